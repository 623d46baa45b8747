"""Pretraining throughput: `train.pretrain` under the deepspeed launcher vs a plain PyTorch loop.

    .venv/bin/python benchmarks/bench_train.py            # CPU: 1 and 2 ranks, ZeRO 0/2/3
    .venv/bin/python benchmarks/bench_train.py --quick    # fewer configurations
    .venv/bin/python benchmarks/bench_train.py --preset gpt2-124m --precision bf16 --peak-tflops 989 --gpu

Every row trains the same model on the same synthetic token stream with the same
micro batch, accumulation and dtype. The plain loop is torch AdamW with no DeepSpeed,
in this process. tokens/s is the median over the steps after warm-up; MFU uses
`flops_per_token` (6N + attention) against the peak you give (--peak-tflops) or, by
default, the best dense matmul rate measured on this machine. Checkpoint rows give
save and load seconds per GB, from the run's own metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.model import CustomLanguageModel, ModelConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measured_peak_flops(dtype: torch.dtype) -> float:
    """Best of a few square matmuls: the practical peak of this machine for `dtype`."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        reps = max(2, int(2e9 / (2 * n**3)))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def write_corpus(prefix: Path, tokens: int, vocab: int) -> None:
    from data_pipeline.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16 if vocab < 65500 else np.int32) as w:
        left = tokens
        while left > 0:
            n = int(min(left, rng.integers(200, 2000)))
            w.add_document(rng.integers(0, vocab, n))
            left -= n
        w.finalize()


def plain_loop(mcfg: ModelConfig, mb: int, gas: int, seq: int, steps: int, precision: str) -> float:
    """tokens/s of a bare torch loop: forward, backward, clip, AdamW, no DeepSpeed."""
    torch.manual_seed(0)
    model = CustomLanguageModel(mcfg)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(gas):
            x = torch.randint(0, mcfg.vocab_size, (mb, seq + 1))
            _, loss = model(x[:, :-1], x[:, 1:])
            (loss / gas).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return mb * gas * seq / statistics.median(times[2:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zerollm_run(work: Path, mcfg: dict, corpus: str, ranks: int, stage: int, mb: int, gas: int, seq: int,
                steps: int, precision: str, compile_: bool) -> dict:  # fmt: skip
    run_dir = work / f"r{ranks}_z{stage}_c{int(compile_)}_{precision}"
    cfg = {
        "model": mcfg,
        "data": {"train": [corpus], "seq_len": seq, "cache_dir": str(work)},
        "train": {"micro_batch_size": mb, "grad_accum_steps": gas, "max_steps": steps, "warmup_steps": 1,
                  "precision": precision, "eval_interval": 0, "save_interval": steps, "compile": compile_},
        "logging": {"run_dir": str(run_dir), "log_interval": 1, "tensorboard": False},
    }  # fmt: skip
    path = work / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--module", "train.pretrain", "--config", str(path),
           "--deepspeed_config", str(REPO / "ds_configs" / f"zero{stage}.json")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, os.cpu_count() // ranks))}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    save = [r for r in rows if "ckpt_save_s" in r]
    # Resume once to time the load (max_steps already reached: load, then exit).
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    load = [r["ckpt_load_s"] for r in rows if "ckpt_load_s" in r]
    gb = save[-1]["ckpt_bytes"] / 2**30 if save else 0.0
    return {
        "tokens_per_s": statistics.median(tps),
        "save_s_per_gb": save[-1]["ckpt_save_s"] / gb if gb else float("nan"),
        "load_s_per_gb": load[-1] / gb if load and gb else float("nan"),
        "ckpt_mb": gb * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="model preset (default: a 4-layer, 256-wide model)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--gas", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak; default: measured matmul peak")
    ap.add_argument("--quick", action="store_true", help="1 rank ZeRO-0 and 2 ranks ZeRO-2 only, no compile")
    args = ap.parse_args()

    mcfg = {"preset": args.preset} if args.preset else {
        "vocab_size": 4096, "max_seq_len": args.seq, "n_layer": 4, "n_head": 4, "d_model": 256}  # fmt: skip
    from train.config import build_section, model_preset

    fields = dict(mcfg)
    if "preset" in fields:
        fields = model_preset(fields.pop("preset"))
    model_cfg = build_section(ModelConfig, fields, "bench", "model")
    flops_tok = CustomLanguageModel(model_cfg).flops_per_token(args.seq)
    dtype = DTYPES[args.precision]
    peak = args.peak_tflops * 1e12 or measured_peak_flops(dtype)
    n_cores = os.cpu_count()
    n_params = CustomLanguageModel(model_cfg).num_parameters()
    print(f"model: {n_params:,} params, seq {args.seq}, micro batch {args.mb} x accumulation {args.gas}, "
          f"{args.precision}; peak {peak / 1e9:.1f} GFLOP/s ({n_cores} cores)")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        write_corpus(corpus, 4_000_000, model_cfg.vocab_size)
        rows = []
        torch.set_num_threads(n_cores)
        base = plain_loop(model_cfg, args.mb, args.gas, args.seq, args.steps, args.precision)
        rows.append(("plain PyTorch loop (AdamW)", 1, "-", "no", base, None))
        combos = (
            [(1, 0, False), (2, 2, False)]
            if args.quick
            else [
                (1, 0, False),
                (1, 0, True),
                (1, 2, False),
                (1, 3, False),
                (2, 0, False),
                (2, 2, False),
                (2, 3, False),
            ]
        )
        ckpt_rows = []
        for ranks, stage, comp in combos:
            r = zerollm_run(work, mcfg, str(corpus), ranks, stage, args.mb, args.gas, args.seq, args.steps,
                            args.precision, comp)  # fmt: skip
            rows.append(("zerollm pretrain", ranks, stage, "yes" if comp else "no", r["tokens_per_s"], r))
            ckpt_rows.append((ranks, stage, r))

    print()
    print("| runner | ranks | ZeRO | compile | tokens/s | vs plain (same ranks) | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, ranks, stage, comp, tps, _ in rows:
        vs = f"{tps / base:.2f}x" if ranks == 1 else f"{tps / base:.2f}x (total of {ranks} ranks)"
        mfu = flops_tok * tps / peak  # peak of the whole machine: the ranks share its cores
        print(f"| {name} | {ranks} | {stage} | {comp} | {tps:,.0f} | {vs} | {100 * mfu:.1f}% |")
    print()
    print("| ranks | ZeRO | checkpoint MB | save s/GB | load s/GB |")
    print("| --- | --- | --- | --- | --- |")
    for ranks, stage, r in ckpt_rows:
        print(f"| {ranks} | {stage} | {r['ckpt_mb']:.1f} | {r['save_s_per_gb']:.1f} | {r['load_s_per_gb']:.1f} |")


if __name__ == "__main__":
    main()
