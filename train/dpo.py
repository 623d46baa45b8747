"""Direct preference optimisation: the policy learns from preference pairs, no reward model.

One node (2 CPU ranks or N GPUs):
    deepspeed --num_gpus 2 --master_addr 127.0.0.1 -m train.dpo \
        --config configs/demo_dpo.yaml --deepspeed_config ds_configs/zero2.json
    zerollm dpo --config configs/demo_dpo.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2

The loss of a pair (Rafailov et al. 2023) is train.losses.dpo_loss on the summed log-probs
of its response tokens under the policy (pi) and the reference (ref):
-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))), or the conservative / IPO variants
(`dpo.loss`). Optionally + nll_weight x the chosen answer's mean token NLL (RPO, Pang et
al. 2024): plain DPO only widens the gap, and can lower both answers' likelihood until
greedy answers leave the format (measured on a parity task: preference accuracy 0.98
while the success rate fell 0.39 -> 0.33). A pair is the prompt's chat turns + the
chosen (or rejected) answer as the last assistant turn, token-exact as in SFT (train/chat_data.py): only that answer's
tokens and its end-of-turn token count; prompt rows are those of train/preference_data.py
(prompt/chosen/rejected, messages, hh-rlhf dialogues, whose earlier turns become chat
turns). Over-long pairs keep the answer and lose the oldest prompt turns first (counted).

The reference is the starting policy itself unless `dpo.reference` names another model:
its log-probs of every training and held-out answer are computed once, before the first
step, with the policy's own weights as given (no second copy in memory, and no re-load of
the policy from its path, so a policy is its own reference exactly: the step-0 loss is
ln 2). They are cached in `<run_dir>/reference_logps.pt` under a fingerprint of the data,
the tokenizer and the reference's weights; a resume uses the cache, and a changed
fingerprint recomputes it from the reference (loaded as a frozen engine).

Held-out metrics at each eval: preference accuracy (the implicit reward
beta (pi - ref) of the chosen answer above the rejected one; a tie counts half, so the
policy as loaded scores 0.5), mean margin, the drift of
chosen and rejected log-probs from the reference, eval loss; with `dpo.eval_reward`
(module:function), the mean verifiable reward of greedy answers to `dpo.eval_prompts`
held-out prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.sampler import DistributedSampler
from train import rollout, run
from train.chat_data import (
    Sample,
    ShuffledRows,
    collate,
    encode_turns,
    end_of_turn_id,
    fit_turns,
    generation_prompt,
    load_chat_tokenizer,
)
from train.config import RunConfig, check_record_file
from train.engine import all_reduce_sum, build_frozen_engine, open_initial_weights, to_device, zero_stage
from train.errors import ZeroLLMError
from train.loop import Stage
from train.losses import IGNORE_INDEX, dpo_loss, token_logprobs
from train.model import CustomLanguageModel
from train.preference_data import BadRow, read_records, row_parts

log = logging.getLogger("zerollm")

LOSSES = ("sigmoid", "conservative", "ipo")


@dataclass
class DPOConfig:
    train_file: str = ""  # preference rows: jsonl(.gz) / parquet / HF dataset dir
    valid_file: str = ""  # held-out rows; "" = split valid_fraction off train_file
    valid_fraction: float = 0.1  # share of train_file's rows held out (seeded by data.seed) when no valid_file
    init_from: str = ""  # the policy to start from: HF model dir or ZeroLLM run dir (usually the SFT model)
    reference: str = ""  # the frozen reference; "" = init_from as loaded (the usual choice)
    tokenizer: str = ""  # HF tokenizer dir with a chat template; "" = init_from's own or its run's
    max_len: int = 512  # tokens per sequence (prompt + answer + end of turn)
    beta: float = 0.1  # strength of the implicit KL to the reference
    loss: str = "sigmoid"  # sigmoid | conservative | ipo
    label_smoothing: float = 0.0  # conservative DPO: probability that a label is flipped
    nll_weight: float = 0.0  # + this x the chosen answer's mean token NLL (RPO); 0 = plain DPO
    eval_reward: str = ""  # module:function verifiable reward for held-out greedy answers ("" = none)
    eval_prompts: int = 32  # held-out prompts answered at each eval (with eval_reward)
    max_new_tokens: int = 64  # answer length of those

    RANGES = {"valid_fraction": (0, 0.9), "max_len": (2, None), "beta": (1e-6, None), "label_smoothing": (0, 0.5),
              "nll_weight": (0, None), "eval_prompts": (0, None), "max_new_tokens": (1, None)}  # fmt: skip


CONFIG_SECTIONS = {"dpo": DPOConfig}


def preflight(cfg: RunConfig) -> None:
    """What `zerollm launch` checks on this node before any rank starts."""
    d = cfg.dpo
    if d.loss not in LOSSES:
        raise ZeroLLMError(f"{cfg.path}: dpo.loss: {d.loss!r} is not one of {', '.join(LOSSES)}")
    for key in ("init_from", "reference"):
        path = getattr(d, key)
        if key == "init_from" and not path:
            raise ZeroLLMError(f"{cfg.path}: dpo.init_from: no starting policy given (HF dir or ZeroLLM run dir)")
        if path and not Path(path).is_dir():
            raise ZeroLLMError(f"{cfg.path}: dpo.{key}: {path} not found")
    if not d.train_file:
        raise ZeroLLMError(f"{cfg.path}: dpo.train_file: no preference data given")
    for key in ("train_file", "valid_file"):
        if getattr(d, key):
            check_record_file(getattr(d, key), f"{cfg.path}: dpo.{key}")
    if d.eval_reward:
        rollout.load_reward_function(d.eval_reward)


# ----------------------------------------------------------------------------- data


@dataclass
class PrefPair:
    chosen: Sample  # prompt turns + chosen answer; mask on the answer and its end of turn
    rejected: Sample
    prompt_text: str  # what a verifiable reward sees as the prompt
    prompt_ids: list[int]  # the prompt turns + assistant header (generation)


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A preference row's prompt as chat turns: messages as they are, an hh-rlhf prefix
    ("\\n\\nHuman: ..\\n\\nAssistant: ..\\n\\nAssistant:") turn by turn, other text as one user turn."""
    if isinstance(prompt, list):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    if prompt.startswith("\n\nHuman:"):
        parts = re.split(r"\n\n(Human|Assistant):", prompt)[1:]  # role, text, role, text, ...
        msgs = [{"role": "user" if r == "Human" else "assistant", "content": t.strip()}
                for r, t in zip(parts[::2], parts[1::2])]  # fmt: skip
        return [m for m in msgs if m["content"]]  # the final "Assistant:" opens the answer
    return [{"role": "user", "content": prompt}]


def answer_sample(tok, msgs: list[dict[str, str]], answer: str, max_len: int, counts: Counter) -> Sample:
    turns = encode_turns(tok, [*msgs, {"role": "assistant", "content": answer}])
    for t in turns[:-1]:  # earlier assistant turns of a dialogue are prompt here
        t.mask = [False] * len(t.ids)
    return fit_turns(turns, max_len + 1, counts)


def build_pairs(rows: list[dict[str, Any]], tok, max_len: int, where: str) -> tuple[list[PrefPair], dict[str, Any]]:
    """Rows -> token-exact pairs; each row kept or counted by reason; no usable row: one line."""
    pairs, dropped, over = [], Counter(), Counter()
    for row in rows:
        try:
            prompt, chosen, rejected = row_parts(row)
            msgs = prompt_messages(prompt)
            if not msgs or any(m["role"] not in ("system", "user", "assistant") for m in msgs):
                raise BadRow("bad_prompt")
            c = answer_sample(tok, msgs, chosen.strip(), max_len, over)
            r = answer_sample(tok, msgs, rejected.strip(), max_len, over)
        except BadRow as e:
            dropped[e.args[0]] += 1
            continue
        text = prompt if isinstance(prompt, str) else msgs[-1]["content"]
        gen = generation_prompt(tok, [*msgs, {"role": "assistant", "content": "x"}])[-max_len:]
        pairs.append(PrefPair(c, r, text, gen))
    if not pairs:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "no rows"
        raise ZeroLLMError(f"{where}: no usable preference pair in {len(rows)} rows ({reasons})")
    report = {"file": where, "rows": len(rows), "kept": len(pairs), "dropped": dict(dropped), "over_long": dict(over)}
    return pairs, report


@dataclass
class Data:
    tok: Any
    train: list[PrefPair]
    valid: list[PrefPair]
    report: dict[str, Any]
    fingerprint: str
    tokenizer_hash: str


def build_data(cfg: RunConfig, rank: int) -> Data:
    from data_pipeline.tokenizer import tokenizer_hash

    d = cfg.dpo
    tdir = rollout.find_tokenizer(d.tokenizer, d.init_from, "dpo.tokenizer")
    tok = load_chat_tokenizer(tdir)
    if len(tok) > cfg.model.vocab_size:
        raise ZeroLLMError(f"{tdir}: {len(tok)} tokens, more than the policy's vocab_size {cfg.model.vocab_size}")
    rows = read_records(d.train_file)
    if d.valid_file:
        train_rows, valid_rows = rows, read_records(d.valid_file)
    else:
        order = np.random.default_rng(cfg.data.seed).permutation(len(rows))
        n_valid = int(round(len(rows) * d.valid_fraction))
        valid_rows = [rows[i] for i in sorted(order[:n_valid])]
        train_rows = [rows[i] for i in sorted(order[n_valid:])]
    train, rep_t = build_pairs(train_rows, tok, d.max_len, d.train_file)
    valid, rep_v = build_pairs(valid_rows, tok, d.max_len, d.valid_file or f"{d.train_file} (held out)") if valid_rows \
        else ([], None)  # fmt: skip
    h = hashlib.sha256(str(cfg.data.seed).encode())
    for p in train + valid:
        for s in (p.chosen, p.rejected):
            h.update(np.asarray(s.ids, dtype=np.int64).tobytes() + bytes(s.mask))
    report = {"train": rep_t, "valid": rep_v}
    if rank == 0:
        for name, rep in report.items():
            if rep:
                log.info("dpo data %s: %d of %d rows kept; dropped %s; over-long %s", name, rep["kept"], rep["rows"],
                         rep["dropped"] or "none", rep["over_long"] or "none")  # fmt: skip
        run_dir = Path(cfg.logging.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "dpo_data.json").write_text(json.dumps(report, indent=1))
    return Data(tok, train, valid, report, h.hexdigest()[:16], tokenizer_hash(tdir))


# ----------------------------------------------------------------------------- log-probs


def pair_batch(pairs: list[PrefPair], pad_id: int) -> dict[str, torch.Tensor]:
    """2B rows (B chosen, then B rejected), right-padded, targets IGNORE_INDEX off the answers."""
    return collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], pad_id)


def sequence_logps(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) summed log-probs of the answer tokens, fp32 (the head runs on answer positions only)."""
    y = batch["y"]  # (2B, T)
    valid = y != IGNORE_INDEX  # (2B, T)
    logits, _ = engine(batch["x"], logits_where=valid)  # (n, V)
    logp = token_logprobs(logits[None], y[valid][None])[0]  # (n,)
    rows = valid.nonzero()[:, 0]  # (n,) the row of each answer token
    return torch.zeros(y.size(0), dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


def shard(n: int, rank: int, world: int) -> tuple[list[int], list[bool]]:
    """This rank's indices of 0..n-1, padded with index 0 to the same count on every rank
    (ZeRO-3 ranks must run the same number of forwards), and which are real."""
    mine, need = list(range(rank, n, world)), -(-n // world)
    return mine + [0] * (need - len(mine)), [True] * len(mine) + [False] * (need - len(mine))


def all_logps(engine, pairs: list[PrefPair], mb: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed answer log-probs of every pair, (N,) each, on every rank:
    each rank computes its shard, one all-reduce assembles them."""
    rank, world = engine.global_rank, engine.world_size
    idx, real = shard(len(pairs), rank, world)
    by_length = sorted(
        range(len(idx)), key=lambda k: -max(len(pairs[idx[k]].chosen.ids), len(pairs[idx[k]].rejected.ids))
    )
    idx, real = [idx[k] for k in by_length], [real[k] for k in by_length]  # little padding per batch
    out = torch.zeros(2, len(pairs), dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        for k in range(0, len(idx), mb):
            chunk = idx[k : k + mb]
            lp = sequence_logps(engine, to_device(pair_batch([pairs[i] for i in chunk], pad_id), engine)).double().cpu()
            B = len(chunk)
            for j, i in enumerate(chunk):
                if real[k + j]:
                    out[0, i], out[1, i] = lp[j], lp[B + j]
    engine.train(was_training)
    flat = all_reduce_sum(out.reshape(-1).tolist())
    full = torch.tensor(flat, dtype=torch.float64).view(2, len(pairs))
    return full[0], full[1]


def reference_fingerprint(d: DPOConfig, data: Data, source) -> str:
    """Data, tokenizer and the reference's weights (files, sizes, mtimes) as one hash."""
    files = sorted(
        p for p in Path(source.path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt", ".bin")
    )
    key = [data.fingerprint, data.tokenizer_hash, str(Path(source.path).resolve()), source.describe(),
           [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]  # fmt: skip
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def reference_logps(r, engine, data: Data, ref_source, fresh: bool) -> dict[str, torch.Tensor]:
    """The reference's log-probs of every answer: from the cache when its fingerprint matches,
    else computed (with the policy's own weights on a fresh run whose reference is the policy,
    or from the reference loaded as a frozen engine), then cached (rank 0 writes)."""
    cfg = r.cfg
    path = Path(cfg.logging.run_dir) / "reference_logps.pt"
    fp = reference_fingerprint(cfg.dpo, data, ref_source)
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("fingerprint") == fp:
            log.info("reference log-probs: %s (fingerprint %s)", path, fp)
            return cached
        log.warning("%s: the data, tokenizer or reference changed (fingerprint); recomputing", path)
    mb, pad = cfg.train.micro_batch_size, data.tok.pad_token_id
    t0 = time.time()
    if fresh and not cfg.dpo.reference:
        model_engine = engine  # the policy as loaded, before any step: exactly the reference
    else:
        model_engine = build_frozen_engine(lambda: CustomLanguageModel(ref_source.config), r.ds, init_from=ref_source)
    out = {"fingerprint": fp}
    for name, pairs in (("train", data.train), ("valid", data.valid)):
        c, rej = all_logps(model_engine, pairs, mb, pad) if pairs else (torch.zeros(0), torch.zeros(0))
        out[f"{name}_chosen"], out[f"{name}_rejected"] = c, rej
    if r.rank == 0:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(out, tmp)
        tmp.replace(path)
    log.info("reference log-probs of %d + %d pairs computed in %.1f s (%s)", len(data.train), len(data.valid),
             time.time() - t0, "the starting policy" if model_engine is engine else ref_source.path)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- steps


def evaluate(engine, cfg: RunConfig, data: Data, ref: dict[str, torch.Tensor], reward_fn) -> dict[str, float]:
    d = cfg.dpo
    out: dict[str, float] = {}
    if data.valid:
        pc, pr = all_logps(engine, data.valid, cfg.train.micro_batch_size, data.tok.pad_token_id)
        rc, rr = ref["valid_chosen"], ref["valid_rejected"]
        loss, stats = dpo_loss(pc, pr, rc, rr, d.beta, d.loss, d.label_smoothing)
        margin = stats["chosen_reward"] - stats["rejected_reward"]
        n = len(data.valid)
        wins = (margin > 0).double() + 0.5 * (margin == 0).double()  # a tie counts half
        out = {"eval_loss": float(loss) / n, "eval_accuracy": float(wins.mean()),
               "eval_margin": float(margin.mean()), "eval_chosen_drift": float((pc - rc).mean()),
               "eval_rejected_drift": float((pr - rr).mean())}  # fmt: skip
    if reward_fn is not None and data.valid and d.eval_prompts:
        held = data.valid[: d.eval_prompts]
        out["eval_success"] = rollout.success_rate(
            engine, data.tok, [p.prompt_text for p in held], [p.prompt_ids for p in held], reward_fn,
            d.max_new_tokens, end_of_turn_id(data.tok),
        )  # fmt: skip
    return out


def make_stage(engine, cfg: RunConfig, data: Data, ref, state: dict[str, Any], reward_fn) -> Stage:
    t, d = cfg.train, cfg.dpo
    rank, world = engine.global_rank, engine.world_size
    gas, mb = t.grad_accum_steps, t.micro_batch_size
    order = ShuffledRows(list(range(len(data.train))), cfg.data.seed)  # global sample number -> pair index
    sampler = iter(DistributedSampler(t.max_steps * mb * gas * world, rank, world, mb,
                                      consumed_samples=state["consumed_samples"]))  # fmt: skip

    def next_batches():
        out = []
        for _ in range(gas):
            idx = torch.tensor([order[g] for g in next(sampler)])
            out.append({**pair_batch([data.train[i] for i in idx], data.tok.pad_token_id), "idx": idx})
        return out

    def loss(engine, batch):
        lp = sequence_logps(engine, batch)  # (2B,)
        B = lp.size(0) // 2
        idx = batch["idx"]
        ref_c, ref_r = (ref[k][idx.cpu()].to(lp) for k in ("train_chosen", "train_rejected"))  # cached on the CPU
        value, _ = dpo_loss(lp[:B], lp[B:], ref_c, ref_r, d.beta, d.loss, d.label_smoothing)
        if d.nll_weight:
            n_tokens = (batch["y"][:B] != IGNORE_INDEX).sum(1).clamp(min=1)  # (B,) chosen answer tokens
            value = value + d.nll_weight * (-lp[:B] / n_tokens).sum()
        return value

    return Stage(
        name="dpo",
        next_batches=next_batches,
        count=lambda b: int(b["idx"].numel()),  # pairs
        loss=loss,
        samples_per_step=mb * gas * world,
        evaluate=(lambda: evaluate(engine, cfg, data, ref, reward_fn)) if t.eval_interval else None,
        unit="pairs",
    )


# ----------------------------------------------------------------------------- main

RESUME_CHECKS = {
    "data_fingerprint": "data (dpo.train_file/valid_file/valid_fraction/max_len, data.seed)",
    "model": "model shape (dpo.init_from)",
    "tokenizer_hash": "tokenizer",
}
OVERRIDABLE_MODEL_FIELDS = {"dropout", "activation_checkpointing"}


def stage_run(args) -> int:
    from train.sft import model_overrides

    r = run.start(args, CONFIG_SECTIONS)
    cfg = r.cfg
    preflight(cfg)
    source = open_initial_weights(cfg.dpo.init_from, model_overrides(cfg, args.set))
    run.adopt_model(r, source, args.deepspeed_config)
    ref_source = open_initial_weights(cfg.dpo.reference, {"dropout": 0.0}) if cfg.dpo.reference else source
    if ref_source.config.padded_vocab_size != source.config.padded_vocab_size:
        raise ZeroLLMError(f"{cfg.path}: dpo.reference: its vocabulary ({ref_source.config.vocab_size}) differs "
                           f"from the policy's ({source.config.vocab_size})")  # fmt: skip
    data = build_data(cfg, r.rank)
    reward_fn = rollout.load_reward_function(cfg.dpo.eval_reward) if cfg.dpo.eval_reward else None
    engine = run.build(r, lambda: CustomLanguageModel(source.config), init_from=source)
    shape = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in OVERRIDABLE_MODEL_FIELDS | {"init_std"}}
    state = {"step": 0, "consumed_samples": 0, "data_fingerprint": data.fingerprint, "model": shape,
             "config_hash": cfg.hash(), "tokenizer_hash": data.tokenizer_hash, "skipped_steps": 0}  # fmt: skip
    fresh_state = dict(state)
    ckpt, state, resumed = run.resume(
        r, engine, state, lambda saved, where: run.refuse_another_run(saved, fresh_state, where, RESUME_CHECKS)
    )
    ref = reference_logps(r, engine, data, ref_source, fresh=resumed is None)
    run.write_snapshot(r)
    if r.rank == 0:
        n = engine.module.num_parameters()
        log.info("policy: %s parameters; world size %d; ZeRO stage %s; beta %g, loss %s, nll_weight %g",
                 f"{n:,}", r.world, zero_stage(r.ds), cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.nll_weight)  # fmt: skip
    return run.loop(r, engine, make_stage(engine, cfg, data, ref, state, reward_fn), ckpt, state, resumed)


def main(argv: list[str] | None = None) -> None:
    run.main(stage_run, argv, prog="train.dpo", doc=__doc__)


if __name__ == "__main__":
    main()
