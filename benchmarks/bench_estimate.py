"""`zerollm estimate` against real runs: each rank's measured peak vs the estimate, per row.

    .venv/bin/python benchmarks/bench_estimate.py                     # the whole matrix (~30 min on 2 cores)
    .venv/bin/python benchmarks/bench_estimate.py --sizes small --ranks 2 --stages 2,3

Each row is a real pretraining job through the deepspeed launcher (`deepspeed --module
train.pretrain`, fp32 on CPU, micro batch 4 x 256 tokens, 3 optimizer steps, no checkpoint
before the last row is written) for one model size, ZeRO stage (ds_configs/zeroN.json), with or
without activation checkpointing, on 1 or 2 ranks. Every rank writes its peak memory growth
over its start (`train.memory`: peak RSS on CPU, max_memory_allocated on a GPU) to
RUN/ranks/rank<r>.jsonl (ZEROLLM_RANK_LOG=1); the table shows the estimate
(`train.estimate.estimate`, the same call as `zerollm estimate`), the measured peak of the
rank that used most and the ratio; then the time estimate per step (MFU 1.0 of this machine's
measured fp32 matmul rate on one thread, the estimate's default without a peak) beside the
measured median step time. Target: every memory row within 15% on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = 8192
SIZES = {  # name -> model fields (8192-token vocabulary, GPT-2 style)
    "tiny": {"n_layer": 2, "n_head": 4, "d_model": 64},  # 0.6M parameters: the runtime's own memory shows
    "small": {"n_layer": 4, "n_head": 6, "d_model": 384},  # 10.4M parameters
    "medium": {"n_layer": 8, "n_head": 8, "d_model": 512},  # 29.5M parameters
}


def write_tokens(prefix: Path) -> None:
    from data_pipeline.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(400):
            w.add_document(rng.integers(0, VOCAB, 600))
        w.finalize()


def run_config(path: Path, tokens: Path, run_dir: Path, model: dict, ckpt: bool, mb: int, seq: int, steps: int) -> Path:
    cfg = {
        "model": {"vocab_size": VOCAB, "max_seq_len": seq, **model, "dropout": 0.0, "activation_checkpointing": ckpt},
        "data": {"train": [str(tokens)], "seq_len": seq, "cache_dir": str(path.parent)},
        "train": {"micro_batch_size": mb, "grad_accum_steps": 1, "max_steps": steps, "warmup_steps": 0,
                  "precision": "fp32", "eval_interval": 0, "save_interval": 0},
        "logging": {"run_dir": str(run_dir), "log_interval": 1, "tensorboard": False},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(config: Path, ds: Path, ranks: int, run_dir: Path) -> list[int]:
    """Launch the job; each rank's peak growth in bytes (at the last step, before the final save)."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--module", "train.pretrain", "--config", str(config),
           "--deepspeed_config", str(ds)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZEROLLM_RANK_LOG": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_estimate: {config} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    peaks = []
    for r in range(ranks):
        rows = [json.loads(line) for line in (run_dir / "ranks" / f"rank{r}.jsonl").read_text().splitlines()]
        peaks.append(max(row["peak_growth"] for row in rows if row.get("peak_growth") is not None))
    return peaks


def estimated(config: Path, ds: Path, ranks: int):
    from train.config import load_ds_config, load_run_config
    from train.estimate import estimate

    cfg = load_run_config(str(config))
    return estimate(cfg, load_ds_config(str(ds), cfg, ranks), ranks, "pretrain", "cpu")


def step_seconds(run_dir: Path) -> float:
    """Median wall time of the steps after the first (metrics.jsonl's per-step rate)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = sorted(1 / r["samples_per_s"] for r in rows if r.get("step", 0) > 1 and r.get("samples_per_s"))
    return times[len(times) // 2] if times else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--sizes", default="small,medium")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--ckpt", default="0,1", help="activation checkpointing off (0) / on (1)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): the matmul rate the time estimate uses
    work = Path(tempfile.mkdtemp(prefix="bench_estimate_"))
    tokens = work / "tokens"
    write_tokens(tokens)
    rows = []
    print("| model | ZeRO | act. ckpt | ranks | estimate GB | measured GB (max rank) | ratio | est. s/step | s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes.split(","):
        for stage in map(int, args.stages.split(",")):
            for ckpt in map(int, args.ckpt.split(",")):
                for ranks in map(int, args.ranks.split(",")):
                    name = f"{size}_z{stage}_c{ckpt}_r{ranks}"
                    cfg = run_config(work / f"{name}.yaml", tokens, work / name, SIZES[size], bool(ckpt),
                                     args.micro_batch, args.seq, args.steps)  # fmt: skip
                    ds = REPO / "ds_configs" / f"zero{stage}.json"
                    t0 = time.time()
                    peaks = measure(cfg, ds, ranks, work / name)
                    e = estimated(cfg, ds, ranks)
                    est, step_s = e.peak_bytes, step_seconds(work / name) * args.micro_batch * ranks
                    row = {"size": size, "stage": stage, "ckpt": ckpt, "ranks": ranks, "estimate": est,
                           "measured": peaks, "ratio": est / max(peaks), "est_step_s": e.step_s,
                           "step_s": step_s, "s": time.time() - t0}  # fmt: skip
                    rows.append(row)
                    print(f"| {size} | {stage} | {'on' if ckpt else 'off'} | {ranks} | {est / 1e9:.3f} | "
                          f"{max(peaks) / 1e9:.3f} ({', '.join(f'{x / 1e9:.3f}' for x in peaks)}) | "
                          f"{row['ratio']:.3f} | {e.step_s:.2f} | {step_s:.2f} |", flush=True)  # fmt: skip
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    within = sum(abs(r["ratio"] - 1) <= 0.15 for r in rows)
    print(f"\n{within}/{len(rows)} rows within 15%; worst ratio {worst['ratio']:.3f} "
          f"({worst['size']}, ZeRO-{worst['stage']}, ckpt {worst['ckpt']}, {worst['ranks']} ranks)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
