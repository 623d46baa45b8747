"""The DPO stage (train/dpo.py) in this one process (world size 1, a real DeepSpeed engine).

pure math: dpo_loss (tests/train/test_losses.py)
the step-0 loss is exactly ln 2: the reference is the policy as loaded
the reference log-probs are cached; a changed fingerprint recomputes them from the
  reference loaded on its own, to the same values
DPO on checkable pairs raises held-out preference accuracy and the verifiable success rate
hh-rlhf prompts become chat turns; only the final answer carries loss
bad input: one line (loss kind, reward function that raises / returns NaN / is missing)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO
from tests.train import checkable_tasks
from train.errors import ZeroLLMError

pytestmark = pytest.mark.usefixtures("single_rank_group")


@pytest.fixture(scope="module")
def inputs(parity_sft) -> Path:
    """The parity task's tokenizer, random tiny Llama-style start, half-right SFT run
    (tests/conftest.py parity_sft), and parity preference pairs."""
    (parity_sft / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in checkable_tasks.parity_rows(640)))
    return parity_sft


def dpo_config(root: Path, run_dir: Path, **over) -> Path:
    cfg = {
        "model": {"dropout": 0.0},
        "dpo": {"train_file": str(root / "pairs.jsonl"), "valid_fraction": 0.1, "init_from": str(root / "hf"),
                "max_len": 32, "beta": 0.5, "eval_reward": "tests.train.checkable_tasks:parity_reward",
                "eval_prompts": 64, "max_new_tokens": 6, **over.pop("dpo", {})},
        "train": {"micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 2, "warmup_steps": 0, "lr": 3e-3,
                  "schedule": "constant", "precision": "fp32", "eval_interval": 2, "eval_at_start": True,
                  "save_interval": 2, "weight_decay": 0.0, **over},
        "logging": {"run_dir": str(run_dir), "log_interval": 1, "tensorboard": False},
    }  # fmt: skip
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dpo(config: Path) -> list[dict]:
    from train.dpo import stage_run

    args = argparse.Namespace(config=str(config), deepspeed_config=str(REPO / "ds_configs" / "zero0.json"), set=[])
    assert stage_run(args) == 0
    return [json.loads(line) for line in (config.with_suffix("") / "metrics.jsonl").read_text().splitlines()]


def evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval_loss" in r]


def test_step_zero_is_ln2_and_the_reference_cache_is_reused_or_recomputed_equal(inputs, tmp_path):
    run_dir = tmp_path / "run"
    rows = run_dpo(dpo_config(inputs, run_dir))
    first = evals(rows)[0]
    assert first["step"] == 0 and first["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["eval_accuracy"] == 0.5  # every margin is 0: a tie counts half
    from train.commands import load_checkpoint_model

    load_checkpoint_model(str(run_dir))  # the run's config snapshot loads again (model 128 < data.seq_len's default)
    cache = run_dir / "reference_logps.pt"
    computed = torch.load(cache, weights_only=True)
    assert computed["train_chosen"].shape == (576,) and bool((computed["train_chosen"] < 0).all())
    # A resume reads the cache (the policy has moved: it could not stand in for the reference).
    stamp = cache.stat().st_mtime_ns
    run_dpo(dpo_config(inputs, run_dir, max_steps=4))
    assert cache.stat().st_mtime_ns == stamp
    # A stale fingerprint: recomputed from the reference loaded as its own frozen engine.
    torch.save({**computed, "fingerprint": "stale"}, cache)
    run_dpo(dpo_config(inputs, run_dir, max_steps=6))
    again = torch.load(cache, weights_only=True)
    assert again["fingerprint"] == computed["fingerprint"]
    for key in ("train_chosen", "train_rejected", "valid_chosen", "valid_rejected"):
        assert torch.allclose(again[key], computed[key], rtol=1e-5, atol=1e-5), key


def test_dpo_after_sft_raises_held_out_preference_accuracy_and_success(inputs, tmp_path):
    """SFT on demonstrations that are right half the time teaches the answer format and
    half the task; DPO (with the RPO term) on parity preferences teaches the rest."""
    start = {"init_from": str(inputs / "sft"), "tokenizer": str(inputs / "tok"), "nll_weight": 1.0}
    config = dpo_config(inputs, tmp_path / "dpo", max_steps=200, eval_interval=200, save_interval=0, lr=1e-3, dpo=start)
    before, after = evals(run_dpo(config))
    print("dpo after sft, parity task: before", before, "after", after)
    # Measured (these seeds, 64 held-out pairs/prompts): accuracy 0.5 -> 1.0, success 0.391 -> 1.0, chosen
    # drift +1.29, rejected -9.40. Without the RPO term (on the unspaced "4821?" variant of the task):
    # accuracy 0.984 but success 0.391 -> 0.328.
    assert before["eval_accuracy"] == 0.5 and 0.2 < before["eval_success"] < 0.6
    assert after["eval_accuracy"] >= 0.85
    assert after["eval_success"] >= 0.8
    assert after["eval_chosen_drift"] > 0 > after["eval_rejected_drift"]


def test_hh_prompts_become_chat_turns_and_only_the_final_answer_has_loss(inputs):
    from train.chat_data import load_chat_tokenizer
    from train.dpo import build_pairs, prompt_messages

    hh = "\n\nHuman: 12=\n\nAssistant: 12\n\nHuman: 345=\n\nAssistant:"
    assert prompt_messages(hh) == [{"role": "user", "content": "12="}, {"role": "assistant", "content": "12"},
                                   {"role": "user", "content": "345="}]  # fmt: skip
    tok = load_chat_tokenizer(inputs / "tok")
    pairs, report = build_pairs([{"chosen": hh + " 345", "rejected": hh + " 354"}], tok, 64, "f.jsonl")
    assert report["kept"] == 1
    s = pairs[0].chosen
    assert tok.decode([i for i, m in zip(s.ids, s.mask) if m]) == "345<|im_end|>"
    assert tok.decode(s.ids).count("<|im_start|>assistant") == 2  # the earlier answer is prompt here


def test_bad_loss_kind_and_bad_reward_functions_are_one_line(inputs, tmp_path):
    from train import rollout
    from train.config import load_run_config
    from train.dpo import CONFIG_SECTIONS, preflight

    cfg = load_run_config(dpo_config(inputs, tmp_path / "a", dpo={"loss": "hinge"}), {}, CONFIG_SECTIONS)
    with pytest.raises(ZeroLLMError, match=r"dpo\.loss: 'hinge' is not one of sigmoid, conservative, ipo"):
        preflight(cfg)
    cfg = load_run_config(dpo_config(inputs, tmp_path / "b", dpo={"eval_reward": "tests.train.checkable_tasks:nope"}),
                          {}, CONFIG_SECTIONS)  # fmt: skip
    with pytest.raises(ZeroLLMError, match=r"reward function tests\.train\.checkable_tasks:nope: cannot import it"):
        preflight(cfg)
    for name, match in (("raises", "raised RuntimeError: boom"), ("returns_nan", "returned a non-finite score")):
        fn = rollout.load_reward_function(f"tests.train.checkable_tasks:{name}")
        with pytest.raises(ZeroLLMError, match=rf"reward function tests\.train\.checkable_tasks:{name} {match}"):
            rollout.call_reward(fn, ["1="], ["1"])
