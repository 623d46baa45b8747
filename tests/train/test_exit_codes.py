"""The exit code a stage returns is the process's status, on every launch path, with the
CPU made busy on purpose (spinning processes beside the run, as on a loaded CI machine).

    0   training finished            3   train.max_bad_steps NaN steps in a row
    75  SIGTERM: checkpoint, stop    2   bad input found on the ranks (one line)

once through the plain deepspeed launcher and once under `zerollm launch`. Launches that
other tests need anyway carry some cases, with the same busy CPU: plain deepspeed 0, 3 and
75 are test_pretrain.py's accumulation, NaN-stop and SIGTERM tests; `zerollm launch` 0 is
tests/launch/test_launch_output.py's default-terminal run. Before the
orderly exit (train/run.py exit_process) about 1 exit in 20-30 ended in
`terminate called without an active exception` (SIGABRT, status 250) because gloo's
process groups were still alive when the interpreter finalised.
ZEROLLM_EXIT_REPEATS=N repeats every case N times (benchmarks/bench_exit.py measures rates).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.indexed import write_meta
from tests.conftest import REPO
from tests.launch.launch_helpers import job_env, make_ds_config
from tests.train.test_pretrain import free_port, launch, losses, run_config, write_corpus

pytestmark = pytest.mark.slow

REPEATS = int(os.environ.get("ZEROLLM_EXIT_REPEATS", "1"))
CASES = {"nan": 3, "term": 75, "input": 2}  # 0 is carried by other tests' launches (above)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("exit_data")
    write_corpus(root / "train", 100, seed=3)
    write_corpus(root / "wide", 20, seed=4)
    write_meta(str(root / "wide"), {"vocab_size": 1000})  # larger than the tiny model's 512
    return {"train": str(root / "train"), "valid": str(root / "train"), "wide": str(root / "wide")}


def case_config(tmp: Path, data: dict[str, str], case: str) -> Path:
    corpus = {"train": data["wide" if case == "input" else "train"], "valid": data["train"]}
    train = {"max_steps": 4, "eval_interval": 0, "save_interval": 2, "max_bad_steps": 2}
    if case == "term":
        train.update(max_steps=100_000, save_interval=0)
    return run_config(tmp / f"{case}.yaml", corpus, tmp / case, **train)


def env_for(case: str) -> dict[str, str]:
    return {"ZEROLLM_NAN_STEPS": "1,2"} if case == "nan" else {}


def wait_steps(run_dir: Path, proc: subprocess.Popen, n: int = 2) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and len(losses(run_dir)) < n and proc.poll() is None:
        time.sleep(0.3)
    assert len(losses(run_dir)) >= n, "training did not start"


def check_outcome(case: str, run_dir: Path, code: int, out: str) -> None:
    assert code == CASES[case], f"{case}: exit {code}, expected {CASES[case]}\n{out[-3000:]}"
    assert "terminate called" not in out, out[-3000:]
    ckpts = run_dir / "checkpoints"
    if case == "nan":
        assert "2 consecutive steps with NaN/inf loss" in out
    elif case == "term":
        assert (ckpts / "latest").read_text().startswith("step")
    else:
        assert "vocab_size 1000 is larger than" in out


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("case", ["input"])
def test_plain_deepspeed_launcher_exits_with_the_stage_code(busy_cpu, data, tmp_path, case, repeat):
    cfg = case_config(tmp_path, data, case)
    result = launch(cfg, "zero1.json", env={**env_for(case), "PYTHONFAULTHANDLER": "1"})
    check_outcome(case, tmp_path / case, result.returncode, result.stdout + result.stderr)


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("case", list(CASES))
def test_zerollm_launch_exits_with_the_stage_code(busy_cpu, data, tmp_path, case, repeat):
    cfg = case_config(tmp_path, data, case)
    run_dir = tmp_path / case
    ds = make_ds_config(tmp_path, "ds_configs/zero1.json")
    cmd = [sys.executable, "-m", "launch.cli", "launch", "pretrain", "--config", str(cfg), "--deepspeed_config",
           str(ds), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--heartbeat_timeout", "60"]  # fmt: skip
    inherited = {k: v for k, v in job_env().items() if k not in ("ZEROLLM_FAULT", "ZEROLLM_NAN_STEPS")}
    env = {**inherited, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(REPO), **env_for(case)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    if case == "term":
        wait_steps(run_dir, proc)
        proc.send_signal(signal.SIGTERM)  # forwarded to every rank: graceful stop
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    check_outcome(case, run_dir, proc.returncode, out)
