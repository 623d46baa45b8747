"""Engines that start from a model, frozen engines, several engines in one checkpoint.

One launch of tests/train/engines_driver.py on 2 CPU ranks (real deepspeed launcher, gloo)
does all of it; each test reads one part of what the ranks recorded:

    - ZeRO-3 and ZeRO-0 engines initialised from exported HF GPT-2 / Llama dirs give the
      transformers logits; under ZeRO-3 each rank holds half of the parameters
    - frozen engines (also with offload_param) give the same logits, with no optimizer and
      no trainable parameter
    - a {"policy", "value"} checkpoint round trip restores both engines exactly, and an
      engine started from that run dir gives the saved engine's logits
    - rank 1 SIGKILLed inside the save of engine "value" leaves the previous checkpoint
      as the resume point
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.train.test_pretrain import free_port
from train.checkpoint import Checkpointer
from train.hf_export import export_hf
from train.model import CustomLanguageModel, from_name

pytestmark = pytest.mark.slow

STYLES = {
    "gpt2": {},
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False),
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """Export both styles, record transformers' logits, launch the driver once."""
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    expected = {}
    for style, overrides in STYLES.items():
        cfg = from_name("tiny", **overrides)
        model = CustomLanguageModel(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ln_" in name or name.endswith(".bias"):  # non-trivial norms and biases
                    p.add_(0.1 * torch.randn_like(p))
        export_hf(model, cfg, work / f"hf_{style}")
        hf = AutoModelForCausalLM.from_pretrained(work / f"hf_{style}", local_files_only=True).eval()
        idx = torch.randint(0, cfg.vocab_size, (2, 16))
        with torch.no_grad():
            expected[style] = {"idx": idx, "logits": hf(idx).logits}
    torch.save(expected, work / "expected.pt")
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus", "2",
        "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()),
        str(REPO / "tests" / "train" / "engines_driver.py"),
        str(work),
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if k != "ZEROLLM_FAULT"},
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "ZEROLLM_PG_TIMEOUT": "60",
        "ZEROLLM_FAULT": "in_save:value:1:2",
    }
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    files = [work / f"rank{r}.json" for r in range(2)]
    assert all(f.is_file() for f in files), log[-4000:]
    return {"work": work, "rc": result.returncode, "log": log, "rank": [json.loads(f.read_text()) for f in files]}


@pytest.mark.parametrize("style", STYLES)
def test_engines_from_hf_dir_give_transformers_logits(ranks, style):
    for r in ranks["rank"]:
        assert r[f"{style}_zero3_diff"] <= 1e-5
        assert r[f"{style}_zero0_diff"] <= 1e-5
        assert r[f"{style}_overridden"] == {"dropout": [0.0, 0.0]}


@pytest.mark.parametrize("style", STYLES)
def test_zero3_generation_gathers_into_a_plain_replica_with_the_same_tokens(ranks, style):
    """rollout.gathered under ZeRO-3 yields a hook-free copy of the whole model: greedy tokens
    equal the ZeRO-0 engine's, and the engine's weights are partitioned again afterwards."""
    for r in ranks["rank"]:
        assert r[f"{style}_zero3_generated"] == r[f"{style}_zero0_generated"]
        assert [len(x) for x in r[f"{style}_zero3_generated"]] == [6, 6]
        assert r[f"{style}_replica_has_ds_params"] is False
        assert r[f"{style}_zero3_resident_after_generate"] == r[f"{style}_zero3_resident"]


@pytest.mark.parametrize("style", STYLES)
def test_zero3_ranks_each_hold_half_the_parameters(ranks, style):
    for r in ranks["rank"]:
        for kind in ("zero3", "frozen"):
            local, total = r[f"{style}_{kind}_resident"]
            assert abs(local - total / 2) <= 30, (kind, local, total)  # padding: < 1 element per parameter


@pytest.mark.parametrize("style", STYLES)
def test_frozen_engine_gives_same_logits_without_optimizer_or_gradients(ranks, style):
    for r in ranks["rank"]:
        assert r[f"{style}_frozen_diff"] <= 1e-5
        assert r[f"{style}_offload_diff"] <= 1e-5  # offload_param=True
        assert r[f"{style}_frozen_trainable"] == 0
        assert r[f"{style}_frozen_optimizer"] == "DeepSpeedZeRoOffload"  # parameter partitioning only, no state
        assert r[f"{style}_frozen_training"] is False


def test_two_engine_checkpoint_round_trip_restores_both(ranks):
    for r in ranks["rank"]:
        assert r["changed_by_step"] and r["round_trip_equal"]
        assert r["loaded_state"] == {"step": 1}
        assert r["from_run_diff"] <= 1e-5
    folder = ranks["work"] / "run" / "checkpoints" / "step00000001"
    manifest = json.loads((folder / "complete.json").read_text())
    assert manifest["engines"] == ["policy", "value"]
    assert any(n.startswith("policy/") for n in manifest["files"])
    assert any(n.startswith("value/") for n in manifest["files"])


def test_kill_inside_second_engine_save_keeps_previous_resume_point(ranks):
    assert ranks["rc"] != 0 and "killing rank 1 at in_save:value (step 2)" in ranks["log"], ranks["log"][-3000:]
    run = ranks["work"] / "run"
    assert Checkpointer(run, 0, 2).find_resume().name == "step00000001"
    assert not (run / "checkpoints" / "step00000002").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step00000001"


def test_to_device_moves_every_tensor_of_a_batch_and_nothing_else():
    """Batches are built on the CPU; train.engine.to_device puts them on the engine's device
    (the meta device stands in for a GPU here) however they nest."""
    from train.engine import device_of, to_device

    batch = {"x": torch.zeros(2, 3), "parts": [torch.ones(1), (torch.arange(2), 7)], "name": "b", "none": None}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"].is_meta and moved["parts"][0].is_meta and moved["parts"][1][0].is_meta
    assert isinstance(moved["parts"][1], tuple) and moved["parts"][1][1] == 7
    assert moved["name"] == "b" and moved["none"] is None
    assert not batch["x"].is_meta  # the CPU batch itself is left as it was
    model = torch.nn.Linear(2, 2, device="meta")
    assert device_of(model) == torch.device("meta") and to_device(torch.zeros(1), model).is_meta
