"""Pretraining: next-token prediction on a tokenized corpus with DeepSpeed ZeRO.

One node (2 CPU ranks or N GPUs):
    deepspeed --num_gpus 2 --master_addr 127.0.0.1 -m train.pretrain \
        --config configs/tiny.yaml --deepspeed_config ds_configs/zero2.json
    zerollm pretrain --config configs/tiny.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2
Many nodes:
    zerollm launch pretrain --hostfile hosts --config RUN.yaml --deepspeed_config ds_configs/zero3.json

Re-running the same command resumes from the last complete checkpoint in
`<logging.run_dir>/checkpoints` (same data order, same RNG). SIGTERM or SIGUSR1 makes
every rank save a checkpoint at an agreed step and exit with code 75.

Deviations from the usual recipe, on purpose: the loss of a step is the sum of
token losses over all ranks and micro batches divided by the global number of
valid tokens (not a mean of per-micro-batch means), so micro batch x accumulation
splits give the same update; the learning rate comes from `train/schedule.py`, not
a DeepSpeed scheduler.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_pipeline.gpt_dataset import build_dataset, parse_blend
from data_pipeline.indexed import dataset_vocab_size
from data_pipeline.sampler import DistributedSampler
from data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from train import run
from train.config import RunConfig, check_token_data
from train.engine import all_reduce_sum, to_device, zero_stage
from train.errors import ZeroLLMError
from train.loop import Stage
from train.losses import IGNORE_INDEX, lm_loss
from train.model import CustomLanguageModel

log = logging.getLogger("zerollm")

# Model fields that may change on resume without changing the parameter shapes.
RESUMABLE_MODEL_FIELDS = {"dropout", "activation_checkpointing", "init_std"}


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    train: Any  # indexed by global sample number -> np.ndarray (seq_len + 1,)
    valid: Any | None
    fingerprint: str
    tokenizer_hash: str


def build_data(cfg: RunConfig, world_size: int) -> Data:
    """Training/validation datasets for this run, checked against the model before training."""
    d, t, m = cfg.data, cfg.train, cfg.model
    if not d.train:
        raise ZeroLLMError(f"{cfg.path}: data.train: no training data given")
    tok_hash = ""
    if d.tokenizer:
        tok = load_tokenizer(d.tokenizer)
        if len(tok) > m.vocab_size:
            raise ZeroLLMError(
                f"{cfg.path}: model.vocab_size: {m.vocab_size} is smaller than the tokenizer's "
                f"{len(tok)} tokens ({d.tokenizer})"
            )
        tok_hash = tokenizer_hash(d.tokenizer)
    prefixes = parse_blend(d.train)[0] + (parse_blend(d.valid)[0] if d.valid else [])
    for prefix in prefixes:
        vocab = dataset_vocab_size(prefix)
        if vocab is not None and vocab > m.vocab_size:
            raise ZeroLLMError(
                f"{prefix}.meta.json: vocab_size {vocab} is larger than {cfg.path}: model.vocab_size={m.vocab_size}"
            )
    global_batch = t.micro_batch_size * t.grad_accum_steps * world_size
    cache = d.cache_dir or None
    train = build_dataset(d.train, d.seq_len, t.max_steps * global_batch, d.seed, cache)
    valid = None
    if d.valid and t.eval_interval:
        valid = build_dataset(d.valid, d.seq_len, t.eval_steps * t.micro_batch_size * world_size, d.seed, cache)
    return Data(train, valid, train.fingerprint, tok_hash)


# ----------------------------------------------------------------------------- state


def model_shape(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in RESUMABLE_MODEL_FIELDS}


def check_resume_compatible(state: dict[str, Any], cfg: RunConfig, data: Data, where: str) -> None:
    """Refuse (one line) to resume onto other data or another model shape."""
    if state["data_fingerprint"] != data.fingerprint:
        raise ZeroLLMError(
            f"{where}: was trained on data with fingerprint {state['data_fingerprint']}, this run's "
            f"data.train/seq_len/seed give {data.fingerprint}; use a new logging.run_dir for new data"
        )
    saved, now = state["model"], model_shape(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        k = diff[0]
        raise ZeroLLMError(
            f"{where}: model.{k} was {saved.get(k)!r}, {cfg.path} says {now.get(k)!r}; "
            "the model shape cannot change on resume"
        )
    if state.get("tokenizer_hash") and data.tokenizer_hash and state["tokenizer_hash"] != data.tokenizer_hash:
        raise ZeroLLMError(f"{where}: the tokenizer differs from the one this checkpoint was trained with")


# ----------------------------------------------------------------------------- steps


def micro_batches(dataset, indices: list[list[int]]) -> list[torch.Tensor]:
    """Global sample indices -> (mb, seq_len + 1) int64 tensors."""
    return [torch.from_numpy(dataset.get_batch(idx)) for idx in indices]


def token_loss(engine, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of one (mb, seq_len + 1) micro batch."""
    logits, _ = engine(batch[:, :-1])
    loss, _ = lm_loss(logits, batch[:, 1:])
    return loss


def evaluate(engine, dataset, cfg: RunConfig, rank: int, world: int) -> dict[str, float]:
    """Mean token loss and perplexity on the first eval_steps global batches of `dataset`."""
    mb = cfg.train.micro_batch_size
    engine.eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for k in range(cfg.train.eval_steps):
            start = (k * world + rank) * mb
            idx = [(start + j) % len(dataset) for j in range(mb)]
            (x,) = micro_batches(dataset, [idx])
            loss_sum += float(token_loss(engine, to_device(x, engine)))
            count += x[:, 1:].numel()
    engine.train()
    total, n = all_reduce_sum([loss_sum, count])
    mean = total / max(1.0, n)
    return {"eval_loss": mean, "eval_ppl": float(np.exp(min(mean, 50.0)))}


def make_stage(engine, cfg: RunConfig, data: Data, state: dict[str, Any]) -> Stage:
    t = cfg.train
    rank, world = engine.global_rank, engine.world_size
    gas, mb = t.grad_accum_steps, t.micro_batch_size
    sampler = iter(DistributedSampler(len(data.train), rank, world, mb, consumed_samples=state["consumed_samples"]))
    return Stage(
        name="pretrain",
        next_batches=lambda: micro_batches(data.train, [next(sampler) for _ in range(gas)]),
        count=lambda b: int((b[:, 1:] != IGNORE_INDEX).sum()),
        loss=token_loss,
        samples_per_step=mb * gas * world,
        evaluate=(lambda: evaluate(engine, data.valid, cfg, rank, world)) if data.valid is not None else None,
        unit="tokens",
        flops_per_unit=engine.module.flops_per_token(cfg.data.seq_len),
    )


# ----------------------------------------------------------------------------- main

preflight = check_token_data  # what `zerollm launch` checks on this node before any rank starts


def stage_run(args) -> int:
    r = run.start(args)
    cfg = r.cfg
    data = build_data(cfg, r.world)
    engine = run.build(r, lambda: CustomLanguageModel(cfg.model))
    state = {
        "step": 0,
        "consumed_samples": 0,
        "data_fingerprint": data.fingerprint,
        "model": model_shape(cfg),
        "config_hash": cfg.hash(),
        "tokenizer_hash": data.tokenizer_hash,
        "skipped_steps": 0,
    }
    ckpt, state, resumed = run.resume(
        r, engine, state, lambda saved, where: check_resume_compatible(saved, cfg, data, where)
    )
    run.write_snapshot(r)
    if r.rank == 0:
        log.info(
            "model: %s parameters; world size %d; ZeRO stage %s",
            f"{engine.module.num_parameters():,}",
            r.world,
            zero_stage(r.ds),
        )
    return run.loop(r, engine, make_stage(engine, cfg, data, state), ckpt, state, resumed)


def main(argv: list[str] | None = None) -> None:
    run.main(stage_run, argv, prog="train.pretrain", doc=__doc__)


if __name__ == "__main__":
    main()
