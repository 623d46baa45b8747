"""Two nodes over ssh on loopback (127.0.0.1 and 127.0.0.2, pdsh): `zerollm launch`
runs the real tiny pretraining with ZeRO-2 on both, carries the user's environment
intact, stops gracefully on SIGTERM and resumes, and stops the whole job within 60 s
when a rank on the second node is killed or frozen (or its per-node launcher is
killed), leaving no process behind.
Needs sshd + pdsh (.ci/services.sh)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from launch import jobctl
from tests.launch.launch_helpers import (
    job_id,
    kill_job,
    leftovers,
    make_config,
    make_dataset,
    make_ds_config,
    metrics,
    need_two_nodes,
    rank_environ,
    start_launch,
    wait_for,
    write_hostfile,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

# A value the deepspeed launcher's remote shell would mangle: `$`, spaces, quotes, backslash.
VALUE = 'pa$$ word $HOME `id` "q" \\z'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_two_nodes()
    tmp = tmp_path_factory.mktemp("two_nodes")
    return tmp, make_dataset(tmp / "data" / "tiny"), write_hostfile(tmp), make_ds_config(tmp)


def launch_args(cfg, hostfile, ds, *extra: str) -> list[str]:
    return [
        "pretrain", "--config", str(cfg), "--deepspeed_config", str(ds),
        "--hostfile", str(hostfile), "--heartbeat_timeout", "10", "--stop_grace", "120", *extra,
    ]  # fmt: skip


def test_zero2_on_two_nodes_env_intact_sigterm_saves_and_resume_finishes(cluster):
    tmp, data, hostfile, ds = cluster
    cfg = make_config(tmp, "run", data, max_steps=100000, save_interval=0)
    run_dir = tmp / "run"
    log = tmp / "run-1.log"
    proc = start_launch(launch_args(cfg, hostfile, ds, "--env", f"ZEROLLM_TEST_VALUE={VALUE}"), log)
    job = None
    try:
        job = job_id(log)
        ranks = wait_for(lambda: (r := rank_environ(job)) and len(r) == 2 and r, 120, "2 ranks", proc, log)
        for rank, env in ranks.items():  # what each rank's process really got
            assert env.get("ZEROLLM_TEST_VALUE") == VALUE, (rank, env.get("ZEROLLM_TEST_VALUE"))
        assert {env["CROSS_RANK"] for env in ranks.values()} == {"0", "1"}  # one rank on each node
        wait_for(lambda: len(metrics(run_dir)) >= 2, 300, "2 logged steps", proc, log)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(180)
        out = log.read_text()
        assert rc == 75, out[-3000:]  # EXIT_PREEMPTED: every rank saved and stopped
        assert not leftovers(job, str(cfg)), leftovers(job, str(cfg))
    finally:
        kill_job(job, proc)
    assert all(row["world_size"] == 2 for row in metrics(run_dir) if "world_size" in row)
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    saved_step = int(saved.removeprefix("step"))
    assert saved_step >= 2

    log2 = tmp / "run-2.log"
    proc = start_launch(launch_args(cfg, hostfile, ds, "--set", f"train.max_steps={saved_step + 3}"), log2)
    try:
        rc = proc.wait(400)
        out = log2.read_text()
        assert rc == 0, out[-3000:]
    finally:
        kill_job(None, proc)
    assert f"resumed from {run_dir / 'checkpoints' / saved}" in out
    steps = [row["step"] for row in metrics(run_dir) if "loss" in row]
    assert steps[-3:] == [saved_step + 1, saved_step + 2, saved_step + 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{saved_step + 3:08d}"


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP", "launcher-SIGKILL"])
def test_rank_killed_or_frozen_on_second_node_stops_job_within_60s(cluster, how):
    tmp, data, hostfile, ds = cluster
    cfg = make_config(tmp, f"lost-{how}", data, max_steps=100000, save_interval=0)
    log = tmp / f"lost-{how}.log"
    proc = start_launch(launch_args(cfg, hostfile, ds), log)
    job = None
    try:
        job = job_id(log)
        wait_for(lambda: len(metrics(tmp / f"lost-{how}")) >= 1, 300, "a logged step", proc, log)
        victim = rank_environ(job)[1]
        assert victim["CROSS_RANK"] == "1"  # rank 1 runs on the second node, 127.0.0.2
        if how == "launcher-SIGKILL":  # the per-node deepspeed launcher: its ranks must not live on
            os.kill(jobctl._ppid(int(victim["_pid"])), signal.SIGKILL)
        else:
            os.kill(int(victim["_pid"]), getattr(signal, how))
        t0 = time.monotonic()
        try:
            rc = proc.wait(60)
        except Exception:
            pytest.fail(f"the job was still running 60 s after {how} of rank 1\n{log.read_text()[-3000:]}")
        took = time.monotonic() - t0
        out = log.read_text()
        print(f"{how} of rank 1: job exited {rc} after {took:.1f} s")
        assert rc != 0, out[-3000:]
        if how != "launcher-SIGKILL":
            assert "rank 1 (node 1, host 127.0.0.2" in out, out[-3000:]
        assert not leftovers(job, str(cfg)), leftovers(job, str(cfg))
    finally:
        kill_job(job, proc)
