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

Pipeline: the main process forks one worker per core (before any encoder or thread pool
exists), reads byte blocks cut at record boundaries and hands them out; a worker parses,
encodes (the fastest of fastokens / tiktoken / tokenizers that gives exactly tokenizers'
ids, checked by a worker on a probe text and a sample of this corpus each run) and returns
a packed token array per chunk; the main process writes chunks in order to temp files,
with a bounded number of chunks in flight. Memory is O(workers x chunk).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline import sources  # the module: a patched sources.parse_chunk reaches the workers
from data_pipeline.tokenizer import Encoder, pick_encoder, token_dtype_for, tokenizer_hash
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


def tokenizer_info(path: str | Path) -> TokenizerInfo:
    """What preprocessing needs of a HF tokenizer dir (eos id, vocab size, hash); errors name the file."""
    # kept local: tokenizers is heavy; numpy and tqdm are not needed at this module's top
    from tokenizers import Tokenizer

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
    return info


# ----------------------------------------------------------------------------- workers
_W: dict = {}
CHUNKS_PER_WORKER = 32  # chunks (of ~1 MB) a worker process encodes before it is replaced


def _init_worker(tok_dir: str, dtype: str, eos_id: int, opts: dict) -> None:
    import numpy as np

    # one process per core: the encoders' own thread pools would only compete
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["FASTOKENS_BPE_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.clear()
    _W.update(opts, tok_dir=tok_dir, eos=eos_id, dtype=np.dtype(dtype), encoders={})


def _encoder(name: str):
    if name not in _W["encoders"]:
        _W["encoders"][name] = Encoder(name, _W["tok_dir"])
    return _W["encoders"][name]


def _pick(sample: list[str], mode: str):
    """Worker: which encoder to use (run in a worker so the parent never starts threads)."""
    return pick_encoder(_W["tok_dir"], sample, mode)


def _pack(ids, lengths, keep, eos: int, dtype):
    """Documents `keep` (all when None), each + eos when non-empty -> (tokens, sizes)."""
    import numpy as np

    if keep is not None:
        ids, lengths = ids[np.repeat(keep, lengths)], lengths[keep]
    nonempty = lengths > 0
    sizes = (lengths + nonempty).astype(np.int32)
    out = np.empty(int(sizes.sum(dtype=np.int64)), dtype)
    eos_at = (np.cumsum(sizes, dtype=np.int64) - 1)[nonempty]
    body = np.ones(out.size, bool)
    body[eos_at] = False
    out[body] = ids
    out[eos_at] = eos
    return out, sizes


def _valid_mask(docs: list[str], fraction: float):
    import numpy as np

    limit = int(fraction * 2**64)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8).digest(), "little") < limit for d in docs),
        bool,
        len(docs),
    )


def _encode_chunk(chunk, enc_name: str):
    """Worker: parse + encode one chunk -> ((tokens, sizes) per split, counts, n_bytes)."""
    docs, counts = sources.parse_chunk(chunk, _W["text_key"], _W["skip_bad"])
    try:
        ids, lengths = _encoder(enc_name).encode_flat(docs)
    except Exception:  # noqa: BLE001 - a fast library failing on odd text: the reference encodes it
        if enc_name == "tokenizers":
            raise
        ids, lengths = _encoder("tokenizers").encode_flat(docs)
        counts["fallback_chunks"] = 1
    counts["empty_documents"] = int((lengths == 0).sum())
    counts["documents"] = len(docs)
    if _W["valid_fraction"] > 0:
        valid = _valid_mask(docs, _W["valid_fraction"])
        out = [_pack(ids, lengths, m, _W["eos"], _W["dtype"]) for m in (~valid, valid)]
    else:
        out = [_pack(ids, lengths, None, _W["eos"], _W["dtype"])]
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
    from data_pipeline.indexed import IndexedDatasetWriter, write_meta  # imports numpy

    t0 = time.perf_counter()
    if not 0.0 <= valid_fraction < 1.0:
        raise ZeroLLMError(f"--valid-fraction {valid_fraction}: must be in [0, 1).")
    files = sources.expand_inputs(inputs)
    info = tokenizer_info(tokenizer_dir)
    dtype = token_dtype_for(info.vocab_size)
    chunks = sources.iter_chunks(files, txt_split, text_key, shard)
    first = next(chunks, None)
    sample = _probe_sample(sources.parse_chunk(first, text_key, True)[0] if first is not None else [])
    prefixes = output_prefixes(out_prefix, valid_fraction, shard)
    total_in = sum(os.path.getsize(f) for f in files) if shard[1] == 1 else None
    opts = {"text_key": text_key, "skip_bad": skip_bad, "valid_fraction": valid_fraction}
    workers = max(1, workers or os.cpu_count() or 1)
    writers = [IndexedDatasetWriter(p, dtype) for p in prefixes]
    try:
        with _Pool(workers, (info.path, dtype.__name__, info.eos_id, opts)) as pool:
            enc_name, skipped = pool.call(_pick, sample, encoder)
            why = "".join(f"; {k} not used: {v}" for k, v in skipped.items())
            log.info("preprocess: %d file(s), encoder %s, dtype %s%s", len(files), enc_name, dtype.__name__, why)
            results = pool.imap(_encode_chunk, first, chunks, enc_name)
            counts, n_bytes = _write(results, writers, _progress(total_in, progress))
        _check_nonempty(writers, prefixes, files)
        for w in writers:
            w.finalize()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    if counts.get("fallback_chunks"):
        n = counts["fallback_chunks"]
        log.warning("preprocess: %s failed on %d chunk(s); tokenizers encoded those", enc_name, n)
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
                "fallback_chunks": counts.get("fallback_chunks", 0),
                "inputs": [os.path.abspath(f) for f in files],
                "shard": f"{shard[0]}/{shard[1]}",
                "valid_fraction": valid_fraction,
            },
        )
    secs = time.perf_counter() - t0
    toks = sum(w.num_tokens for w in writers)
    docs = sum(w.num_documents for w in writers)
    return PreprocessResult(prefixes, enc_name, secs, n_bytes, toks, docs, counts)


def _write(results, writers, bar) -> tuple[dict[str, int], int]:
    """Append each chunk's documents to the writers, in order; (summed counts, input bytes)."""
    counts: dict[str, int] = {}
    n_bytes = 0
    with bar:
        for out, c, nb in results:
            for w, (toks, sizes) in zip(writers, out, strict=True):
                w.add_documents(toks, sizes)
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
            n_bytes += nb
            bar.update(nb)
    return counts, n_bytes


def _check_nonempty(writers, prefixes, files) -> None:
    if sum(w.num_tokens for w in writers) == 0:
        raise ZeroLLMError(f"{', '.join(files[:3])}: no tokens at all (every document empty?); nothing to write.")
    for w, p in zip(writers, prefixes, strict=True):
        if w.num_tokens == 0:
            raise ZeroLLMError(
                f"{p}: this split got no documents (field: --valid-fraction); use a larger fraction or more data."
            )


def _progress(total, enabled):
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: worker processes are forked later
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


class _Pool:
    """Worker processes (this process when workers == 1) that encode chunks in order.

    A `ProcessPoolExecutor`, forked before any encoder or thread pool exists in the parent:
    a worker killed (say by the OOM killer) fails the run with one line instead of leaving
    it waiting forever. After CHUNKS_PER_WORKER chunks per worker the processes are
    replaced (in-flight chunks drained first): fastokens' cache and a long-lived worker's
    heap grow with the distinct text seen (~0.5 MB per MB of unique code), so recycled
    workers keep peak memory flat in the corpus size. At most 2*workers+1 chunks in flight.
    """

    def __init__(self, workers: int, initargs: tuple):
        self.workers, self.initargs = workers, initargs
        self.ex = None
        self.submitted = 0  # to the current processes
        if workers == 1:  # in-process: no pickling
            _init_worker(*initargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close()

    def _close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)
            self.ex = None

    def _submit(self, fn, *args):
        if self.ex is None:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self.ex = ProcessPoolExecutor(self.workers, ctx, _init_worker, self.initargs)
            self.submitted = 0
        self.submitted += 1
        return self.ex.submit(fn, *args)

    @staticmethod
    def _result(future, what: str):
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise ZeroLLMError(
                f"{what}: a preprocess worker process died (killed, or out of memory?); "
                "nothing was written under the output names. Use fewer --workers, or check the system log."
            ) from e

    def call(self, fn, *args):
        return fn(*args) if self.workers == 1 else self._result(self._submit(fn, *args), "encoder check")

    def imap(self, fn, first, rest, *args):
        if first is None:
            return
        stream = itertools.chain([first], rest)
        if self.workers == 1:
            for c in stream:
                yield fn(c, *args)
            return
        pending: deque = deque()
        for c in stream:
            if self.submitted >= CHUNKS_PER_WORKER * self.workers:  # fresh processes
                while pending:
                    yield self._result(*pending.popleft())
                self._close()
            pending.append((self._submit(fn, c, *args), f"{c.path} (chunk at byte {c.offset})"))
            if len(pending) > 2 * self.workers:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())
