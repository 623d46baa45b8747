"""Peak memory per rank while starting an engine from a Hugging Face model dir, ZeRO-3 vs ZeRO-0.

    .venv/bin/python benchmarks/bench_load.py                       # gpt2-124m, fp32, 2 CPU ranks
    .venv/bin/python benchmarks/bench_load.py --preset gpt2-350m --kinds frozen,train

A randomly initialised preset is exported with `export_hf` (fp32 safetensors), then for each
ZeRO stage the deepspeed launcher starts N ranks that each build an engine from it with
`train.engine` (`frozen`: build_frozen_engine, no optimizer; `train`: build_engine with
AdamW, which adds fp32 master weights and Adam moments). Each rank reports how much its
peak RSS (`ru_maxrss`) grew over the value after imports and process-group start, the
parameters it holds afterwards, and the seconds the load took.

Reading the numbers: under ZeRO-0 a rank holds the whole model plus one source tensor at a
time. Under ZeRO-3 it holds its partition, but `zero.Init` builds each module at full size
for a moment before partitioning it (the tied head is built as a full Linear last, when the
other partitions already exist), and each source tensor is read whole before this rank's
slice is copied: the peak is the partition plus one to two times the largest parameter (the
embedding), whatever the model's depth. The model's random init is skipped when weights are
loaded (`construct_model(skip_init=True)`). glibc keeps some freed blocks in its heap;
MALLOC_MMAP_THRESHOLD_=1048576 in the environment returns them. `train` rows differ in kind:
ZeRO-3 allocates fp32 partitions and Adam moments inside `deepspeed.initialize`, torch's
AdamW under ZeRO-0 only at its first step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(hf_dir: str, ds_name: str, kind: str) -> None:
    """One rank: load the engine, print one BENCH json line."""
    from train.config import DataConfig, LoggingConfig, RunConfig, TrainConfig
    from train.engine import (
        build_engine,
        build_frozen_engine,
        init_distributed,
        open_initial_weights,
        resolve_ds_config,
    )
    from train.model import CustomLanguageModel

    rank, world = init_distributed()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    src = open_initial_weights(hf_dir)
    train = TrainConfig(micro_batch_size=1, grad_accum_steps=1, precision="fp32")
    cfg = RunConfig(src.config, DataConfig(seq_len=64), train, LoggingConfig(run_dir=tempfile.mkdtemp()))
    ds = resolve_ds_config(str(REPO / "ds_configs" / ds_name), cfg, world)

    def make():
        return CustomLanguageModel(src.config)

    if kind == "frozen":
        engine = build_frozen_engine(make, ds, init_from=src)
    else:
        engine = build_engine(cfg, ds, make, init_from=src)
    seconds = time.perf_counter() - t0
    params = list(engine.module.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    row = {"rank": rank, "grow_mb": peak_rss_mb() - base, "base_mb": base, "held": held, "seconds": seconds}
    print("BENCH " + json.dumps(row), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(hf_dir: Path, ds_name: str, kind: str, nproc: int) -> list[dict]:
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus", str(nproc),
        "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()),
        str(Path(__file__).resolve()),
        "--worker", str(hf_dir), ds_name, kind,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line.split("BENCH ", 1)[1]) for line in result.stdout.splitlines() if "BENCH " in line]
    if result.returncode != 0 or len(rows) != nproc:
        sys.exit(f"{ds_name} {kind} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        worker(*sys.argv[i + 1 : i + 4])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--kinds", default="frozen", help="comma list of frozen, train")
    args = ap.parse_args()

    from train.hf_export import export_hf
    from train.model import CustomLanguageModel, from_name

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        cfg = from_name(args.preset)
        model = CustomLanguageModel(cfg)
        export_hf(model, cfg, hf_dir)
        total, size_mb = model.num_parameters(), (hf_dir / "model.safetensors").stat().st_size / 2**20
        del model
        print(f"{args.preset}: {total / 1e6:.1f} M parameters, model.safetensors {size_mb:.0f} MB, {args.nproc} ranks")
        print()
        print("| engine | ZeRO | rank | peak RSS growth (MB) | parameters held | load (s) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for kind in args.kinds.split(","):
            for ds_name, stage in (("zero0.json", 0), ("zero3.json", 3)):
                for r in launch(hf_dir, ds_name, kind, args.nproc):
                    print(
                        f"| {kind} | {stage} | {r['rank']} | {r['grow_mb']:.0f} | {r['held'] / 1e6:.1f} M "
                        f"| {r['seconds']:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
