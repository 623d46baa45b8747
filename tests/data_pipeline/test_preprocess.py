"""preprocess: Megatron-identical .bin/.idx from jsonl / txt / parquet; bad input is loud."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from data_pipeline.indexed import MMapIndexedDataset, read_meta
from data_pipeline.preprocess import preprocess
from train.errors import ZeroLLMError


def megatron_reference(texts: list[str], tok_dir) -> tuple[bytes, bytes]:
    """What Megatron-LM's preprocess_data.py --append-eod (HuggingFaceTokenizer) writes,
    rebuilt here from its documented behaviour: tokens = tokenizer(text).input_ids + [eos]
    for non-empty documents; an empty one adds a document entry only; uint16 < 65,500."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) < 65500
    seqs, docs = [], [0]
    for t in texts:
        ids = tok(t).input_ids
        if ids:
            seqs.append(ids + [tok.eos_token_id])
        docs.append(len(seqs))
    sizes = [len(s) for s in seqs]
    pointers = np.concatenate([[0], np.cumsum(sizes)[:-1] * 2]).astype(int) if seqs else []
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(seqs), len(docs))
    idx += struct.pack(f"<{len(sizes)}i", *sizes)
    idx += struct.pack(f"<{len(sizes)}q", *pointers)
    idx += struct.pack(f"<{len(docs)}q", *docs)
    bin_ = b"".join(struct.pack(f"<{len(s)}H", *s) for s in seqs)
    return bin_, idx


TRICKY = [
    "plain text",
    "",  # empty document: entry without tokens
    "spells <|endoftext|> inside and <|im_start|>user",
    "tabs\tand\r\nCRLF\u2028line sep \x00 nul",
    "emoji 🙂👍🏽 and 東京 and e\u0301",
    "   ",
]


@pytest.mark.parametrize("encoder,workers", [("fastokens", 2), ("tiktoken", 2), ("tokenizers", 1)])
def test_jsonl_output_is_byte_identical_to_megatron(tmp_path, tok_dir, corpus_docs, encoder, workers, write_jsonl):
    texts = corpus_docs[:12] + TRICKY
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    r = preprocess([str(src)], str(tok_dir), str(tmp_path / "out"), workers=workers, encoder=encoder, progress=False)
    assert r.encoder == encoder
    bin_, idx = megatron_reference(texts, tok_dir)
    assert (tmp_path / "out.bin").read_bytes() == bin_
    assert (tmp_path / "out.idx").read_bytes() == idx
    meta = read_meta(tmp_path / "out")
    assert meta["documents"] == len(texts) and meta["empty_documents"] == 1
    assert meta["vocab_size"] == 600 and meta["dtype"] == "uint16"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "out.bin",
        "out.idx",
        "out.meta.json",
    ]  # no temp files left


def test_small_chunks_and_many_workers_change_nothing(tmp_path, tok_dir, corpus_docs, monkeypatch, write_jsonl):
    import data_pipeline.sources as sources

    texts = corpus_docs[:20]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    preprocess([str(src)], str(tok_dir), str(tmp_path / "a"), workers=1, progress=False)
    monkeypatch.setattr(sources, "BLOCK", 997)  # records straddle every block edge
    preprocess([str(src)], str(tok_dir), str(tmp_path / "b"), workers=2, progress=False)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()


def test_shards_merge_back_to_the_unsharded_output(tmp_path, tok_dir, corpus_docs, write_jsonl):
    from data_pipeline.indexed import merge_datasets

    texts = corpus_docs[:30] + TRICKY
    a = write_jsonl(tmp_path / "a.jsonl", texts[:17])
    b = write_jsonl(tmp_path / "b.jsonl", texts[17:])
    ins = [str(a), str(b)]
    preprocess(ins, str(tok_dir), str(tmp_path / "full"), workers=1, progress=False)
    parts = []
    for i in range(3):
        r = preprocess(ins, str(tok_dir), str(tmp_path / "s"), workers=1, shard=(i, 3), progress=False)
        parts += r.prefixes
    assert [p.split("/")[-1] for p in parts] == ["s_shard0of3", "s_shard1of3", "s_shard2of3"]
    assert sum(read_meta(p)["documents"] for p in parts) == len(texts)
    merge_datasets(parts, str(tmp_path / "merged"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"full.{ext}").read_bytes()


def test_valid_split_partitions_documents(tmp_path, tok_dir, corpus_docs, write_jsonl):
    texts = corpus_docs[:40]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    r = preprocess([str(src)], str(tok_dir), str(tmp_path / "c"), valid_fraction=0.25, workers=2, progress=False)
    assert [p.split("/")[-1] for p in r.prefixes] == ["c_train", "c_valid"]
    tr, va = (MMapIndexedDataset(p) for p in r.prefixes)
    assert len(tr) + len(va) == len(texts) and len(va) > 0 and len(tr) > len(va)
    # same split with one worker and the other encoder: it depends on the text only
    r2 = preprocess(
        [str(src)],
        str(tok_dir),
        str(tmp_path / "d"),
        valid_fraction=0.25,
        workers=1,
        encoder="tokenizers",
        progress=False,
    )
    assert (tmp_path / "d_valid.bin").read_bytes() == (tmp_path / "c_valid.bin").read_bytes()
    assert r2.prefixes[1].endswith("d_valid")


def test_txt_and_parquet_inputs(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.txt").write_text("first doc\nline two\n\n\n\nsecond doc\n \t\nthird\n")
    r = preprocess([str(tmp_path / "t.txt")], str(tok_dir), str(tmp_path / "t"), workers=1, progress=False)
    assert r.documents == 3
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\r\n\r\n\r\nthree\r\n")
    r = preprocess([str(tmp_path / "crlf.txt")], str(tok_dir), str(tmp_path / "c"), workers=1, progress=False)
    assert r.documents == 2
    ds = MMapIndexedDataset(tmp_path / "t")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.decode(ds[0]) == "first doc\nline two<|endoftext|>"
    pq.write_table(pa.table({"text": ["a b c", "", "d"]}), tmp_path / "p.parquet")
    r = preprocess([str(tmp_path / "p.parquet")], str(tok_dir), str(tmp_path / "p"), workers=1, progress=False)
    assert r.documents == 3 and len(MMapIndexedDataset(tmp_path / "p")) == 2


def test_tinyshakespeare_txt(tmp_path, tok_dir, shakespeare):
    src = shakespeare
    r = preprocess([str(src)], str(tok_dir), str(tmp_path / "ts"), workers=2, progress=False)
    ds = MMapIndexedDataset(tmp_path / "ts")
    assert r.encoder == "fastokens" and len(ds) == r.documents > 7000
    assert ds.tokens[-1] == 0  # every document ends with <|endoftext|> (id 0)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b'{"text": "ok"}\n{"text": "bad \xff utf8"}\n', "invalid UTF-8"),
        (b'{"text": "ok"}\n{"text": broken\n', "not valid JSON"),
        (b'{"body": "no text field"}\n', "no 'text' field"),
        (b'{"text": 42}\n', "is int, not text"),
        (b'{"text": "lone \\ud800 surrogate"}\n', "lone surrogate"),
        (b'{"text": ""}\n{"text": ""}\n', "no tokens at all"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, tok_dir, content, message):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    with pytest.raises(ZeroLLMError, match=message) as e:
        preprocess([str(src)], str(tok_dir), str(tmp_path / "o"), workers=2, progress=False)
    assert "in.jsonl" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_skip_bad_documents_counts_them(tmp_path, tok_dir):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "ok"}\n\n{"text": "bad \xff"}\n{"text": oops}\n{"text": "fine"}\n')
    r = preprocess([str(src)], str(tok_dir), str(tmp_path / "o"), skip_bad=True, workers=1, progress=False)
    meta = read_meta(tmp_path / "o")
    assert meta["skipped"] == {"bad_records": 2, "blank_lines": 1}
    assert r.documents == 2


def test_tokenizer_without_eos_is_refused(tmp_path, tok_dir, write_jsonl):
    import shutil

    bad = tmp_path / "tok"
    shutil.copytree(tok_dir, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bad / "special_tokens_map.json").unlink(missing_ok=True)
    src = write_jsonl(tmp_path / "in.jsonl", ["x"])
    with pytest.raises(ZeroLLMError, match="eos_token"):
        preprocess([str(src)], str(bad), str(tmp_path / "o"), progress=False)


def test_falls_back_to_tokenizers_when_the_fast_path_is_not_equivalent(tmp_path, tok_dir, write_jsonl):
    import shutil

    other = tmp_path / "nfc"  # a normalizer neither fast library implements
    shutil.copytree(tok_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFKC"}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    texts = ["ﬁne ½ café e\u0301", "plain"]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    r = preprocess([str(src)], str(other), str(tmp_path / "o"), workers=2, progress=False)
    assert r.encoder == "tokenizers" and read_meta(tmp_path / "o")["encoder"] == "tokenizers"
    bin_, idx = megatron_reference(texts, other)
    assert (tmp_path / "o.bin").read_bytes() == bin_ and (tmp_path / "o.idx").read_bytes() == idx
    with pytest.raises(ZeroLLMError, match="not exactly equivalent"):
        preprocess([str(src)], str(other), str(tmp_path / "p"), encoder="tiktoken", progress=False)


def test_blank_line_txt_chunking_does_not_change_documents(tmp_path, tok_dir, monkeypatch):
    import data_pipeline.sources as sources

    cr = ["\r", "", ""]
    text = "".join(f"para {i}\nline{cr[i % 3]}\n" + "\n" * (i % 4) for i in range(60))
    (tmp_path / "t.txt").write_text(text, newline="")
    preprocess([str(tmp_path / "t.txt")], str(tok_dir), str(tmp_path / "a"), workers=1, progress=False)
    monkeypatch.setattr(sources, "BLOCK", 5)  # separators straddle every block edge
    preprocess([str(tmp_path / "t.txt")], str(tok_dir), str(tmp_path / "b"), workers=1, progress=False)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()
    docs = [d for d in text.split("\n\n") if d.strip()]
    assert read_meta(tmp_path / "a")["documents"] == len([d for d in docs if d.strip("\r\n")])


def test_a_chunk_the_fast_encoder_fails_on_is_encoded_by_tokenizers(tmp_path, tok_dir, write_jsonl, monkeypatch):
    from data_pipeline.tokenizer import PROBE_TEXT, Encoder

    real = Encoder.encode_flat

    def flaky(self, texts):  # e.g. a regex engine's match limit on one odd document (not in the check)
        if self.name == "fastokens" and texts[0] != PROBE_TEXT and any("BOOM" in t for t in texts):
            raise RuntimeError("match limit exceeded")
        return real(self, texts)

    monkeypatch.setattr(Encoder, "encode_flat", flaky)  # the forked workers inherit it
    texts = ["first document", "BOOM goes this one", "and a last one"]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    r = preprocess([str(src)], str(tok_dir), str(tmp_path / "o"), workers=2, progress=False)
    assert r.encoder == "fastokens" and r.counts["fallback_chunks"] == 1
    assert read_meta(tmp_path / "o")["fallback_chunks"] == 1
    bin_, idx = megatron_reference(texts, tok_dir)
    assert (tmp_path / "o.bin").read_bytes() == bin_ and (tmp_path / "o.idx").read_bytes() == idx


def test_a_killed_worker_fails_the_run_with_one_line_and_no_output(tmp_path, tok_dir, write_jsonl, monkeypatch):
    import signal

    import data_pipeline.sources as sources

    parent, real = os.getpid(), sources.parse_chunk

    def oom(chunk, *a, **k):  # as the OOM killer would, in a worker only
        if os.getpid() != parent and b"KILLME" in chunk.data:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(chunk, *a, **k)

    monkeypatch.setattr(sources, "parse_chunk", oom)  # the forked workers inherit it
    src = write_jsonl(tmp_path / "in.jsonl", ["fine", "KILLME please", "also fine"])
    with pytest.raises(ZeroLLMError, match="in.jsonl .*worker process died"):
        preprocess([str(src)], str(tok_dir), str(tmp_path / "o"), workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temp files


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_every_record_lands_in_exactly_one_shard(tmp_path, monkeypatch, write_jsonl, block):
    """Records longer than a read block straddle shard edges: none lost, none doubled."""
    import data_pipeline.sources as sources
    from data_pipeline.sources import iter_chunks, parse_chunk

    monkeypatch.setattr(sources, "BLOCK", block)
    rng = np.random.default_rng(block)
    texts = [f"doc {i} " + "x" * int(rng.integers(0, 300)) for i in range(120)]
    src = write_jsonl(tmp_path / "in.jsonl", texts)

    def docs(shard):
        return [d for c in iter_chunks([str(src)], shard=shard) for d in parse_chunk(c, "text", False)[0]]

    for n in (2, 3, 7, 50, 400):  # 400: some shards lie inside one record
        assert [d for i in range(n) for d in docs((i, n))] == texts, n
