"""Shared helpers for the launch tests: a tiny run config and dataset, starting
`zerollm launch`, finding a job's ranks through /proc, and service checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from launch import jobctl
from tests.conftest import REPO, need, tiny_run_config

HOSTS = ["127.0.0.1", "127.0.0.2"]


def make_dataset(prefix: Path) -> str:
    """200 random documents of token ids < 500 (the tiny preset's vocab is 512)."""
    from data_pipeline.indexed import IndexedDatasetWriter

    if not Path(f"{prefix}.idx").is_file():
        rng = np.random.default_rng(0)
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for _ in range(200):
                w.add_document(rng.integers(1, 500, size=int(rng.integers(20, 80))).astype(np.uint16))
            w.finalize()
    return str(prefix)


def make_config(tmp: Path, name: str, data: str, max_steps: int, save_interval: int, **train) -> Path:
    return tiny_run_config(tmp / f"{name}.yaml", [data], tmp / name, max_steps=max_steps,
                           save_interval=save_interval, **train)  # fmt: skip


_warm = False


def warm_deepspeed_ops() -> None:
    """Build DeepSpeed's shm comm op once, in one process, before any job starts: ranks
    starting together would otherwise race for the build lock, and a rank killed while it
    holds the lock stalls every later job."""
    global _warm
    if not _warm:
        code = "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder')"
        code += ".load()"
        subprocess.run([sys.executable, "-c", code], env=job_env(), cwd=REPO, check=True, timeout=900,
                       capture_output=True)  # fmt: skip
        _warm = True


def make_ds_config(tmp: Path, base: str = "ds_configs/zero2.json") -> Path:
    """The project's ds_config with torch's AdamW instead of DeepSpeed's JIT-compiled CPU
    FusedAdam: ZeRO is unchanged, and the tests skip a minutes-long C++ build on 2 cores."""
    ds = json.loads((REPO / base).read_text())
    ds["optimizer"]["params"]["torch_adam"] = True
    path = tmp / Path(base).name
    path.write_text(json.dumps(ds, indent=2))
    warm_deepspeed_ops()
    return path


def write_hostfile(tmp: Path) -> Path:
    path = tmp / "hostfile"
    path.write_text("# two test nodes on loopback\n" + "".join(f"{h} slots=1\n" for h in HOSTS))
    return path


def start_launch(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`zerollm launch ARGS` in its own session, output to `log`."""
    out = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "launch", *args],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**job_env(), **(env or {})},
        start_new_session=True,
    )


def job_env() -> dict[str, str]:
    """The tests' own torch extension cache (DeepSpeed's shm comm op), so a build another
    process runs or leaves locked in the shared one cannot stall them; and one PATH for
    every job: a different `ninja` first on PATH makes torch rebuild the op (minutes)."""
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {"TORCH_EXTENSIONS_DIR": "/var/tmp/zerollm-launch-tests/torch_extensions", **os.environ, "PATH": path}


def job_id(log: Path, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("zerollm launch: job "):
                return line.split()[3].rstrip(",")
        time.sleep(0.2)
    raise AssertionError(f"no job line in {log}:\n{log.read_text()[-3000:]}")


def rank_environ(job: str) -> dict[int, dict[str, str]]:
    """Global rank -> initial environment, for this job's live ranks on this machine."""
    out = {}
    for pid in jobctl.job_processes(job, ranks_only=True):
        env = jobctl._environ(pid)
        if "RANK" in env:
            out[int(env["RANK"])] = {**env, "_pid": str(pid)}
    return out


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def leftovers(job: str, marker: str) -> list[str]:
    """Processes of the job still alive: by job id, and by the run config path on the command line."""
    found = [f"{pid} (job id)" for pid in jobctl.job_processes(job)]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(f"{entry.name} ({cmd[:120]})")
    return found


def kill_job(job: str | None, proc: subprocess.Popen) -> None:
    """Test cleanup: nothing of a failed test may outlive it."""
    if job:
        jobctl.signal_job(job, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def need_two_nodes() -> None:
    need(shutil.which("pdsh") is not None, "pdsh is not installed (.ci/services.sh installs it)")
    for host in HOSTS:
        ok = subprocess.run(
            ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=no", host, "true"],
            capture_output=True,
            timeout=30,
        ).returncode
        need(ok == 0, f"passwordless ssh to {host} does not work (.ci/services.sh sets it up)")
