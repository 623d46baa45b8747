"""Hugging Face parity: export -> transformers logits equal ours, import -> ours equal theirs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from train.errors import ZeroLLMError
from train.hf_export import export_hf, import_hf
from train.model import CustomLanguageModel, from_name


def _randomize(model: CustomLanguageModel) -> CustomLanguageModel:
    """Non-trivial norms and biases too, so a mis-mapped one shows up."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(
    "style,overrides",
    [
        ("gpt2", {}),
        ("llama", {}),
        ("gpt2", dict(pad_vocab_multiple=64, vocab_size=500, tie_embeddings=False)),
        ("llama", dict(bias=True, tie_embeddings=True, n_kv_head=1, pad_vocab_multiple=64, vocab_size=500)),
    ],
)
def test_exported_model_loads_in_transformers_with_equal_logits(tmp_path, style, overrides, tiny):
    cfg = tiny(style, **overrides)
    model = _randomize(CustomLanguageModel(cfg))
    export_hf(model, cfg, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(hf) is (GPT2LMHeadModel if style == "gpt2" else LlamaForCausalLM)
    assert sum(p.numel() for p in hf.parameters()) == model.num_parameters() - (
        (cfg.padded_vocab_size - cfg.vocab_size) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    )
    idx = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_imported_transformers_model_gives_equal_logits(tmp_path, style):
    torch.manual_seed(1)
    if style == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=3, n_inner=100))
    else:
        hf = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=300,
                hidden_size=48,
                intermediate_size=80,
                num_hidden_layers=2,
                num_attention_heads=6,
                num_key_value_heads=2,
                max_position_embeddings=64,
                rope_theta=1234.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
            )
        )
    hf.eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        theirs = hf(idx).logits
    model, cfg = import_hf(hf)
    torch.testing.assert_close(model.eval()(idx)[0], theirs, rtol=0, atol=1e-5)
    hf.save_pretrained(tmp_path / "saved")
    from_dir, cfg2 = import_hf(tmp_path / "saved", pad_vocab_multiple=64)
    assert cfg2.padded_vocab_size == 320 and cfg2.vocab_size == 300
    torch.testing.assert_close(from_dir.eval()(idx)[0], theirs, rtol=0, atol=1e-5)


def test_export_import_round_trip_keeps_weights_and_copies_tokenizer(tmp_path, tiny):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok_dir = tmp_path / "tok"
    raw = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>").save_pretrained(tok_dir)
    cfg = tiny("llama")
    model = _randomize(CustomLanguageModel(cfg))
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer_dir=tok_dir)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    back, cfg2 = import_hf(out)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    assert cfg2.n_kv_head == cfg.n_kv_head and cfg2.rope_theta == cfg.rope_theta


def test_bf16_export_keeps_dtype(tmp_path, tiny):
    cfg = tiny("gpt2")
    model = CustomLanguageModel(cfg).to(torch.bfloat16)
    export_hf(model, cfg, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf.transformer.wte.weight.dtype == torch.bfloat16


def test_mixed_style_export_is_refused_before_writing(tmp_path, tiny):
    cfg = from_name("tiny", pos_emb="rope")  # rope with LayerNorm/GELU: no HF class
    with pytest.raises(ZeroLLMError, match="no Hugging Face class"):
        export_hf(CustomLanguageModel(cfg), cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(ZeroLLMError, match="n_kv_head"):
        gqa = tiny("gpt2", n_kv_head=2)
        export_hf(CustomLanguageModel(gqa), gqa, tmp_path / "hf")


@pytest.mark.parametrize("name", ["gpt2-124m", "llama-125m", "llama-1b"])
def test_preset_parameter_counts_equal_the_transformers_model(name):
    from train.hf_export import hf_config

    cfg = from_name(name)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config(cfg))
        ours = CustomLanguageModel(cfg)
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    if name == "llama-1b":
        assert ours.num_parameters() == 1_100_048_384  # TinyLlama-1.1B


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_dropout_survives_export_and_import(tmp_path, style):
    from train.hf_export import export_hf, import_hf
    from train.model import CustomLanguageModel, from_name

    extra = {} if style == "gpt2" else {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
    cfg = from_name("tiny", dropout=0.1, **extra)
    _, back = import_hf(export_hf(CustomLanguageModel(cfg), cfg, tmp_path / "hf"))
    assert back.dropout == 0.1
