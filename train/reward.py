"""Reward model: our LM with a scalar head, trained on preference pairs (Bradley-Terry).

One node (2 CPU ranks or N GPUs):
    deepspeed --num_gpus 2 --master_addr 127.0.0.1 -m train.reward \
        --config configs/reward_tiny.yaml --deepspeed_config ds_configs/zero2.json
    zerollm launch reward --config RUN.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2

The score of a sequence is a Linear(d_model -> 1) head on the final hidden state of its
last real token, the end-of-text token appended to every sequence (any padding side).
The loss of a pair is -log sigmoid(r_chosen - r_rejected - margin) (Bradley & Terry 1952;
the margin term as in Llama 2, Touvron et al. 2023, eq. 2; 0 without a `margin` column),
summed over pairs; the shared loop divides by the global pair count.

Held-out metrics: accuracy (r_chosen > r_rejected), mean margin, reward mean/std. The
reward mean/std on training pairs are kept in each checkpoint's state (`reward_stats`,
as of the last evaluation) and in `<run_dir>/reward_stats.json` (the final model), so
later stages normalise with them; both record the tokenizer's hash.

Deviation: the LM head is dropped (only the trunk and the scalar head are trained); the
scalar head starts from normal(0, init_std) weights with a zero bias.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train import run
from train.config import RunConfig, check_record_file
from train.engine import all_reduce_sum, open_initial_weights, zero_stage
from train.errors import ZeroLLMError
from train.loop import Stage
from train.losses import bradley_terry_loss, last_token_index
from train.model import CustomLanguageModel, ModelConfig, padding_causal_mask
from train.preference_data import Pair, PairSet, build_pairs, check_tokenizer, collate, read_records

log = logging.getLogger("zerollm")


@dataclass
class RewardConfig:
    train_file: str = ""  # preference rows: jsonl(.gz) / parquet / HF dataset dir
    valid_file: str = ""  # held-out rows; "" = split valid_fraction off train_file
    valid_fraction: float = 0.1  # share of train_file's rows held out (seeded by data.seed) when no valid_file
    init_from: str = ""  # HF model dir or ZeroLLM run dir; "" = random init from the model section
    max_len: int = 256  # tokens per sequence (prompt truncated from the left to fit)
    tokenizer: str = ""  # HF tokenizer dir; "" = data.tokenizer
    stats_pairs: int = 512  # training pairs whose rewards give the saved mean/std

    RANGES = {"valid_fraction": (0, 0.9), "max_len": (2, None), "stats_pairs": (1, None)}


CONFIG_SECTIONS = {"reward": RewardConfig}


# ----------------------------------------------------------------------------- model


class RewardModel(nn.Module):
    """CustomLanguageModel's trunk + a scalar head read at each row's last real token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.lm = CustomLanguageModel(cfg)
        self.lm.lm_head = nn.Identity()  # unused: the score comes from `head` (a tied head lives on in wte)
        self.head = nn.Linear(cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and 0/1 mask -> (B,) fp32 scores."""
        valid = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T) 0 at the first real token
        h = self.lm.hidden_states(input_ids, position_ids, padding_causal_mask(valid))  # (B, T, d)
        last = h[torch.arange(h.size(0), device=h.device), last_token_index(attention_mask)]  # (B, d)
        return self.head(last).squeeze(-1).float()  # (B,)

    def num_parameters(self) -> int:
        return (
            self.lm.num_parameters()
            - (0 if self.cfg.tie_embeddings else self.cfg.padded_vocab_size * self.cfg.d_model)
            + self.cfg.d_model
            + 1
        )


def with_head(source, init_std: float, seed: int):
    """`source` (train.engine.InitialWeights of an LM) as the weights of a RewardModel:
    `lm.<name>` reads the LM's `<name>`; the head is normal(0, init_std) (seeded: the same
    on every rank), its bias 0. Names are what `load_initial_weights` asks for."""
    d = source.config.d_model
    gen = torch.Generator().manual_seed(seed)
    head = {"head.weight": torch.randn(1, d, generator=gen) * init_std, "head.bias": torch.zeros(1)}

    def read(name: str) -> torch.Tensor:
        return head[name] if name in head else source.read(name.removeprefix("lm."))

    def shape(name: str) -> tuple[int, ...]:
        return tuple(head[name].shape) if name in head else source.shape(name.removeprefix("lm."))

    return dataclasses.replace(source, read=read, shape=shape)


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    train: PairSet
    valid: PairSet | None
    pad_id: int
    tokenizer_hash: str
    fingerprint: str


def tokenizer_dir(cfg: RunConfig) -> str:
    tok = cfg.reward.tokenizer or cfg.data.tokenizer
    if not tok:
        raise ZeroLLMError(f"{cfg.path}: reward.tokenizer: no tokenizer given (nor data.tokenizer)")
    return tok


def build_data(cfg: RunConfig, vocab_size: int) -> Data:
    """Train/held-out pairs (seeded split when there is no valid_file), counts logged and saved."""
    import hashlib

    from data_pipeline.tokenizer import load_tokenizer, tokenizer_hash

    rc = cfg.reward
    tok_dir = tokenizer_dir(cfg)
    tok = load_tokenizer(tok_dir)
    check_tokenizer(tok, tok_dir)
    if len(tok) > vocab_size:
        raise ZeroLLMError(f"{tok_dir}: {len(tok)} tokens, more than the model's vocab_size {vocab_size}")
    rows = read_records(rc.train_file)
    if rc.valid_file:
        train_rows, valid_rows = rows, read_records(rc.valid_file)
    else:
        order = np.random.default_rng(cfg.data.seed).permutation(len(rows))
        n_valid = int(round(len(rows) * rc.valid_fraction))
        valid_rows = [rows[i] for i in sorted(order[:n_valid])]
        train_rows = [rows[i] for i in sorted(order[n_valid:])]
    train = build_pairs(train_rows, tok, rc.max_len, rc.train_file)
    valid = (
        build_pairs(valid_rows, tok, rc.max_len, rc.valid_file or f"{rc.train_file} (held out)") if valid_rows else None
    )
    key = json.dumps([rc.train_file, rc.valid_file, rc.valid_fraction, rc.max_len, cfg.data.seed, len(rows)])
    fp = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Data(train, valid, tok.pad_token_id, tokenizer_hash(tok_dir), fp)


def report_data(cfg: RunConfig, data: Data, rank: int) -> None:
    """Rows kept, truncated and dropped by reason: in the log and `<run_dir>/reward_data.json`."""
    if rank != 0:
        return
    report = {"train": data.train.report(), "valid": data.valid.report() if data.valid else None}
    for name, part in report.items():
        if part:
            log.info("reward data %s: %d rows, %d pairs kept, %d prompts truncated from the left, dropped %s",
                     name, part["rows"], part["kept"], part["truncated_prompt"], part["dropped"] or "none")  # fmt: skip
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "reward_data.json").write_text(json.dumps(report, indent=1))


def global_pairs(pairs: list[Pair], start: int, n: int, seed: int) -> list[Pair]:
    """Global sample numbers start..start+n-1 -> pairs: epoch e = g // N is permutation e."""
    N, out = len(pairs), []
    for g in range(start, start + n):
        perm = np.random.default_rng([seed, g // N]).permutation(N)
        out.append(pairs[int(perm[g % N])])
    return out


# ----------------------------------------------------------------------------- steps


def pair_loss(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed Bradley-Terry loss of one micro batch (2B rows: B chosen, then B rejected)."""
    scores = engine(batch["input_ids"], batch["attention_mask"])  # (2B,)
    B = scores.size(0) // 2
    margin = batch["margin"] if batch.get("has_margin") else None
    return bradley_terry_loss(scores[:B], scores[B:], margin)


def scores_of(engine, pairs: list[Pair], mb: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (len(pairs),), in micro batches, without gradients."""
    rc, rr = [], []
    for i in range(0, len(pairs), mb):
        b = collate(pairs[i : i + mb], pad_id)
        s = engine(b["input_ids"], b["attention_mask"]).detach().float()
        rc.append(s[: s.size(0) // 2])
        rr.append(s[s.size(0) // 2 :])
    empty = torch.zeros(0)
    return (torch.cat(rc) if rc else empty), (torch.cat(rr) if rr else empty)


def shard(pairs: list[Pair], rank: int, world: int) -> tuple[list[Pair], torch.Tensor]:
    """This rank's share of `pairs`, padded with repeats to the same length on every rank
    (ZeRO-3 ranks must run the same number of forwards), and its (n,) 0/1 weights."""
    mine, need = pairs[rank::world], -(-len(pairs) // world)
    weights = torch.tensor([1.0] * len(mine) + [0.0] * (need - len(mine)))
    return mine + [pairs[0]] * (need - len(mine)), weights


def evaluate(engine, data: Data, cfg: RunConfig, state: dict[str, Any], rank: int, world: int) -> dict[str, float]:
    """Held-out accuracy, mean margin, reward mean/std (all held-out pairs, sharded over ranks),
    and the training-set reward mean/std kept in `state["reward_stats"]`."""
    mb = cfg.train.micro_batch_size
    engine.eval()
    with torch.no_grad():
        out: dict[str, float] = {}
        if data.valid is not None:
            pairs, w = shard(data.valid.pairs, rank, world)
            rc, rr = scores_of(engine, pairs, mb, data.pad_id)
            lp = -F.logsigmoid(rc - rr)  # (n,) per-pair loss
            n, correct, marg, s, s2, loss = all_reduce_sum([
                float(w.sum()), float((w * (rc > rr)).sum()), float((w * (rc - rr)).sum()),
                float((w * (rc + rr)).sum()), float((w * (rc**2 + rr**2)).sum()), float((w * lp).sum()),
            ])  # fmt: skip
            mean, n = s / max(2 * n, 1), max(n, 1)
            std = math.sqrt(max(s2 / (2 * n) - mean**2, 0.0))
            out = {"eval_accuracy": correct / n, "eval_margin": marg / n, "eval_loss": loss / n,
                   "eval_reward_mean": mean, "eval_reward_std": std}  # fmt: skip
        k = min(cfg.reward.stats_pairs, len(data.train.pairs))
        pairs, w = shard(data.train.pairs[:k], rank, world)
        rc, rr = scores_of(engine, pairs, mb, data.pad_id)
        n, s, s2 = all_reduce_sum(
            [2 * float(w.sum()), float((w * (rc + rr)).sum()), float((w * (rc**2 + rr**2)).sum())]
        )
    engine.train()
    mean = s / max(n, 1)
    stats = {"mean": mean, "std": math.sqrt(max(s2 / max(n, 1) - mean**2, 0.0)), "n_rewards": int(n),
             "step": state["step"], "tokenizer_hash": data.tokenizer_hash}  # fmt: skip
    state["reward_stats"] = stats
    if rank == 0:
        path = Path(cfg.logging.run_dir) / "reward_stats.json"
        path.write_text(json.dumps(stats, indent=1))
    return {**out, "train_reward_mean": stats["mean"], "train_reward_std": stats["std"]}


def make_stage(engine, cfg: RunConfig, data: Data, state: dict[str, Any]) -> Stage:
    t = cfg.train
    rank, world = engine.global_rank, engine.world_size
    gas, mb = t.grad_accum_steps, t.micro_batch_size
    has_margin = any(p.margin is not None for p in data.train.pairs)

    def next_batches() -> list[dict[str, torch.Tensor]]:
        base = state["consumed_samples"]
        out = []
        for k in range(gas):
            pairs = global_pairs(data.train.pairs, base + (k * world + rank) * mb, mb, cfg.data.seed)
            out.append({**collate(pairs, data.pad_id), "has_margin": has_margin})
        return out

    return Stage(
        name="reward",
        next_batches=next_batches,
        count=lambda b: int(b["margin"].numel()),  # pairs
        loss=pair_loss,
        samples_per_step=mb * gas * world,
        evaluate=lambda: evaluate(engine, data, cfg, state, rank, world),
        unit="pairs",
    )


# ----------------------------------------------------------------------------- main


def preflight(cfg: RunConfig) -> None:
    """What `zerollm launch` checks on this node before any rank starts."""
    rc = cfg.reward
    if not rc.train_file:
        raise ZeroLLMError(f"{cfg.path}: reward.train_file: no preference data given")
    for key in ("train_file", "valid_file"):
        path = getattr(rc, key)
        if path:
            check_record_file(path, f"{cfg.path}: reward.{key}")
    tok = Path(tokenizer_dir(cfg))
    if not tok.is_dir():
        raise ZeroLLMError(f"{cfg.path}: reward.tokenizer: directory {tok} not found")


# What a resume must find unchanged, as the user would name it.
RESUME_CHECKS = {
    "data_fingerprint": "data (reward.train_file/valid_file/valid_fraction/max_len, data.seed)",
    "model": "model shape",
    "tokenizer_hash": "tokenizer",
}


def stage_run(args) -> int:
    r = run.start(args, CONFIG_SECTIONS)
    cfg = r.cfg
    preflight(cfg)
    source = None
    model_cfg = cfg.model
    if cfg.reward.init_from:
        overrides = {"dropout": cfg.model.dropout, "activation_checkpointing": cfg.model.activation_checkpointing}
        source = open_initial_weights(cfg.reward.init_from, overrides)
        model_cfg = source.config
    if cfg.reward.max_len > model_cfg.max_seq_len and model_cfg.pos_emb == "learned":
        raise ZeroLLMError(
            f"{cfg.path}: reward.max_len: {cfg.reward.max_len} > the model's max_seq_len {model_cfg.max_seq_len}"
        )
    data = build_data(cfg, model_cfg.vocab_size)
    report_data(cfg, data, r.rank)
    init = with_head(source, model_cfg.init_std, cfg.train.seed) if source is not None else None
    engine = run.build(r, lambda: RewardModel(model_cfg), init_from=init)
    state = {
        "step": 0,
        "consumed_samples": 0,
        "data_fingerprint": data.fingerprint,
        "model": dataclasses.asdict(model_cfg) | {"dropout": None, "activation_checkpointing": None},
        "config_hash": cfg.hash(),
        "tokenizer_hash": data.tokenizer_hash,
        "skipped_steps": 0,
        "reward_stats": None,
    }
    ckpt, state, resumed = run.resume(
        r, engine, state, lambda saved, where: run.refuse_another_run(saved, state, where, RESUME_CHECKS)
    )
    run.write_snapshot(r)
    if r.rank == 0:
        log.info("reward model: %s parameters; world size %d; ZeRO stage %s",
                 f"{engine.module.num_parameters():,}", r.world, zero_stage(r.ds))  # fmt: skip
    code = run.loop(r, engine, make_stage(engine, cfg, data, state), ckpt, state, resumed)
    if code == 0 and (state.get("reward_stats") or {}).get("step") != state["step"]:
        evaluate(engine, data, cfg, state, r.rank, r.world)  # reward_stats.json of the final model
    return code


def main(argv: list[str] | None = None) -> None:
    run.main(stage_run, argv, prog="train.reward", doc=__doc__)


if __name__ == "__main__":
    main()
