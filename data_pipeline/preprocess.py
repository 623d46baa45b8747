"""Corpus -> Megatron `.bin/.idx`: streaming, multi-process, bounded memory.

    zerollm preprocess corpus.jsonl --tokenizer runs/tok --out-prefix data/corpus
    zerollm preprocess 'shards/*.jsonl' --tokenizer runs/tok --out-prefix data/c --shard 3/8

Output names: `<out-prefix>.{bin,idx,meta.json}`; with `--valid-fraction f`,
`<out-prefix>_train.*` and `<out-prefix>_valid.*` (a document goes to valid when a hash of
its text falls below f, so the split does not depend on order or sharding). With
`--shard i/n`, `<out-prefix>` gets `_shard{i}of{n}` appended before those suffixes.

Each document becomes `tokenizer(text).input_ids + [eos]`, exactly as Megatron-LM's
`tools/preprocess_data.py --append-eod` with `--tokenizer-type HuggingFaceTokenizer`,
and the files are byte-identical to its output. A document with no text adds a document
entry and no tokens (as Megatron does); it is counted in the meta file.

Pipeline: the main process reads byte blocks cut at record boundaries; a pool of workers
parses, encodes (tiktoken fast path when exactly equivalent, else `tokenizers`) and
returns a packed token array per chunk; the main process writes chunks in order to
temp files, with a bounded number of chunks in flight. Memory is O(workers x chunk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from train.errors import ZeroLLMError

log = logging.getLogger(__name__)


@dataclass
class TokenizerInfo:
    """What preprocessing needs from a tokenizer dir, without importing transformers."""

    path: str
    eos_id: int
    vocab_size: int  # len(tokenizer): base vocabulary + added tokens
    hash: str


def _token_content(t) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t


def tokenizer_info(path: str | Path):
    """(TokenizerInfo, tokenizers.Tokenizer) for a HF tokenizer dir; errors name the file."""
    from tokenizers import Tokenizer

    from data_pipeline.tokenizer import tokenizer_hash

    p = Path(path)
    tj = p / "tokenizer.json"
    if not tj.is_file():
        raise ZeroLLMError(f"{tj}: missing (field: --tokenizer); train one first.")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:  # noqa: BLE001
        raise ZeroLLMError(f"{tj}: cannot load ({e}).") from e
    eos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = p / name
        if f.is_file() and eos is None:
            try:
                eos = _token_content(json.loads(f.read_text("utf-8")).get("eos_token"))
            except ValueError as e:
                raise ZeroLLMError(f"{f}: not valid JSON ({e}).") from e
    if eos is None:
        raise ZeroLLMError(
            f"{p}/tokenizer_config.json: no eos_token (field: eos_token); documents need an "
            "end-of-text token as their separator."
        )
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise ZeroLLMError(f"{p}: eos_token {eos!r} is not in the vocabulary (field: eos_token).")
    info = TokenizerInfo(str(p), eos_id, tok.get_vocab_size(with_added_tokens=True), "")
    info.hash = tokenizer_hash(p)
    return info, tok


# ----------------------------------------------------------------------------- workers
_W: dict = {}


def _init_worker(tok_dir: str, fast: bool, dtype: str, eos_id: int, opts: dict) -> None:
    import numpy as np
    from tokenizers import Tokenizer

    from data_pipeline import tokenizer as T

    _W.clear()
    _W.update(opts, eos=eos_id, dtype=np.dtype(dtype))
    if fast:
        spec = T._fast_spec(json.loads((Path(tok_dir) / "tokenizer.json").read_text("utf-8")))
        _W["encode"] = T.FastEncoder(spec).encode_batch
    else:
        tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
        _W["encode"] = lambda texts: [e.ids for e in tok.encode_batch(texts)]


def _pack(token_lists: list[list[int]], eos: int, dtype):
    """Concatenate documents (each + eos when non-empty) into one array and sizes."""
    import itertools

    import numpy as np

    for t in token_lists:
        if t:
            t.append(eos)
    sizes = np.fromiter(map(len, token_lists), np.int32, len(token_lists))
    flat = itertools.chain.from_iterable(token_lists)
    return np.fromiter(flat, dtype, int(sizes.sum(dtype=np.int64))), sizes


def _valid_mask(docs: list[str], fraction: float):
    import numpy as np

    if fraction <= 0:
        return np.zeros(len(docs), bool)
    limit = int(fraction * 2**64)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8).digest(), "little") < limit for d in docs),
        bool,
        len(docs),
    )


def _encode_chunk(chunk):
    """Worker: parse + encode one chunk -> ((tokens, sizes) per split, counts, n_bytes)."""
    import numpy as np

    from data_pipeline.sources import parse_chunk

    docs, counts = parse_chunk(chunk, _W["text_key"], _W["skip_bad"])
    ids = _W["encode"](docs)
    valid = _valid_mask(docs, _W["valid_fraction"])
    counts["empty_documents"] = sum(1 for t in ids if not t)
    out = []
    for mask in (~valid, valid) if _W["valid_fraction"] > 0 else (np.ones(len(docs), bool),):
        out.append(_pack([t for t, m in zip(ids, mask, strict=True) if m], _W["eos"], _W["dtype"]))
    counts["documents"] = len(docs)
    n_bytes = len(chunk.data) if isinstance(chunk.data, bytes) else sum(map(len, chunk.data))
    return out, counts, n_bytes


# ----------------------------------------------------------------------------- driver
@dataclass
class PreprocessResult:
    prefixes: list[str]
    encoder: str  # "tiktoken" (fast path) or "tokenizers"
    seconds: float
    input_bytes: int
    tokens: int
    documents: int
    counts: dict = field(default_factory=dict)


def output_prefixes(out_prefix: str, valid_fraction: float, shard: tuple[int, int]) -> list[str]:
    base = out_prefix if shard[1] == 1 else f"{out_prefix}_shard{shard[0]}of{shard[1]}"
    return [f"{base}_train", f"{base}_valid"] if valid_fraction > 0 else [base]


def _probe_sample(docs: list[str], limit: int = 1 << 16) -> list[str]:
    """The corpus's first documents, cut to ~64 KB: checked against tokenizers each run."""
    out, n = [], 0
    for d in docs:
        out.append(d[: limit - n])
        n += len(out[-1])
        if n >= limit:
            break
    return out


def choose_encoder(info: TokenizerInfo, tok, sample_docs: list[str], mode: str) -> bool:
    """True to use the tiktoken fast path: only if it encodes the probe and sample equally."""
    if mode == "tokenizers":
        return False
    from data_pipeline import tokenizer as T

    try:
        spec = T._fast_spec(json.loads((Path(info.path) / "tokenizer.json").read_text("utf-8")))
        fast = T.FastEncoder(spec) if spec else None
    except Exception as e:  # noqa: BLE001 - any failure: use the reference path
        log.info("fast path unavailable: %s", e)
        fast = None
    ok = False
    if fast is not None:
        probe = [T.PROBE_TEXT, *T.PROBE_TEXT.split("\n"), *sample_docs]
        # one text at a time: encode_batch would start tokenizers threads before the fork
        ok = fast.encode_batch(probe) == [tok.encode(t).ids for t in probe]
    if mode == "tiktoken" and not ok:
        raise ZeroLLMError(
            f"{info.path}: --encoder tiktoken asked for, but the fast path is not exactly "
            "equivalent for this tokenizer; use --encoder auto."
        )
    return ok


def preprocess(
    inputs: list[str],
    tokenizer_dir: str,
    out_prefix: str,
    *,
    workers: int | None = None,
    text_key: str = "text",
    txt_split: str = "blank-line",
    valid_fraction: float = 0.0,
    shard: tuple[int, int] = (0, 1),
    skip_bad: bool = False,
    encoder: str = "auto",
    progress: bool = True,
) -> PreprocessResult:
    """Tokenize `inputs` into Megatron .bin/.idx (+ meta.json); see the module docstring."""
    from data_pipeline.indexed import IndexedDatasetWriter, write_meta
    from data_pipeline.sources import expand_inputs, iter_chunks, parse_chunk
    from data_pipeline.tokenizer import token_dtype_for

    t0 = time.perf_counter()
    if not 0.0 <= valid_fraction < 1.0:
        raise ZeroLLMError(f"--valid-fraction {valid_fraction}: must be in [0, 1).")
    files = expand_inputs(inputs)
    info, tok = tokenizer_info(tokenizer_dir)
    dtype = token_dtype_for(info.vocab_size)
    chunks = iter_chunks(files, txt_split, text_key, shard)
    first = next(chunks, None)
    sample = _probe_sample(parse_chunk(first, text_key, True)[0] if first is not None else [])
    fast = choose_encoder(info, tok, sample, encoder)
    enc_name = "tiktoken" if fast else "tokenizers"
    log.info("preprocess: %d file(s), encoder %s, dtype %s", len(files), enc_name, dtype.__name__)
    prefixes = output_prefixes(out_prefix, valid_fraction, shard)
    total_in = sum(os.path.getsize(f) for f in files) if shard[1] == 1 else None
    opts = {"text_key": text_key, "skip_bad": skip_bad, "valid_fraction": valid_fraction}
    initargs = (info.path, fast, dtype.__name__, info.eos_id, opts)
    workers = max(1, workers or os.cpu_count() or 1)
    counts: dict[str, int] = {}
    n_bytes = 0
    writers = [IndexedDatasetWriter(p, dtype) for p in prefixes]
    bar = _progress(total_in, progress)
    try:
        results = _run_pool(workers, initargs, first, chunks)
        for out, c, nb in results:
            for w, (toks, sizes) in zip(writers, out, strict=True):
                w.add_documents(toks, sizes)
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
            n_bytes += nb
            bar.update(nb)
        bar.close()
        if sum(w.num_tokens for w in writers) == 0:
            raise ZeroLLMError(f"{', '.join(files[:3])}: no tokens at all (every document empty?); nothing to write.")
        for w, p in zip(writers, prefixes, strict=True):
            if w.num_tokens == 0:
                raise ZeroLLMError(
                    f"{p}: this split got no documents (field: --valid-fraction); use a larger fraction or more data."
                )
        for w in writers:
            w.finalize()
    except BaseException:
        bar.close()
        for w in writers:
            w.abort()
        raise
    for w, p in zip(writers, prefixes, strict=True):
        write_meta(
            p,
            {
                "tokenizer": os.path.abspath(info.path),
                "tokenizer_hash": info.hash,
                "vocab_size": info.vocab_size,
                "eod_id": info.eos_id,
                "dtype": dtype.__name__,
                "tokens": w.num_tokens,
                "documents": w.num_documents,
                "sequences": w.num_sequences,
                "empty_documents": w.num_documents - w.num_sequences,
                "skipped": {k: v for k, v in counts.items() if k in ("blank_lines", "bad_records")},
                "encoder": enc_name,
                "inputs": [os.path.abspath(f) for f in files],
                "shard": f"{shard[0]}/{shard[1]}",
                "valid_fraction": valid_fraction,
            },
        )
    secs = time.perf_counter() - t0
    toks = sum(w.num_tokens for w in writers)
    docs = sum(w.num_documents for w in writers)
    return PreprocessResult(prefixes, enc_name, secs, n_bytes, toks, docs, counts)


def _progress(total, enabled):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="preprocess",
        file=sys.stderr,
        disable=not enabled,
        smoothing=0.1,
    )


def _run_pool(workers, initargs, first, chunks):
    """Ordered results of `_encode_chunk`, at most 2*workers+1 chunks in flight."""
    import itertools
    import multiprocessing as mp

    if first is None:
        return
    stream = itertools.chain([first], chunks)
    if workers == 1:  # in-process: no pickling
        _init_worker(*initargs)
        for c in stream:
            yield _encode_chunk(c)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for c in stream:
            pending.append(pool.apply_async(_encode_chunk, (c,)))
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
