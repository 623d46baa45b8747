"""A real Slurm cluster on this machine (slurmctld + slurmd + munge, .ci/services.sh):
`sbatch launch/slurm/pretrain.sbatch` runs the tiny pretraining; `scancel --signal=USR1
--batch` makes it checkpoint and requeue; the requeued run resumes from that checkpoint
and the job ends COMPLETED with the final checkpoint."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, need
from tests.launch.launch_helpers import job_env, make_config, make_dataset, make_ds_config, metrics, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_state(job: str, states: set[str], timeout: float, log: Path) -> dict[str, str]:
    deadline = time.time() + timeout
    info = {}
    while time.time() < deadline:
        info = job_info(job)
        if info.get("JobState") in states:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job])
    text = log.read_text() if log.is_file() else ""
    raise AssertionError(f"job {job} not {states} within {timeout} s: {info.get('JobState')}\n{text[-3000:]}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    need(shutil.which("sbatch") is not None, "Slurm is not installed (.ci/services.sh installs it)")
    ok = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    need(ok.returncode == 0 and ok.stdout.strip() != "", "slurmctld/slurmd are not running (.ci/services.sh)")
    tmp = tmp_path_factory.mktemp("slurm")
    return tmp, make_dataset(tmp / "data" / "tiny"), make_ds_config(tmp)


def sbatch(tmp: Path, name: str, cfg: Path, ds: Path) -> tuple[str, Path]:
    log = tmp / f"{name}.out"
    env = job_env()
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", f"--chdir={REPO}", f"--job-name={name}",
         str(REPO / "launch/slurm/pretrain.sbatch"), "--config", str(cfg), "--deepspeed_config", str(ds),
         "--num_gpus", "2", "--master_addr", "127.0.0.1", "--heartbeat_timeout", "30"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return out.stdout.strip().split(";")[0], log


def test_sbatch_pretrain_usr1_checkpoints_requeues_resumes_and_completes(slurm):
    """One job covers both: it runs, is preempted (checkpoint, requeue), resumes, completes."""
    tmp, data, ds = slurm
    cfg = make_config(tmp, "preempt", data, max_steps=100000, save_interval=0)
    run_dir = tmp / "preempt"
    job, log = sbatch(tmp, "preempt", cfg, ds)
    try:
        wait_for(lambda: len(metrics(run_dir)) >= 2, 400, "training steps", log=log)
        # The requeued run reads the config again: let it finish 20 steps after the stop.
        target = metrics(run_dir)[-1]["step"] + 20
        cfg.write_text(cfg.read_text().replace("max_steps: 100000", f"max_steps: {target}"))
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        info = wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 500, log)
    finally:
        subprocess.run(["scancel", job])
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert info["Restarts"] == "1", text[-3000:]
    assert "requeueing job" in text and "restart 1 on" in text, text[-3000:]
    first = (run_dir / "logs" / f"slurm-{job}-restart0-node0.log").read_text()
    stopped = re.search(r"stopped at step (\d+) after a signal; checkpoint saved", first)
    assert stopped, first[-3000:]
    step = int(stopped.group(1))
    second = (run_dir / "logs" / f"slurm-{job}-restart1-node0.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step{step:08d}'}" in second, second[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{target:08d}"
    assert (run_dir / "checkpoints" / f"step{target:08d}").is_dir()
    assert {row["world_size"] for row in metrics(run_dir) if "world_size" in row} == {2}
    assert [row["step"] for row in metrics(run_dir) if "loss" in row][-1] == target
