"""Tiny model configs of both styles for the model tests."""

from __future__ import annotations

import pytest
import torch

from train.model import ModelConfig, from_name

LLAMA_STYLE = dict(
    pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False, rope_theta=500.0
)


def make_tiny(style: str, **overrides) -> ModelConfig:
    """The tiny preset as GPT-2 style or Llama style (GQA 4 heads / 2 kv heads, untied head)."""
    return from_name("tiny", **({**LLAMA_STYLE, **overrides} if style == "llama" else overrides))


@pytest.fixture
def tiny():
    """make_tiny(style, **overrides) -> ModelConfig."""
    return make_tiny


@pytest.fixture(params=["gpt2", "llama"])
def style(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: tiny ops on a shared 2-core machine run ~100x slower
    when OpenMP threads spin against other processes."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
