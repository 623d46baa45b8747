"""Hugging Face export and import: ours <-> `GPT2LMHeadModel` / `LlamaForCausalLM`.

    export_hf(model, cfg, "out/hf", tokenizer_dir="tok/")   # then AutoModelForCausalLM.from_pretrained("out/hf")
    export_hf(reward_model, cfg, "out/rm", "tok/")          # AutoModelForSequenceClassification (num_labels=1)
    model, cfg = import_hf("some/hf_dir")                     # or import_hf(hf_model)
    recipe = hf_weight_recipe(cfg, HFTensors(dir).keys())   # one parameter at a time (ZeRO-3 loading)

The GPT-2 style (learned positions, LayerNorm, GELU, biases) maps to GPT2LMHeadModel, the Llama
style (RoPE, RMSNorm, SwiGLU, GQA) to LlamaForCausalLM; a mixed style has no HF class and is
refused. The weights are renamed, never changed, so logits match to float rounding:

- GPT-2 keeps weights in `Conv1D` layout (in, out): our `nn.Linear` weights are transposed.
- Llama has separate q/k/v projections: our fused `c_attn` ([q | k | v] rows) is split; our
  SwiGLU `c_fc` / `c_up` / `c_proj` are its gate_proj / up_proj / down_proj. Our RoPE already
  uses HF's rotate_half layout, so q/k need no permutation.
- Padded vocabulary rows are dropped on export and zero-filled on import (they never reach the
  logits either way). A tied head is written once, as HF does.
- A reward model (train/reward.py: the trunk under `lm.`, a bias-free `head`) becomes
  GPT2ForSequenceClassification / LlamaForSequenceClassification: the trunk as above, no LM
  head, `head.weight` as `score.weight`. HF reads the score at the last token that is not
  `pad_token_id`; the tokenizer's pad differs from eos, so that is the appended eos, where
  ours reads it. Import reads `score.weight` back as `head.weight`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from train.errors import ZeroLLMError
from train.model import CustomLanguageModel, ModelConfig

_PREFIXES = ("_orig_mod.", "module.")  # torch.compile / DDP-style wrappers


def hf_style(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama': the HF family this config exports to; ZeroLLMError for mixed styles."""
    gpt2 = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True)
    llama = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")
    if all(getattr(cfg, k) == v for k, v in gpt2.items()):
        if cfg.kv_heads != cfg.n_head:
            raise ZeroLLMError("model.n_kv_head: GPT2LMHeadModel has no grouped-query attention; set it to n_head")
        return "gpt2"
    if all(getattr(cfg, k) == v for k, v in llama.items()):
        return "llama"
    got = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in (*gpt2, "mlp"))
    raise ZeroLLMError(
        f"model style ({got}) has no Hugging Face class: use pos_emb=learned, norm=layernorm, mlp=gelu, "
        "bias=true (GPT-2) or pos_emb=rope, norm=rmsnorm, mlp=swiglu (Llama)"
    )


def hf_config(cfg: ModelConfig, reward: bool = False, **token_ids: Any):
    """The transformers config of the same architecture (GPT2Config or LlamaConfig); `reward`:
    of its ForSequenceClassification class with one label (a scalar score)."""
    # heavy: transformers, kept local (only export and its checks need it)
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std)
    if reward:
        common["num_labels"] = 1
    token_ids = {"bos_token_id": None, "eos_token_id": None, **token_ids}  # not HF's defaults (50256; 1, 2)
    head = "ForSequenceClassification" if reward else None
    if hf_style(cfg) == "gpt2":
        return GPT2Config(
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.ffn_dim,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            architectures=[f"GPT2{head or 'LMHeadModel'}"],
            **common,
            **token_ids,
        )
    return LlamaConfig(
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        attention_dropout=cfg.dropout,
        architectures=[f"Llama{head or 'ForCausalLM'}"],
        **common,
        **token_ids,
    )


def config_from_hf(hf_cfg: Any, **overrides: Any) -> ModelConfig:
    """Our ModelConfig from a GPT2Config / LlamaConfig; overrides set training-time fields."""
    c = hf_cfg
    if c.model_type == "gpt2":
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ZeroLLMError(f"GPT-2 activation_function={c.activation_function!r} is not supported (gelu_new only)")
        if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False):
            raise ZeroLLMError("GPT-2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        fields = dict(
            vocab_size=c.vocab_size,
            max_seq_len=c.n_positions,
            n_layer=c.n_layer,
            n_head=c.n_head,
            d_model=c.n_embd,
            ffn_hidden=c.n_inner or 4 * c.n_embd,
            norm_eps=c.layer_norm_epsilon,
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            dropout=float(c.resid_pdrop),  # export writes one dropout to resid/embd/attn_pdrop
        )
    elif c.model_type == "llama":
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ZeroLLMError(f"Llama rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if head_dim * c.num_attention_heads != c.hidden_size:
            raise ZeroLLMError(f"Llama head_dim={head_dim} * heads != hidden_size={c.hidden_size} is not supported")
        if c.hidden_act != "silu" or bool(c.attention_bias) != bool(getattr(c, "mlp_bias", False)):
            raise ZeroLLMError("Llama needs hidden_act='silu' and attention_bias == mlp_bias")
        fields = dict(
            vocab_size=c.vocab_size,
            max_seq_len=c.max_position_embeddings,
            n_layer=c.num_hidden_layers,
            n_head=c.num_attention_heads,
            n_kv_head=c.num_key_value_heads or c.num_attention_heads,
            d_model=c.hidden_size,
            ffn_hidden=c.intermediate_size,
            pos_emb="rope",
            rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
            norm="rmsnorm",
            norm_eps=c.rms_norm_eps,
            mlp="swiglu",
            bias=bool(c.attention_bias),
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            dropout=float(getattr(c, "attention_dropout", 0.0)),
        )
    else:
        raise ZeroLLMError(f"Hugging Face model_type {c.model_type!r} is not supported (gpt2, llama)")
    return ModelConfig(**{**fields, **overrides})


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            k = k.removeprefix(p)
        out[k] = v
    return out


def is_reward_state(sd: dict[str, Any]) -> bool:
    """A reward model's state dict (train/reward.py): the trunk under `lm.`, a scalar `head`."""
    return "head.weight" in _strip(sd)


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names and layouts (fresh contiguous CPU tensors, no shared storage).

    A reward model's gives the ForSequenceClassification names: no lm_head, `score.weight`."""
    sd, V = _strip(sd), cfg.vocab_size
    reward = is_reward_state(sd)
    if reward:
        sd = {k.removeprefix("lm."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    if hf_style(cfg) == "gpt2":
        out["transformer.wte.weight"] = sd["wte.weight"][:V]
        out["transformer.wpe.weight"] = sd["wpe.weight"]
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, transpose in [
                ("ln_1", "ln_1", False),
                ("attn.c_attn", "attn.c_attn", True),
                ("attn.c_proj", "attn.c_proj", True),
                ("ln_2", "ln_2", False),
                ("mlp.c_fc", "mlp.c_fc", True),
                ("mlp.c_proj", "mlp.c_proj", True),
            ]:
                w = sd[o + ours + ".weight"]
                out[h + theirs + ".weight"] = w.t() if transpose else w  # Conv1D is (in, out)
                out[h + theirs + ".bias"] = sd[o + ours + ".bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["wte.weight"][:V]
        qkv = [cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = sd[o + "ln_1.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[o + "ln_2.weight"]
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                parts = sd[f"{o}attn.c_attn.{kind}"].split(qkv)
                for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                    out[f"{h}self_attn.{name}.{kind}"] = part
                out[f"{h}self_attn.o_proj.{kind}"] = sd[f"{o}attn.c_proj.{kind}"]
                out[f"{h}mlp.gate_proj.{kind}"] = sd[f"{o}mlp.c_fc.{kind}"]
                out[f"{h}mlp.up_proj.{kind}"] = sd[f"{o}mlp.c_up.{kind}"]
                out[f"{h}mlp.down_proj.{kind}"] = sd[f"{o}mlp.c_proj.{kind}"]
        out["model.norm.weight"] = sd["ln_f.weight"]
    if reward:
        out["score.weight"] = sd["head.weight"]  # (1, d): Linear(d, 1, bias=False) in both
    elif not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


Recipe = dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]]


def hf_weight_recipe(cfg: ModelConfig, hf_keys: Iterable[str]) -> Recipe:
    """For each of our parameter names: the HF tensors it is made of and how to combine them.

    `hf_keys` are the names present in the HF weights (a "module." prefix, or GPT-2 names
    without "transformer.", are accepted). A loader reads only the tensors one entry names, so a
    parameter can be built alone (ZeRO-3 fills partitions this way). KeyError names a missing
    tensor. A tied head maps to the same recipe as `wte.weight`. A sequence-classification
    dir's `score.weight` (an exported reward model) is read as `head.weight`.
    """
    gpt2 = hf_style(cfg) == "gpt2"
    actual: dict[str, str] = {}  # canonical HF name -> name in the file
    for key in hf_keys:
        canon = key.removeprefix("module.")
        if gpt2 and not canon.startswith(("transformer.", "lm_head.", "score.")):
            canon = "transformer." + canon
        actual[canon] = key
    pad = cfg.padded_vocab_size - cfg.vocab_size

    def rows(w: torch.Tensor) -> torch.Tensor:  # zero rows for the padded vocabulary
        return torch.cat([w, w.new_zeros(pad, w.size(1))]) if pad else w

    def same(w: torch.Tensor) -> torch.Tensor:
        return w

    def transpose(w: torch.Tensor) -> torch.Tensor:  # GPT-2 Conv1D is (in, out)
        return w.t()

    def cat(*parts: torch.Tensor) -> torch.Tensor:
        return torch.cat(parts)

    def take(fn: Callable[..., torch.Tensor], *canon: str) -> tuple[tuple[str, ...], Callable[..., torch.Tensor]]:
        return tuple(actual[c] for c in canon), fn  # KeyError(canonical name) when absent

    out: Recipe = {}
    if gpt2:
        out["wte.weight"] = take(rows, "transformer.wte.weight")
        out["wpe.weight"] = take(same, "transformer.wpe.weight")
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"transformer.h.{i}."
            for name, fn in [("ln_1", same), ("attn.c_attn", transpose), ("attn.c_proj", transpose)] + [
                ("ln_2", same),
                ("mlp.c_fc", transpose),
                ("mlp.c_proj", transpose),
            ]:
                out[o + name + ".weight"] = take(fn, h + name + ".weight")
                out[o + name + ".bias"] = take(same, h + name + ".bias")
        out["ln_f.weight"] = take(same, "transformer.ln_f.weight")
        out["ln_f.bias"] = take(same, "transformer.ln_f.bias")
        embed = "transformer.wte.weight"
    else:
        out["wte.weight"] = take(rows, "model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            out[o + "ln_1.weight"] = take(same, h + "input_layernorm.weight")
            out[o + "ln_2.weight"] = take(same, h + "post_attention_layernorm.weight")
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                a, m = h + "self_attn.", h + "mlp."
                out[f"{o}attn.c_attn.{kind}"] = take(cat, *(f"{a}{n}_proj.{kind}" for n in "qkv"))
                out[f"{o}attn.c_proj.{kind}"] = take(same, f"{a}o_proj.{kind}")
                out[f"{o}mlp.c_fc.{kind}"] = take(same, f"{m}gate_proj.{kind}")
                out[f"{o}mlp.c_up.{kind}"] = take(same, f"{m}up_proj.{kind}")
                out[f"{o}mlp.c_proj.{kind}"] = take(same, f"{m}down_proj.{kind}")
        out["ln_f.weight"] = take(same, "model.norm.weight")
        embed = "model.embed_tokens.weight"
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    else:
        out["lm_head.weight"] = take(rows, "lm_head.weight" if "lm_head.weight" in actual else embed)
    if "score.weight" in actual:
        out["head.weight"] = take(same, "score.weight")
    return out


def hf_to_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 / Llama weights -> our state dict (vocab rows zero-padded to padded_vocab_size)."""
    recipe = hf_weight_recipe(cfg, hf_sd)
    recipe.pop("head.weight", None)  # a reward dir's score head is no LM parameter
    out = {name: fn(*(hf_sd[k] for k in keys)) for name, (keys, fn) in recipe.items()}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]  # one tensor, as in the model
    return out


def _token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad ids of a tokenizer dir, for the HF config (so HF generate stops right)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ids = {f"{k}_token_id": getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    return {k: v for k, v in ids.items() if v is not None}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def export_hf(
    model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, tokenizer_dir: str | Path | None = None
) -> Path:
    """Write `model` (a CustomLanguageModel, or a reward model: the sequence-classification
    class) as an HF model dir: model.safetensors + config.json (+ tokenizer files).

    The weights keep the model's dtype. A reward model needs its tokenizer (HF finds the
    scored token by `pad_token_id`). Returns out_dir.
    """
    module = getattr(model, "_orig_mod", model)
    hf_style(cfg)  # refuse a mixed style before writing anything
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tok_dir is not None and not tok_dir.is_dir():
        raise ZeroLLMError(f"{tok_dir}: tokenizer directory not found")
    sd = module.state_dict()
    reward = is_reward_state(sd)
    token_ids = _token_ids(tok_dir) if tok_dir is not None else {}
    if reward and token_ids.get("pad_token_id") in (None, token_ids.get("eos_token_id")):
        raise ZeroLLMError(
            f"{tok_dir or 'no tokenizer given'}: a reward model's export needs its tokenizer with a pad token "
            "other than eos (Hugging Face reads the score at the last non-pad token, the appended eos)"
        )
    tensors = state_dict_to_hf(sd, cfg)
    dtype = next(iter(tensors.values())).dtype
    cfg_hf = hf_config(cfg, reward, **token_ids)
    cfg_hf.dtype = dtype  # from_pretrained loads in this dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out / "config.json", lambda p: p.write_text(cfg_hf.to_json_string()))
    if tok_dir is not None:
        for f in sorted(tok_dir.iterdir()):
            if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".bin")):
                shutil.copy2(f, out / f.name)
    return out


class HFTensors:
    """The tensors of an HF model dir, read one at a time by name (nothing loaded up front).

    Each read maps its safetensors file only while copying that tensor out, so the pages
    of tensors already read do not stay in this process's memory. pytorch_model*.bin files
    (pickles, no random access) are loaded whole on first use.
    """

    def __init__(self, path: Path):
        self.path, self._bin = path, None
        self._files: dict[str, str] = {}  # tensor name -> safetensors file
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                self._files.update(dict.fromkeys(handle.keys(), str(f)))
        if not self._files and not sorted(path.glob("pytorch_model*.bin")):
            raise ZeroLLMError(f"{path}: no *.safetensors or pytorch_model*.bin weights found")

    def _bins(self) -> dict[str, torch.Tensor]:
        if self._bin is None:
            self._bin = {}
            for f in sorted(self.path.glob("pytorch_model*.bin")):
                self._bin.update(torch.load(f, map_location="cpu", weights_only=True))
        return self._bin

    def keys(self) -> list[str]:
        return list(self._files) if self._files else list(self._bins())

    def __getitem__(self, name: str) -> torch.Tensor:
        if not self._files:
            return self._bins()[name]
        with safe_open(self._files[name], framework="pt", device="cpu") as handle:
            return handle.get_tensor(name).clone()  # own memory, not the file mapping

    def shape(self, name: str) -> tuple[int, ...]:
        if not self._files:
            return tuple(self._bins()[name].shape)
        with safe_open(self._files[name], framework="pt", device="cpu") as handle:
            return tuple(handle.get_slice(name).get_shape())


def read_hf_config(path: str | Path) -> Any:
    """The transformers config of an HF model dir (ZeroLLMError when it is not one)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ZeroLLMError(f"{path}: not a Hugging Face model directory (no config.json)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def import_hf(path_or_hf_model: Any, **overrides: Any) -> tuple[CustomLanguageModel, ModelConfig]:
    """A GPT-2 / Llama HF model (a local dir or a loaded model) -> (our model, its config).

    overrides set ModelConfig fields that do not change the weights' meaning (dropout,
    pad_vocab_multiple, activation_checkpointing, ...). The model is in fp32 unless the
    caller casts it.
    """
    if isinstance(path_or_hf_model, (str, Path)):
        hf_cfg = read_hf_config(path_or_hf_model)
        tensors = HFTensors(Path(path_or_hf_model))
        hf_sd = {k: tensors[k] for k in tensors.keys()}
    else:
        hf_cfg, hf_sd = path_or_hf_model.config, path_or_hf_model.state_dict()
    cfg = config_from_hf(hf_cfg, **overrides)
    try:
        sd = hf_to_state_dict(hf_sd, cfg)
    except KeyError as e:
        raise ZeroLLMError(
            f"Hugging Face weights lack {e.args[0]!r} for a {cfg.n_layer}-layer {hf_cfg.model_type}"
        ) from e
    model = CustomLanguageModel(cfg)
    model.load_state_dict(sd, strict=True)
    return model, cfg
