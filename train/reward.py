"""Reward model: our LM with a scalar head, trained on preference pairs (Bradley-Terry).

One node (2 CPU ranks or N GPUs):
    deepspeed --num_gpus 2 --master_addr 127.0.0.1 -m train.reward \
        --config configs/reward_tiny.yaml --deepspeed_config ds_configs/zero2.json
    zerollm launch reward --config RUN.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2

The score of a sequence is a bias-free Linear(d_model -> 1) head (as HF's `score` layer;
the loss only sees score differences, so a bias would never get a gradient) on the final
hidden state of its last real token, the end-of-text token appended to every sequence (any
padding side).
The loss of a pair is -log sigmoid(r_chosen - r_rejected - margin) (Bradley & Terry 1952;
the margin term as in Llama 2, Touvron et al. 2023, eq. 2; 0 without a `margin` column),
summed over pairs; the shared loop divides by the global pair count.

A pair's common prefix (its prompt) goes through the model once: the row holds
[prefix][chosen's rest][rejected's rest] with positions and a "tree" attention mask that give
each response exactly the hidden states of its own sequence (preference_data.collate_shared;
reward.shared_prompt: false runs the 2B sequences separately), several pairs packed per row.
On hh-rlhf at max_len 256 that is 192 positions per pair instead of 503 padded ones.

Held-out metrics: accuracy (r_chosen > r_rejected), mean margin, reward mean/std. The
reward mean/std on training pairs are kept in each checkpoint's state (`reward_stats`,
as of the last evaluation) and in `<run_dir>/reward_stats.json` (the final model), so
later stages normalise with them; both record the tokenizer's hash.

Afterwards (train/commands.py):
    zerollm export runs/reward_tiny --out out/rm    # AutoModelForSequenceClassification dir + reward_stats.json
    zerollm reward score --model out/rm --input rows.jsonl    # one score line per row
A reward run or its export is also an `init_from` for later stages (the PPO critic):
`open_initial_weights` reads its trunk by LM names and its head as `head.weight`; they call
`check_same_tokenizer(policy_tokenizer, reward_dir)` first.

Deviation: the LM head is dropped (only the trunk and the scalar head are trained); the
scalar head starts from normal(0, init_std) weights, or from the source's head when
`init_from` is itself a reward model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from train import run
from train.checkpoint import MANIFEST, checkpoint_folder
from train.config import RunConfig, check_record_file, load_run_config, read_yaml
from train.engine import (
    all_reduce_sum,
    construct_model,
    load_initial_weights,
    open_initial_weights,
    to_device,
    zero_stage,
)
from train.errors import ZeroLLMError
from train.hf_export import config_from_hf, read_hf_config
from train.loop import Stage
from train.losses import bradley_terry_loss, last_token_index
from train.model import CustomLanguageModel, ModelConfig, padding_causal_mask
from train.preference_data import (
    Pair,
    PairSet,
    build_pairs,
    check_tokenizer,
    collate,
    collate_shared,
    pad,
    read_records,
)

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
    shared_prompt: bool = True  # run each pair's common prefix once for both responses (same scores)

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
        self.head = nn.Linear(cfg.d_model, 1, bias=False)  # as HF's ForSequenceClassification `score`
        nn.init.normal_(self.head.weight, std=cfg.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        per_token: bool = False,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        read_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids and 0/1 mask -> (B,) fp32 scores; per_token: (B, T), the head at every
        position (a PPO critic's values). Shared-prompt rows (preference_data.collate_shared):
        position_ids (B, T), attn_mask (B, 1, T, T) and read_at (N,) flat indices into B*T
        -> (N,) scores at those positions."""
        if attn_mask is not None:
            h = self.lm.hidden_states(input_ids, position_ids, attn_mask)  # (B, T, d)
            return self.head(h.flatten(0, 1)[read_at]).squeeze(-1).float()  # (N,)
        valid = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T) 0 at the first real token
        h = self.lm.hidden_states(input_ids, position_ids, padding_causal_mask(valid))  # (B, T, d)
        if per_token:
            return self.head(h).squeeze(-1).float()  # (B, T)
        last = h[torch.arange(h.size(0), device=h.device), last_token_index(attention_mask)]  # (B, d)
        return self.head(last).squeeze(-1).float()  # (B,)

    def num_parameters(self) -> int:
        return (
            self.lm.num_parameters()
            - (0 if self.cfg.tie_embeddings else self.cfg.padded_vocab_size * self.cfg.d_model)
            + self.cfg.d_model
        )


def with_head(source, init_std: float, seed: int):
    """`source` (train.engine.InitialWeights of an LM or of a reward model) as the weights of
    a RewardModel: `lm.<name>` reads the source's `<name>`; the head is the source's own when
    it has one, else normal(0, init_std) (seeded: the same on every rank). Names are what
    `load_initial_weights` asks for."""
    if source.has_head:
        return dataclasses.replace(
            source,
            read=lambda name: source.read(name.removeprefix("lm.")),
            shape=lambda name: source.shape(name.removeprefix("lm.")),
        )
    d = source.config.d_model
    gen = torch.Generator().manual_seed(seed)
    head = {"head.weight": torch.randn(1, d, generator=gen) * init_std}

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


def pair_batch(pairs: list[Pair], pad_id: int, cfg: RewardConfig) -> dict[str, torch.Tensor]:
    """A micro batch of pairs as the model takes it: shared-prompt rows (the default) or
    2B separate rows."""
    if cfg.shared_prompt:
        return collate_shared(pairs, pad_id, cfg.max_len)
    return collate(pairs, pad_id)


def pair_scores(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) scores of a pair_batch: the B chosen, then the B rejected."""
    if "read_at" in batch:
        return engine(batch["input_ids"], None, position_ids=batch["position_ids"], attn_mask=batch["attn_mask"],
                      read_at=batch["read_at"])  # fmt: skip
    return engine(batch["input_ids"], batch["attention_mask"])


def pair_loss(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed Bradley-Terry loss of one micro batch of B pairs."""
    scores = pair_scores(engine, batch)  # (2B,)
    B = scores.size(0) // 2
    margin = batch["margin"] if batch.get("has_margin") else None
    return bradley_terry_loss(scores[:B], scores[B:], margin)


def scores_of(engine, pairs: list[Pair], mb: int, pad_id: int, cfg: RewardConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (len(pairs),), in micro batches, without gradients."""
    rc, rr = [], []
    for i in range(0, len(pairs), mb):
        s = pair_scores(engine, to_device(pair_batch(pairs[i : i + mb], pad_id, cfg), engine)).detach().float().cpu()
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
            rc, rr = scores_of(engine, pairs, mb, data.pad_id, cfg.reward)
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
        rc, rr = scores_of(engine, pairs, mb, data.pad_id, cfg.reward)
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
            out.append({**pair_batch(pairs, data.pad_id, cfg.reward), "has_margin": has_margin})
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


# ----------------------------------------------------------------------------- after training

STATS_FILE = "reward_stats.json"


def checkpoint_stats(run_dir: str | Path, folder: Path) -> dict[str, Any] | None:
    """The reward mean/std that go with checkpoint `folder`: `<run_dir>/reward_stats.json`
    when it is of that step (the final model), else those in the checkpoint's state (its
    last evaluation); None when it never evaluated."""
    manifest = json.loads((folder / MANIFEST).read_text())
    f = Path(run_dir) / STATS_FILE
    stats = json.loads(f.read_text()) if f.is_file() else None
    if stats is None or stats.get("step") != manifest["step"]:
        stats = manifest.get("state", {}).get("reward_stats")
    if stats is not None and stats.get("step") != manifest["step"]:
        log.warning("%s: reward mean/std are of step %s (the last evaluation before it)", folder, stats.get("step"))
    return stats


def write_export_stats(run_dir: str | Path, folder: Path, out: Path, tok_dir: str, max_len: int) -> None:
    """`reward_stats.json` of an export: checkpoint `folder`'s stats and the training max_len;
    refuses a tokenizer other than the one the stats were measured with."""
    stats = checkpoint_stats(run_dir, folder)
    if stats is None:
        log.warning("%s: no reward mean/std (no evaluation yet): `reward score` will give raw scores only", folder)
        return
    _check_hash(tok_dir, run_dir, stats.get("tokenizer_hash"))
    (out / STATS_FILE).write_text(json.dumps({**stats, "max_len": max_len}, indent=1))


@dataclass
class RewardDir:
    """A trained reward model on disk: its export (HF dir) or its run dir; configs only read."""

    path: Path
    model: ModelConfig
    tokenizer: str  # its tokenizer dir
    stats: dict[str, Any] | None  # reward_stats.json (mean, std, tokenizer_hash); None: never evaluated
    max_len: int  # tokens per sequence in training (prompt cut from the left to fit)
    tag: str | None = None  # a run's checkpoint (default: its resume point)


def open_reward_dir(path: str | Path, tag: str | None = None) -> RewardDir:
    """An exported reward dir (config.json of a ForSequenceClassification model) or a reward
    run dir (config.yaml with a `reward:` section); one line when it is neither."""
    path = Path(path)
    if (path / "config.json").is_file():
        hf_cfg = read_hf_config(path)
        arch = (hf_cfg.architectures or ["?"])[0]
        if not arch.endswith("ForSequenceClassification"):
            raise ZeroLLMError(f"{path}: a {arch}, not a reward model (export a reward run with `zerollm export`)")
        f = path / STATS_FILE
        stats = json.loads(f.read_text()) if f.is_file() else None
        model = config_from_hf(hf_cfg)
        return RewardDir(path, model, str(path), stats, int((stats or {}).get("max_len") or model.max_seq_len))
    if (path / "config.yaml").is_file():
        if "reward" not in read_yaml(path / "config.yaml"):
            raise ZeroLLMError(f"{path / 'config.yaml'}: no reward section: not a reward-model run")
        cfg = load_run_config(path / "config.yaml", extra_sections=CONFIG_SECTIONS)
        stats = checkpoint_stats(path, checkpoint_folder(path, tag))
        return RewardDir(path, cfg.model, tokenizer_dir(cfg), stats, cfg.reward.max_len, tag)
    raise ZeroLLMError(f"{path}: neither an exported reward model (config.json) nor a reward run (config.yaml)")


def load_reward_model(rd: RewardDir) -> RewardModel:
    """The RewardModel of `rd` (fp32, eval mode, dropout off)."""
    source = open_initial_weights(rd.path, {"dropout": 0.0}, tag=rd.tag)
    if not source.has_head:
        raise ZeroLLMError(f"{rd.path}: the weights hold no reward head")
    model = construct_model({}, lambda: RewardModel(source.config), skip_init=True)
    load_initial_weights(model, with_head(source, 0.0, 0))
    return model.float().eval()


def check_same_tokenizer(policy_tokenizer_dir: str | Path, reward_dir: str | Path) -> None:
    """Refuse, in one line naming both dirs and hashes, a tokenizer other than the one the
    reward model in `reward_dir` (a reward run or its export) was trained with: its scores
    of another tokenizer's ids mean nothing. A stage that scores a policy's text calls this."""
    from data_pipeline.tokenizer import tokenizer_hash

    rd = open_reward_dir(reward_dir)
    trained_with = (rd.stats or {}).get("tokenizer_hash") or tokenizer_hash(rd.tokenizer)
    _check_hash(policy_tokenizer_dir, reward_dir, trained_with)


def _check_hash(tok_dir: str | Path, reward_dir: str | Path, reward_hash: str | None) -> None:
    from data_pipeline.tokenizer import tokenizer_hash

    mine = tokenizer_hash(tok_dir)
    if reward_hash is not None and mine != reward_hash:
        raise ZeroLLMError(
            f"tokenizer {tok_dir} (hash {mine}) is not the one reward model {reward_dir} was trained with "
            f"(hash {reward_hash}); use that tokenizer, or a reward model trained with this one"
        )


@torch.no_grad()
def score(model: RewardModel, seqs: list[list[int]], pad_id: int, batch_size: int, device: str) -> list[float]:
    """Scores of id lists, in their order; batched by length (scores do not depend on the
    padding), a progress bar on stderr."""
    model.to(device)
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    with tqdm(total=len(seqs), unit="seq", desc="scoring", file=sys.stderr) as bar:
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            ids, mask = pad([seqs[j] for j in idx], pad_id)
            for j, v in zip(idx, model(ids.to(device), mask.to(device)).tolist()):
                out[j] = v
            bar.update(len(idx))
    return out


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
        run.adopt_model(r, source, args.deepspeed_config)  # the snapshot (export, init_from) names this shape
        model_cfg = cfg.model
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
