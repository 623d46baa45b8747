"""What a person sees in the terminal during a real `zerollm launch` of a tiny 2-rank run:
ZeroLLM's own lines, the progress bar and the verdict by default, DeepSpeed's and torch's
chatter only in the launch log (and on the terminal with `--verbose`). The line filter
itself is tested in test_launch_unit.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.launch.launch_helpers import kill_job, make_config, make_dataset, make_ds_config, start_launch

pytestmark = pytest.mark.slow
CHATTER = re.compile(r"\[(INFO|WARNING)\] \[")  # DeepSpeed's "[2026-...] [INFO] [launch.py:152:main] ..."


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("output")
    return tmp, make_dataset(tmp / "data"), make_ds_config(tmp)


def _launch(tmp: Path, data: str, ds: Path, name: str, *extra: str) -> tuple[int, str]:
    cfg = make_config(tmp, name, data, max_steps=2, save_interval=0)
    log = tmp / f"{name}.terminal"
    args = ["pretrain", "--config", str(cfg), "--deepspeed_config", str(ds), "--num_gpus", "2",
            "--master_addr", "127.0.0.1", *extra]  # fmt: skip
    proc = start_launch(args, log, env={"OMP_NUM_THREADS": "1"})
    try:
        rc = proc.wait(600)
    except subprocess.TimeoutExpired:
        kill_job(None, proc)
        raise
    return rc, log.read_text()


def test_default_terminal_shows_our_lines_and_bar_and_the_log_file_has_deepspeeds(tiny_run, busy_cpu):
    # Under a busy CPU this is also the exit-code-0 case of tests/train/test_exit_codes.py.
    tmp, data, ds = tiny_run
    rc, out = _launch(tmp, data, ds, "quiet")
    assert rc == 0, out[-3000:]
    assert "[rank0] model: " in out and re.search(r"pretrain: 100%\|", out), out[-3000:]
    assert re.search(r"zerollm launch: job \w+ finished in \d+ s\n$", out), out[-3000:]
    assert not CHATTER.search(out) and "spawned with command" not in out, out
    (path,) = re.findall(r"DeepSpeed's and torch's own output: (\S+) \(--verbose shows it here\)", out)
    job = re.search(r"zerollm launch: job (\w+),", out)[1]
    assert Path(path) == tmp / "quiet" / "logs" / f"launch-{job}.log"
    full = Path(path).read_text()
    assert "[INFO] [launch.py" in full and "spawned with command" in full  # the launcher's own
    assert "[rank0] model: " in full and "pretrain: 100%|" in full  # and all the rest
    assert "terminate called" not in full  # no rank aborted while exiting
    # zerollm estimate's table heads the terminal and the launch log; rank 0 ends with its
    # measured peak beside that estimate
    assert "zerollm launch: estimate (device memory:" in out and full.startswith("zerollm launch: estimate")
    assert re.search(r"\[rank0\] memory: peak [\d.]+ GB on rank 0 \(peak RSS growth\), estimate [\d.]+ GB", out), out


def test_verbose_terminal_shows_deepspeeds_output_too(tiny_run):
    tmp, data, ds = tiny_run
    rc, out = _launch(tmp, data, ds, "loud", "--verbose")
    assert rc == 0, out[-3000:]
    assert "[INFO] [launch.py" in out and "spawned with command" in out, out[-3000:]
    assert "[rank0] model: " in out and "(shown here too)" in out
