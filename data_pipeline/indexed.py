"""The token dataset format: Megatron-LM's MMapIndexedDataset (`.bin` + `.idx`).

This is the one module that writes and reads it. Byte for byte the layout of
Megatron-LM `megatron/core/datasets/indexed_dataset.py` (version 1, no sequence
modes), so files made here load in Megatron-LM / GPT-NeoX and theirs load here.

`<prefix>.bin`: the tokens of every sequence, back to back, in the header's dtype,
little endian, no header and no padding.

`<prefix>.idx` (all integers little endian):

    offset  size        field
    0       9           magic  b"MMIDIDX\\x00\\x00"
    9       8  <Q       version, always 1
    17      1  <B       dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                        6 float64, 7 float32, 8 uint16)
    18      8  <Q       S = number of sequences
    26      8  <Q       D = number of entries in the document index
    34      4*S int32   sizes: tokens in each sequence
    ..      8*S int64   pointers: byte offset of each sequence in .bin
                        (exclusive cumulative sum of sizes * itemsize)
    ..      8*D int64   document index: D = documents + 1, starts with 0; document j
                        is sequences [doc_idx[j], doc_idx[j+1]). Here (and in Megatron's
                        preprocess without sentence splitting) one document = one sequence,
                        except that a document with no tokens adds a document entry and
                        no sequence (the same value appears twice).

The .bin length must equal sum(sizes) * itemsize; `MMapIndexedDataset` checks that and
every header field and names the file in a one-line `ZeroLLMError` otherwise.

Beside them, `<prefix>.meta.json` (ZeroLLM only, optional for readers) records the
tokenizer hash, vocab size, eod id, token/document counts and skipped-document counts.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from train.errors import ZeroLLMError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # elements per chunk when streaming index arrays


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.meta.json")


def read_meta(prefix: str | Path) -> dict | None:
    p = meta_path(prefix)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text("utf-8"))
    except ValueError as e:
        raise ZeroLLMError(f"{p}: not valid JSON ({e}).") from e


def dataset_vocab_size(prefix: str | Path) -> int | None:
    """Vocabulary size the dataset was tokenized with (from `<prefix>.meta.json`), or None."""
    meta = read_meta(prefix)
    return None if meta is None else int(meta["vocab_size"])


def write_meta(prefix: str | Path, meta: dict) -> None:
    p = meta_path(prefix)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", "utf-8")
    os.replace(tmp, p)


class IndexedDatasetWriter:
    """Streams documents into `<prefix>.bin/.idx` with bounded memory.

    Tokens go straight to `<prefix>.bin.tmp`; per document only its size (int32) is kept,
    itself spilled to a temp file, so memory does not grow with the corpus. `finalize()`
    writes the .idx from that file in chunks and renames both files into place, so a crash
    never leaves a half-written file under the final names. Use as a context manager:
    leaving it with an exception removes the temp files.
    """

    def __init__(self, prefix: str | Path, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ZeroLLMError(f"{prefix}: unsupported token dtype {self.dtype}.")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp")
        self._sizes_tmp = Path(f"{self.prefix}.sizes.tmp")
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in finalize/abort
        self._sizes = open(self._sizes_tmp, "wb")  # noqa: SIM115
        self.num_documents = 0
        self.num_tokens = 0
        self.num_sequences = 0

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append documents: `tokens` is their concatenation, `sizes` their lengths (0 ok)."""
        tokens = np.asarray(tokens)
        sizes = np.asarray(sizes, dtype=np.int32)
        if int(sizes.sum(dtype=np.int64)) != tokens.size:
            raise ValueError("sizes do not add up to the number of tokens")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._sizes.write(sizes.tobytes())
        self.num_documents += sizes.size
        self.num_sequences += int(np.count_nonzero(sizes))
        self.num_tokens += tokens.size

    def add_document(self, tokens) -> None:
        t = np.asarray(tokens)
        self.add_documents(t, np.array([t.size], dtype=np.int32))

    def _size_chunks(self):
        with open(self._sizes_tmp, "rb") as f:
            while True:
                buf = f.read(4 * _CHUNK)
                if not buf:
                    return
                yield np.frombuffer(buf, dtype=np.int32)

    def finalize(self) -> None:
        self._bin.close()
        self._sizes.close()
        idx_tmp = Path(f"{self.prefix}.idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", self.num_sequences))
            f.write(struct.pack("<Q", self.num_documents + 1))
            for s in self._size_chunks():  # sizes of the non-empty documents
                f.write(s[s > 0].tobytes())
            offset = 0  # pointers: running byte offset
            for s in self._size_chunks():
                s = s[s > 0].astype(np.int64) * self.dtype.itemsize
                ptr = np.cumsum(s) - s + offset
                f.write(ptr.tobytes())
                offset += int(s.sum())
            f.write(np.zeros(1, np.int64).tobytes())
            seen = 0  # document index: sequences before each document end
            for s in self._size_chunks():
                d = np.cumsum(s > 0, dtype=np.int64) + seen
                f.write(d.tobytes())
                seen = int(d[-1]) if d.size else seen
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        self._sizes_tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        self._bin.close()
        self._sizes.close()
        for p in (self._bin_tmp, self._sizes_tmp, Path(f"{self.prefix}.idx.tmp")):
            p.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


class MMapIndexedDataset:
    """Read-only view of `<prefix>.bin/.idx` through `np.memmap` (nothing loaded whole)."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        ip, bp = idx_path(prefix), bin_path(prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise ZeroLLMError(f"{p}: missing (field: dataset prefix {prefix}).")
        isize = ip.stat().st_size
        with open(ip, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE or head[:9] != MAGIC:
            raise ZeroLLMError(f"{ip}: not a Megatron MMapIndexedDataset index (bad magic).")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise ZeroLLMError(f"{ip}: unsupported index version {version} (expected 1).")
        code = head[17]
        if code not in DTYPE_CODES:
            raise ZeroLLMError(f"{ip}: unknown dtype code {code} in the header.")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n_seq, n_doc = struct.unpack("<QQ", head[18:34])
        expect = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if isize != expect:
            raise ZeroLLMError(
                f"{ip}: truncated or corrupt ({isize} bytes, header says {n_seq} sequences "
                f"and {n_doc} document entries = {expect} bytes)."
            )
        if n_doc < 1:
            raise ZeroLLMError(f"{ip}: corrupt document index (no entries).")
        self._idx = np.memmap(ip, dtype=np.uint8, mode="r")
        off = HEADER_SIZE
        self.sizes = np.frombuffer(self._idx, np.int32, n_seq, off)
        off += 4 * n_seq
        self.pointers = np.frombuffer(self._idx, np.int64, n_seq, off)
        off += 8 * n_seq
        self.doc_idx = np.frombuffer(self._idx, np.int64, n_doc, off)
        n_tokens = int(self.sizes.sum(dtype=np.int64))
        bsize = bp.stat().st_size
        if bsize != n_tokens * self.dtype.itemsize:
            raise ZeroLLMError(
                f"{bp}: truncated or corrupt ({bsize} bytes; {ip} says {n_tokens} tokens of "
                f"{self.dtype} = {n_tokens * self.dtype.itemsize} bytes)."
            )
        if n_seq and (
            int(self.pointers[0]) != 0 or int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize != bsize
        ):
            raise ZeroLLMError(f"{ip}: pointers do not match sizes (corrupt index).")
        if int(self.doc_idx[0]) != 0 or int(self.doc_idx[-1]) != n_seq:
            raise ZeroLLMError(f"{ip}: document index does not cover the sequences (corrupt).")
        self.num_tokens = n_tokens
        # np.memmap cannot map an empty file; an all-empty dataset has no tokens to read.
        self._bin = np.memmap(bp, dtype=self.dtype, mode="r") if bsize else np.zeros(0, self.dtype)
        self._token_offsets = self.pointers // self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self._token_offsets[i])
        return self._bin[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `i` (a view, no copy)."""
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        start = int(self._token_offsets[i]) + offset
        return self._bin[start : start + length]

    @property
    def tokens(self) -> np.ndarray:
        """All tokens as one memory-mapped array."""
        return self._bin

    def max_token_id(self) -> int:
        """Largest token id in the .bin (a full chunked scan: O(tokens))."""
        best = -1
        for s in range(0, self._bin.size, 1 << 24):
            best = max(best, int(self._bin[s : s + (1 << 24)].max()))
        return best


def merge_datasets(prefixes: list[str], out_prefix: str) -> dict:
    """Concatenate `.bin/.idx` pairs in order into `out_prefix` (chunked, bounded memory).

    Same result as Megatron-LM's `IndexedDatasetBuilder.add_index` for each input; their
    `.meta.json` files (when present) must name the same tokenizer, and the merged meta
    sums their counts.
    """
    if not prefixes:
        raise ZeroLLMError("merge-datasets: no input prefixes given.")
    parts = [MMapIndexedDataset(p) for p in prefixes]
    metas = [read_meta(p) for p in prefixes]
    for p, d in zip(prefixes, parts, strict=True):
        if d.dtype != parts[0].dtype:
            raise ZeroLLMError(
                f"{idx_path(p)}: dtype {d.dtype} differs from {idx_path(prefixes[0])} "
                f"({parts[0].dtype}); all parts must share a tokenizer."
            )
    hashes = {m["tokenizer_hash"] for m in metas if m}
    if len(hashes) > 1:
        raise ZeroLLMError(
            f"{', '.join(str(meta_path(p)) for p in prefixes)}: made with different "
            f"tokenizers (field: tokenizer_hash {sorted(hashes)}); cannot merge."
        )
    out = str(out_prefix)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    bin_tmp, idx_tmp = Path(out + ".bin.tmp"), Path(out + ".idx.tmp")
    try:
        with open(bin_tmp, "wb") as fb:
            for p in prefixes:
                with open(bin_path(p), "rb") as src:
                    shutil.copyfileobj(src, fb, 1 << 24)
        n_seq = sum(len(d) for d in parts)
        n_doc = sum(len(d.doc_idx) - 1 for d in parts) + 1
        with open(idx_tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF[parts[0].dtype]))
            f.write(struct.pack("<QQ", n_seq, n_doc))
            for d in parts:
                for s in range(0, len(d), _CHUNK):
                    f.write(d.sizes[s : s + _CHUNK].tobytes())
            base = 0
            for d in parts:
                for s in range(0, len(d), _CHUNK):
                    f.write((d.pointers[s : s + _CHUNK] + base).tobytes())
                base += d.num_tokens * d.dtype.itemsize
            f.write(np.zeros(1, np.int64).tobytes())
            base = 0
            for d in parts:
                for s in range(1, len(d.doc_idx), _CHUNK):
                    f.write((d.doc_idx[s : s + _CHUNK] + base).tobytes())
                base += len(d)
        os.replace(bin_tmp, bin_path(out))
        os.replace(idx_tmp, idx_path(out))
    except BaseException:
        bin_tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)
        raise
    meta = None
    if all(metas):
        meta = dict(metas[0])
        for k in ("tokens", "documents", "sequences", "empty_documents"):
            meta[k] = sum(int(m.get(k, 0)) for m in metas)
        skipped: dict[str, int] = {}
        for m in metas:
            for k, v in m.get("skipped", {}).items():
                skipped[k] = skipped.get(k, 0) + int(v)
        meta["skipped"] = skipped
        meta["merged_from"] = [str(p) for p in prefixes]
        meta.pop("shard", None)
        write_meta(out, meta)
    return {"sequences": n_seq, "documents": n_doc - 1, "meta": meta is not None}
