"""Forward, loss, masking, packing, GQA, tying, padding, checkpointing, init, counts, presets."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from train.errors import ZeroLLMError
from train.model import PRESETS, CustomLanguageModel, ModelConfig, from_name


def test_shapes_and_loss_match_cross_entropy(style, tiny):
    cfg = tiny(style)
    model = CustomLanguageModel(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 20))
    targets = torch.randint(0, cfg.vocab_size, (3, 20))
    targets[0, :5] = -100  # masked targets add nothing
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 20, cfg.vocab_size)
    valid = targets != -100
    expected = F.cross_entropy(logits[valid], targets[valid])
    torch.testing.assert_close(loss, expected)
    _, loss_sum = model(idx, targets, loss_reduction="sum")
    torch.testing.assert_close(loss_sum, expected * valid.sum())
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5  # near-uniform at init
    assert model(idx)[1] is None


def test_changing_a_future_token_changes_no_earlier_logit(style, tiny):
    model = CustomLanguageModel(tiny(style)).eval()
    idx = torch.randint(0, 512, (2, 24))
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 512
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=0)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_packed_row_logits_equal_each_document_alone(style, tiny):
    model = CustomLanguageModel(tiny(style)).eval()
    lengths = [7, 12, 5]
    docs = [torch.randint(0, 512, (1, n)) for n in lengths]
    row = torch.cat(docs, dim=1)  # (1, 24)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    packed = model(row, doc_ids=doc_ids)[0]
    alone = torch.cat([model(d)[0] for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(row)[0][:, 7:], alone[:, 7:], atol=1e-3)  # without doc_ids they mix


def test_explicit_position_ids_equal_derived_ones(style, tiny):
    model = CustomLanguageModel(tiny(style)).eval()
    row = torch.randint(0, 512, (2, 10))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [3] * 10])
    pos = torch.tensor([list(range(4)) + list(range(6)), list(range(10))])
    torch.testing.assert_close(model(row, doc_ids=doc_ids)[0], model(row, doc_ids=doc_ids, position_ids=pos)[0])


def test_gqa_equals_full_attention_with_repeated_kv_heads(tiny):
    gqa = CustomLanguageModel(tiny("llama", n_kv_head=2)).eval()
    full = CustomLanguageModel(tiny("llama", n_kv_head=4)).eval()
    sd = gqa.state_dict()
    hd, nh, nkv = 16, 4, 2
    for i in range(2):
        w = sd[f"blocks.{i}.attn.c_attn.weight"]  # rows [q | k | v]
        q, k, v = w.split([nh * hd, nkv * hd, nkv * hd])
        rep = lambda t: t.view(nkv, hd, -1).repeat_interleave(nh // nkv, dim=0).reshape(nh * hd, -1)  # noqa: E731
        sd[f"blocks.{i}.attn.c_attn.weight"] = torch.cat([q, rep(k), rep(v)])
    full.load_state_dict(sd)
    idx = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(gqa(idx)[0], full(idx)[0], rtol=1e-5, atol=1e-5)


def test_kv_heads_equal_heads_is_plain_multi_head_attention(tiny):
    a = CustomLanguageModel(tiny("llama", n_kv_head=4)).eval()
    b = CustomLanguageModel(tiny("llama", n_kv_head=None)).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 512, (1, 9))
    torch.testing.assert_close(a(idx)[0], b(idx)[0])


def test_tied_weights_are_one_tensor_and_untied_are_two(tiny):
    tied = CustomLanguageModel(tiny("gpt2"))
    assert tied.lm_head.weight is tied.wte.weight
    assert len({id(p) for p in tied.parameters()}) == len(list(tied.parameters()))
    idx = torch.randint(1, 512, (1, 8))
    logits, loss = tied(idx, torch.randint(0, 512, (1, 8)))
    loss.backward()
    _assert_finite_nonzero_grads(tied, skip={"wpe.weight"})
    _assert_finite_nonzero_grads(tied.wpe, rows=slice(0, 8))
    assert torch.count_nonzero(tied.wpe.weight.grad[8:]) == 0  # positions 8.. were never used
    assert 0 not in idx and torch.count_nonzero(tied.wte.weight.grad[0]) > 0  # never looked up: the head's share
    with torch.no_grad():
        tied.wte.weight[3] += 1.0
    assert torch.equal(tied.lm_head.weight[3], tied.wte.weight[3])
    untied = CustomLanguageModel(tiny("llama"))
    assert untied.lm_head.weight is not untied.wte.weight


def _assert_finite_nonzero_grads(module: torch.nn.Module, skip: set[str] = frozenset(), rows=slice(None)) -> None:
    for name, p in module.named_parameters():
        if name in skip:
            continue
        assert p.grad is not None, f"{name}: no gradient"
        g = p.grad[rows] if p.dim() == 2 else p.grad
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        assert torch.count_nonzero(g) > 0, f"{name}: zero gradient"


def test_backward_reaches_every_parameter_and_no_padded_or_masked_row(style, tiny):
    """Vocab 500 padded to 512; row 0 trains, row 1 is all token 9 with every target masked."""
    model = CustomLanguageModel(tiny(style, vocab_size=500, pad_vocab_multiple=64))
    idx = torch.randint(10, 500, (2, 8))
    idx[1] = 9  # token 9 occurs only in the masked row
    targets = torch.randint(0, 500, (2, 8))
    targets[1] = -100
    model(idx, targets)[1].backward()
    embeddings = {"wte.weight", "wpe.weight", "lm_head.weight"}
    _assert_finite_nonzero_grads(model, skip=embeddings)
    _assert_finite_nonzero_grads(model.lm_head, rows=slice(0, 500))  # softmax over the whole real vocab
    assert torch.count_nonzero(model.lm_head.weight.grad[500:]) == 0  # padded ids: never a logit
    wte = model.wte.weight.grad
    assert torch.count_nonzero(wte[500:]) == 0
    for token in idx[0].unique():
        assert torch.count_nonzero(wte[token]) > 0, int(token)
    if model.lm_head.weight is not model.wte.weight:  # untied: only looked-up rows that reach a loss
        assert torch.count_nonzero(wte[9]) == 0 and torch.count_nonzero(wte[:9]) == 0
    if model.wpe is not None:
        assert torch.count_nonzero(model.wpe.weight.grad[:8]) > 0
        assert torch.count_nonzero(model.wpe.weight.grad[8:]) == 0


def test_padded_vocab_gives_the_same_logits_and_never_exposes_padded_ids(style, tiny):
    plain = CustomLanguageModel(tiny(style, vocab_size=500)).eval()
    padded = CustomLanguageModel(tiny(style, vocab_size=500, pad_vocab_multiple=64)).eval()
    assert padded.wte.weight.shape[0] == 512 and padded.cfg.padded_vocab_size == 512
    sd = {k: v for k, v in plain.state_dict().items()}
    for key in ("wte.weight", "lm_head.weight"):
        sd[key] = torch.cat([sd[key], torch.full((12, 64), 50.0)])  # huge padded rows would win if visible
    padded.load_state_dict(sd)
    idx = torch.randint(0, 500, (2, 10))
    lp, lossp = padded(idx, idx)
    l0, loss0 = plain(idx, idx)
    assert lp.shape[-1] == 500
    torch.testing.assert_close(lp, l0)
    torch.testing.assert_close(lossp, loss0)
    out = padded.generate(idx[:, :3], 6, temperature=2.0)
    assert int(out.max()) < 500


def test_activation_checkpointing_runs_every_block_and_keeps_gradients(style, tiny):
    cfg = tiny(style)
    model = CustomLanguageModel(cfg)
    idx, tgt = torch.randint(0, 512, (2, 12)), torch.randint(0, 512, (2, 12))
    model(idx, tgt)[1].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []

    def counting(fn, *args):
        calls.append(fn)
        return checkpoint(fn, *args, use_reentrant=False)

    model.set_activation_checkpointing(counting)
    model(idx, tgt)[1].backward()
    assert len(calls) == cfg.n_layer
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)
    model.eval()
    model(idx)
    assert len(calls) == cfg.n_layer  # not in eval
    on = CustomLanguageModel(tiny(style, activation_checkpointing=True))
    assert isinstance(on.checkpoint_fn, functools.partial)
    assert CustomLanguageModel(cfg).checkpoint_fn is None


def test_dropout_is_active_only_in_training(tiny):
    model = CustomLanguageModel(tiny("gpt2", dropout=0.5))
    idx = torch.randint(0, 512, (1, 8))
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])


def test_gpt2_init_scales_residual_projections(tiny):
    model = CustomLanguageModel(tiny("gpt2", n_layer=8, d_model=128, vocab_size=4096))
    assert abs(model.wte.weight.std().item() - 0.02) < 0.001
    assert abs(model.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.001
    expect = 0.02 / math.sqrt(2 * 8)
    assert abs(model.blocks[0].attn.c_proj.weight.std().item() - expect) < 0.0005
    assert abs(model.blocks[0].mlp.c_proj.weight.std().item() - expect) < 0.0005
    assert torch.count_nonzero(model.blocks[0].mlp.c_fc.bias) == 0
    assert torch.all(model.blocks[0].ln_1.weight == 1)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(tie_embeddings=False),
        dict(bias=False),
        dict(pad_vocab_multiple=64, vocab_size=500),
        dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1),
        dict(mlp="swiglu", ffn_hidden=100),
    ],
)
def test_num_parameters_counts_every_unique_parameter(overrides):
    model = CustomLanguageModel(from_name("tiny", **overrides))
    params = list(model.parameters())
    assert model.num_parameters() == sum(p.numel() for p in params)
    emb = model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - emb


@pytest.mark.parametrize("name,published", [("gpt2-124m", 124_439_808), ("gpt2-350m", 354_823_168)])
def test_gpt2_presets_have_the_published_parameter_counts(name, published):
    with torch.device("meta"):
        model = CustomLanguageModel(from_name(name, pad_vocab_multiple=1))
    assert sum(p.numel() for p in model.parameters()) == published
    assert model.num_parameters() == published


def test_flops_per_token_of_the_tiny_preset_at_seq_len_128():
    # tiny: 2 layers, d_model 64, 4 heads, GELU MLP 256, biases, LayerNorm, vocab 512.
    #   attention: qkv 64*192 + 192, proj 64*64 + 64                      = 16,640
    #   mlp:       fc 64*256 + 256, proj 256*64 + 64                      = 33,088
    #   2 LayerNorms of 64 weights + 64 biases                            =    256
    #   per block 49,984; 2 blocks 99,968; final LayerNorm 128; head 512*64 = 32,768
    #   N = 132,864 (no wte/wpe lookups) -> 6N = 797,184
    #   attention term 12 * n_layer 2 * d_model 64 * T 128                 = 196,608
    assert CustomLanguageModel(from_name("tiny")).flops_per_token(128) == 993_792
    # Llama style (RMSNorm weight only, no biases, SwiGLU 256 = ceil(170/256)*256, 2 kv heads):
    #   attention 64*(4+2*2)*16 + 64*64 = 12,288; mlp 64*512 + 256*64 = 49,152; norms 128
    #   per block 61,568; 2 blocks 123,136; final norm 64; head 32,768 -> N = 155,968, 6N = 935,808
    llama = from_name("tiny", pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)
    assert CustomLanguageModel(llama).flops_per_token(128) == 935_808 + 196_608


def test_presets_exist_and_tiny_is_small():
    assert {"tiny", "gpt2-124m", "gpt2-350m", "llama-125m", "llama-1b"} <= set(PRESETS)
    cfg = from_name("tiny")
    assert (cfg.vocab_size, cfg.max_seq_len) == (512, 128)
    assert CustomLanguageModel(cfg).num_parameters() < 1_000_000
    for name in PRESETS:
        from_name(name)  # every preset builds a valid config


def test_from_name_errors_list_the_valid_names():
    with pytest.raises(ZeroLLMError, match="gpt2-124m.*tiny"):
        from_name("gpt5")
    with pytest.raises(ZeroLLMError, match="d_modle"):
        from_name("tiny", d_modle=3)


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ZeroLLMError, match="model.d_model"):
        ModelConfig(d_model=100, n_head=3)
    with pytest.raises(ZeroLLMError, match="model.n_kv_head"):
        ModelConfig(n_head=12, n_kv_head=5)
    with pytest.raises(ZeroLLMError, match="model.ffn_multiple_of"):
        ModelConfig(ffn_multiple_of=0)


def test_llama_hidden_size_rule():
    assert ModelConfig(d_model=4096, n_head=32, mlp="swiglu").ffn_dim == 11008  # Llama-7B
    assert ModelConfig(d_model=768, mlp="swiglu").ffn_dim == 2048
    assert ModelConfig(d_model=768).ffn_dim == 3072


def test_logits_where_gives_the_full_logits_at_those_positions_only():
    from train.model import CustomLanguageModel, from_name

    torch.manual_seed(0)
    model = CustomLanguageModel(from_name("tiny", dropout=0.0)).eval()
    idx = torch.randint(0, 512, (2, 7))
    where = torch.zeros(2, 7, dtype=torch.bool)
    where[0, 2], where[1, 5], where[1, 6] = True, True, True
    full, _ = model(idx)
    part, _ = model(idx, logits_where=where)
    assert part.shape == (3, 512)
    torch.testing.assert_close(part, full[where])
