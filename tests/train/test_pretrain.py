"""Pretraining through the real deepspeed launcher with 2 CPU ranks (gloo).

Launches are the expensive part (~15 s each), so runs are module-scoped fixtures
shared between assertions:

    bf16[stage]   ZeRO 0-3, bf16, 12 steps (stage 2 also gets an injected NaN at step 4)
    ref           ZeRO-0 fp32 with dropout, 10 steps, checkpoints every 2 (the reference)
    fp32[stage]   ZeRO 1-3 fp32, same config as ref: same losses
    killed        the ref config killed twice (a rank SIGKILLed inside a save, then one
                  SIGKILLed mid-training) and restarted each time: same per-rank losses
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, run_cli, tiny_run_config

pytestmark = pytest.mark.slow

VOCAB = 512
GOLDEN = Path(__file__).parent / "golden_tiny_losses.json"


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_corpus(prefix: Path, n_docs: int, seed: int) -> None:
    """Learnable synthetic documents: each continues an arithmetic progression mod VOCAB
    with a per-document stride, with 10% noise tokens."""
    from data_pipeline.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(n_docs):
            n = int(rng.integers(20, 200))
            start, stride = rng.integers(0, VOCAB), rng.integers(1, 4)
            doc = (start + stride * np.arange(n)) % (VOCAB - 1)
            noise = rng.random(n) < 0.1
            doc[noise] = rng.integers(0, VOCAB - 1, noise.sum())
            w.add_document(np.append(doc, VOCAB - 1))  # VOCAB-1 is end-of-text
        w.finalize()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "train", 400, seed=1)
    write_corpus(root / "valid", 40, seed=2)
    return {"train": str(root / "train"), "valid": str(root / "valid")}


def run_config(path: Path, corpus: dict[str, str], run_dir: Path, **train) -> Path:
    """The tiny config these launches share: seq 64, dropout 0.1, eval every 5 steps."""
    train = {"grad_accum_steps": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_interval": 5,
             "eval_steps": 2, "save_interval": 2, "keep_last": 10, **train}  # fmt: skip
    model = {"dropout": train.pop("dropout", 0.1)}
    return tiny_run_config(path, [corpus["train"]], run_dir, valid=[corpus["valid"]], seq_len=64,
                           cache_dir=path.parent, model=model, **train)  # fmt: skip


PORTS: list[int] = []  # master ports of the launches so far


def launch(config: Path, ds: str, nproc: int = 2, env: dict | None = None, wait: bool = True, timeout: float = 900):
    """`deepspeed --num_gpus N --module train.pretrain ...` exactly as a user runs it."""
    PORTS.append(free_port())
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus", str(nproc),
        "--master_addr", "127.0.0.1",
        "--master_port", str(PORTS[-1]),
        "--module", "train.pretrain",
        "--config", str(config),
        "--deepspeed_config", str(REPO / "ds_configs" / ds),
    ]  # fmt: skip
    inherited = {k: v for k, v in os.environ.items() if k not in ("ZEROLLM_FAULT", "ZEROLLM_NAN_STEPS")}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", "ZEROLLM_RANK_LOG": "1", "PYTHONPATH": str(REPO), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def launch_side_by_side(jobs: list[tuple[Path, str, dict | None]], timeout: float = 900) -> list:
    """Launch every (config, ds config, env) at once and wait for all: a 2-rank launch leaves
    the CPUs idle in its start-up and rendezvous, which the others fill."""
    procs = [launch(cfg, ds, env=env, wait=False) for cfg, ds, env in jobs]
    out = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    finally:  # a timeout or an error leaves no launch running (as subprocess.run's timeout does)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    """Train loss by step (the last logged value wins, as after a resume)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def rank_losses(run_dir: Path, rank: int) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "ranks" / f"rank{rank}.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss_local"] for r in rows if "step" in r}


def ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def relclose(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def bf16_runs(corpus, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("bf16")
    jobs = [(run_config(root / f"zero{stage}.yaml", corpus, root / f"zero{stage}", precision="bf16", max_steps=12,
                        dropout=0.0), f"zero{stage}.json", {"ZEROLLM_NAN_STEPS": "4"} if stage == 2 else {})
            for stage in (0, 1, 2, 3)]  # fmt: skip
    for pair in (jobs[:2], jobs[2:]):
        for result in launch_side_by_side(pair):
            ok(result)
    return {stage: root / f"zero{stage}" for stage in (0, 1, 2, 3)}


@pytest.fixture(scope="module")
def ref_run(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    ok(launch(run_config(root / "run.yaml", corpus, root / "run"), "zero0.json"))
    return root / "run"


@pytest.fixture(scope="module")
def fp32_runs(corpus, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("fp32")
    jobs = [(run_config(root / f"zero{stage}.yaml", corpus, root / f"zero{stage}"), f"zero{stage}.json", None)
            for stage in (1, 2, 3)]  # fmt: skip
    for result in launch_side_by_side(jobs):
        ok(result)
    return {stage: root / f"zero{stage}" for stage in (1, 2, 3)}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_loss_falls_on_every_zero_stage(bf16_runs, stage):
    by_step = losses(bf16_runs[stage])
    assert sorted(by_step) == list(range(1, 13))
    assert by_step[12] < by_step[1] - 0.2, by_step
    assert all(r["world_size"] == 2 for r in metrics(bf16_runs[stage]) if "loss" in r)


def test_nan_loss_step_is_skipped_and_counted(bf16_runs):
    rows = [r for r in metrics(bf16_runs[2]) if "loss" in r]
    by_step = {r["step"]: r for r in rows}
    assert not np.isfinite(by_step[5]["loss"])  # step index 4 is logged as step 5
    assert by_step[5]["skipped_steps"] == 1 and by_step[12]["skipped_steps"] == 1
    assert all(np.isfinite(by_step[s]["loss"]) for s in range(6, 13))
    assert by_step[12]["loss"] < by_step[1]["loss"]


def test_runs_leave_no_shared_memory_buffers_behind(bf16_runs):
    """DeepSpeed's CPU all-reduce creates ~69 MB per rank in /dev/shm; we remove the names."""
    assert PORTS
    for run_dir in bf16_runs.values():  # each rank of each run did create and remove its buffer
        for rank in (0, 1):
            first = json.loads((run_dir / "ranks" / f"rank{rank}.jsonl").read_text().splitlines()[0])
            assert len(first["shm_removed"]) == 1 and first["shm_removed"][0].endswith(f"_{rank}"), first
    buffers = Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")
    left = [p.name for p in buffers if int(p.name.split("_")[-2]) in PORTS]
    assert not left, left


def test_zero3_rank_holds_half_the_parameters(bf16_runs):
    for rank in (0, 1):
        first = json.loads((bf16_runs[3] / "ranks" / f"rank{rank}.jsonl").read_text().splitlines()[0])
        assert first["resident_params"] <= first["total_params"] / 2 * 1.05, first
        assert first["resident_params"] >= first["total_params"] / 2 * 0.95, first


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp32_losses_match_across_zero_stages(ref_run, fp32_runs, stage):
    ref, other = losses(ref_run), losses(fp32_runs[stage])
    assert sorted(ref) == sorted(other) == list(range(1, 11))
    for step in ref:
        assert relclose(ref[step], other[step], 1e-4), (step, ref[step], other[step])


def test_golden_losses_of_the_tiny_preset(ref_run):
    got = losses(ref_run)
    if os.environ.get("ZEROLLM_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({str(k): v for k, v in sorted(got.items())}, indent=1) + "\n")
        pytest.fail(f"wrote {GOLDEN} (ZEROLLM_WRITE_GOLDEN=1): a run that writes the golden file checks nothing")
    golden = {int(k): v for k, v in json.loads(GOLDEN.read_text()).items()}
    assert sorted(golden) == sorted(got)
    for step, value in golden.items():
        assert relclose(value, got[step], 1e-4), (step, value, got[step])


def test_kill_and_resume_repeats_losses_exactly(ref_run, corpus, tmp_path):
    run_dir = tmp_path / "run"
    cfg = run_config(tmp_path / "run.yaml", corpus, run_dir)
    # 1. rank 1 is SIGKILLed inside the save of step 6: that checkpoint must not count.
    first = launch(cfg, "zero0.json", env={"ZEROLLM_FAULT": "in_save:1:6"})
    assert first.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000004"
    assert not (ckpts / "step00000006").exists()
    # 2. restart: resumes from step 4; then rank 0 is SIGKILLed right after step 9.
    second = launch(cfg, "zero0.json", env={"ZEROLLM_FAULT": "step:0:9"})
    assert second.returncode != 0
    assert "resumed from" in second.stdout + second.stderr
    # 3. `latest` deleted: the newest complete checkpoint (step 8) is used, not step 0.
    (ckpts / "latest").unlink()
    ok(third := launch(cfg, "zero0.json"))
    assert "resuming from the newest complete checkpoint step00000008" in third.stdout + third.stderr
    for rank in (0, 1):
        want, got = rank_losses(ref_run, rank), rank_losses(run_dir, rank)
        assert sorted(got) == list(range(1, 11))
        for step in range(1, 11):
            assert got[step] == want[step], (rank, step, got[step], want[step])


def test_resume_on_one_rank_from_a_two_rank_zero2_checkpoint(ref_run, fp32_runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fp32_runs[2], run_dir)
    ckpts = run_dir / "checkpoints"
    for step in (8, 10):
        shutil.rmtree(ckpts / f"step{step:08d}")
    (ckpts / "latest").write_text("step00000006")
    conv = run_cli("checkpoint", "universal", str(run_dir), timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    assert (ckpts / "step00000006_universal" / "complete.json").exists()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["train"]["grad_accum_steps"] = 4  # same global batch on 1 rank: 2 x 4 x 1 = 2 x 2 x 2
    cfg["logging"]["run_dir"] = str(run_dir)
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(cfg))
    result = launch(tmp_path / "one.yaml", "zero2.json", nproc=1)
    ok(result)
    resumed = [r for r in metrics(run_dir) if "loss" in r and r["world_size"] == 1]
    assert [r["step"] for r in resumed] == [7, 8, 9, 10]
    assert resumed[-1]["consumed_samples"] == 10 * 8
    ref = losses(ref_run)
    for r in resumed:  # same samples, other dropout masks: close, not equal
        assert relclose(r["loss"], ref[r["step"]], 0.05), (r["step"], r["loss"], ref[r["step"]])


def test_sigterm_checkpoints_at_an_agreed_step_and_exits_75(corpus, tmp_path, busy_cpu):
    run_dir = tmp_path / "run"
    cfg = run_config(tmp_path / "run.yaml", corpus, run_dir, max_steps=500, save_interval=0, eval_interval=0)
    proc = launch(cfg, "zero2.json", wait=False, env={"PYTHONFAULTHANDLER": "1"})
    import psutil

    deadline = time.time() + 600
    while time.time() < deadline and len(losses(run_dir)) < 3:
        time.sleep(0.5)
    assert len(losses(run_dir)) >= 3, "training did not start"
    children = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in children if any(a.startswith("--local_rank=") for a in p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "terminate called" not in out, out[-3000:]  # no rank aborted while exiting
    tag = (run_dir / "checkpoints" / "latest").read_text()
    manifest = json.loads((run_dir / "checkpoints" / tag / "complete.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["step"] == manifest["state"]["step"] >= 3
    assert manifest["step"] < 500


def test_too_many_nan_steps_stop_the_run_and_keep_the_good_checkpoint(corpus, tmp_path, busy_cpu):
    run_dir = tmp_path / "run"
    cfg = run_config(tmp_path / "run.yaml", corpus, run_dir, max_bad_steps=3, eval_interval=0)
    result = launch(cfg, "zero1.json", env={"ZEROLLM_NAN_STEPS": "3,4,5", "PYTHONFAULTHANDLER": "1"})
    assert result.returncode == 3, result.stdout[-2000:]
    assert "terminate called" not in result.stdout + result.stderr  # no rank aborted while exiting
    assert "3 consecutive steps with NaN/inf loss" in result.stdout + result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"


def test_micro_batch_and_accumulation_splits_give_the_same_update(corpus, tmp_path, busy_cpu):
    # Same 16 samples per step on 2 ranks: micro 1 x accumulation 8 vs micro 8 x accumulation 1.
    # Under a busy CPU these are also the exit-code-0 case of test_exit_codes.py (plain deepspeed).
    jobs = [(run_config(tmp_path / f"mb{mb}.yaml", corpus, tmp_path / f"mb{mb}", micro_batch_size=mb,
                        grad_accum_steps=gas, max_steps=3, dropout=0.0, eval_interval=0, save_interval=0),
             "zero0.json", {"PYTHONFAULTHANDLER": "1"}) for mb, gas in ((1, 8), (8, 1))]  # fmt: skip
    for result in launch_side_by_side(jobs):
        ok(result)
        assert "terminate called" not in result.stdout + result.stderr  # no rank aborted while exiting
    results = {mb: losses(tmp_path / f"mb{mb}") for mb in (1, 8)}
    for step in (1, 2, 3):
        assert relclose(results[1][step], results[8][step], 1e-5), (step, results)


def test_zero2_checkpoint_exports_to_transformers_with_equal_logits(bf16_runs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from train.commands import load_checkpoint_model

    out = tmp_path / "hf"
    result = run_cli("export", str(bf16_runs[2]), "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, _ = load_checkpoint_model(str(bf16_runs[2]))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        a, _ = ours.eval()(x)
        b = hf(x).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
