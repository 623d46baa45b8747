"""The PPO stage (train/ppo.py) in this one process (world size 1, real DeepSpeed engines:
actor and critic training, reference and reward model frozen).

PPO with a reward model trained on a checkable preference raises both the reward model's
  score and the checkable success rate of greedy held-out answers, KL to the reference bounded
the first update of every rollout sees a ratio of exactly 1; 4 epochs per rollout stay stable
one checkpoint holds actor and critic; a resume repeats the uninterrupted run's metrics
2 ranks through the real launchers: a SIGKILLed rank, a re-run, a SIGTERM (checkpoint between
  rollouts, exit 75) and a last re-run log every step's metrics as a run never interrupted
pure math: GAE, clipped policy and value losses, KL estimators (tests/train/test_losses.py)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO
from tests.train import checkable_tasks

pytestmark = pytest.mark.usefixtures("single_rank_group")
ZERO0 = str(REPO / "ds_configs" / "zero0.json")


@pytest.fixture(scope="module")
def start(parity_sft) -> Path:
    """The parity SFT model (it answers "odd" to every held-out prompt, greedy) and a reward
    model trained from it on pairs whose preferred answer is checkable: "even"."""
    from train.reward import stage_run

    root = parity_sft
    pairs = [{"prompt": r["prompt"], "chosen": "even", "rejected": "odd"} for r in checkable_tasks.parity_rows(400, 3)]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cfg = {"model": {"dropout": 0.0},
           "reward": {"train_file": str(root / "prefs.jsonl"), "valid_fraction": 0.1, "init_from": str(root / "sft"),
                      "tokenizer": str(root / "tok"), "max_len": 32},
           "data": {"seq_len": 32},
           "train": {"micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 30, "warmup_steps": 0, "lr": 1e-3,
                     "schedule": "constant", "precision": "fp32", "eval_interval": 30, "save_interval": 30,
                     "weight_decay": 0.0},
           "logging": {"run_dir": str(root / "rm"), "log_interval": 10, "tensorboard": False}}  # fmt: skip
    (root / "rm.yaml").write_text(yaml.safe_dump(cfg))
    assert stage_run(argparse.Namespace(config=str(root / "rm.yaml"), deepspeed_config=ZERO0, set=[])) == 0
    return root


def ppo_config(root: Path, run_dir: Path, ppo: dict | None = None, **train) -> Path:
    cfg = {
        "model": {"dropout": 0.0},
        "ppo": {"prompts_file": str(root / "prompts.jsonl"), "valid_prompts_file": str(root / "valid.jsonl"),
                "init_from": str(root / "sft"), "reward_model": str(root / "rm"), "tokenizer": str(root / "tok"),
                "eval_reward": "tests.train.checkable_tasks:says_even", "max_new_tokens": 4, "kl_coef": 0.05,
                "epochs": 4, "minibatches": 1, "eval_prompts": 64, **(ppo or {})},
        "train": {"micro_batch_size": 16, "grad_accum_steps": 1, "max_steps": 40, "warmup_steps": 0, "lr": 1e-3,
                  "schedule": "constant", "precision": "fp32", "eval_interval": 40, "eval_at_start": True,
                  "save_interval": 20, "weight_decay": 0.0, **train},
        "logging": {"run_dir": str(run_dir), "log_interval": 1, "tensorboard": False},
    }  # fmt: skip
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_ppo(config: Path) -> list[dict]:
    from train.ppo import stage_run

    assert stage_run(argparse.Namespace(config=str(config), deepspeed_config=ZERO0, set=[])) == 0
    return [json.loads(line) for line in (config.with_suffix("") / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_reward_model_score_and_success_with_bounded_kl(start, tmp_path):
    rows = run_ppo(ppo_config(start, tmp_path / "run"))
    steps = [r for r in rows if "loss" in r]
    before, after = (r for r in rows if "eval_success" in r)
    print("ppo: before", before, "after", after, "reward", [round(r["reward"], 2) for r in steps][::4],
          "kl", [round(r["kl_to_ref"], 3) for r in steps][::4])  # fmt: skip
    firsts = [r for r in steps if r["step"] % 4 == 1]  # 4 epochs per rollout: steps 1, 5, 9, ...
    assert len(firsts) == 10 and all(r["approx_kl"] == 0.0 and r["clip_fraction"] == 0.0 for r in firsts)
    # Measured (these seeds; 10 rollouts of 16 answers x 4 epochs): ?
    assert after["eval_reward"] > before["eval_reward"] + 0.5
    assert before["eval_success"] == 0.0 and after["eval_success"] >= 0.9
    assert max(r["kl_to_ref"] for r in steps) < 2.0
    assert all(r["value_loss"] == r["value_loss"] for r in steps)  # finite: 4 epochs per rollout, no divergence


def test_one_checkpoint_holds_actor_and_critic_and_a_resume_repeats_the_run(start, tmp_path):
    """Stopped at a rollout boundary (step 8 of 16), re-run: steps 9..16 repeat the metrics
    of an uninterrupted run exactly (same rollouts, same updates of actor and critic)."""
    keys = ("loss", "reward", "kl_to_ref", "value_loss", "approx_kl", "kl_coef")
    whole = run_ppo(ppo_config(start, tmp_path / "whole", max_steps=16, save_interval=8, eval_interval=0))
    run_dir = tmp_path / "cut"
    run_ppo(ppo_config(start, run_dir, max_steps=8, save_interval=8, eval_interval=0))
    manifest = json.loads(next((run_dir / "checkpoints").glob("step*/complete.json")).read_text())
    assert manifest["engines"] == ["policy", "value"]
    resumed = run_ppo(ppo_config(start, run_dir, max_steps=16, save_interval=8, eval_interval=0))
    a = {r["step"]: [r[k] for k in keys] for r in whole if "loss" in r and r["step"] > 8}
    b = {r["step"]: [r[k] for k in keys] for r in resumed if "loss" in r and r["step"] > 8}
    assert list(a) == list(range(9, 17)) and a == b
    # `zerollm export` of a PPO run writes its policy (the actor), as transformers loads it.
    from transformers import AutoModelForCausalLM

    from train.checkpoint import checkpoint_folder, consolidated_state_dict
    from train.commands import load_run_dir_config, run_export
    from train.model import CustomLanguageModel

    out = tmp_path / "hf"
    assert run_export(argparse.Namespace(run_dir=str(run_dir), out=str(out), tag=None, tokenizer=None)) == 0
    policy_sd = consolidated_state_dict(checkpoint_folder(run_dir, None), "policy")
    cfg = load_run_dir_config(run_dir).model
    policy = CustomLanguageModel(cfg).eval()
    policy.load_state_dict(policy_sd, strict=False)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(out).eval()(idx).logits
        assert torch.allclose(hf_logits, policy(idx)[0][..., : hf_logits.size(-1)], atol=1e-4)
    assert (out / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------- the real launchers, 2 ranks


def noisy_says_even(prompts: list[str], completions: list[str]) -> list[float]:
    """says_even plus noise drawn from the rank's global torch, numpy and Python RNGs: a run
    repeats its rewards only where every rank's RNG resumes where it was saved."""
    noise = [torch.rand(()).item() + np.random.rand() + random.random() - 1.5 for _ in completions]
    return [float(c.strip() == "even") + 0.1 * n for c, n in zip(completions, noise, strict=True)]


def launch_ppo(config: Path, log: Path, via: str = "deepspeed", env: dict | None = None):
    """2 CPU ranks, ZeRO-2, as a user starts them: `deepspeed --num_gpus 2 --module train.ppo`
    or `zerollm ppo --num_gpus 2` (its supervisor owns the ranks and their stop signals);
    output to `log`; returns the launcher's process."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import SINGLE_RANK_VARS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = ["--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    stage = ["--config", str(config), "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")]
    if via == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), *where, "--module", "train.ppo", *stage]
    else:
        cmd = [sys.executable, "-m", "launch.cli", "ppo", *stage, *where, "--verbose"]
    inherited = {k: v for k, v in os.environ.items() if k not in (*SINGLE_RANK_VARS, "ZEROLLM_FAULT")}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", "ZEROLLM_RANK_LOG": "1", "PYTHONPATH": str(REPO), **(env or {})}
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip


def step_rows(run_dir: Path) -> dict[str, dict[int, dict]]:
    """Each step's deterministic metrics (no timings): the global row (metrics.jsonl) and each
    rank's own loss (ranks/rank<r>.jsonl); the last row of a step wins, as after a resume."""
    timings = {"time", "tokens_per_s", "samples_per_s", "gen_tokens_per_s", "gen_s", "memory_gb", "last_iteration_s",
               "last_gen_share", "peak_growth"}  # fmt: skip (measurements: peak_growth is a rank's peak memory)
    out = {}
    for name, path in [("global", run_dir / "metrics.jsonl")] + [
        (f"rank{r}", run_dir / "ranks" / f"rank{r}.jsonl") for r in (0, 1)
    ]:
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        out[name] = {
            r["step"]: {k: v for k, v in r.items() if k not in timings}
            for r in rows
            if "loss" in r or "loss_local" in r
        }
    return out


@pytest.mark.slow
def test_two_rank_ppo_resumes_after_sigkill_and_sigterm_with_the_same_metrics(parity_sft, tmp_path):
    """2 CPU ranks, ZeRO-2, 10 rollouts x 4 epochs, adaptive KL coefficient, a reward with noise
    from each rank's RNG: a run (`deepspeed`) whose rank 1 is SIGKILLed after step 10 (mid-
    rollout: the checkpoint of step 8 is the newest), re-run (`zerollm ppo`) and SIGTERMed
    once step 9 is logged (the ranks agree to stop at the next rollout boundary: checkpoint,
    exit 75), re-run to the end (`deepspeed`), logs for every step the same metrics (reward,
    KL, KL coefficient, losses, clip fractions, entropy, grad norm, per-rank losses) as a run
    never interrupted (launched beside the first interrupted one), and ends with the same
    RNG state on every rank. (Rollouts after the SIGTERM leave it time to arrive before the end.)"""
    root, max_steps, cycle = parity_sft, 40, 4
    ppo = {"reward_model": "", "reward": "tests.train.test_ppo:noisy_says_even", "valid_prompts_file": "",
           "eval_reward": "", "kl_target": 0.05}  # fmt: skip
    train = {"micro_batch_size": 4, "max_steps": max_steps, "save_interval": 8, "eval_interval": 0, "keep_last": 20}
    cfg, ckpts = ppo_config(root, tmp_path / "run", ppo, **train), tmp_path / "run" / "checkpoints"
    logs = [tmp_path / f"launch{i}.log" for i in range(4)]

    def finished(proc, i: int) -> tuple[int, str]:
        code, out = proc.wait(timeout=600), logs[i].read_text()
        assert "terminate called" not in out, out[-3000:]  # no rank aborted while exiting
        return code, out

    ref = launch_ppo(ppo_config(root, tmp_path / "ref", ppo, **train), logs[0])
    killed = launch_ppo(cfg, logs[1], env={"ZEROLLM_FAULT": "step:1:10"})
    code, out = finished(ref, 0)
    assert code == 0, out[-3000:]
    code, out = finished(killed, 1)
    assert code != 0 and (ckpts / "latest").read_text() == "step00000008", out[-3000:]
    logged = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    stopped = launch_ppo(cfg, logs[2], via="zerollm")
    sigterm_once_logged(stopped, tmp_path / "run" / "metrics.jsonl", logged, step=9)
    code, out = finished(stopped, 2)
    assert code == 75 and f"resumed from {ckpts / 'step00000008'}" in out, out[-3000:]
    tag = (ckpts / "latest").read_text()
    manifest = json.loads((ckpts / tag / "complete.json").read_text())
    assert "stopped at step" in out and manifest["step"] % cycle == 0, (manifest["step"], out[-3000:])
    assert 12 <= manifest["step"] < max_steps, (manifest["step"], out[-3000:])
    code, out = finished(launch_ppo(cfg, logs[3]), 3)
    assert code == 0 and f"resumed from {ckpts / tag}" in out, out[-3000:]
    want, got = step_rows(tmp_path / "ref"), step_rows(tmp_path / "run")
    for name in ("global", "rank0", "rank1"):
        assert sorted(got[name]) == sorted(want[name]) == list(range(1, max_steps + 1)), name
        for step in want[name]:
            assert got[name][step] == want[name][step], (name, step)  # exactly: same rollouts, same updates
    for r in (0, 1):
        a, b = (torch.load(d / "checkpoints" / f"step{max_steps:08d}" / f"zerollm_rank{r:05d}.pt")
                for d in (tmp_path / "ref", tmp_path / "run"))  # fmt: skip
        assert torch.equal(a["torch"], b["torch"]) and torch.equal(a["numpy"], b["numpy"]), r
        assert a["python"] == b["python"] and a["numpy_pos"] == b["numpy_pos"], r


def sigterm_once_logged(proc, metrics: Path, logged: int, step: int) -> None:
    """SIGTERM to the launcher (as a user's kill or a scheduler sends it) once this launch
    has logged `step` (in the rows of `metrics` past the first `logged`)."""
    import signal
    import time

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        text = metrics.read_text()
        rows = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()[logged:]]  # whole lines
        if any(r.get("step", 0) >= step and "loss" in r for r in rows):
            proc.send_signal(signal.SIGTERM)
            return
        time.sleep(0.05)
