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

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from train.config import RunConfig, load_run_config
from train.errors import ZeroLLMError

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
    from data_pipeline.gpt_dataset import build_dataset, parse_blend
    from data_pipeline.indexed import dataset_vocab_size

    d, t, m = cfg.data, cfg.train, cfg.model
    if not d.train:
        raise ZeroLLMError(f"{cfg.path}: data.train: no training data given")
    tok_hash = ""
    if d.tokenizer:
        from data_pipeline.tokenizer import load_tokenizer, tokenizer_hash

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


# ----------------------------------------------------------------------------- stop signals


class GracefulStop:
    """SIGTERM / SIGUSR1 set a flag; the loop agrees on it across ranks at the next step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.requested:
            log.warning(
                "rank %s: got %s; checkpointing at the next step",
                os.environ.get("RANK", "?"),
                signal.Signals(signum).name,
            )
        self.requested = True


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
    if state.get("config_hash") != cfg.hash():
        log.warning("%s: the run config changed since this checkpoint (e.g. lr); continuing with the new one", where)


# ----------------------------------------------------------------------------- steps


def micro_batches(dataset, indices: list[list[int]]) -> list[torch.Tensor]:
    """Global sample indices -> (mb, seq_len + 1) int64 tensors."""
    return [torch.from_numpy(dataset.get_batch(idx)) for idx in indices]


def nan_injected(step: int, rank: int) -> bool:
    """Test hook: ZEROLLM_NAN_STEPS=3,4 makes rank 0's loss NaN at those steps."""
    steps = os.environ.get("ZEROLLM_NAN_STEPS", "")
    return rank == 0 and str(step) in steps.split(",")


def evaluate(engine, dataset, cfg: RunConfig, rank: int, world: int) -> tuple[float, float]:
    """Mean token loss and perplexity on the first eval_steps global batches of `dataset`."""
    from train.engine import all_reduce_sum

    mb = cfg.train.micro_batch_size
    engine.eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for k in range(cfg.train.eval_steps):
            start = (k * world + rank) * mb
            idx = [(start + j) % len(dataset) for j in range(mb)]
            (x,) = micro_batches(dataset, [idx])
            _, loss = engine(x[:, :-1], x[:, 1:], loss_reduction="sum")
            loss_sum += float(loss)
            count += x[:, 1:].numel()
    engine.train()
    total, n = all_reduce_sum([loss_sum, count])
    mean = total / max(1.0, n)
    return mean, float(np.exp(min(mean, 50.0)))


def train(engine, cfg: RunConfig, data: Data, ckpt, state: dict[str, Any], stop: GracefulStop, metrics) -> int:
    """The loop: lr, eval/checkpoint when due, micro steps, optimizer step, log."""
    from data_pipeline.sampler import DistributedSampler
    from train.checkpoint import fault_point
    from train.engine import EXIT_BAD_LOSS, EXIT_PREEMPTED, all_reduce_sum, set_lr
    from train.schedule import lr_at

    t = cfg.train
    rank, world = engine.global_rank, engine.world_size
    gas, mb = t.grad_accum_steps, t.micro_batch_size
    sampler = iter(DistributedSampler(len(data.train), rank, world, mb, consumed_samples=state["consumed_samples"]))
    plain_optimizer = engine.zero_optimization_stage() == 0 and t.precision == "fp32"
    flops_per_token = engine.module.flops_per_token(cfg.data.seq_len)
    rank_log = RankLog(cfg.logging.run_dir, rank, engine.module)
    bad_in_row = 0
    while state["step"] < t.max_steps:
        step = state["step"]
        t0 = time.time()
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps, t.schedule, t.decay_fraction)
        set_lr(engine, lr)
        batches = micro_batches(data.train, [next(sampler) for _ in range(gas)])
        local_tokens = sum(int((b[:, 1:] != -100).sum()) for b in batches)
        global_tokens, stop_votes = all_reduce_sum([local_tokens, float(stop.requested)])
        if stop_votes:
            ckpt.save(engine, step, state)
            log.warning("rank %d: stopped at step %d after a signal; checkpoint saved", rank, step)
            return EXIT_PREEMPTED
        loss_sum, nonfinite = 0.0, 0
        for i, batch in enumerate(batches):
            _, loss = engine(batch[:, :-1], batch[:, 1:], loss_reduction="sum")
            if nan_injected(step, rank):
                loss = loss * float("nan")
            loss_sum += float(loss.detach())
            nonfinite += int(not torch.isfinite(loss.detach()))
            # DeepSpeed divides by gas and averages over ranks; undo both so the update
            # is d(sum of token losses) / (global valid tokens).
            engine.backward(loss * (gas * world / global_tokens))
            if i == gas - 1:
                (any_bad,) = all_reduce_sum([nonfinite])
                if any_bad and plain_optimizer:
                    engine.optimizer.zero_grad(set_to_none=True)  # torch AdamW skips None grads
            engine.step()  # the optimizer update happens at the accumulation boundary
        fault_point("step", rank, step + 1)
        total_loss, _ = all_reduce_sum([loss_sum, 0.0])
        rank_log.write({"step": step + 1, "loss_local": loss_sum / max(1, local_tokens)})
        state["step"] = step + 1
        state["consumed_samples"] += mb * gas * world
        if any_bad:
            state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            bad_in_row += 1
            log.warning("rank %d: step %d: non-finite loss, update skipped (%d in a row)", rank, step, bad_in_row)
            if bad_in_row >= t.max_bad_steps:
                log.error(
                    "stopping: %d consecutive steps with NaN/inf loss (train.max_bad_steps); the last good "
                    "checkpoint is kept in %s",
                    bad_in_row,
                    ckpt.dir,
                )
                return EXIT_BAD_LOSS
        else:
            bad_in_row = 0
        dt = time.time() - t0
        metrics.advance()
        if state["step"] % cfg.logging.log_interval == 0 or state["step"] == t.max_steps:
            tokens_per_s = global_tokens / dt
            peak = cfg.logging.peak_flops
            row = {
                "loss": total_loss / global_tokens,
                "lr": lr,
                "grad_norm": _grad_norm(engine),
                "tokens_per_s": tokens_per_s,
                "samples_per_s": mb * gas * world / dt,
                "mfu": flops_per_token * tokens_per_s / (peak * world) if peak else None,
                "world_size": world,
                "consumed_samples": state["consumed_samples"],
                "skipped_steps": state.get("skipped_steps", 0),
                "memory_gb": _memory_gb(),
            }
            metrics.log(state["step"], row)
        if data.valid is not None and t.eval_interval and state["step"] % t.eval_interval == 0:
            eval_loss, ppl = evaluate(engine, data.valid, cfg, rank, world)
            metrics.log(state["step"], {"eval_loss": eval_loss, "eval_ppl": ppl})
        due = (t.save_interval and state["step"] % t.save_interval == 0) or state["step"] == t.max_steps
        if due and not any_bad:  # only checkpoints after a good step count as good
            t_save = time.time()
            folder = ckpt.save(engine, state["step"], state)
            size = sum(f.stat().st_size for f in folder.iterdir()) if rank == 0 else 0
            metrics.log(state["step"], {"ckpt_save_s": time.time() - t_save, "ckpt_bytes": size})
    return 0


class RankLog:
    """Per-rank facts for tests and debugging (env ZEROLLM_RANK_LOG=1):
    <run_dir>/ranks/rank<r>.jsonl with resident parameter counts and local losses."""

    def __init__(self, run_dir: str, rank: int, model: torch.nn.Module):
        self.file = None
        if os.environ.get("ZEROLLM_RANK_LOG") != "1":
            return
        import json
        from pathlib import Path

        folder = Path(run_dir) / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank{rank}.jsonl", "a")  # noqa: SIM115
        # Under ZeRO-3 each parameter keeps only its partition (ds_tensor) on this rank.
        resident = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.file.write(json.dumps({"resident_params": resident, "total_params": total}) + "\n")
        self.file.flush()
        self._json = json

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(self._json.dumps(row) + "\n")
            self.file.flush()


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--deepspeed_config", required=True, help='DeepSpeed JSON ("auto" fields filled)')
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a run-config value (YAML syntax), e.g. --set train.max_steps=20",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ZeroLLMError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from train.checkpoint import Checkpointer
    from train.engine import build_engine, init_distributed, resolve_ds_config
    from train.metrics import Metrics
    from train.model import CustomLanguageModel

    cfg = load_run_config(args.config, parse_overrides(args.set))
    stop = GracefulStop()
    rank, world = init_distributed()
    setup_logging(rank)
    ds = resolve_ds_config(args.deepspeed_config, cfg, world)
    data = build_data(cfg, world)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    engine = build_engine(cfg, ds, lambda: CustomLanguageModel(cfg.model))
    _seed_rank(cfg.train.seed, rank)  # then per-rank streams (dropout)
    ckpt = Checkpointer(cfg.logging.run_dir, rank, world, cfg.train.keep_last)
    state = {
        "step": 0,
        "consumed_samples": 0,
        "data_fingerprint": data.fingerprint,
        "model": model_shape(cfg),
        "config_hash": cfg.hash(),
        "tokenizer_hash": data.tokenizer_hash,
        "skipped_steps": 0,
    }
    folder = ckpt.find_resume()
    if folder is not None:
        t_load = time.time()
        saved = ckpt.load(engine, folder)
        load_s = time.time() - t_load
        check_resume_compatible(saved, cfg, data, str(folder))
        state.update(
            step=saved["step"], consumed_samples=saved["consumed_samples"], skipped_steps=saved.get("skipped_steps", 0)
        )
        log.info("resumed from %s: step %d, %d samples consumed", folder, state["step"], state["consumed_samples"])
    elif rank == 0:
        log.info("starting from scratch: %s has no checkpoint", ckpt.dir)
    if rank == 0:
        _write_snapshot(cfg, ds)
        n = engine.module.num_parameters() if hasattr(engine.module, "num_parameters") else 0
        log.info(
            "model: %s parameters; world size %d; ZeRO stage %s",
            f"{n:,}",
            world,
            ds.get("zero_optimization", {}).get("stage", 0),
        )
    metrics = Metrics(cfg.logging.run_dir, rank == 0, cfg.logging.tensorboard, cfg.train.max_steps, state["step"])
    if folder is not None:
        metrics.log(state["step"], {"ckpt_load_s": load_s, "resumed_from": folder.name})
    code = 1
    try:
        code = train(engine, cfg, data, ckpt, state, stop, metrics)
    finally:
        metrics.close(plot=code == 0)
    return code


def _seed_rank(seed: int, rank: int) -> None:
    import random

    torch.manual_seed(seed + 1000 * (rank + 1))
    np.random.seed(seed + 1000 * (rank + 1))
    random.seed(seed + 1000 * (rank + 1))


def _write_snapshot(cfg: RunConfig, ds: dict[str, Any]) -> None:
    import json
    from pathlib import Path

    import yaml

    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ZeroLLMError as e:
        print(f"zerollm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
