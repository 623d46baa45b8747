"""`zerollm estimate` (train/estimate.py): checked against real runs, not against itself.

- the activation count (a meta-device trace) equals what a real CPU forward saves, byte for
  byte, for both model styles and both attention kernels;
- the model states by ZeRO stage, worked out by hand;
- post-training roles: PPO holds actor, critic, reference and reward plus the rollout cache;
- the command: a table, exit 1 and the smallest change when it does not fit; `zerollm launch`
  prints the same table and stops before any rank when the run cannot fit;
- real jobs (one 1-rank, one 2-rank launch of train.pretrain): each rank's measured peak
  memory (train.memory, peak RSS growth) within 15% of the estimate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launch.cli import main as cli_main
from tests.conftest import REPO
from train.config import load_ds_config, load_run_config
from train.estimate import Role, estimate, parameter_count, role_parts, saved_activation_bytes, stage_roles
from train.model import CustomLanguageModel, ModelConfig

GPT2 = ModelConfig(vocab_size=512, max_seq_len=64, n_layer=2, n_head=4, d_model=64)
LLAMA = ModelConfig(vocab_size=512, max_seq_len=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64, pos_emb="rope",
                    norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, ffn_multiple_of=32)  # fmt: skip


def real_saved_bytes(cfg: ModelConfig, batch: int, seq: int) -> int:
    """What autograd saves in a real CPU forward (storages counted once, parameters not)."""
    torch.manual_seed(0)
    model = CustomLanguageModel(cfg).train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            seen.setdefault(s._cdata, s.nbytes())
        return t

    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return sum(seen.values())


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])  # CPU: flash kernel without dropout, math kernel with
def test_the_meta_trace_counts_what_a_real_forward_saves(style, dropout):
    cfg = dataclasses.replace(GPT2 if style == "gpt2" else LLAMA, dropout=dropout)
    flash = dropout == 0.0
    assert saved_activation_bytes(cfg, 3, 40, torch.float32, flash, device="meta") == real_saved_bytes(cfg, 3, 40)
    # what the estimate runs for a forward this small: a real one on the CPU, the same bytes
    assert saved_activation_bytes(cfg, 3, 40, torch.float32, flash) == real_saved_bytes(cfg, 3, 40)


def by_what(parts) -> dict[str, float]:
    return {p.what: p.bytes for p in parts}


def test_model_states_by_zero_stage_worked_out_by_hand():
    cfg = GPT2
    n = parameter_count(cfg)
    assert (
        n == CustomLanguageModel(cfg).num_parameters() == sum(p.numel() for p in CustomLanguageModel(cfg).parameters())
    )
    model = Role("model", cfg, trains=True)
    zero = lambda stage, **kw: {"zero_optimization": {"stage": stage, "reduce_bucket_size": 1000, **kw}}  # noqa: E731
    s0 = by_what(role_parts(model, zero(0), 4, 2, "cuda"))  # bf16 weights, 4 ranks
    assert s0 == {"parameters": 2 * n, "gradients": 2 * n, "fp32 master weights": 4 * n, "AdamW moments": 8 * n,
                  "optimizer step temporaries": 4 * n}  # fmt: skip
    s2 = by_what(role_parts(model, zero(2, overlap_comm=True), 4, 4, "cuda"))  # fp32, 4 ranks
    assert s2 == {"parameters": 4 * n, "gradients (partition)": n, "fp32 master partition": n,
                  "AdamW moments (partition)": 2 * n, "optimizer step temporaries": 4 * n,
                  "gradient buckets": 4 * 2000}  # fmt: skip
    s1 = by_what(role_parts(model, zero(1), 4, 4, "cuda"))
    assert s1["gradients (full)"] == 4 * n and s1["fp32 master partition"] == n
    s3 = by_what(role_parts(model, zero(3, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=100), 4, 4, "cuda"))
    block = 2 * 128 + (64 * 192 + 192 + 64 * 64 + 64) + (64 * 256 + 256 + 256 * 64 + 64)  # norms, attention, MLP
    assert s3["parameters (partition)"] == n and s3["gathered parameters"] == 4 * (block + 100)  # > the embedding
    s3_kept = by_what(role_parts(model, zero(3), 4, 4, "cuda"))  # default reuse distance 1e9 keeps all gathered
    assert s3_kept["gathered parameters"] == 4 * n
    offload = role_parts(model, zero(2, offload_optimizer={"device": "cpu"}), 4, 4, "cuda")
    host = {"gradients (partition)", "fp32 master partition", "AdamW moments (partition)", "optimizer step temporaries"}
    assert {p.what for p in offload if p.where == "host"} == host
    frozen = by_what(role_parts(Role("reference", cfg, trains=False), zero(2), 4, 2, "cuda"))
    assert frozen == {"parameters": 2 * n}  # a frozen role under ZeRO-1/2 is a plain replica


def write_config(tmp: Path, name: str, sections: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def pretrain_sections(tmp: Path, model: dict, mb: int = 4, seq: int = 256, **train) -> dict:
    for ext in (".bin", ".idx"):
        (tmp / f"tokens{ext}").touch()
    return {"model": {"vocab_size": 8192, "max_seq_len": seq, "dropout": 0.0, **model},
            "data": {"train": [str(tmp / "tokens")], "seq_len": seq, "cache_dir": str(tmp)},
            "train": {"micro_batch_size": mb, "grad_accum_steps": 1, "max_steps": 3, "warmup_steps": 0,
                      "precision": "fp32", "eval_interval": 0, "save_interval": 0, **train},
            "logging": {"run_dir": str(tmp / "run"), "log_interval": 1, "tensorboard": False}}  # fmt: skip


def test_ppo_estimates_every_role_and_the_rollout_cache(tmp_path):
    from train.ppo import CONFIG_SECTIONS

    sections = pretrain_sections(tmp_path, {"n_layer": 2, "n_head": 4, "d_model": 64})
    sections["ppo"] = {"prompts_file": "p.jsonl", "reward_model": str(tmp_path / "rm"), "tokenizer": "t",
                       "max_prompt_len": 32, "max_new_tokens": 16}  # fmt: skip
    cfg = load_run_config(str(write_config(tmp_path, "ppo", sections)), extra_sections=CONFIG_SECTIONS)
    roles, rows, length, gen = stage_roles(cfg, "ppo")
    assert [r.name for r in roles] == ["actor", "critic", "reference", "reward"]
    assert [r.trains for r in roles] == [True, True, False, False] and gen == (4, 48) and length == 48
    ds = load_ds_config(str(REPO / "ds_configs" / "zero3.json"), cfg, 2)
    est = estimate(cfg, ds, 2, "ppo", "cuda", None, timed=False)
    kv = [p for p in est.parts if p.what == "KV cache (rollout)"]
    assert kv[0].bytes == 2 * 2 * 4 * 48 * 4 * 16 * 4  # K and V x layers x rows x positions x heads x head_dim x fp32
    assert any(p.what == "gathered replica (rollout)" for p in est.parts)  # ZeRO-3 generates with whole weights
    assert {p.role for p in est.parts if p.what == "activations"} == {"actor", "critic"}
    assert {p.role for p in est.parts if p.what == "logits and loss"} == {"actor"}  # the critic reads a scalar head
    assert any(n.startswith(f"{tmp_path / 'rm'}: not readable") for n in est.notes)  # the shape it used instead
    assert "note: " in est.table()


def test_estimate_command_says_what_would_fit(tmp_path, capsys):
    big = pretrain_sections(tmp_path, {"n_layer": 8, "n_head": 8, "d_model": 512}, mb=16, seq=1024)
    cfg = write_config(tmp_path, "big", big)
    argv = [
        "estimate",
        "--config",
        str(cfg),
        "--ds",
        "ds_configs/zero2.json",
        "--num_gpus",
        "8",
        "--peak-tflops",
        "989",
    ]
    assert cli_main([*argv, "--gpu-memory", "40GB"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "model: activations" in out and "MFU 0.40 of 989 TFLOP/s" in out
    # 16 x 1024 tokens of activations (~10 GB) do not fit in 4 GB; checkpointing the blocks does
    assert cli_main([*argv, "--gpu-memory", "4GB"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out
    assert "would fit with: train.activation_checkpointing: true" in out


def test_a_launch_that_cannot_fit_stops_before_any_rank(tmp_path, capsys):
    huge = pretrain_sections(tmp_path, {"n_layer": 48, "n_head": 16, "d_model": 4096}, mb=64, seq=4096)
    cfg = write_config(tmp_path, "huge", huge)  # 10B parameters: no CPU node holds it at ZeRO-0
    argv = [
        "launch",
        "pretrain",
        "--config",
        str(cfg),
        "--deepspeed_config",
        "ds_configs/zero0.json",
        "--num_gpus",
        "1",
    ]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "estimated peak" in err[0] and "would fit with:" in err[0], err
    assert not (tmp_path / "run").exists()
    small = write_config(tmp_path, "small", pretrain_sections(tmp_path, {"n_layer": 2, "n_head": 4, "d_model": 64}))
    assert cli_main(["launch", "pretrain", "--config", str(small), "--ds", "ds_configs/zero0.json", "--num_gpus", "1",
                     "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "zerollm launch: estimate" in out and "model: AdamW moments" in out and "time:" in out


# ----------------------------------------------------------------------------- real runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SMALL = {"n_layer": 4, "n_head": 6, "d_model": 384}  # 10.4M parameters: model states and activations dominate
REAL_RUNS = [("zero2", 1, True), ("zero3", 2, False)]  # (ds config, ranks, activation checkpointing)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> dict:
    import numpy as np

    from data_pipeline.indexed import IndexedDatasetWriter

    tmp = tmp_path_factory.mktemp("estimate")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp / "tokens", np.uint16) as w:
        for _ in range(100):
            w.add_document(rng.integers(0, 8192, 600))
        w.finalize()
    jobs = {}
    for ds_name, ranks, ckpt in REAL_RUNS:  # both at once: a peak does not depend on the time it takes
        sections = pretrain_sections(tmp, {**SMALL, "activation_checkpointing": ckpt})
        sections["logging"]["run_dir"] = str(tmp / f"{ds_name}_{ranks}")
        cfg = write_config(tmp, f"{ds_name}_{ranks}", sections)
        ds = REPO / "ds_configs" / f"{ds_name}.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ZEROLLM_RANK_LOG": "1", "PYTHONPATH": str(REPO)}
        if ranks == 1:  # one rank without a launcher, as `python -m train.pretrain` runs it
            cmd = [sys.executable, "-m", "train.pretrain", "--config", str(cfg), "--deepspeed_config", str(ds)]
            env |= {"MASTER_PORT": str(free_port())}
        else:
            cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), "--module", "train.pretrain", "--config",
                   str(cfg), "--deepspeed_config", str(ds)]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        jobs[(ds_name, ranks)] = (proc, cfg, ds)
    out = {}
    for (ds_name, ranks), (proc, cfg, ds) in jobs.items():
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, text[-3000:]
        peaks = []
        for r in range(ranks):
            lines = (tmp / f"{ds_name}_{ranks}" / "ranks" / f"rank{r}.jsonl").read_text().splitlines()
            peaks.append(
                max(row["peak_growth"] for row in map(json.loads, lines) if row.get("peak_growth") is not None)
            )
        loaded = load_run_config(str(cfg))
        est = estimate(loaded, load_ds_config(str(ds), loaded, ranks), ranks, "pretrain", "cpu", timed=False)
        out[(ds_name, ranks)] = (est.peak_bytes, peaks)
    return out


@pytest.mark.parametrize("ds_name,ranks,ckpt", REAL_RUNS)
def test_estimate_is_within_15_percent_of_each_ranks_measured_peak(real_runs, ds_name, ranks, ckpt):
    est, peaks = real_runs[(ds_name, ranks)]
    # 15%: the target on CPU; measured ratios (benchmarks/bench_estimate.py) are in the README
    for rank, peak in enumerate(peaks):
        assert 0.85 <= est / peak <= 1.15, f"rank {rank}: estimate {est / 1e9:.3f} GB, measured {peak / 1e9:.3f} GB"
