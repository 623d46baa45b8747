"""Corpus input: files, globs and directories of jsonl / parquet / txt, read in chunks.

Documents:
  - `.jsonl` / `.json` (`.gz` too): one JSON object per line, text in `--text-key`
    (default "text"); blank lines are skipped and counted.
  - `.parquet`: the `--text-key` column, one row = one document.
  - `.txt` / anything else: `--txt-split blank-line` (default: documents are separated
    by one or more blank lines, i.e. lines holding only spaces, tabs or CR), `line`
    (one document per line) or `file` (whole file).

Chunks are raw byte blocks cut at record boundaries (decoded and parsed by the worker
that encodes them), so the reading process does almost no work.

Sharding (`shard=(i, n)`): jsonl and line-split txt are split by byte ranges of the
concatenated inputs (a record belongs to the shard in which its first byte lies);
other inputs are split by whole files. Shards are contiguous and in order, so merging
shards 0..n-1 gives exactly the unsharded output.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from train.errors import ZeroLLMError

BLOCK = 1 << 20  # bytes per chunk
_BLANK = re.compile(rb"\n[ \t\r]*\n")  # a blank line (may hold spaces, tabs, CR)
_BLANKS = re.compile(rb"\n(?:[ \t\r]*\n)+")  # one or more: a document separator
JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
TXT_SPLITS = ("blank-line", "line", "file")


@dataclass(frozen=True)
class Chunk:
    """A block of records from one file: `data` is bytes (jsonl/txt) or a list of str."""

    path: str
    offset: int  # byte offset (or row number for parquet) of the first record
    kind: str  # "jsonl" | "txt-blank-line" | "txt-line" | "txt-file" | "texts"
    data: bytes | list


def kind_of(path: str, txt_split: str = "blank-line") -> str:
    p = path.lower()
    if p.endswith(JSONL_EXT):
        return "jsonl"
    if p.endswith(".parquet"):
        return "texts"
    return f"txt-{txt_split}"


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named, matched by globs, or found under directories; sorted, de-duplicated."""
    out: list[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and not p.name.startswith("."))
        elif any(c in spec for c in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(spec):
            found = [spec]
        else:
            raise ZeroLLMError(f"{spec}: no such file, directory or glob match (field: input).")
        if not found:
            raise ZeroLLMError(f"{spec}: matched no files (field: input).")
        out.extend(found)
    seen: set[str] = set()
    files = [f for f in out if not (f in seen or seen.add(f))]
    for f in files:
        if os.path.getsize(f) == 0:
            raise ZeroLLMError(f"{f}: the file is empty (field: input).")
    return files


def _splittable(kind: str, path: str) -> bool:
    return kind in ("jsonl", "txt-line") and not path.endswith(".gz")


def plan_shard(files: list[str], txt_split: str, shard: tuple[int, int] = (0, 1)) -> list[tuple[str, int, int]]:
    """The (file, start, end) byte ranges this shard reads (end -1 = to the end)."""
    i, n = shard
    if not (0 <= i < n):
        raise ZeroLLMError(f"--shard {i}/{n}: needs 0 <= i < n.")
    if n == 1:
        return [(f, 0, -1) for f in files]
    if all(_splittable(kind_of(f, txt_split), f) for f in files):
        sizes = [os.path.getsize(f) for f in files]
        total = sum(sizes)
        lo, hi = total * i // n, total * (i + 1) // n
        ranges, base = [], 0
        for f, s in zip(files, sizes, strict=True):
            a, b = max(lo - base, 0), min(hi - base, s)
            if a < b:
                ranges.append((f, a, b if b < s else -1))
            base += s
        return ranges
    if len(files) < n:
        raise ZeroLLMError(
            f"--shard {i}/{n}: these inputs split by whole files and there are only "
            f"{len(files)}; use n <= {len(files)} or jsonl / --txt-split line inputs."
        )
    return [(f, 0, -1) for j, f in enumerate(files) if j * n // len(files) == i]


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _byte_blocks(path: str, start: int, end: int, sep: bytes) -> Iterator[tuple[int, bytes]]:
    """Blocks of whole records (each ends with `sep`) whose first byte is in [start, end)."""
    with _open(path) as f:
        pos = 0
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != sep:  # inside a record that an earlier shard owns
                f.readline()
            pos = f.tell()

        def end_after(data: bytes, i: int) -> int:
            return data.find(sep, i) + 1 or -1

        yield from _record_blocks(f, pos, lambda data: data.rfind(sep) + 1 or -1, end_after, end)


def _blank_line_blocks(path: str) -> Iterator[tuple[int, bytes]]:
    with _open(path) as f:
        yield from _record_blocks(f, 0, _last_blank_line_end)


def _record_blocks(f, pos: int, last_end, end_after=None, end: int = -1) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) blocks of whole records read from `f`, now at byte `pos`.

    `last_end(data)`: offset just past the last whole record in `data` (-1: none yet), so
    a record longer than a block is carried into the next read. With `end` >= 0, the last
    block ends with the record holding byte end - 1 (records starting at or after `end`
    belong to the next shard), read to its end however far that is: `end_after(data, i)`
    is the offset just past the first record end at or after `i` (-1: not in `data` yet).
    """
    carry = b""
    while True:
        if end >= 0 and pos >= end and not carry:  # the next record is the next shard's
            return
        block = f.read(BLOCK)
        first = pos - len(carry)
        data = carry + block
        pos += len(block)
        if not block:
            if data:
                yield first, data
            return
        if end >= 0 and pos >= end:
            k = end_after(data, max(end - 1 - first, 0))
            if k >= 0:
                if k > 0:
                    yield first, data[:k]
                return
        cut = last_end(data)
        if cut > 0:
            yield first, data[:cut]
        carry = data[cut:] if cut > 0 else data


def _last_blank_line_end(data: bytes) -> int:
    """End of the last blank-line separator in `data` (a cut point), or -1."""
    k = data.rfind(b"\n\n")
    if k >= 0:
        return k + 2
    last = -1  # blank lines holding spaces, tabs or CR (e.g. CRLF files)
    for m in _BLANK.finditer(data):
        last = m.end()
    return last


def iter_chunks(
    files: list[str],
    txt_split: str = "blank-line",
    text_key: str = "text",
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Chunk]:
    """Chunks of records in a deterministic order; `Chunk.data` is what a worker parses."""
    if txt_split not in TXT_SPLITS:
        raise ZeroLLMError(f"--txt-split {txt_split}: choose one of {', '.join(TXT_SPLITS)}.")
    for path, start, end in plan_shard(files, txt_split, shard):
        kind = kind_of(path, txt_split)
        if kind == "texts":
            yield from _parquet_chunks(path, text_key)
        elif kind == "txt-file":
            with _open(path) as f:
                yield Chunk(path, 0, kind, f.read())
        elif kind == "txt-blank-line":
            for off, data in _blank_line_blocks(path):
                yield Chunk(path, off, kind, data)
        else:
            for off, data in _byte_blocks(path, start, end, b"\n"):
                yield Chunk(path, off, kind, data)


def _parquet_chunks(path: str, text_key: str) -> Iterator[Chunk]:
    import pyarrow.parquet as pq  # optional: only .parquet inputs need pyarrow

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise ZeroLLMError(f"{path}: not a readable parquet file ({e}).") from e
    if text_key not in pf.schema_arrow.names:
        raise ZeroLLMError(
            f"{path}: no column {text_key!r} (field: --text-key); columns: {', '.join(pf.schema_arrow.names)}."
        )
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_key]):
        texts = batch.column(0).to_pylist()
        yield Chunk(path, row, "texts", texts)
        row += len(texts)


_JSON = json.JSONDecoder()


class BadDocument(ZeroLLMError):
    """One document cannot be read (bad JSON, missing field, invalid UTF-8)."""


def _where(chunk: Chunk, whole: str | None, at: int) -> str:
    """Where record `at` is: a row, or a byte offset (`at` counts chars when `whole` is set)."""
    if chunk.kind == "texts":
        return f"{chunk.path}: row {chunk.offset + at}"
    if whole is not None:
        at = len(whole[:at].encode("utf-8"))
    return f"{chunk.path}: record at byte {chunk.offset + at}"


def parse_chunk(chunk: Chunk, text_key: str, skip_bad: bool) -> tuple[list[str], dict]:
    """Documents of a chunk, and counts of what was skipped (blank lines, bad records)."""
    counts = {"blank_lines": 0, "bad_records": 0}
    docs: list[str] = []

    def bad(msg: str) -> None:
        if not skip_bad:
            raise BadDocument(msg + " (use --skip-bad-documents to skip and count such records)")
        counts["bad_records"] += 1

    if chunk.kind == "texts":
        for j, t in enumerate(chunk.data):
            if not isinstance(t, str):
                bad(f"{_where(chunk, None, j)}: {text_key!r} is {type(t).__name__}, not text")
            elif not _encodable(t):
                bad(f"{_where(chunk, None, j)}: text is not valid Unicode (lone surrogate)")
            else:
                docs.append(t)
        return docs, counts
    data: bytes = chunk.data
    if chunk.kind == "txt-file":
        text = _decode(chunk, data, 0, bad)
        if text is not None:
            docs.append(text)
        return docs, counts
    if chunk.kind == "txt-blank-line":
        at = 0
        for m in [*_BLANKS.finditer(data), None]:
            end = len(data) if m is None else m.start()
            piece = data[at:end].strip(b"\r\n")
            if piece.strip():
                text = _decode(chunk, piece, at, bad)
                if text is not None:
                    docs.append(text)
            at = end if m is None else m.end()
        return docs, counts
    try:  # one C-speed decode for the whole chunk; per line only to locate an error
        whole: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        whole = None
    lines = whole.split("\n") if whole is not None else data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    at = 0
    decode = _JSON.decode
    for line in lines:
        here = at  # chars when `whole` decoded, else bytes; see _byte_at for messages
        at += len(line) + 1
        if chunk.kind == "txt-line":
            line = line.rstrip("\r" if whole is not None else b"\r")
            text = line if whole is not None else _decode(chunk, line, here, bad)
            if text:
                docs.append(text)
            continue
        if not line.strip():
            counts["blank_lines"] += 1
            continue
        try:
            obj = decode(line if whole is not None else line.decode("utf-8"))
        except UnicodeDecodeError:
            bad(f"{_where(chunk, whole, here)}: invalid UTF-8")
            continue
        except ValueError as e:
            bad(f"{_where(chunk, whole, here)}: not valid JSON ({e})")
            continue
        if not isinstance(obj, dict) or text_key not in obj:
            bad(f"{_where(chunk, whole, here)}: no {text_key!r} field (field: --text-key)")
            continue
        t = obj[text_key]
        if not isinstance(t, str):
            bad(f"{_where(chunk, whole, here)}: {text_key!r} is {type(t).__name__}, not text")
        elif (whole is None or "\\u" in line) and not _encodable(t):
            # only a JSON \\udXXX escape can put a lone surrogate into valid UTF-8
            bad(f"{_where(chunk, whole, here)}: text holds a lone surrogate (invalid Unicode)")
        else:
            docs.append(t)
    return docs, counts


def _encodable(t: str) -> bool:
    try:
        t.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _decode(chunk: Chunk, data: bytes, at: int, bad) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(f"{_where(chunk, None, at + e.start)}: invalid UTF-8")
        return None


def iter_documents(files: list[str], txt_split: str = "blank-line", text_key: str = "text") -> Iterator[str]:
    """All documents of the inputs, in order (for tokenizer training)."""
    for chunk in iter_chunks(files, txt_split, text_key):
        yield from parse_chunk(chunk, text_key, skip_bad=False)[0]
