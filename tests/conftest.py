"""Shared fixtures: the repo root, the shared data folder, and the CLI runner."""

from __future__ import annotations

import contextlib
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


SINGLE_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def _single_rank_pg():
    """One single-rank gloo process group for the whole session, ended before pytest
    exits (a live gloo group can abort the interpreter's exit). Created once: DeepSpeed
    caches its groups, so a second init after a destroy would leave it holding dead ones."""
    import socket

    import torch.distributed as dist

    from train.engine import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with _environ(values):
        assert init_distributed() == (0, 1)
    yield values
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_rank_group(_single_rank_pg):
    """World size 1, no launcher, for a module's in-process engine tests; the rank
    variables DeepSpeed reads are set only while that module runs (never for launches
    made by other modules). torch runs on one thread meanwhile, as each launched rank does
    (OMP_NUM_THREADS=1): the post-training tests' margins were measured so, and two
    threads on a 2-core machine beside anything else ran these small ops ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _environ(_single_rank_pg):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def parity_sft(tmp_path_factory, _single_rank_pg):
    """The parity task's tokenizer, random tiny start (hf/), half-right SFT run (sft/) and
    train/held-out prompts, shared by the DPO, GRPO and PPO tests (tests/train/checkable_tasks.py)."""
    import torch

    from tests.train.checkable_tasks import make_sft_start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _environ(_single_rank_pg):
            return make_sft_start(tmp_path_factory.mktemp("parity"))
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def busy_cpu():
    """Two processes spinning beside a test's launches: a loaded machine on purpose
    (the rare exit-time aborts of issue "exit codes are exact" showed up under load)."""
    spin = "while True: sum(i * i for i in range(10_000))"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    yield
    for p in procs:
        p.kill()
        p.wait(10)


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
