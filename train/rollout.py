"""Generation and verifiable rewards shared by the post-training stages (DPO eval, PPO, GRPO).

    fn = load_reward_function("data_pipeline.function_tasks:reward")   # (prompts, completions) -> scores
    with gathered(engine) as model:                                      # ZeRO-3: weights once per batch
        responses = generate(model, prompt_ids, 64, eot, pad_id, temperature=0.0)
    rate = success_rate(engine, tok, prompts, prompt_ids, fn, 64)       # mean score on held-out prompts

A reward function takes the prompt texts and the completion texts (decoded up to the
end-of-turn token, which is not included) and returns one finite float per row; one that
raises, returns the wrong count or a non-finite value stops the stage with one line
naming it.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from train.chat_data import generation_prompt, read_rows
from train.engine import all_reduce_sum, device_of, to_device
from train.errors import ZeroLLMError
from train.losses import token_logprobs

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def load_reward_function(spec: str) -> RewardFn:
    """`module:function` -> the function; one line when it cannot be imported."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ZeroLLMError(
            f"reward function {spec!r}: expected module:function, e.g. data_pipeline.function_tasks:reward"
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ZeroLLMError(f"reward function {spec}: cannot import it ({e})") from None
    if not callable(fn):
        raise ZeroLLMError(f"reward function {spec}: {name} is not callable")
    fn.spec = spec  # type: ignore[attr-defined]  (named in errors)
    return fn


def call_reward(fn: RewardFn, prompts: list[str], completions: list[str]) -> list[float]:
    """fn(prompts, completions) checked: one finite float per row, else one clear line."""
    name = getattr(fn, "spec", getattr(fn, "__name__", repr(fn)))
    try:
        scores = [float(s) for s in fn(prompts, completions)]
    except Exception as e:  # noqa: BLE001 (any failure of user code is reported, with its type)
        raise ZeroLLMError(f"reward function {name} raised {type(e).__name__}: {e}") from None
    if len(scores) != len(prompts):
        raise ZeroLLMError(f"reward function {name} returned {len(scores)} scores for {len(prompts)} completions")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ZeroLLMError(f"reward function {name} returned a non-finite score ({scores[bad[0]]}) for row {bad[0]}")
    return scores


@contextlib.contextmanager
def gathered(engine):
    """The model to generate with: `engine.module`, or under ZeRO-3 a plain replica of it.

    A ZeRO-3 module fetches its weights through DeepSpeed's hooks at every forward, i.e. for
    every generated token, and even with the weights held gathered the hooks' bookkeeping at
    each of those forwards made generation 6x slower than a plain module (2 CPU ranks,
    benchmarks/bench_zero3_generate.py). So the weights are all-gathered once, copied into a
    hook-free module of the same class, dtype and device, and released again; the replica
    (one full copy of the weights, for the rollout) generates. Collective under ZeRO-3:
    every rank enters together.
    """
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        yield module
        return
    import deepspeed

    params = dict(module.named_parameters())
    dtype = next(iter(params.values())).dtype
    with torch.device("meta"):
        replica = type(module)(module.cfg).to(dtype)
    tied: dict[int, list[str]] = {}  # to_empty() unties shared parameters (a tied LM head): re-tie them
    for name, p in replica.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    replica.to_empty(device=device_of(engine))
    for first, *others in tied.values():
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(replica.get_submodule(owner), attr, replica.get_parameter(first))
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in replica.named_parameters():
            p.data.copy_(params[name].data)
    for name, b in module.named_buffers():  # buffers are never partitioned
        replica.get_buffer(name).copy_(b)
    yield replica.eval()


class StopBetweenRollouts:
    """The stop flag the loop reads (train.run.GracefulStop's `requested`), raised only at a
    rollout boundary, before that rollout is made, when any rank got a signal. A checkpoint
    inside a rollout would resume by regenerating it from weights its updates had changed;
    one after making it would hold the RNG (and PPO's KL coefficient) the rollout had advanced.
    A stage whose next_batches returns [] when `agree()` is True at a boundary gets that
    boundary saved and exit 75 from the loop (GRPO, PPO)."""

    def __init__(self, signals):
        self.signals, self.requested = signals, False

    def agree(self) -> bool:
        """Called by every rank at each rollout boundary: True (here and as `requested`)
        when any rank has been signalled."""
        (votes,) = all_reduce_sum([float(self.signals.requested)])
        self.requested = votes > 0
        return self.requested


class IterationTimes:
    """Wall time of a whole iteration (making a rollout, then its updates) and the share of it
    spent generating. An iteration's time is known when the next rollout starts, so each
    rollout's stats carry the previous iteration's (`last_iteration_s`, `last_gen_share`;
    absent for the first rollout of a process)."""

    def __init__(self):
        self.prev: tuple[int, float, float] | None = None  # (rollout, start time, generation seconds)

    def made(self, r: int, started: float, gen_s: float) -> dict[str, float]:
        """Rollout r, begun at `started` (time.time()), generated for gen_s seconds."""
        out = {}
        if self.prev is not None and self.prev[0] == r - 1:
            it = max(started - self.prev[1], 1e-9)
            out = {"last_iteration_s": it, "last_gen_share": self.prev[2] / it}
        self.prev = (r, started, gen_s)
        return out


def mean_over_ranks(stats: dict[str, float], keys: list[str], world: int) -> dict[str, float]:
    """The rank mean of each of `keys` in this rank's rollout `stats` (0 where absent), and of
    the iteration timings (IterationTimes) when the rollout has them (every rank's has, or
    none's: they follow the rollout number). Collective: every rank calls it."""
    keys = keys + [k for k in ("last_iteration_s", "last_gen_share") if k in stats]
    return {k: v / world for k, v in zip(keys, all_reduce_sum([stats.get(k, 0.0) for k in keys]))}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (B, T) ids left-padded with pad_id and their 0/1 attention mask."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eot: int,
    pad_id: int,
    temperature: float = 0.0,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Each prompt's response ids, up to and including `eot` when it ended (KV cache, batched)."""
    ids, mask = left_pad(prompts, pad_id)
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, eos_token_id=eot,
                         attention_mask=mask, generator=generator)  # fmt: skip
    responses = []
    for row in out[:, ids.size(1) :].tolist():
        responses.append(row[: row.index(eot) + 1] if eot in row else row)
    return responses


def completion_text(tok, response: list[int], eot: int) -> str:
    """Decoded response without its end-of-turn token."""
    return tok.decode(response[:-1] if response and response[-1] == eot else response)


def success_rate(
    engine, tok, prompts: list[str], prompt_ids: list[list[int]], fn: RewardFn, max_new_tokens: int,
    eot: int, batch_size: int = 16,
) -> float:  # fmt: skip
    """Mean verifiable reward of greedy completions of `prompts` (every rank runs the same
    prompts: under ZeRO-3 generation is collective)."""
    was_training = engine.training
    engine.eval()
    scores = []
    try:
        with gathered(engine) as model:
            for i in range(0, len(prompts), batch_size):
                resp = generate(model, prompt_ids[i : i + batch_size], max_new_tokens, eot, tok.pad_token_id)
                texts = [completion_text(tok, r, eot) for r in resp]
                scores += call_reward(fn, prompts[i : i + batch_size], texts)
    finally:
        engine.train(was_training)
    return sum(scores) / max(1, len(scores))


def sequences(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """prompt + answer rows, prompts left-aligned to one column (as generated):
    x / targets (B, T-1), doc_ids (-1 on the left padding: never attended, positions start
    at the first real token, as in generation), mask (B, T-1) on the answer's targets."""
    P = max(len(p) for p in prompts)
    A = max(1, max(len(a) for a in answers))
    full = torch.full((len(prompts), P + A), pad_id, dtype=torch.long)
    doc = torch.full_like(full, -1)
    mask = torch.zeros_like(full, dtype=torch.bool)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        full[b, P - len(p) : P] = torch.tensor(p)
        full[b, P : P + len(a)] = torch.tensor(a, dtype=torch.long)
        doc[b, P - len(p) :] = 0
        mask[b, P : P + len(a)] = True
    return {"x": full[:, :-1], "y": full[:, 1:], "doc_ids": doc[:, :-1], "mask": mask[:, 1:]}


def answer_logps(engine, batch: dict[str, torch.Tensor], temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) log-probs of the answer tokens (row-major) at `temperature`, and their logits (n, V),
    on the engine's device."""
    batch = to_device(batch, engine)
    logits, _ = engine(batch["x"], doc_ids=batch["doc_ids"], logits_where=batch["mask"])
    return token_logprobs(logits[None], batch["y"][batch["mask"]][None], temperature)[0], logits


# ----------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    text: str  # what the reward function sees
    ids: list[int]  # chat turns + the assistant header
    messages: list[dict[str, str]]  # the chat turns (a reward model re-encodes them as it was trained)


def load_prompts(path: str, tok, max_len: int) -> list[Prompt]:
    out = []
    for n, row in enumerate(read_rows(path), 1):
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            msgs = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("messages"), list) and row["messages"]:
            msgs = row["messages"]
        else:
            raise ZeroLLMError(f"{path}: row {n}: prompt: expected a non-empty 'prompt' text or 'messages' list")
        ids = generation_prompt(tok, [*msgs, {"role": "assistant", "content": "x"}])
        out.append(Prompt(msgs[-1]["content"], ids[-max_len:], msgs))
    if not out:
        raise ZeroLLMError(f"{path}: no prompt rows")
    return out


def find_tokenizer(tokenizer: str, init_from: str, key: str) -> str:
    """The tokenizer dir a stage uses: `tokenizer` when given, else the one beside the
    starting model (an HF dir's tokenizer.json, or a ZeroLLM run's data.tokenizer)."""
    from train.config import read_yaml

    if tokenizer:
        return tokenizer
    src = Path(init_from)
    if (src / "tokenizer.json").is_file():
        return str(src)
    if (src / "config.yaml").is_file():
        tok = (read_yaml(src / "config.yaml").get("data") or {}).get("tokenizer")
        if tok:
            return tok
    raise ZeroLLMError(f"{key}: {src} holds no tokenizer.json; name the tokenizer dir in {key}")
