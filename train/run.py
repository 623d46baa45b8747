"""The entry point every stage's `main` goes through: start, resume, run, exit.

    def main(argv=None):
        run.main(stage_run, argv, prog="train.pretrain", doc=__doc__)

    def stage_run(args) -> int:
        r = run.start(args)                     # config + --set, signals, process groups, logging, ds config
        engine = run.build(r, make_model)       # same initial weights on every rank, then per-rank RNG
        ckpt, state, resumed = run.resume(r, engine, state, check)   # compatibility checked
        run.write_snapshot(r)
        return run.loop(r, engine, stage, ckpt, state, resumed)      # the shared loop + metrics

`main` owns the exit: whatever the stage returns (0, 2 for bad input, 3 after too
many bad steps, 75 after a graceful stop) is this process's exit status on every path
(plain `deepspeed`, `zerollm launch`, Slurm, the Docker image). After the stage returns,
the ranks meet at a bounded barrier, end their process groups, flush logs and leave with
`os._exit`: no C++ destructor of gloo, DeepSpeed's shm comm op or torch runs at
interpreter shutdown, where a still-joinable std::thread aborted about 1 exit in 20
(`terminate called without an active exception`, SIGABRT, launcher status 250).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
import yaml

from train import loop as shared_loop
from train.checkpoint import Checkpointer
from train.config import RunConfig, load_run_config, parse_overrides
from train.engine import build_engine, init_distributed, resolve_ds_config
from train.errors import EXIT_BAD_INPUT, ZeroLLMError
from train.memory import ENV_ESTIMATE, PeakMemory, stage_growth, start_stage_probe
from train.metrics import Metrics

log = logging.getLogger("zerollm")

EXIT_BARRIER_S = 120.0  # how long a finished rank waits for its peers before leaving anyway
_exit_hooks: list[Callable[[int], None]] = []


# ----------------------------------------------------------------------------- arguments


def parse_args(prog: str, doc: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0])
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


# ----------------------------------------------------------------------------- start


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


@dataclass
class Run:
    """What every stage has once started."""

    cfg: RunConfig
    ds: dict[str, Any]  # the resolved DeepSpeed config
    rank: int
    world: int
    stop: GracefulStop


def start(args: argparse.Namespace, sections: dict[str, type] | None = None) -> Run:
    """Config (with --set; `sections`: the stage's own, e.g. {"sft": SFTConfig}), stop
    signals, process groups, logging, the DeepSpeed config."""
    cfg = load_run_config(args.config, parse_overrides(args.set), sections)
    stop = GracefulStop()
    rank, world = init_distributed()
    start_stage_probe()  # peak memory from here on: what `zerollm estimate` predicts
    setup_logging(rank)
    ds = resolve_ds_config(args.deepspeed_config, cfg, world)
    return Run(cfg, ds, rank, world, stop)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build(r: Run, make_model: Callable[[], Any], init_from=None):
    """The training engine: identical initial weights on every rank (or those of
    `init_from`, see `train.engine.open_initial_weights`), then per-rank RNG streams."""
    torch.manual_seed(r.cfg.train.seed)  # identical initial weights on every rank
    engine = build_engine(r.cfg, r.ds, make_model, init_from=init_from)
    seed_rank(r.cfg.train.seed, r.rank)  # then per-rank streams (dropout)
    return engine


def adopt_model(r: Run, source, ds_path: str) -> None:
    """A stage that starts from trained weights takes their model shape (`source`:
    train.engine.InitialWeights): the config's model section, the DeepSpeed buckets sized
    from the real width, and data.seq_len (pretraining's, unused here) kept within the
    model so the run's config.yaml snapshot loads again (export, init_from)."""
    r.cfg.model = source.config
    r.cfg.data.seq_len = min(r.cfg.data.seq_len, source.config.max_seq_len)
    r.ds = resolve_ds_config(ds_path, r.cfg, r.world)


def seed_rank(seed: int, rank: int) -> None:
    torch.manual_seed(seed + 1000 * (rank + 1))
    np.random.seed(seed + 1000 * (rank + 1))
    random.seed(seed + 1000 * (rank + 1))


def resume(r: Run, engine, state: dict[str, Any], check: Callable[[dict[str, Any], str], None]):
    """Load the run's resume point, if any, into `engine` and `state`.

    `check(saved_state, where)` refuses incompatible checkpoints (other data, model
    shape, tokenizer) with one line. Returns (checkpointer, state, resumed) where
    `resumed` is {"ckpt_load_s", "resumed_from"} or None for a fresh start.
    """
    ckpt = Checkpointer(r.cfg.logging.run_dir, r.rank, r.world, r.cfg.train.keep_last)
    folder = ckpt.find_resume()
    if folder is None:
        if r.rank == 0:
            log.info("starting from scratch: %s has no checkpoint", ckpt.dir)
        return ckpt, state, None
    t_load = time.time()
    saved = ckpt.load(engine, folder)
    load_s = time.time() - t_load
    check(saved, str(folder))
    if saved.get("config_hash") != r.cfg.hash():
        log.warning("%s: the run config changed since this checkpoint (e.g. lr); continuing with the new one", folder)
    state = {**state, **{k: v for k, v in saved.items() if k in state and k not in PINNED_STATE}}
    log.info("resumed from %s: step %d, %d samples consumed", folder, state["step"], state["consumed_samples"])
    return ckpt, state, {"ckpt_load_s": load_s, "resumed_from": folder.name}


# Facts of this run that a checkpoint's copy must not overwrite (they were checked instead).
PINNED_STATE = {"config_hash", "data_fingerprint", "model", "tokenizer_hash"}


def refuse_another_run(saved: dict[str, Any], fresh: dict[str, Any], where: str, what: dict[str, str]) -> None:
    """One line when checkpoint `where` was trained with other data, model shape or
    tokenizer: `what` maps each state key to check to what it names for the user."""
    for key, name in what.items():
        if saved.get(key) != fresh[key]:
            raise ZeroLLMError(f"{where}: was trained with another {name}; use a new logging.run_dir")


def write_snapshot(r: Run) -> None:
    """The resolved run config and DeepSpeed config beside the run's outputs (rank 0)."""
    if r.rank != 0:
        return
    run_dir = Path(r.cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(r.cfg.to_dict(), sort_keys=False))
    (run_dir / "ds_config.json").write_text(json.dumps(r.ds, indent=2))


def loop(r: Run, engine, stage, ckpt, state: dict[str, Any], resumed: dict[str, Any] | None) -> int:
    """Run the shared loop with this stage's metrics (progress bar, metrics.jsonl, loss.png)."""
    lg, t = r.cfg.logging, r.cfg.train
    metrics = Metrics(lg.run_dir, r.rank == 0, lg.tensorboard, t.max_steps, state["step"], stage=stage.name)
    if resumed:
        metrics.log(state["step"], resumed)
    code = 1
    try:
        code = shared_loop.train(engine, stage, r.cfg, ckpt, state, r.stop, metrics)
    finally:
        metrics.close(plot=code == 0)
    log_peak_memory(r)
    return code


def log_peak_memory(r: Run) -> None:
    """Rank 0's measured peak beside the launcher's estimate (`zerollm launch` passes it as
    ZEROLLM_ESTIMATE_BYTES): every run checks the estimate against reality."""
    measured, predicted = stage_growth(), float(os.environ.get(ENV_ESTIMATE, 0) or 0)
    if r.rank != 0 or not measured:
        return
    versus = f", estimate {predicted / 1e9:.3f} GB ({predicted / measured:.2f}x)" if predicted else ""
    log.info("memory: peak %.3f GB on rank 0 (%s)%s", measured / 1e9, PeakMemory.kind_here(), versus)


# ----------------------------------------------------------------------------- exit


def main(stage_run: Callable[[argparse.Namespace], int], argv: list[str] | None, prog: str, doc: str) -> NoReturn:
    """Parse the stage's arguments, run it, and end the process with the code it returned."""
    args = parse_args(prog, doc, argv)  # a usage error exits 2 through argparse, before any rank work
    orderly = True
    try:
        code = int(stage_run(args))
    except ZeroLLMError as e:
        print(f"zerollm: error: {e}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("zerollm: interrupted", file=sys.stderr)
        code, orderly = 130, False
    except BaseException:  # a crash: peers may sit in a collective, so no barrier
        traceback.print_exc()
        code, orderly = 1, False
    exit_process(code, orderly)


def add_exit_hook(fn: Callable[[int], None]) -> None:
    """Call `fn(code)` just before the process leaves (e.g. `launch.rank` reports the code)."""
    _exit_hooks.append(fn)


def exit_process(code: int, orderly: bool = True) -> NoReturn:
    """Leave with exactly `code`: ranks meet, process groups end, logs flush, then `os._exit`."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # a late stop signal must not turn the code into a death
    if orderly:
        end_process_groups(EXIT_BARRIER_S)
    for hook in _exit_hooks:
        try:
            hook(code)
        except Exception:  # noqa: BLE001 (the exit code matters more than a hook)
            traceback.print_exc()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def end_process_groups(timeout_s: float) -> None:
    """Bounded barrier with every peer, then destroy the process groups (when one exists)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_world_size() > 1:
            timeout = timedelta(seconds=timeout_s)
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timeout)  # names a rank that never arrives
            else:
                dist.barrier(async_op=True).wait(timeout=timeout)
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 (a peer died or timed out: leave anyway, with the code)
        log.warning("rank %s: peers did not all reach the exit barrier (%s); leaving anyway", _rank(), e)


def _rank() -> str:
    return os.environ.get("RANK", "?")
