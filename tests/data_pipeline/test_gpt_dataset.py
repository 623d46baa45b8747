"""GPTDataset / BlendedDataset: exact windows, pure function of the global index, blending."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.gpt_dataset import BlendedDataset, GPTDataset, blend_schedule, build_dataset
from data_pipeline.indexed import IndexedDatasetWriter, write_meta
from train.errors import ZeroLLMError


def make(prefix, n_docs=50, seed=0, vocab=1000, tok_hash="h"):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab, rng.integers(1, 40)).tolist() for _ in range(n_docs)]
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(np.array(d + [0]))  # eod = 0
        w.finalize()
    write_meta(prefix, {"tokenizer_hash": tok_hash, "vocab_size": vocab})
    return [d + [0] for d in docs]


def reference_sample(ds: GPTDataset, docs, i):
    """Sample i by the definition: window j*seq_len of the epoch-ordered token stream."""
    j = int(ds.shuffle[i])
    start = j * ds.seq_len
    if not hasattr(ds, "_ref_cum"):  # tokens before each piece of the stream
        ds._ref_cum = np.concatenate([[0], np.cumsum(np.array([len(d) for d in docs])[np.asarray(ds.doc_order)])])
    k = int(np.searchsorted(ds._ref_cum, start, side="right")) - 1  # the piece holding `start`
    stream, skipped = [], int(ds._ref_cum[k])
    while len(stream) < start - skipped + ds.seq_len + 1:
        stream += docs[int(ds.doc_order[k])]
        k += 1
    return stream[start - skipped : start - skipped + ds.seq_len + 1]


def test_samples_are_windows_of_the_shuffled_document_stream(tmp_path):
    docs = make(tmp_path / "a")
    ds = GPTDataset(str(tmp_path / "a"), seq_len=16, num_samples=500, seed=3)
    assert len(ds) >= 500
    n_docs = len(docs)
    for e in range(3):  # every epoch is a permutation of all documents
        assert sorted(ds.doc_order[e * n_docs : (e + 1) * n_docs]) == list(range(n_docs))
    for i in list(range(40)) + [499, len(ds) - 1]:
        s = ds[i]
        assert s.dtype == np.int64 and s.shape == (17,)
        assert s.tolist() == reference_sample(ds, docs, i)
    batch = ds.get_batch([5, 0, 499, 5])
    assert batch.shape == (4, 17) and (batch[0] == ds[5]).all() and (batch[2] == ds[499]).all()
    assert sorted(ds.shuffle[: ds.block]) == list(range(ds.block))  # a true permutation
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_sample_i_does_not_depend_on_num_samples_or_cache(tmp_path):
    make(tmp_path / "a")
    small = GPTDataset(str(tmp_path / "a"), 16, 100, seed=1)
    big = GPTDataset(str(tmp_path / "a"), 16, 200_000, seed=1, cache_dir=str(tmp_path / "c"))
    again = GPTDataset(str(tmp_path / "a"), 16, 200_000, seed=1, cache_dir=str(tmp_path / "c"))
    assert len(list((tmp_path / "c").glob("*.npy"))) == 4
    assert isinstance(again.shuffle, np.memmap)  # loaded from the cache
    idx = np.random.default_rng(0).integers(0, len(small), 300)
    assert (small.get_batch(idx) == big.get_batch(idx)).all()
    assert (big.get_batch(idx) == again.get_batch(idx)).all()
    assert small.fingerprint == big.fingerprint


def test_fingerprint_changes_with_data_seq_len_seed(tmp_path):
    make(tmp_path / "a")
    make(tmp_path / "b", seed=1)
    f = GPTDataset(str(tmp_path / "a"), 16, 10, 1).fingerprint
    assert GPTDataset(str(tmp_path / "a"), 16, 10, 1).fingerprint == f
    assert GPTDataset(str(tmp_path / "b"), 16, 10, 1).fingerprint != f
    assert GPTDataset(str(tmp_path / "a"), 32, 10, 1).fingerprint != f
    assert GPTDataset(str(tmp_path / "a"), 16, 10, 2).fingerprint != f
    d1 = GPTDataset(str(tmp_path / "a"), 16, 10, 1)
    d2 = GPTDataset(str(tmp_path / "a"), 16, 10, 2)
    assert not (d1.get_batch(range(10)) == d2.get_batch(range(10))).all()


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.25], [0.999, 0.001], [3, 1]])
def test_blend_schedule_exact_proportions(weights):
    n = 20_000
    ids, ks = blend_schedule([w / sum(weights) for w in weights], n)
    for d, w in enumerate(weights):
        w = w / sum(weights)
        mine = ids == d
        counts = np.cumsum(mine)
        prefix = np.arange(1, n + 1)
        assert np.abs(counts - w * prefix).max() <= 1.0  # within 1 sample at every prefix
        assert (ks[mine] == np.arange(mine.sum())).all()  # each dataset read in order
    # prefix-stable: the first 1,000 of a longer schedule are the schedule of 1,000
    ids2, ks2 = blend_schedule([w / sum(weights) for w in weights], 1000)
    assert (ids2 == ids[:1000]).all() and (ks2 == ks[:1000]).all()


def test_blended_dataset_reads_from_its_parts(tmp_path):
    make(tmp_path / "a")
    make(tmp_path / "b", seed=1)
    ds = build_dataset(["0.7", str(tmp_path / "a"), 0.3, str(tmp_path / "b")], 8, 1000, 5)
    assert isinstance(ds, BlendedDataset) and len(ds) == 1000
    assert abs(int((ds.dataset_index == 0).sum()) - 700) <= 1
    for i in (0, 1, 2, 500, 999):
        part = ds.datasets[ds.dataset_index[i]]
        assert (ds[i] == part[int(ds.sample_index[i])]).all()
    assert (ds.get_batch([3, 999, 0]) == np.stack([ds[3], ds[999], ds[0]])).all()
    assert ds.vocab_size == 1000
    other = build_dataset(["0.6", str(tmp_path / "a"), 0.4, str(tmp_path / "b")], 8, 1000, 5)
    assert other.fingerprint != ds.fingerprint


def test_blend_refuses_mismatched_tokenizers_and_bad_specs(tmp_path):
    make(tmp_path / "a")
    make(tmp_path / "b", tok_hash="other")
    with pytest.raises(ZeroLLMError, match="different tokenizers"):
        build_dataset(["1", str(tmp_path / "a"), "1", str(tmp_path / "b")], 8, 10, 0)
    with pytest.raises(ZeroLLMError, match="not a number"):
        build_dataset(["x", str(tmp_path / "a"), "1", str(tmp_path / "a")], 8, 10, 0)
    with pytest.raises(ZeroLLMError, match="expected"):
        build_dataset(["1", str(tmp_path / "a"), "2"], 8, 10, 0)
    with pytest.raises(ZeroLLMError, match="not a number"):  # two prefixes, no weights
        build_dataset([str(tmp_path / "a"), str(tmp_path / "b")], 8, 10, 0)


def test_token_id_beyond_vocab_is_reported(tmp_path):
    make(tmp_path / "a", vocab=1000)
    ds = GPTDataset(str(tmp_path / "a"), 8, 10, 0)
    ds.check_token_ids(1000)
    with pytest.raises(ZeroLLMError, match="token id 9.. >= vocab_size 500"):
        ds.check_token_ids(500)


def test_index_build_is_vectorised_for_a_million_samples(tmp_path):
    make(tmp_path / "a", n_docs=300)
    ds = GPTDataset(str(tmp_path / "a"), 4, 1_000_000, 0)  # ~ 570 epochs of a tiny dataset
    assert len(ds) >= 1_000_000
    assert (ds.sample_off >= 0).all() and ds.sample_off.max() < 41


@pytest.mark.parametrize("seq_len", [1, 16, 64, 2000])
def test_batched_reads_equal_single_reads_and_the_definition(tmp_path, seq_len):
    """Windows inside one document, spanning several, starting in the document stored
    last in the .bin (a window view would run off its end), and longer than the whole
    dataset (2000 > its ~1,000 tokens)."""
    docs = make(tmp_path / "a")
    ds = GPTDataset(str(tmp_path / "a"), seq_len=seq_len, num_samples=300, seed=5)
    first_doc = ds.doc_order[ds.sample_pos[ds.shuffle]]
    stored_last = np.flatnonzero(first_doc == len(docs) - 1)[:20]
    idx = np.concatenate([np.arange(300), stored_last, [len(ds) - 1]])
    batch = ds.get_batch(idx)
    assert batch.shape == (len(idx), seq_len + 1) and batch.dtype == np.int64
    for row, i in zip(batch, idx.tolist(), strict=True):
        assert (row == ds[i]).all() and row.tolist() == reference_sample(ds, docs, i)
