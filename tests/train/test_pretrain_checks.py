"""Checks that stop a run before training: vocab mismatch, other data, other model shape."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.indexed import IndexedDatasetWriter, write_meta
from tests.conftest import tiny_run_config
from train.config import load_run_config
from train.errors import ZeroLLMError
from train.pretrain import build_data, check_resume_compatible, model_shape


@pytest.fixture
def prefix(tmp_path):
    p = tmp_path / "corpus"
    with IndexedDatasetWriter(p, np.uint16) as w:
        for i in range(50):
            w.add_document(np.arange(100) % 500 + i)
        w.finalize()
    return str(p)


def config(tmp_path, prefix, **model):
    path = tiny_run_config(tmp_path / "run.yaml", [prefix], tmp_path / "run", cache_dir=tmp_path, model=model,
                           max_steps=5, warmup_steps=1)  # fmt: skip
    return load_run_config(path)


def test_dataset_vocab_larger_than_model_stops_before_training(tmp_path, prefix):
    write_meta(prefix, {"vocab_size": 1000})
    with pytest.raises(ZeroLLMError, match=r"corpus.meta.json: vocab_size 1000 .*model.vocab_size=512"):
        build_data(config(tmp_path, prefix), world_size=1)


def test_resume_refuses_other_data_and_other_shape(tmp_path, prefix):
    cfg = config(tmp_path, prefix)
    data = build_data(cfg, world_size=1)
    state = {"data_fingerprint": data.fingerprint, "model": model_shape(cfg), "config_hash": cfg.hash()}
    check_resume_compatible(state, cfg, data, "ckpt")  # same run: fine
    with pytest.raises(ZeroLLMError, match="ckpt: was trained on data with fingerprint 0123abcd"):
        check_resume_compatible({**state, "data_fingerprint": "0123abcd"}, cfg, data, "ckpt")
    wider = config(tmp_path, prefix, d_model=128)
    with pytest.raises(ZeroLLMError, match=r"ckpt: model.d_model was 64, .* says 128"):
        check_resume_compatible(state, wider, data, "ckpt")
    more_dropout = config(tmp_path, prefix, dropout=0.2)  # not a shape change: allowed
    check_resume_compatible(state, more_dropout, data, "ckpt")
