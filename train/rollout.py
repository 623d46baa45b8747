"""Generation and verifiable rewards shared by the post-training stages (DPO eval, PPO, GRPO).

    fn = load_reward_function("data_pipeline.function_tasks:reward")   # (prompts, completions) -> scores
    with gathered(engine):                                               # ZeRO-3: weights once per batch
        responses = generate(engine.module, prompt_ids, 64, eot, pad_id, temperature=0.0)
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

import torch

from train.errors import ZeroLLMError

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
    """Under ZeRO-3 every weight is gathered once for the whole block (one all-gather per
    rollout batch, not one per layer per generated token); otherwise nothing to do."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        yield


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
        with gathered(engine):
            for i in range(0, len(prompts), batch_size):
                resp = generate(engine.module, prompt_ids[i : i + batch_size], max_new_tokens, eot, tok.pad_token_id)
                texts = [completion_text(tok, r, eot) for r in resp]
                scores += call_reward(fn, prompts[i : i + batch_size], texts)
    finally:
        engine.train(was_training)
    return sum(scores) / max(1, len(scores))
