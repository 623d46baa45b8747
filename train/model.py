"""The ZeroLLM language model: one file, GPT-2 and Llama styles as config switches.

Read top to bottom: `ModelConfig` (the fields), `PRESETS` / `from_name` (named sizes from
train/presets/*.yaml), the pieces (RoPE, masks, attention, MLP, block), then
`CustomLanguageModel` (forward, loss, parameter/FLOP counts, generate with a KV cache).

- GPT-2 style: learned positions, LayerNorm, GELU (tanh, = HF "gelu_new"), biases, tied head.
- Llama style: RoPE (HF's non-interleaved "rotate_half" layout), RMSNorm, SwiGLU with Llama's
  hidden-size rule, grouped-query attention, no biases, optional untied head.
- Attention is `F.scaled_dot_product_attention`: `is_causal=True` for ordinary rows (flash /
  memory-efficient kernels on GPU); a boolean block-diagonal causal mask for packed rows
  (`doc_ids`) and for left-padded prompts in `generate`.
- Padded vocabulary (`pad_vocab_multiple`): the embedding and head have extra rows for matmul
  speed, but logits are sliced to the real `vocab_size`, so padded ids never appear in the
  logits, the loss or a sample, and export drops the rows.

The model is single-device torch: parallelism (DeepSpeed ZeRO, activation checkpointing
functions) is applied from outside. Under `deepspeed.zero.Init()` the weights are initialised
through `self.apply(self._init_weights)` (DeepSpeed gathers parameters around `apply`), and
every sub-module is called as a module, so ZeRO-3's gather hooks see it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import checkpoint

from train.errors import ConfigError, ZeroLLMError

IGNORE_INDEX = -100  # targets with this value add nothing to the loss
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa kwarg


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
    ffn_multiple_of: int = 256  # Llama's rule rounds 2/3 * 4d up to a multiple of this
    # --- style switches (GPT-2 defaults) ---
    pos_emb: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True  # biases of the linear layers and of LayerNorm (never on the head)
    tie_embeddings: bool = True
    # --- training-time knobs ---
    dropout: float = 0.0  # embedding, attention-probability and residual dropout
    init_std: float = 0.02
    pad_vocab_multiple: int = 1  # pad the embedding rows to a multiple (64 helps matmuls)
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"model.{msg}")

        if self.n_head < 1 or self.d_model % self.n_head:
            raise bad(f"d_model: {self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise bad(f"n_kv_head: {self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise bad(f"d_model: rope needs an even head size, got d_model/n_head={self.head_dim}")
        if self.pad_vocab_multiple < 1:
            raise bad(f"pad_vocab_multiple: {self.pad_vocab_multiple} must be >= 1")
        if self.ffn_multiple_of < 1:
            raise bad(f"ffn_multiple_of: {self.ffn_multiple_of} must be >= 1")

    # Derived sizes are properties (not stored), so dataclasses.replace() keeps them right.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp == "gelu":
            return 4 * self.d_model
        hidden = int(2 * 4 * self.d_model / 3)  # Llama: 2/3 of 4d keeps SwiGLU's 3 matrices at 8d^2
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return m * math.ceil(self.vocab_size / m)


PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESETS: dict[str, dict[str, Any]] = {
    p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted(PRESET_DIR.glob("*.yaml"))
}


def preset_fields(name: str) -> dict[str, Any]:
    """The fields of a named preset (a copy); the one preset lookup, also behind `model.preset:`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (presets: {', '.join(sorted(PRESETS)) or 'none'})")
    return dict(PRESETS[name])


def from_name(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a preset (train/presets/<name>.yaml), with fields overridden."""
    base = preset_fields(name)
    valid = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(f"unknown model field(s) {', '.join(unknown)} (valid: {', '.join(sorted(valid))})")
    return ModelConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- positions, masks


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of RoPE (Su et al. 2021, eq. 34) for (B, T) positions -> each (B, 1, T, head_dim).

    Computed in fp32 on the fly (no buffer to cast or partition), in HF Llama's layout:
    frequencies repeated as [f0..f_{d/2-1}, f0..f_{d/2-1}] to pair with `_rotate_half`.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (head_dim/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin  # (B, H, T, head_dim)


def doc_position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 where the document id changes: (B, T) -> (B, T)."""
    T = doc_ids.size(1)
    ar = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(new_doc, ar, 0).cummax(dim=1).values  # (B, T) index where each doc began
    return ar - starts


def doc_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask for packed rows: (B, T) -> (B, 1, T, T), True = may attend."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same_doc & causal)[:, None]


def padding_causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal mask that hides padded keys: (B, T) bool -> (B, 1, T, T).

    The diagonal stays open so a padded query (its output is never used) sees itself instead
    of nothing: an all-masked row would give NaN, and NaN values poison later layers.
    """
    T = valid.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


class KVCache:
    """Keys and values of past tokens for `generate`: per layer (B, n_kv_head, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.pos = 0  # tokens already stored; advanced by the model after each forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, n_kv_head, end, head_dim)


# ----------------------------------------------------------------------------- modules


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # q, k, v in one matmul: [n_head | n_kv_head | n_kv_head] * head_dim output columns
        self.c_attn = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.c_proj.residual_proj = True  # GPT-2 init: std / sqrt(2 * n_layer)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos=None, sin=None, mask=None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, n_head, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, n_kv_head, T, hd)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv_head, past + T, hd)
        # Without a mask: causal when queries and keys are the same tokens; a decode step
        # (1 query, cached keys) sees every key.
        is_causal = mask is None and k.size(2) == T
        gqa = {}
        if nkv != nh:
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:  # query head h reads kv head h // (nh / nkv), as HF's repeat_kv
                k, v = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=is_causal, **gqa
        )  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Shazeer 2020; Llama): c_proj(silu(c_fc(x)) * c_up(x)).

    Gate and up stay two matmuls: fused into one (d -> 2*hidden) they ran up to 1.7x slower in
    CPU decoding (batch 4, llama-125m) and no faster in training (benchmarks/bench_model.py).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.ffn_dim
        self.c_fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)  # GELU's in-projection, or SwiGLU's gate
        self.c_up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias) if self.swiglu else None
        self.c_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.c_proj.residual_proj = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden)
        if self.swiglu:
            h = F.silu(h) * self.c_up(x)
        else:
            h = F.gelu(h, approximate="tanh")  # HF "gelu_new"
        return self.dropout(self.c_proj(h))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos=None, sin=None, mask=None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin, mask, cache)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- the model


class CustomLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one tensor (Press & Wolf 2017)
        self.apply(self._init_weights)
        self.checkpoint_fn: Callable | None = None
        if cfg.activation_checkpointing:
            self.set_activation_checkpointing(functools.partial(checkpoint, use_reentrant=False))

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: normal(0, init_std); residual projections / sqrt(2 * n_layer)."""
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_proj", False):
                std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def set_activation_checkpointing(self, fn: Callable | None) -> None:
        """Run each block as `fn(block, x, cos, sin, mask)` while training (None = off).

        E.g. `functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)` or
        `deepspeed.checkpointing.checkpoint`.
        """
        self.checkpoint_fn = fn

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        logits_where: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, vocab_size) and the cross-entropy loss (None without targets).

        logits_where (B, T) bool: only those positions go through the head, logits (n, vocab_size)
        in row-major order (post-training scores answer tokens only: the head over the whole
        vocabulary is most of a small model's cost); targets must then be (n,).

        targets (B, T) use IGNORE_INDEX (-100) for tokens without loss. loss_reduction="sum"
        gives the sum over valid targets (the trainer divides by its global count), "mean"
        the mean (NaN if no target is valid). doc_ids (B, T) packs several documents in a
        row: attention stays inside a document and positions restart at each one (unless
        position_ids is given).
        """
        mask = None
        if doc_ids is not None:
            if position_ids is None:
                position_ids = doc_position_ids(doc_ids)
            mask = doc_causal_mask(doc_ids)
        x = self.hidden_states(idx, position_ids, mask)  # (B, T, d)
        if logits_where is not None:
            x = x[logits_where]  # (n, d)
        logits = self.lm_head(x)  # (B, T, padded_vocab_size) or (n, padded_vocab_size)
        if self.cfg.padded_vocab_size != self.cfg.vocab_size:
            logits = logits[..., : self.cfg.vocab_size]  # padded rows dropped (a no-op slice still costs a backward)
        if targets is None:
            return logits, None
        if loss_reduction not in ("mean", "sum"):
            raise ZeroLLMError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),  # fp32 softmax even for bf16 logits
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=loss_reduction,
        )
        return logits, loss

    def hidden_states(self, idx, position_ids=None, mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """Embeddings -> blocks -> final norm: (B, T) ids -> (B, T, d)."""
        cfg = self.cfg
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if position_ids is None:
            if past + T > cfg.max_seq_len and cfg.pos_emb == "learned":
                raise ZeroLLMError(f"sequence of {past + T} tokens is longer than model.max_seq_len={cfg.max_seq_len}")
            position_ids = torch.arange(past, past + T, device=idx.device)[None]  # (1, T)
        x = self.wte(idx)  # (B, T, d)
        cos = sin = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)  # (B or 1, T, d)
        else:
            cos, sin = (t.to(x.dtype) for t in rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta))
        x = self.drop(x)
        use_ckpt = self.checkpoint_fn is not None and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                x = self.checkpoint_fn(block, x, cos, sin, mask)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)

    # --------------------------------------------------------------------- counts

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters, counted from the config (so it also holds under ZeRO-3 partitioning).

        exclude_embeddings drops the token and position tables (and so a tied head).
        """
        c, d = self.cfg, self.cfg.d_model
        total = c.n_layer * self._block_params() + self._norm_params()
        if not exclude_embeddings:
            total += c.padded_vocab_size * d + (c.max_seq_len * d if c.pos_emb == "learned" else 0)
        if not c.tie_embeddings:
            total += c.padded_vocab_size * d
        return total

    def _norm_params(self) -> int:
        return self.cfg.d_model * (2 if self.cfg.norm == "layernorm" and self.cfg.bias else 1)

    def _block_params(self) -> int:
        c, d, b = self.cfg, self.cfg.d_model, int(self.cfg.bias)
        qkv = (c.n_head + 2 * c.kv_heads) * c.head_dim
        attn = d * qkv + b * qkv + c.n_head * c.head_dim * d + b * d
        fc = c.ffn_dim * (2 if c.mlp == "swiglu" else 1)
        mlp = d * fc + b * fc + c.ffn_dim * d + b * d
        return 2 * self._norm_params() + attn + mlp

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12 * n_layer * d_model * seq_len.

        PaLM (Chowdhery et al. 2022) appendix B, as nanoGPT's estimate_mfu: N counts the
        parameters used in matmuls (blocks, final norm and the head over the real vocab, not
        the embedding lookups); the second term is the attention scores and values (QK^T and
        AV, forward + backward), with n_head * head_dim = d_model.
        """
        c = self.cfg
        n = c.n_layer * self._block_params() + self._norm_params() + c.vocab_size * c.d_model
        return 6.0 * n + 12.0 * c.n_layer * c.d_model * seq_len

    # --------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend prompts idx (B, T0) by up to max_new_tokens -> (B, T0 + new).

        Prompts of different lengths are left-padded, with attention_mask (B, T0) 1 on real
        tokens and 0 on padding. temperature <= 0 is greedy; top_k / top_p filter before
        sampling. A row that produced eos_token_id continues with eos_token_id; generation
        stops early when every row has. use_cache=False re-runs the whole sequence each step.
        """
        B, T0 = idx.shape
        cfg = self.cfg
        idx = idx.to(self.wte.weight.device)  # prompts are built on the CPU
        if attention_mask is not None:
            attention_mask = attention_mask.to(idx.device)
        if cfg.pos_emb == "learned" and T0 + max_new_tokens > cfg.max_seq_len:
            raise ZeroLLMError(
                f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len={cfg.max_seq_len}"
            )
        valid = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        padded = not bool(valid.all())
        cache = None
        if use_cache:
            dtype = self.lm_head.weight.dtype
            cache = KVCache(cfg, B, T0 + max_new_tokens, dtype, idx.device)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out = idx
        for step in range(max_new_tokens):
            if cache is None or step == 0:  # the whole sequence so far
                tokens = out
                pos = (valid.cumsum(1) - 1).clamp(min=0)  # (B, T): positions skip the padding
                mask = padding_causal_mask(valid) if padded else None
            else:  # one new token against the cache
                tokens = out[:, -1:]
                pos = valid.sum(1, keepdim=True) - 1  # (B, 1)
                mask = valid[:, None, None, :] if padded else None  # (B, 1, 1, L)
            h = self.hidden_states(tokens, pos, mask, cache)[:, -1]  # (B, d)
            logits = self.lm_head(h)[:, : cfg.vocab_size].float()  # (B, vocab_size)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
        return out


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one id per row from logits (B, V): greedy, or sampled after top-k / top-p (nucleus)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
