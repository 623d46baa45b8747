"""The step loop every stage runs; a stage supplies only what is its own (a `Stage`).

    stage = Stage(name="pretrain", next_batches=..., count=..., loss=..., evaluate=...)
    code = train(engine, stage, cfg, ckpt, state, stop, metrics)

One optimizer step, top to bottom: the lr of this step; this rank's micro batches and
one all-reduce of [valid units, stop votes] (every rank sees a SIGTERM/SIGUSR1 at the
same step: checkpoint, EXIT_PREEMPTED); the micro steps, each backward scaled so the
update is d(sum of unit losses) / (global count of valid units), whatever the micro
batch x accumulation x world split; the NaN guard (a non-finite loss anywhere skips
the update on every rank; train.max_bad_steps in a row: EXIT_BAD_LOSS, the last good
checkpoint kept); `engine.step()`; the metrics row; eval when due; checkpoint when due
(never right after a skipped step). With train.eval_at_start, a fresh run evaluates once
before its first step (step 0 in metrics.jsonl).

A "unit" is what the stage's loss is a sum over: tokens for pretraining and SFT,
pairs for a reward model. The loop knows nothing else about the stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import fault_point
from train.config import RunConfig
from train.engine import SHM_BUFFERS_REMOVED, all_reduce_sum, set_lr, to_device
from train.errors import EXIT_BAD_LOSS, EXIT_OK, EXIT_PREEMPTED
from train.memory import peak_rss_bytes, stage_growth
from train.schedule import lr_at

log = logging.getLogger("zerollm")


@dataclass
class Stage:
    """What one stage brings to the loop (composition: plain callables, no subclassing)."""

    name: str  # "pretrain", "sft", ...: the progress bar and the log say it
    next_batches: Callable[[], list[Any]]  # this rank's micro batches for the next step (grad_accum_steps)
    count: Callable[[Any], int]  # valid units (tokens, pairs) in one micro batch
    loss: Callable[[Any, Any], torch.Tensor]  # (engine, micro batch) -> summed loss of its valid units
    samples_per_step: int  # global samples one step consumes (the data position in `state`)
    evaluate: Callable[[], dict[str, float]] | None = None  # eval metrics, run every train.eval_interval steps
    unit: str = "tokens"  # metrics name their rate `<unit>_per_s`
    flops_per_unit: float = 0.0  # for MFU (0: not reported)
    step_metrics: Callable[[], dict[str, float]] | None = None  # the stage's own row entries (every rank calls it)


def train(engine, stage: Stage, cfg: RunConfig, ckpt, state: dict[str, Any], stop, metrics) -> int:
    """Run optimizer steps until train.max_steps; returns the stage's exit code."""
    t = cfg.train
    rank, world = engine.global_rank, engine.world_size
    gas = t.grad_accum_steps
    # ZeRO-0 fp32 runs torch's optimizer directly: nothing else skips a non-finite update.
    plain_optimizer = engine.zero_optimization_stage() == 0 and t.precision == "fp32"
    rank_log = RankLog(cfg.logging.run_dir, rank, engine.module)
    bad_in_row = 0
    if stage.evaluate is not None and t.eval_at_start and state["step"] == 0:
        metrics.log(0, stage.evaluate())  # the model as it came in: the "before" of a fine-tuning run
    while state["step"] < t.max_steps:
        step = state["step"]
        t0 = time.time()
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps, t.schedule, t.decay_fraction)
        set_lr(engine, lr)
        batches = stage.next_batches()
        local_units = sum(stage.count(b) for b in batches)
        global_units, stop_votes = all_reduce_sum([local_units, float(stop.requested)])
        if stop_votes:
            ckpt.save(engine, step, state)
            log.warning("rank %d: %s stopped at step %d after a signal; checkpoint saved", rank, stage.name, step)
            return EXIT_PREEMPTED
        loss_sum, nonfinite = 0.0, 0
        for i, batch in enumerate(batches):
            loss = stage.loss(engine, to_device(batch, engine))  # built on the CPU; the engine's device
            if nan_injected(step, rank):
                loss = loss * float("nan")
            loss_sum += float(loss.detach())
            nonfinite += int(not torch.isfinite(loss.detach()))
            # DeepSpeed divides by gas and averages over ranks; undo both so the update
            # is d(sum of unit losses) / (global valid units).
            engine.backward(loss * (gas * world / max(global_units, 1.0)))
            if i < gas - 1:
                engine.step()  # no update before the accumulation boundary
                continue
            (any_bad,) = all_reduce_sum([nonfinite])
            with optimizer_step_skipped(engine.optimizer, any_bad and plain_optimizer):
                engine.step()  # the update (DeepSpeed's own optimizers skip non-finite grads themselves)
        fault_point("step", rank, step + 1)
        total_loss, _ = all_reduce_sum([loss_sum, 0.0])
        rank_log.write({"step": step + 1, "loss_local": loss_sum / max(1, local_units), "peak_growth": stage_growth()})
        state["step"] = step + 1
        state["consumed_samples"] += stage.samples_per_step
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
        metrics.advance()
        if state["step"] % cfg.logging.log_interval == 0 or state["step"] == t.max_steps:
            dt = time.time() - t0
            row = step_row(engine, stage, cfg, state, lr, total_loss, global_units, dt)
            metrics.log(state["step"], row | (stage.step_metrics() if stage.step_metrics else {}))
        if stage.evaluate is not None and t.eval_interval and state["step"] % t.eval_interval == 0:
            metrics.log(state["step"], stage.evaluate())
        due = (t.save_interval and state["step"] % t.save_interval == 0) or state["step"] == t.max_steps
        if due and not any_bad:  # only checkpoints after a good step count as good
            t_save = time.time()
            folder = ckpt.save(engine, state["step"], state)
            size = sum(f.stat().st_size for f in folder.iterdir()) if rank == 0 else 0
            metrics.log(state["step"], {"ckpt_save_s": time.time() - t_save, "ckpt_bytes": size})
    return EXIT_OK


@contextlib.contextmanager
def optimizer_step_skipped(optimizer, skip: bool):
    """While inside, `optimizer.step()` does nothing when `skip` (ZeRO-0 fp32 runs torch's
    optimizer directly, which would write NaN into the weights). DeepSpeed's step still
    runs around it (clipping, zero_grad, its step counters), so its bookkeeping stays
    aligned; the weights and the optimizer's moments stay as they were."""
    if not skip:
        yield
        return
    real = optimizer.step
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        optimizer.step = real


def step_row(engine, stage: Stage, cfg: RunConfig, state, lr, total_loss, global_units, dt) -> dict[str, Any]:
    """One metrics.jsonl row for a step."""
    world = engine.world_size
    units_per_s = global_units / dt
    peak = cfg.logging.peak_flops
    norm = engine.get_global_grad_norm()
    return {
        "stage": stage.name,
        "loss": total_loss / max(global_units, 1.0),
        "lr": lr,
        "grad_norm": None if norm is None else float(norm),
        f"{stage.unit}_per_s": units_per_s,
        "samples_per_s": stage.samples_per_step / dt,
        "mfu": stage.flops_per_unit * units_per_s / (peak * world) if peak and stage.flops_per_unit else None,
        "world_size": world,
        "consumed_samples": state["consumed_samples"],
        "skipped_steps": state.get("skipped_steps", 0),
        "memory_gb": memory_gb(),
    }


def nan_injected(step: int, rank: int) -> bool:
    """Test hook: ZEROLLM_NAN_STEPS=3,4 makes rank 0's loss NaN at those step indices."""
    steps = os.environ.get("ZEROLLM_NAN_STEPS", "")
    return rank == 0 and str(step) in steps.split(",")


def memory_gb() -> float:
    """Peak accelerator memory, or this process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_bytes() / 2**30


class RankLog:
    """Per-rank facts for tests and debugging (env ZEROLLM_RANK_LOG=1):
    <run_dir>/ranks/rank<r>.jsonl with resident parameter counts and local losses."""

    def __init__(self, run_dir: str, rank: int, model: torch.nn.Module):
        self.file = None
        if os.environ.get("ZEROLLM_RANK_LOG") != "1":
            return
        folder = Path(run_dir) / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank{rank}.jsonl", "a")  # noqa: SIM115 (one line per step, flushed)
        # Under ZeRO-3 each parameter keeps only its partition (ds_tensor) on this rank.
        resident = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.write({"resident_params": resident, "total_params": total, "shm_removed": SHM_BUFFERS_REMOVED})

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
