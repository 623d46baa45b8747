"""The .bin/.idx format: written exactly as Megatron-LM lays it out, read back, validated."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from data_pipeline.indexed import (
    IndexedDatasetWriter,
    MMapIndexedDataset,
    dataset_vocab_size,
    merge_datasets,
    write_meta,
)
from train.errors import ZeroLLMError


def parse_megatron_idx(idx_bytes: bytes) -> dict:
    """Independent parser, from the format's description (Megatron-LM indexed_dataset.py):
    magic 'MMIDIDX\\0\\0', <Q version=1, <B dtype code, <Q sequence count, <Q document
    count, int32 sizes, int64 byte pointers, int64 document indices."""
    assert idx_bytes[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", idx_bytes, 9)
    o = 9 + 8 + 1 + 8 + 8
    sizes = list(struct.unpack_from(f"<{n_seq}i", idx_bytes, o))
    o += 4 * n_seq
    pointers = list(struct.unpack_from(f"<{n_seq}q", idx_bytes, o))
    o += 8 * n_seq
    docs = list(struct.unpack_from(f"<{n_doc}q", idx_bytes, o))
    o += 8 * n_doc
    assert o == len(idx_bytes), "trailing bytes"
    return {"version": version, "code": code, "sizes": sizes, "pointers": pointers, "docs": docs}


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(np.array(d, dtype=np.int64))
        w.finalize()


def test_layout_matches_independent_parser_including_empty_documents(tmp_path):
    docs = [[5, 6, 7], [], [65535, 0], [1]]  # an empty document: doc entry, no sequence
    write(tmp_path / "d", docs)
    parsed = parse_megatron_idx((tmp_path / "d.idx").read_bytes())
    assert parsed["version"] == 1 and parsed["code"] == 8  # 8 = uint16
    assert parsed["sizes"] == [3, 2, 1]
    assert parsed["pointers"] == [0, 6, 10]  # byte offsets (uint16 = 2 bytes)
    assert parsed["docs"] == [0, 1, 1, 2, 3]
    raw = (tmp_path / "d.bin").read_bytes()
    assert raw == struct.pack("<6H", 5, 6, 7, 65535, 0, 1)


def test_reader_round_trip_int32(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100_000, rng.integers(1, 50)).tolist() for _ in range(30)]
    write(tmp_path / "d", docs, np.int32)
    ds = MMapIndexedDataset(tmp_path / "d")
    assert ds.dtype == np.int32 and len(ds) == 30
    assert parse_megatron_idx((tmp_path / "d.idx").read_bytes())["code"] == 4
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds.get(3, 1, 2).tolist() == docs[3][1:3]
    assert ds.doc_idx.tolist() == list(range(31))
    assert isinstance(ds.tokens, np.memmap)  # mapped, not loaded


def test_writer_streams_many_chunks(tmp_path, monkeypatch):
    import data_pipeline.indexed as ix

    monkeypatch.setattr(ix, "_CHUNK", 7)  # force several chunks in finalize
    docs = [[i] * (i % 5) for i in range(40)]
    write(tmp_path / "d", docs)
    parsed = parse_megatron_idx((tmp_path / "d.idx").read_bytes())
    nonempty = [d for d in docs if d]
    assert parsed["sizes"] == [len(d) for d in nonempty]
    assert parsed["pointers"] == list(np.cumsum([0] + [2 * len(d) for d in nonempty])[:-1])
    assert parsed["docs"] == [0, *np.cumsum([1 if d else 0 for d in docs]).tolist()]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b, i: (b[:-3], i), "truncated or corrupt"),
        (lambda b, i: (b, i[:-8]), "truncated or corrupt"),
        (lambda b, i: (b, b"XXXXXXXXX" + i[9:]), "bad magic"),
        (lambda b, i: (b, i[:9] + struct.pack("<Q", 2) + i[17:]), "version 2"),
        (lambda b, i: (b, i[:17] + b"\x09" + i[18:]), "dtype code 9"),
        (lambda b, i: (b + b"\x00\x00", i), "truncated or corrupt"),
    ],
)
def test_corrupt_files_are_one_clear_error(tmp_path, damage, message):
    write(tmp_path / "d", [[1, 2, 3], [4, 5]])
    b, i = damage((tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes())
    (tmp_path / "d.bin").write_bytes(b)
    (tmp_path / "d.idx").write_bytes(i)
    with pytest.raises(ZeroLLMError, match=message) as e:
        MMapIndexedDataset(tmp_path / "d")
    assert "\n" not in str(e.value) and "d." in str(e.value)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(ZeroLLMError, match="missing"):
        MMapIndexedDataset(tmp_path / "nope")


def test_failed_write_leaves_no_file_under_the_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add_document(np.array([1, 2]))
            raise RuntimeError("crash mid-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_merge_concatenates_like_megatron_add_index(tmp_path):
    a, b = [[1, 2], [], [3]], [[4, 5, 6], [7]]
    write(tmp_path / "a", a)
    write(tmp_path / "b", b)
    write(tmp_path / "ab", a + b)
    for p in ("a", "b"):
        write_meta(tmp_path / p, {"tokenizer_hash": "h", "vocab_size": 10, "tokens": 1})
    merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"m.{ext}").read_bytes() == (tmp_path / f"ab.{ext}").read_bytes()
    assert dataset_vocab_size(tmp_path / "m") == 10


def test_merge_refuses_different_tokenizers(tmp_path):
    write(tmp_path / "a", [[1]])
    write(tmp_path / "b", [[2]])
    write_meta(tmp_path / "a", {"tokenizer_hash": "h1", "vocab_size": 10})
    write_meta(tmp_path / "b", {"tokenizer_hash": "h2", "vocab_size": 10})
    with pytest.raises(ZeroLLMError, match="different tokenizers"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert not (tmp_path / "m.bin").exists()
