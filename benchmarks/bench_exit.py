"""How often does a stage's exit code come out wrong? Real launches under CPU load.

    .venv/bin/python benchmarks/bench_exit.py --runs 20 [--cases end,nan] [--busy 3] [--repo DIR]

Each run is a tiny 2-rank pretraining through the plain deepspeed launcher (gloo on
CPU), with `--busy` spinning processes beside it, and the exit code is compared with
the one the stage must return: `end` 0 (training finished), `nan` 3 (max_bad_steps
non-finite steps in a row), `term` 75 (SIGTERM to both ranks: checkpoint, stop),
`config` 2 (an impossible config found on the ranks). `--repo` runs another checkout
(e.g. a worktree of an older commit) with this script, to compare old and new code.
Prints one row per case: runs, wrong exits, the codes seen, and a sample of what the
rank that went wrong printed.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

EXPECTED = {"end": 0, "nan": 3, "term": 75, "config": 2}


def spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(repo: Path, prefix: Path) -> None:
    sys.path.insert(0, str(repo))
    from data_pipeline.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(100):
            w.add_document(rng.integers(1, 500, size=int(rng.integers(20, 80))).astype(np.uint16))
        w.finalize()


def write_config(path: Path, data: Path, run_dir: Path, case: str) -> None:
    train = {"micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 3, "warmup_steps": 0,
             "precision": "fp32", "save_interval": 0, "eval_interval": 0, "max_bad_steps": 2}  # fmt: skip
    if case == "term":
        train["max_steps"] = 100_000
    cfg = {"model": {"preset": "tiny"}, "data": {"train": [str(data)], "seq_len": 32, "cache_dir": str(path.parent)},
           "train": train, "logging": {"run_dir": str(run_dir), "log_interval": 1, "tensorboard": False}}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))


def launch(repo: Path, cfg: Path, ds: Path, case: str, timeout: float) -> tuple[int, str]:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--module", "train.pretrain", "--config", str(cfg),
           "--deepspeed_config", str(ds)]  # fmt: skip
    if case == "config":
        cmd += ["--set", "train.grad_accum_steps=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "PYTHONFAULTHANDLER": "1"}
    if case == "nan":
        env["ZEROLLM_NAN_STEPS"] = "0,1,2"
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    if case == "term":
        import psutil

        metrics = Path(yaml.safe_load(cfg.read_text())["logging"]["run_dir"]) / "metrics.jsonl"
        deadline = time.time() + timeout
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.2)
        for p in psutil.Process(proc.pid).children(recursive=True):
            if any(a.startswith("--local_rank=") for a in p.cmdline()):
                p.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -999, out
    return proc.returncode, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="launches per case")
    ap.add_argument("--cases", default="end,nan,term,config")
    ap.add_argument("--busy", type=int, default=3, help="spinning processes beside the run")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    repo = Path(args.repo).resolve()
    cases = args.cases.split(",")
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            write_data(repo, tmp / "data")
            ds = yaml.safe_load((repo / "ds_configs" / "zero1.json").read_text())
            ds["optimizer"]["params"]["torch_adam"] = True
            (tmp / "ds.json").write_text(yaml.safe_dump(ds))
            import json

            (tmp / "ds.json").write_text(json.dumps(ds))
            for case in cases:
                seen, bad_out = collections.Counter(), ""
                t0 = time.time()
                for i in range(args.runs):
                    run_dir = tmp / f"{case}{i}"
                    write_config(tmp / f"{case}{i}.yaml", tmp / "data", run_dir, case)
                    code, out = launch(repo, tmp / f"{case}{i}.yaml", tmp / "ds.json", case, args.timeout)
                    seen[code] += 1
                    if code != EXPECTED[case]:
                        bad_out = bad_out or "\n".join(out.splitlines()[-25:])
                        print(f"  {case} run {i}: exit {code}", flush=True)
                wrong = sum(n for c, n in seen.items() if c != EXPECTED[case])
                rows.append((case, args.runs, wrong, dict(seen), (time.time() - t0) / args.runs, bad_out))
                print(f"  {case}: {wrong}/{args.runs} wrong {dict(seen)}", flush=True)
    finally:
        stop.set()
        for s in spinners:
            s.join(5)
    print(f"\nrepo {repo}, {args.busy} busy processes, {os.cpu_count()} cores")
    print(f"{'case':8} {'expect':>6} {'runs':>5} {'wrong':>6} {'s/run':>6}  exit codes seen")
    for case, runs, wrong, seen, per, _ in rows:
        print(f"{case:8} {EXPECTED[case]:>6} {runs:>5} {wrong:>6} {per:>6.1f}  {seen}")
    for case, *_, out in rows:
        if out:
            print(f"\n--- {case}: last lines of the first wrong run ---\n{out}")


if __name__ == "__main__":
    main()
