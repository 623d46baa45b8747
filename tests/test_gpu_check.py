"""benchmarks/gpu_check.sh: its CPU smoke mode runs every step and prints every row with numbers
(so the GPU check cannot rot); the table's own arithmetic and failure lines on made-up runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

ROWS = ["data", "a", "b", "c", "d1", "d2"]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_mode_runs_every_step_and_prints_every_row(tmp_path):
    work = tmp_path / "gc"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("GPU_CHECK_LAUNCH", None)
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--work", str(work)], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    table = {line.split()[0]: line for line in p.stdout.splitlines() if line.strip()}
    for row in ROWS:
        assert row in table, f"no row {row} in:\n{p.stdout}"
        line = table[row]
        assert " ok " in line, line
        result = line.split(" ok ", 1)[1]
        assert re.search(r"\d", result) and "n/a" not in result, line
    assert "total" in table
    got = {r["row"]: r["values"] for r in json.loads((work / "results.json").read_text())["rows"]}
    a, b, c = got["a"], got["b"], got["c"]
    for key in ("loss_first", "loss_last", "loss_scale_last", "skipped_steps", "tokens_per_s"):
        assert isinstance(a[key], (int, float)), (key, a)
    assert a["loss_scale_last"] == 1.0 and a["skipped_steps"] == 0  # fp32 in smoke mode: a static scale of 1
    assert b["tokens_per_s"] > 0 and 0 < b["mfu"] < 1
    assert 0 < c["gen_share"] < 1 and c["gen_tokens_per_s"] > 0 and c["rollouts"] == 2
    for row in ("d1", "d2"):
        assert got[row]["steps"] == 2 and isinstance(got[row]["loss_last"], float)
    for row in ("a", "b", "c", "d1", "d2"):  # zerollm estimate of each run (compared with the measured on a GPU)
        assert got[row]["memory_estimate_gb"] > 0, got[row]
    for step in ("data", "a", "b", "ppo", "sft", "reward"):
        assert (work / "logs" / f"{step}.log").is_file()


def ppo_run(work, times, gen_s, epochs=2):
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "ppo.yaml").write_text(yaml.safe_dump({"ppo": {"epochs": epochs}}))
    run = work / "runs" / "ppo"
    run.mkdir(parents=True)
    rows = [{"step": k + 1, "time": t, "loss": 0.1, "memory_gb": 1.0, "tokens_per_s": 100.0, "reward": 0.5,
             "response_len": 8.0, "gen_s": gen_s[k // epochs], "gen_tokens_per_s": 50.0}
            for k, t in enumerate(times)]  # fmt: skip
    rows.append({"step": len(times), "time": times[-1] + 5, "ckpt_save_s": 5.0})  # not a step row
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_generation_share_counts_rollouts_after_the_first(tmp_path):
    gc = gpu_check_module()
    # 3 rollouts x 2 epochs; rollout 1 (steps 1-2) is warm-up; rollouts 2 and 3 take
    # 4 + 1 s and 3 + 2 s, of which 2 s and 1.5 s generating.
    ppo_run(tmp_path, times=[10, 20, 24, 25, 28, 30], gen_s=[9.0, 2.0, 1.5])
    values, text, bad = gc.summarise("ppo", tmp_path, "smoke", 989.0)
    assert not bad
    assert values["gen_share"] == pytest.approx(3.5 / 10)
    assert values["rollouts"] == 3 and "35%" in text


def test_one_rollout_has_no_share_and_the_table_fails(tmp_path, capsys):
    gc = gpu_check_module()
    ppo_run(tmp_path, times=[10, 20], gen_s=[9.0])
    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "ppo").write_text("ok 30.0")
    (tmp_path / "status" / "data").write_text("failed 2.5 exit 2 (log: x/data.log)")
    assert gc.table("smoke", tmp_path, 989.0) == 1
    out, err = capsys.readouterr()
    assert "CHECK FAILED: no generation share" in out
    assert "gpu_check: FAILED: data (data): exit 2 (log: x/data.log)" in err
    assert "gpu_check: FAILED: c (ppo)" in err
    assert "gpu_check: FAILED: a (a): not run" in err  # no status at all: never silently missing
    rows = {r["row"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["c"]["status"] == "failed" and rows["a"]["status"] == "missing"


def test_a_python_without_the_dependencies_stops_with_one_line(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no such module' >&2\nexit 1\n")
    fake.chmod(0o755)
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path / "w")]
    env = {**os.environ, "PYTHON": str(fake)}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("gpu_check: ") and "does not run" in p.stderr
