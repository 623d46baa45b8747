"""GPT training samples from token datasets: fixed windows, shuffling, blending.

    ds = build_dataset(["data/web"], seq_len=1024, num_samples=10**6, seed=1234)
    ds = build_dataset(["0.7", "data/web", "0.3", "data/code"], 1024, 10**6, 1234)
    tokens = ds[i]  # np.int64, shape (seq_len + 1,): inputs tokens[:-1], labels tokens[1:]

`GPTDataset` (one prefix). The token stream is the concatenation of epochs; epoch e lists
the sequences (documents) in a permutation drawn from (seed, e). Sample j is the window
of seq_len + 1 tokens starting at token j * seq_len of that stream (windows overlap by one
token and span document boundaries, as in Megatron-LM). Samples are then shuffled within
blocks of `block` consecutive samples (about one epoch, at least 65,536), block b by a
permutation drawn from (seed, b). Nothing depends on `num_samples` except how many blocks
are built, so sample i is a pure function of (data files, seq_len, seed, i): asking for
more samples later extends the same sequence, on every rank and after any restart.

Index arrays (document order, sample start positions, shuffle) are built with vectorised
numpy and cached as .npy under `cache_dir` keyed by every parameter and a fingerprint of
the data files (written to temp names and renamed, so concurrent ranks are safe).

`BlendedDataset` (weights w_d): the k-th sample of dataset d is placed at "time"
(k + 1/2) / w_d and samples are taken in time order, so after any n samples each dataset
has contributed w_d * n within one sample. Also independent of `num_samples`.

`.fingerprint` changes whenever the data files, seq_len, seed or blend weights change;
the trainer stores it and refuses to resume onto different data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data_pipeline.indexed import MMapIndexedDataset, dataset_vocab_size, idx_path, read_meta
from train.errors import ZeroLLMError

log = logging.getLogger(__name__)
__all__ = ["BlendedDataset", "GPTDataset", "build_dataset", "dataset_vocab_size", "parse_blend"]

INDEX_VERSION = 1
MIN_BLOCK, MAX_BLOCK = 1 << 16, 1 << 20  # samples per shuffle block
_FULL_HASH_LIMIT = 64 << 20


def data_fingerprint(prefix: str) -> str:
    """Hash of a dataset's files: the whole .idx (sampled windows past 64 MB) + .bin size."""
    ip = idx_path(prefix)
    h = hashlib.sha256()
    size = ip.stat().st_size
    h.update(f"{size}:{Path(f'{prefix}.bin').stat().st_size}".encode())
    with open(ip, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            h.update(f.read())
        else:  # 256 windows of 64 KiB spread over the file
            for k in range(256):
                f.seek(k * (size - (1 << 16)) // 255)
                h.update(f.read(1 << 16))
    meta = read_meta(prefix)
    if meta:
        h.update(str(meta.get("tokenizer_hash")).encode())
    return h.hexdigest()[:16]


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(list(key)))


def _threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _argsort_rows(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.argsort(keys[rows], axis=1, kind="stable").ravel()


def _int_view(a: np.ndarray) -> memoryview:
    """A memoryview of an integer array whose items index as Python ints (no copy)."""
    a = np.ascontiguousarray(a)
    return memoryview(a).cast("B").cast(a.dtype.char)


class GPTDataset:
    """Windows of seq_len + 1 tokens of one token dataset; see the module docstring."""

    def __init__(
        self,
        prefix: str,
        seq_len: int,
        num_samples: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        if seq_len < 1 or num_samples < 1:
            raise ZeroLLMError(f"seq_len {seq_len} and num_samples {num_samples} must be >= 1.")
        self.prefix = str(prefix)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.indexed = MMapIndexedDataset(prefix)
        meta = read_meta(prefix)
        self.vocab_size = None if meta is None else int(meta["vocab_size"])
        self.tokenizer_hash = None if meta is None else meta.get("tokenizer_hash")
        sizes = self.indexed.sizes
        self.tokens_per_epoch = int(sizes.sum(dtype=np.int64))
        if self.tokens_per_epoch == 0:
            raise ZeroLLMError(f"{idx_path(prefix)}: the dataset holds no tokens.")
        self.block = min(max(self.tokens_per_epoch // self.seq_len, MIN_BLOCK), MAX_BLOCK)
        n_blocks = -(-num_samples // self.block)
        self.length = n_blocks * self.block
        self.data_fingerprint = data_fingerprint(self.prefix)
        self.fingerprint = hashlib.sha256(
            json.dumps(["gpt", INDEX_VERSION, self.data_fingerprint, self.seq_len, self.seed]).encode()
        ).hexdigest()[:16]
        arrays = _load_or_build(self, cache_dir)
        self.doc_order, self.sample_pos, self.sample_off, self.shuffle = arrays
        self._tok_off = (self.indexed.pointers // self.indexed.dtype.itemsize).astype(np.int64)
        # plain ndarray views: slicing an np.memmap subclass costs microseconds per call
        self._bin = self.indexed.tokens.view(np.ndarray)
        index = (self.shuffle, self.sample_pos, self.sample_off, self.doc_order, self.indexed.sizes, self._tok_off)
        self._views = tuple(_int_view(a) for a in index)
        n = self.seq_len + 1
        fits = n <= len(self._bin)
        self._windows = np.lib.stride_tricks.sliding_window_view(self._bin, n) if fits else None

    def __len__(self) -> int:
        return self.length

    def build_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(doc_order, sample_pos, sample_off, shuffle), vectorised; no per-sample loop.

        The sorts and shuffles run in threads (numpy releases the GIL in them); every
        random draw comes from a stream keyed by (seed, what, block), so the arrays do not
        depend on the number of threads.
        """
        sizes = self.indexed.sizes
        n_docs = len(sizes)
        need = self.length * self.seq_len + 1  # tokens the last window reaches
        n_epochs = -(-need // self.tokens_per_epoch)
        # Document order: epoch e is argsort of a row of uniform keys from one stream, so
        # row e is the same however many epochs are built (rows drawn in bounded batches).
        rng = _rng(self.seed, 0)
        rows = max(1, (1 << 22) // n_docs)
        order = np.empty(n_epochs * n_docs, np.int32 if n_docs < 2**31 else np.int64)
        with ThreadPoolExecutor(_threads()) as pool:
            for e in range(0, n_epochs, rows):
                keys = rng.random((min(rows, n_epochs - e), n_docs))
                parts = np.array_split(np.arange(len(keys)), min(len(keys), _threads()))
                got = list(pool.map(_argsort_rows, [keys] * len(parts), parts))
                order[e * n_docs : e * n_docs + keys.size] = np.concatenate(got)
            # Sample j starts at token j * seq_len of the stream: in piece k when
            # cum[k] <= j * seq_len < cum[k + 1]; so piece k holds samples
            # ceil(cum[k] / seq_len) .. ceil(cum[k + 1] / seq_len) - 1.
            cum = np.zeros(len(order) + 1, np.int64)
            np.cumsum(sizes[order], out=cum[1:])
            n = self.length + 1
            first = -(-cum[1:-1] // self.seq_len)  # first sample of pieces 1.. (0 for piece 0)
            pdt = np.int32 if len(order) < 2**31 else np.int64
            pos = np.cumsum(np.bincount(first[first < n], minlength=n)[:n], dtype=pdt)
            off = np.arange(n, dtype=np.int64)
            off *= self.seq_len
            off -= cum[pos]
            off = off.astype(np.int32)
            idt = np.int32 if self.length < 2**31 else np.int64
            shuffle = np.empty(self.length, idt)

            def shuffle_block(b: int) -> None:  # blocks of up to 2^20 samples
                lo = b * self.block
                block = np.arange(lo, lo + self.block, dtype=idt)
                _rng(self.seed, 1, b).shuffle(block)
                shuffle[lo : lo + self.block] = block

            list(pool.map(shuffle_block, range(self.length // self.block)))
        return order, pos, off, shuffle

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range [0, {self.length})")
        # memoryviews: a Python int per lookup, ~10x cheaper than numpy scalar indexing
        shuffle, pos, off, order, sizes, tok_off = self._views
        j = shuffle[i]
        p, o = pos[j], off[j]
        n = self.seq_len + 1
        d = order[p]
        if o + n <= sizes[d]:  # the window lies in one document (the common case)
            s = tok_off[d] + o
            return self._bin[s : s + n].astype(np.int64)
        return self._fill(np.empty(n, np.int64), p, o, 0)

    def get_batch(self, indices) -> np.ndarray:
        """Samples `indices` as one (len(indices), seq_len + 1) int64 array."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"sample index out of range [0, {self.length})")
        return self._read_many(self.shuffle[idx].astype(np.int64))

    __getitems__ = get_batch  # torch DataLoader batched fetch

    def _read_many(self, j: np.ndarray) -> np.ndarray:
        """Unshuffled samples j: one row copy each from a window view of the .bin; the
        samples that span documents then get their later pieces written one by one."""
        p0, p1 = self.sample_pos[j], self.sample_pos[j + 1]
        o0 = self.sample_off[j]
        start = self._tok_off[self.doc_order[p0]] + o0
        if self._windows is None:  # a window is longer than the data: all span documents
            out, last = np.empty((len(j), self.seq_len + 1), np.int64), -1
        else:
            # row r of the window view is bin[r : r + n]: fancy-indexing rows copies each
            # contiguously (~0.5 us per sample). A start past `last` only happens for a
            # sample that spans documents: clamped here, rewritten whole below.
            last = len(self._windows) - 1
            out = self._windows[np.minimum(start, last)].astype(np.int64)
        _, _, _, order, sizes, _ = self._views
        spans = np.flatnonzero(p1 > p0)
        for r, p, o, st in zip(
            spans.tolist(), p0[spans].tolist(), o0[spans].tolist(), start[spans].tolist(), strict=True
        ):
            if st <= last:  # the first piece is in place already
                self._fill(out[r], p + 1, 0, sizes[order[p]] - o)
            else:
                self._fill(out[r], p, o, 0)
        return out

    def _fill(self, row: np.ndarray, p: int, o: int, filled: int) -> np.ndarray:
        """Write row[filled:] from stream piece p at offset o, then the next pieces."""
        _, _, _, order, sizes, tok_off = self._views
        n, bin_ = len(row), self._bin
        while filled < n:
            d = order[p]
            take = min(sizes[d] - o, n - filled)
            s = tok_off[d] + o
            row[filled : filled + take] = bin_[s : s + take]
            filled, p, o = filled + take, p + 1, 0
        return row

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise if any token id is >= vocab_size (full scan of the .bin)."""
        m = self.indexed.max_token_id()
        if m >= vocab_size:
            raise ZeroLLMError(
                f"{self.prefix}.bin: token id {m} >= vocab_size {vocab_size} (field: vocab_size); "
                "the dataset was made with a larger tokenizer."
            )

    @property
    def max_token_id(self) -> int:
        """Largest token id in the data (a full O(tokens) scan; prefer `vocab_size`)."""
        return self.indexed.max_token_id()


def _load_or_build(ds: GPTDataset, cache_dir: str | None):
    names = ("doc_order", "sample_pos", "sample_off", "shuffle")
    if cache_dir is None:
        return ds.build_arrays()
    key = hashlib.sha256(json.dumps([ds.fingerprint, ds.length]).encode()).hexdigest()[:16]
    base = Path(cache_dir) / f"gpt_{Path(ds.prefix).name}_{key}"
    paths = [Path(f"{base}_{n}.npy") for n in names]
    if all(p.is_file() for p in paths):
        try:
            return tuple(np.load(p, mmap_mode="r") for p in paths)
        except (ValueError, OSError) as e:
            log.warning("rebuilding the dataset index cache %s (%s)", base, e)
    arrays = ds.build_arrays()
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    for p, a in zip(paths, arrays, strict=True):
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, a)
        os.replace(tmp, p)
    return arrays


def blend_schedule(weights: list[float], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) of the first n blended samples."""
    w = np.asarray(weights, np.float64)
    times, ids, ks = [], [], []
    for d, wd in enumerate(w):
        k = np.arange(int(np.floor(wd * n)) + 2, dtype=np.int64)
        times.append((k + 0.5) / wd)
        ids.append(np.full(k.size, d, np.int16))
        ks.append(k)
    order = np.argsort(np.concatenate(times), kind="stable")[:n]
    return np.concatenate(ids)[order], np.concatenate(ks)[order]


class BlendedDataset:
    """Weighted mix of GPTDatasets with exact proportions; see the module docstring."""

    def __init__(
        self,
        prefixes: list[str],
        weights: list[float],
        seq_len: int,
        num_samples: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        total = float(sum(weights))
        self.weights = [float(x) / total for x in weights]
        self.length = int(num_samples)
        self.dataset_index, self.sample_index = blend_schedule(self.weights, self.length)
        counts = np.bincount(self.dataset_index, minlength=len(prefixes))
        self.datasets = [
            GPTDataset(p, seq_len, max(int(c), 1), seed, cache_dir) for p, c in zip(prefixes, counts, strict=True)
        ]
        hashes = {d.tokenizer_hash for d in self.datasets if d.tokenizer_hash}
        if len(hashes) > 1:
            raise ZeroLLMError(
                f"blend {', '.join(prefixes)}: made with different tokenizers "
                f"(.meta.json field tokenizer_hash: {sorted(hashes)}); re-tokenize them alike."
            )
        sizes = [d.vocab_size for d in self.datasets]
        self.vocab_size = None if None in sizes else max(sizes)
        self.seq_len = int(seq_len)
        self.fingerprint = hashlib.sha256(
            json.dumps(
                ["blend", INDEX_VERSION, [f"{w:.12g}" for w in self.weights]] + [d.fingerprint for d in self.datasets]
            ).encode()
        ).hexdigest()[:16]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range [0, {self.length})")
        return self.datasets[self.dataset_index[i]][int(self.sample_index[i])]

    def get_batch(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"sample index out of range [0, {self.length})")
        out = np.empty((len(idx), self.seq_len + 1), np.int64)
        which = self.dataset_index[idx]
        for d, ds in enumerate(self.datasets):
            rows = np.flatnonzero(which == d)
            if rows.size:
                out[rows] = ds.get_batch(self.sample_index[idx[rows]])
        return out

    __getitems__ = get_batch

    def check_token_ids(self, vocab_size: int) -> None:
        for d in self.datasets:
            d.check_token_ids(vocab_size)

    @property
    def max_token_id(self) -> int:
        return max(d.max_token_id for d in self.datasets)


def parse_blend(spec: list) -> tuple[list[str], list[float]]:
    """`[prefix]` or `[w1, prefix1, w2, prefix2, ...]` -> (prefixes, weights)."""
    spec = [str(s) if not isinstance(s, int | float) else s for s in spec]
    if len(spec) == 1:
        return [str(spec[0])], [1.0]
    if len(spec) == 0 or len(spec) % 2:
        raise ZeroLLMError(f"data blend {spec}: expected [prefix] or [weight, prefix, weight, prefix, ...].")
    prefixes, weights = [], []
    for w, p in zip(spec[::2], spec[1::2], strict=True):
        try:
            wf = float(w)
        except ValueError:
            raise ZeroLLMError(f"data blend {spec}: weight {w!r} is not a number.") from None
        if not wf > 0 or not np.isfinite(wf):
            raise ZeroLLMError(f"data blend {spec}: weight {w!r} must be > 0.")
        prefixes.append(str(p))
        weights.append(wf)
    return prefixes, weights


def build_dataset(
    spec: list,
    seq_len: int,
    num_samples: int,
    seed: int,
    cache_dir: str | None = None,
):
    """A GPTDataset for `[prefix]`, a BlendedDataset for `[w, prefix, w, prefix, ...]`."""
    prefixes, weights = parse_blend([spec] if isinstance(spec, str | Path) else list(spec))
    if len(prefixes) == 1:
        return GPTDataset(prefixes[0], seq_len, num_samples, seed, cache_dir)
    return BlendedDataset(prefixes, weights, seq_len, num_samples, seed, cache_dir)
