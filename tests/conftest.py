"""Shared fixtures: the repo root, the shared data folder, and the CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REQUIRE_ALL = os.environ.get("ZEROLLM_REQUIRE_ALL") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip when `condition` is false, unless CI demands every test run (then fail)."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"ZEROLLM_REQUIRE_ALL=1 but: {reason}")
    pytest.skip(reason)


@pytest.fixture
def shared_data() -> Path:
    need(SHARED_DATA.is_dir(), f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def tiny_run_config(
    path: Path,
    train_data: list[str],
    run_dir: Path,
    *,
    valid: list[str] | None = None,
    seq_len: int = 32,
    cache_dir: Path | None = None,
    model: dict | None = None,
    **train,
) -> Path:
    """Write the tiny-preset run config every test suite starts from (fp32, no eval, a
    metrics row per step, no TensorBoard); `train` overrides train.* keys. Returns `path`."""
    import yaml

    data = {"train": list(train_data), "seq_len": seq_len}
    if valid:
        data["valid"] = list(valid)
    if cache_dir is not None:
        data["cache_dir"] = str(cache_dir)
    cfg = {
        "model": {"preset": "tiny", **(model or {})},
        "data": data,
        "train": {
            "micro_batch_size": 2,
            "grad_accum_steps": 1,
            "max_steps": 10,
            "warmup_steps": 0,
            "precision": "fp32",
            "eval_interval": 0,
            **train,
        },  # fmt: skip
        "logging": {"run_dir": str(run_dir), "log_interval": 1, "tensorboard": False},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


@pytest.fixture
def busy_cpu():
    """Two processes spinning beside a test's launches: a loaded machine on purpose
    (the rare exit-time aborts of issue "exit codes are exact" showed up under load)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    yield
    stop.set()
    for p in procs:
        p.join(10)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    """Run `zerollm ARGS` in a fresh interpreter; returns CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def pytest_terminal_summary(terminalreporter) -> None:
    """Say when the Docker fixture repeated a build after buildah's memfd sealing race."""
    docker = sys.modules.get("tests.launch.test_launch_docker")
    rebuilds = getattr(docker, "REBUILDS", [])
    if rebuilds:
        terminalreporter.write_line(
            f"docker: podman build repeated {len(rebuilds)} time(s) after the memfd sealing race; "
            f"first logs: {', '.join(rebuilds)}"
        )
