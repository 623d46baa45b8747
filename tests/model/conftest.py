"""Tiny model configs of both styles for the model tests."""

from __future__ import annotations

import pytest
import torch

from train.model import ModelConfig, from_name

LLAMA_STYLE = dict(
    pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False, rope_theta=500.0
)


def tiny(style: str, **overrides) -> ModelConfig:
    """The tiny preset as GPT-2 style or Llama style (GQA 4 heads / 2 kv heads, untied head)."""
    return from_name("tiny", **({**LLAMA_STYLE, **overrides} if style == "llama" else overrides))


@pytest.fixture(params=["gpt2", "llama"])
def style(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
