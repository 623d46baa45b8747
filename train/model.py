"""The ZeroLLM language model (placeholder: the model issue fills in the modules).

`ModelConfig` is the contract other stages use; GPT-2 and Llama styles are switches
of the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    # --- size ---
    vocab_size: int = 50257  # tokenizer vocabulary (before optional padding)
    max_seq_len: int = 1024  # longest sequence; learned position table size
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    d_model: int = 768
    ffn_hidden: int | None = None  # None = 4*d (gelu) or Llama's rule (swiglu)
    # --- style switches (GPT-2 defaults) ---
    pos_emb: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    # --- training-time knobs ---
    dropout: float = 0.0
    init_std: float = 0.02
    pad_vocab_multiple: int = 1  # pad the embedding rows to a multiple (64 helps matmuls)
    activation_checkpointing: bool = False
