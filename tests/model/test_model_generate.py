"""generate(): KV cache equals no cache, left padding equals no padding, stop token, sampling."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from train.hf_export import export_hf
from train.model import CustomLanguageModel, sample_next


def _left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    return idx, mask


def _naive_greedy(model: CustomLanguageModel, idx: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        nxt = model(idx)[0][:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def test_kv_cache_greedy_equals_no_cache_greedy_on_a_left_padded_batch(style, tiny):
    model = CustomLanguageModel(tiny(style)).eval()
    idx, mask = _left_pad([torch.randint(1, 512, (n,)) for n in (3, 9, 6)])
    cached = model.generate(idx, 20, temperature=0, attention_mask=mask)
    plain = model.generate(idx, 20, temperature=0, attention_mask=mask, use_cache=False)
    assert cached.shape == (3, 9 + 20)
    assert torch.equal(cached, plain)


def test_left_padded_rows_equal_each_prompt_alone_and_a_naive_loop(style, tiny):
    model = CustomLanguageModel(tiny(style)).eval()
    prompts = [torch.randint(1, 512, (n,)) for n in (4, 11)]
    idx, mask = _left_pad(prompts)
    batch = model.generate(idx, 12, temperature=0, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 12, temperature=0)
        assert torch.equal(batch[i, -12:], alone[0, -12:])
        assert torch.equal(alone, _naive_greedy(model, p[None], 12))


def test_rows_stop_at_the_eos_token(tiny):
    model = CustomLanguageModel(tiny("gpt2")).eval()
    idx = torch.randint(1, 512, (2, 5))
    free = model.generate(idx, 10, temperature=0)
    eos = int(free[0, 7])
    out = model.generate(idx, 10, temperature=0, eos_token_id=eos)
    for row in range(2):
        hits = (free[row, 5:] == eos).nonzero()
        stop = int(hits[0]) + 5 + 1 if len(hits) else free.shape[1]  # just past the first eos
        assert torch.equal(out[row, :stop], free[row, :stop])
        assert torch.all(out[row, stop:] == eos)
    first = int((free[0, 5:] == eos).nonzero()[0]) + 5
    single = model.generate(idx[:1], 10, temperature=0, eos_token_id=eos)
    assert single.shape[1] == first + 1  # stops as soon as every row has finished


def test_sampling_filters_and_is_reproducible(style, tiny):
    model = CustomLanguageModel(tiny(style)).eval()
    idx = torch.randint(1, 512, (2, 4))
    greedy = model.generate(idx, 8, temperature=0)
    assert torch.equal(model.generate(idx, 8, top_k=1), greedy)
    assert torch.equal(model.generate(idx, 8, top_p=1e-6), greedy)
    a = model.generate(idx, 8, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 8, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_sample_next_top_k_and_top_p_keep_the_right_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # top_p=0.7: 0.5 alone is < 0.7, 0.5 + 0.3 reaches it -> {0, 1}
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, generator=g).tolist()) == {0, 1, 2, 3}


def test_greedy_generate_equals_transformers_generate(tmp_path, tiny):
    cfg = tiny("llama")
    model = CustomLanguageModel(cfg).eval()
    export_hf(model, cfg, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    idx, mask = _left_pad([torch.randint(1, 512, (n,)) for n in (5, 8)])
    ours = model.generate(idx, 10, temperature=0, attention_mask=mask)
    theirs = hf.generate(idx, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
