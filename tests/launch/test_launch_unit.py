"""`zerollm launch` pieces that need no service: hostfile parsing and filters, values
and arguments surviving deepspeed's own remote-shell quoting (checked with deepspeed's
code and a real bash), pre-flight errors, the dry-run command, finding a job's
processes, and process-group timeouts that also bound `new_group()` groups."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from launch import env as launch_env
from launch import hostfile as hf
from launch import jobctl
from launch.cli import main as cli_main
from tests.conftest import REPO
from tests.launch.launch_helpers import make_config, make_dataset

NASTY = ["pa$$ word", "$HOME", "a`id`b", 'say "hi"', "back\\slash", "it's", "semi;colon&amp", "x!y", "tab\there"]


def test_hostfile_comments_blank_lines_and_filters(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# cluster\n\nnode1 slots=4\nnode2 slots=4  # spare\n")
    hosts = hf.parse_hostfile(path)
    assert hosts == {"node1": 4, "node2": 4}
    assert hf.select(hosts, include="node2:1,3") == {"node2": [1, 3]}
    assert hf.select(hosts, exclude="node1@node2:0") == {"node2": [1, 2, 3]}
    assert hf.select(hosts, num_nodes=1, num_gpus=2) == {"node1": [0, 1]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("node1 slots=4\nnode1 slots=2\n", "hosts:2: host 'node1' is listed twice"),
        ("node1 slots=4\nnode2 4\n", "hosts:2: expected 'HOST slots=N'"),
        ("node1 slots=0\n", "slots=0"),
        ("# nothing\n", "no hosts"),
    ],
)
def test_bad_hostfile_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(hf.HostfileError, match=message.replace("(", r"\(")):
        hf.parse_hostfile(path)


def test_bad_filters_are_clear():
    hosts = {"node1": 2}
    with pytest.raises(hf.HostfileError, match="host 'node9' is not in the hostfile"):
        hf.select(hosts, include="node9")
    with pytest.raises(hf.HostfileError, match="node1 has slots 0..1, not \\[5\\]"):
        hf.select(hosts, include="node1:5")
    with pytest.raises(hf.HostfileError, match="--num_nodes 3: only 1 host"):
        hf.select(hosts, num_nodes=3)


def _remote_shell(line: str) -> str:
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True).stdout


def test_env_file_values_arrive_intact_through_deepspeeds_quoting(tmp_path):
    from deepspeed.launcher.multinode_runner import MultiNodeRunner

    values = {f"V{i}": v for i, v in enumerate(NASTY)} | {"PLAIN": "/a/b:c", "EMPTY": ""}
    path = launch_env.write_env_file(tmp_path / "deepspeed_env", values)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    runner = SimpleNamespace(exports={})
    for line in path.read_text().splitlines(keepends=True):  # exactly as deepspeed's runner reads it
        key, val = line.split("=", maxsplit=1)
        MultiNodeRunner.add_export(runner, key, val)
    exports = "".join(f"export {k}={v}; " for k, v in runner.exports.items())  # deepspeed's pdsh line
    for name, value in values.items():
        assert _remote_shell(exports + f'printf %s "${name}"') == value, name


def test_values_that_cannot_travel_are_refused():
    with pytest.raises(launch_env.EnvError, match="newline"):
        launch_env.escape("a\nb", "X")
    with pytest.raises(launch_env.EnvError, match="leading/trailing spaces"):
        launch_env.escape(" a", "X")


def test_stage_arguments_survive_deepspeeds_pdsh_line():
    from deepspeed.launcher.multinode_runner import PDSHRunner

    from launch.launcher import _pdsh_quote

    args = ["--config", "my run.yaml", *NASTY]
    fake = SimpleNamespace(args=SimpleNamespace(user_args=[_pdsh_quote(a) for a in args]))
    line = " ".join(PDSHRunner.parse_user_args(fake))
    got = _remote_shell(f"printf '%s\\n' {line}").split("\n")[:-1]
    assert got == args


def test_user_env_file_comments_are_skipped(tmp_path):
    path = tmp_path / ".deepspeed_env"
    path.write_text("# mine\n\nNCCL_DEBUG=INFO\nHF_HOME=/data/hf home\n")
    assert launch_env.read_user_env_file(path) == {"NCCL_DEBUG": "INFO", "HF_HOME": "/data/hf home"}


@pytest.fixture
def run_files(tmp_path):
    data = make_dataset(tmp_path / "data" / "tiny")
    cfg = make_config(tmp_path, "run", data, max_steps=4, save_interval=2)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    return tmp_path, cfg, hosts


def test_dry_run_prints_the_deepspeed_command_with_explicit_master_addr(run_files, capsys):
    tmp, cfg, hosts = run_files
    argv = ["launch", "pretrain", "--config", str(cfg), "--deepspeed_config", "ds_configs/zero2.json",
            "--hostfile", str(hosts), "--launcher", "openmpi", "--dry-run"]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "world size 4 on 127.0.0.1, 127.0.0.2" in out
    assert "--master_addr 127.0.0.1 --master_port " in out
    assert f"--hostfile {hosts} " in out and "--launcher openmpi" in out
    assert f"--module launch.rank train.pretrain --config {cfg} --deepspeed_config ds_configs/zero2.json" in out
    assert not (tmp / "run" / "launch").exists()  # a dry run writes nothing


def test_preflight_errors_stop_before_any_rank(run_files, capsys):
    tmp, cfg, hosts = run_files
    ds = json.loads((REPO / "ds_configs/zero2.json").read_text())
    ds["train_batch_size"] = 6
    bad_ds = tmp / "bad.json"
    bad_ds.write_text(json.dumps(ds))
    base = ["launch", "pretrain", "--config", str(cfg), "--hostfile", str(hosts), "--launcher", "openmpi"]
    assert cli_main([*base, "--deepspeed_config", str(bad_ds)]) == 2
    assert "train_batch_size: 6 != micro_batch 2 x grad_accum 1 x world_size 4 = 8" in capsys.readouterr().err
    # --num_gpus changes the world size the arithmetic is checked for (2 hosts x 1 rank).
    assert cli_main([*base, "--deepspeed_config", str(bad_ds), "--num_gpus", "1", "--dry-run"]) == 2
    assert "world_size 2 = 4" in capsys.readouterr().err
    missing = make_config(tmp, "nodata", str(tmp / "data" / "absent"), max_steps=4, save_interval=2)
    assert (
        cli_main(["launch", "pretrain", "--config", str(missing), "--deepspeed_config", "ds_configs/zero2.json"]) == 2
    )
    assert "data.train: " in (err := capsys.readouterr().err) and "absent.bin not found" in err
    (tmp / "badhosts").write_text("127.0.0.1 slots=two\n")
    argv = ["launch", "pretrain", "--config", str(cfg), "--deepspeed_config", "ds_configs/zero2.json"]
    assert cli_main([*argv, "--hostfile", str(tmp / "badhosts")]) == 2
    assert "badhosts:1: expected 'HOST slots=N'" in capsys.readouterr().err
    assert cli_main([*argv, "--env", "BAD-NAME=1", "--num_gpus", "1"]) == 2
    assert "not a valid variable name" in capsys.readouterr().err


def test_jobctl_finds_the_ranks_of_a_job_and_kills_all_its_processes():
    job = f"test{os.getpid()}"
    env = {**os.environ, "ZEROLLM_JOB_ID": job, "LOCAL_RANK": "0", "CROSS_RANK": "0"}
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    rank = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 20
        while len(jobctl.job_processes(job)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert len(jobctl.job_processes(job)) == 2  # the rank and its child (a data worker)
        assert jobctl.job_processes(job, ranks_only=True) == [rank.pid]
        assert jobctl.job_processes(job, ranks_only=True, node="1") == []
        assert jobctl.signal_job(job, signal.SIGKILL) == 2
        rank.wait(10)
        deadline = time.time() + 10
        while jobctl.job_processes(job) and time.time() < deadline:
            time.sleep(0.1)
        assert jobctl.job_processes(job) == []
    finally:
        rank.kill()


@pytest.mark.slow
def test_pg_timeout_bounds_groups_created_later_without_a_timeout(tmp_path):
    """Rank 1 never joins the collective; with ZEROLLM_PG_TIMEOUT=3, rank 0's all_reduce on
    a `new_group()` made without a timeout fails instead of waiting torch's 30 minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(
        """
        import datetime, os, sys, time, torch, torch.distributed as dist
        from launch.watchdog import install_pg_timeouts
        install_pg_timeouts()
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:PORT", rank=int(sys.argv[1]), world_size=2,
                                timeout=datetime.timedelta(minutes=30))  # the default group keeps its own
        group = dist.new_group([0, 1])  # no timeout given, as DeepSpeed does
        if dist.get_rank() == 1:
            time.sleep(300)  # alive, never joins: only a timeout can end rank 0's wait
            sys.exit(0)
        try:
            dist.all_reduce(torch.ones(1), group=group)
        except RuntimeError as e:
            print("COLLECTIVE FAILED:", str(e)[:200], flush=True)
            os._exit(3)  # gloo's threads can abort a normal interpreter exit (SIGABRT) here
        print("COLLECTIVE RETURNED")
        """
    ).replace("PORT", str(port))
    env = {**os.environ, "ZEROLLM_PG_TIMEOUT": "3"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(r)], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    try:
        out, _ = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 3, out
        assert "COLLECTIVE FAILED" in out and "imed out" in out, out
    finally:
        for p in procs:
            p.kill()


# What a 2-rank run writes to its launcher's stdout+stderr, in order (shortened real lines).
TRANSCRIPT = [
    "[2026-12-01 11:09:19,778] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.\n",
    "[2026-12-01 11:09:27,366] [INFO] [launch.py:245:main] process 6658 spawned with command: ['python', '-u']\n",
    "[W1201 11:09:30.123456 ProcessGroupGloo.cpp:514] Warning: Unable to resolve hostname (an error is possible)\n",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n",
    "[rank0] model: 141,056 parameters; world size 2; ZeRO stage 2\n",
    "\rpretrain:   0%|          | 0/4 [00:00<?, ?step/s]",
    "/venv/torch/distributed/c10d_logger.py:83: FutureWarning: `all_gather_into_tensor` is deprecated, or errors\n",
    "  return func(*args, **kwargs)\n",
    "\rpretrain:  50%|█████     | 2/4 [00:02<00:05,  2.56s/step, loss=6.2618]",
    "\rpretrain: 100%|██████████| 4/4 [00:02<00:00,  1.38step/s, loss=6.2425]",
    "\n",
    "[rank1] checkpoint dir is not shared between nodes\n",
    "Traceback (most recent call last):\n",
    '  File "/work/main/train/run.py", line 35, in <module>\n',
    "    from train.config import parse_overrides\n",
    "ImportError: cannot import name 'parse_overrides'\n",
    "[2026-12-01 11:05:44,574] [INFO] [launch.py:253:sigkill_handler] Killing subprocess 4851\n",
    "[2026-12-01 11:05:44,577] [ERROR] [launch.py:259:sigkill_handler] ['python', '-u'] exits with return code = 1\n",
    "zerollm: error: data.train: /data/x.bin not found\n",
    "terminate called without an active exception\n",
]
SHOWN = (
    "[rank0] model: 141,056 parameters; world size 2; ZeRO stage 2\n"
    "pretrain:   0%|          | 0/4 [00:00<?, ?step/s]"  # the warning after it is hidden
    "\rpretrain:  50%|█████     | 2/4 [00:02<00:05,  2.56s/step, loss=6.2618]"
    "\rpretrain: 100%|██████████| 4/4 [00:02<00:00,  1.38step/s, loss=6.2425]\n"
    "[rank1] checkpoint dir is not shared between nodes\n"
    "Traceback (most recent call last):\n"
    '  File "/work/main/train/run.py", line 35, in <module>\n'
    "    from train.config import parse_overrides\n"
    "ImportError: cannot import name 'parse_overrides'\n"
    "[2026-12-01 11:05:44,577] [ERROR] [launch.py:259:sigkill_handler] ['python', '-u'] exits with return code = 1\n"
    "zerollm: error: data.train: /data/x.bin not found\n"
    "terminate called without an active exception\n"
)


def _filtered(chunks, **kw) -> str:
    from launch.supervisor import OutputFilter

    f = OutputFilter(**kw)
    return "".join(f.feed(c) for c in chunks) + f.close()


def test_terminal_shows_our_lines_bars_and_errors_not_deepspeed_chatter():
    assert _filtered(TRANSCRIPT) == SHOWN
    # However the pipe cuts the text (bar redraws arrive whole: tqdm writes each at once).
    whole = "".join(TRANSCRIPT)
    assert _filtered([whole]) == SHOWN
    lines = [c for t in TRANSCRIPT for c in ([t] if t.startswith("\rpretrain") else t)]  # char by char
    assert _filtered(lines) == SHOWN
    assert _filtered(TRANSCRIPT, verbose=True) == whole + "\n"[: not whole.endswith("\n")]


def test_a_bar_redraw_reaches_the_terminal_before_its_newline():
    from launch.supervisor import OutputFilter

    f = OutputFilter()
    assert f.feed("[rank0] step 1\n\rpretrain:  25%|██▌  | 1/4") == "[rank0] step 1\npretrain:  25%|██▌  | 1/4"
    assert f.feed("[2026-12-01 11:10:00,605] [INFO] [launch.py:285:main] Process 6659 exits successfully.\n") == ""
    assert f.feed("[rank0] done\n") == "\n[rank0] done\n"  # on a line of its own, not after the bar


def test_remote_lines_keep_their_host_and_are_judged_without_it():
    chunks = [
        "127.0.0.2: [2026-12-01 11:09:27,366] [INFO] [launch.py:152:main] WORLD INFO DICT: {}\n",
        "127.0.0.2: [rank1] resumed from runs/x/checkpoints/step00000002\n",
        "127.0.0.2: Traceback (most recent call last):\n",
        '127.0.0.2:   File "x.py", line 1, in <module>\n',
        "127.0.0.2: RuntimeError: gloo connection reset\n",
        "127.0.0.2: [2026-12-01 11:09:27,366] [INFO] [launch.py:253:sigkill_handler] Killing subprocess 12\n",
    ]
    assert _filtered(chunks, hosts=["127.0.0.1", "127.0.0.2"]) == "".join(chunks[1:5])


def test_supervisor_logs_everything_shows_the_filtered_part_and_keeps_the_exit_code(tmp_path, capsys, caplog):
    from launch.supervisor import Supervisor

    script = (
        "import sys\n"
        "print('[2026-12-01 11:09:27,366] [INFO] [launch.py:152:main] WORLD INFO DICT')\n"
        "print('[rank0] step 1', flush=True)\n"
        "sys.stderr.write('\\rpretrain: 100%|##| 1/1 [00:00<00:00]\\n')\n"
        "sys.exit('zerollm: error: something a user can fix')\n"
    )
    log = tmp_path / "logs" / "launch-j1.log"
    sup = Supervisor([sys.executable, "-c", script], dict(os.environ), "j1", nodes=["localhost"], log_path=log)
    assert sup.run() == 1
    out = capsys.readouterr()
    assert out.out == "[rank0] step 1\npretrain: 100%|##| 1/1 [00:00<00:00]\nzerollm: error: something a user can fix\n"
    assert re.search(
        rf"job j1 ended with exit code 1 after \d+ s; its whole output is in {re.escape(str(log))}", caplog.text
    )
    assert "[INFO] [launch.py:152:main] WORLD INFO DICT\n[rank0] step 1\n" in log.read_text()
