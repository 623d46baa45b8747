"""The shared step loop (train/loop.py) in this one process: a real DeepSpeed engine at
world size 1, no launcher. The launcher tests (test_pretrain.py) keep the multi-rank path.

    stop vote -> checkpoint at the agreed step, EXIT_PREEMPTED
    a non-finite loss -> update skipped and counted; max_bad_steps in a row -> EXIT_BAD_LOSS,
                         no checkpoint after a bad step
    save when due (save_interval and the last step)
    micro 1 x accumulation 4 == micro 4 x accumulation 1
    pretraining's stage changes every trainable parameter in a few steps
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, tiny_run_config
from train.errors import EXIT_BAD_LOSS, EXIT_OK, EXIT_PREEMPTED

SEQ = 16


pytestmark = pytest.mark.usefixtures("single_rank_group")


def make_cfg(tmp_path: Path, **train):
    from train.config import load_run_config

    train = {"grad_accum_steps": 2, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4, "save_interval": 0,
             "keep_last": 10, **train}  # fmt: skip
    path = tiny_run_config(tmp_path / "run.yaml", [], tmp_path / "run", seq_len=SEQ, model={"dropout": 0.0}, **train)
    return load_run_config(path)


class Stop:
    requested = False


def start(cfg):
    from train.checkpoint import Checkpointer
    from train.engine import build_engine, resolve_ds_config
    from train.metrics import Metrics
    from train.model import CustomLanguageModel

    ds = resolve_ds_config(str(REPO / "ds_configs" / "zero0.json"), cfg, 1)
    torch.manual_seed(0)
    engine = build_engine(cfg, ds, lambda: CustomLanguageModel(cfg.model))
    ckpt = Checkpointer(cfg.logging.run_dir, 0, 1, cfg.train.keep_last)
    metrics = Metrics(cfg.logging.run_dir, True, False, cfg.train.max_steps, 0, stage="toy")
    return engine, ckpt, metrics


def toy_stage(engine, cfg, nan_steps=(), stop=None, stop_at=None, samples=None, evaluate=None):
    """Sample i is a fixed random row; a step takes the next mb x gas of them."""
    from train.loop import Stage
    from train.pretrain import token_loss

    t = cfg.train
    rows = torch.from_numpy(np.random.default_rng(1).integers(0, 511, size=(512, SEQ + 1)))
    pos = {"next": 0, "step": 0}

    def next_batches():
        pos["step"] += 1
        if stop is not None and pos["step"] == stop_at:
            stop.requested = True
        out = []
        for _ in range(t.grad_accum_steps):
            out.append(rows[pos["next"] : pos["next"] + t.micro_batch_size])
            pos["next"] += t.micro_batch_size
        return out

    def loss(engine, batch):
        value = token_loss(engine, batch)
        return value * float("nan") if pos["step"] in nan_steps else value

    return Stage(
        name="toy",
        next_batches=next_batches,
        count=lambda b: b[:, 1:].numel(),
        loss=loss,
        samples_per_step=t.micro_batch_size * t.grad_accum_steps,
        evaluate=evaluate,
    )


def run_loop(cfg, state=None, **stage_kw):
    from train.loop import train

    engine, ckpt, metrics = start(cfg)
    stop = stage_kw.pop("stop", Stop())
    state = state or {"step": 0, "consumed_samples": 0, "skipped_steps": 0}
    try:
        code = train(engine, toy_stage(engine, cfg, stop=stop, **stage_kw), cfg, ckpt, state, stop, metrics)
    finally:
        metrics.close(plot=False)
    return code, engine, ckpt, state


def rows(cfg) -> list[dict]:
    path = Path(cfg.logging.run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def test_stop_vote_saves_at_that_step_and_returns_75(tmp_path):
    cfg = make_cfg(tmp_path)
    code, _, ckpt, state = run_loop(cfg, stop_at=4)  # the flag is seen when step index 3 starts
    assert code == EXIT_PREEMPTED
    assert state["step"] == 3 and state["consumed_samples"] == 3 * 4
    assert ckpt.find_resume().name == "step00000003"
    manifest = json.loads((ckpt.dir / "step00000003" / "complete.json").read_text())
    assert manifest["state"]["step"] == 3 and manifest["state"]["consumed_samples"] == 12


def test_non_finite_step_is_skipped_counted_and_never_checkpointed(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=4, save_interval=1)
    code, engine, ckpt, state = run_loop(cfg, nan_steps=(2,))
    assert code == EXIT_OK
    assert state["skipped_steps"] == 1
    assert ckpt.complete_tags() == ["step00000001", "step00000003", "step00000004"]  # not step 2
    by_step = {r["step"]: r for r in rows(cfg) if "loss" in r}
    assert not np.isfinite(by_step[2]["loss"]) and all(np.isfinite(by_step[s]["loss"]) for s in (1, 3, 4))
    assert by_step[4]["skipped_steps"] == 1


def test_skipped_step_leaves_the_weights_unchanged(tmp_path):
    one = make_cfg(tmp_path / "a", max_steps=1)
    _, after_one, _, _ = run_loop(one)
    two = make_cfg(tmp_path / "b", max_steps=2)
    _, after_bad, _, state = run_loop(two, nan_steps=(2,))
    assert state["skipped_steps"] == 1
    a, b = params(after_one), params(after_bad)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_max_bad_steps_in_a_row_stops_with_3_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=10, save_interval=1, max_bad_steps=3)
    code, _, ckpt, state = run_loop(cfg, nan_steps=(3, 4, 5))
    assert code == EXIT_BAD_LOSS
    assert state["step"] == 5 and state["skipped_steps"] == 3
    assert ckpt.find_resume().name == "step00000002"


def test_two_bad_steps_then_a_good_one_reset_the_count(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=7, max_bad_steps=3)
    code, _, _, state = run_loop(cfg, nan_steps=(2, 3, 5, 6))
    assert code == EXIT_OK and state["skipped_steps"] == 4


def test_checkpoints_when_due_and_at_the_last_step(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=5, save_interval=2)
    code, _, ckpt, _ = run_loop(cfg)
    assert code == EXIT_OK
    assert ckpt.complete_tags() == ["step00000002", "step00000004", "step00000005"]
    saves = [r["step"] for r in rows(cfg) if "ckpt_save_s" in r]
    assert saves == [2, 4, 5]


def test_eval_at_start_evaluates_a_fresh_run_before_its_first_step_only(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=4, eval_interval=2, eval_at_start=True)
    run_loop(cfg, evaluate=lambda: {"eval_marker": 1.0})
    assert [r["step"] for r in rows(cfg) if "eval_marker" in r] == [0, 2, 4]
    resumed = {"step": 2, "consumed_samples": 0, "skipped_steps": 0}  # a resume has its "before" already
    run_loop(make_cfg(tmp_path / "again", max_steps=4, eval_interval=2, eval_at_start=True), resumed,
             evaluate=lambda: {"eval_marker": 1.0})  # fmt: skip
    assert [r["step"] for r in rows(make_cfg(tmp_path / "again")) if "eval_marker" in r] == [4]


def test_micro_batch_and_accumulation_splits_give_the_same_update(tmp_path):
    out = {}
    for mb, gas in ((1, 4), (4, 1)):
        cfg = make_cfg(tmp_path / f"mb{mb}", micro_batch_size=mb, grad_accum_steps=gas, max_steps=3)
        code, engine, _, _ = run_loop(cfg)
        assert code == EXIT_OK
        out[mb] = ([r["loss"] for r in rows(cfg) if "loss" in r], params(engine))
    (loss_a, p_a), (loss_b, p_b) = out[1], out[4]
    assert np.allclose(loss_a, loss_b, rtol=1e-5), (loss_a, loss_b)
    # Adam scales every update to ~lr (3e-3), so fp32 summation-order differences in
    # near-zero gradient entries move a weight by a sliver of one step: measured 1.5e-5
    # after 3 steps; a real normalisation error (e.g. dividing by the local count) moves
    # weights by whole steps.
    worst = max(float((p_a[n] - p_b[n]).abs().max()) for n in p_a)
    assert worst < 1e-4, worst


def test_pretraining_changes_every_trainable_parameter(tmp_path):
    """Smoke test of the pretraining stage through the loop: 3 steps move every weight."""
    from data_pipeline.indexed import IndexedDatasetWriter
    from train.loop import train
    from train.pretrain import build_data, make_stage

    with IndexedDatasetWriter(tmp_path / "corpus", np.uint16) as w:
        for i in range(60):
            w.add_document((np.arange(40) * (1 + i % 3) + i) % 511)
        w.finalize()
    cfg = make_cfg(tmp_path, max_steps=3)
    cfg.data.train = [str(tmp_path / "corpus")]
    cfg.data.cache_dir = str(tmp_path)
    data = build_data(cfg, 1)
    engine, ckpt, metrics = start(cfg)
    before = params(engine)
    state = {"step": 0, "consumed_samples": 0, "skipped_steps": 0}
    stop = Stop()
    try:
        code = train(engine, make_stage(engine, cfg, data, state), cfg, ckpt, state, stop, metrics)
    finally:
        metrics.close(plot=False)
    assert code == EXIT_OK
    after = params(engine)
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    unchanged = [n for n in trainable if torch.equal(before[n], after[n])]
    assert trainable and not unchanged, unchanged


def test_a_resume_onto_another_run_is_refused_naming_what_changed():
    from train.errors import ZeroLLMError
    from train.run import refuse_another_run

    fresh = {"data_fingerprint": "aa", "model": {"d_model": 64}, "tokenizer_hash": "t1"}
    what = {"data_fingerprint": "data (x.train_file)", "model": "model shape", "tokenizer_hash": "tokenizer"}
    refuse_another_run(dict(fresh), fresh, "ckpt", what)  # the same run: fine
    with pytest.raises(ZeroLLMError, match=r"^ckpt: was trained with another model shape; use a new logging.run_dir"):
        refuse_another_run({**fresh, "model": {"d_model": 128}}, fresh, "ckpt", what)
    with pytest.raises(ZeroLLMError, match=r"another data \(x.train_file\)"):
        refuse_another_run({**fresh, "data_fingerprint": "bb"}, fresh, "ckpt", what)
