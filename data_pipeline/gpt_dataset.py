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

    def __len__(self) -> int:
        return self.length

    def build_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(doc_order, sample_pos, sample_off, shuffle), vectorised; no per-sample loop."""
        sizes = self.indexed.sizes
        n_docs = len(sizes)
        need = self.length * self.seq_len + 1  # tokens the last window reaches
        n_epochs = -(-need // self.tokens_per_epoch)
        # Document order: epoch e is argsort of a row of uniform keys from one stream, so
        # row e is the same however many epochs are built (rows drawn in bounded batches).
        rng = _rng(self.seed, 0)
        rows = max(1, (1 << 22) // n_docs)
        order = np.empty(n_epochs * n_docs, np.int32 if n_docs < 2**31 else np.int64)
        for e in range(0, n_epochs, rows):
            r = min(rows, n_epochs - e)
            keys = rng.random((r, n_docs))
            order[e * n_docs : (e + r) * n_docs] = np.argsort(keys, axis=1, kind="stable").ravel()
        cum = np.zeros(len(order) + 1, np.int64)
        np.cumsum(sizes[order], out=cum[1:])
        starts = np.arange(self.length + 1, dtype=np.int64) * self.seq_len
        pos = np.searchsorted(cum, starts, side="right") - 1
        off = (starts - cum[pos]).astype(np.int32)
        pos = pos.astype(np.int32 if len(order) < 2**31 else np.int64)
        idt = np.int32 if self.length < 2**31 else np.int64
        shuffle = np.empty(self.length, idt)
        for b in range(self.length // self.block):  # a few blocks of up to 2^20 samples
            lo = b * self.block
            block = np.arange(lo, lo + self.block, dtype=idt)
            _rng(self.seed, 1, b).shuffle(block)
            shuffle[lo : lo + self.block] = block
        return order, pos, off, shuffle

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range [0, {self.length})")
        j = int(self.shuffle[i])
        p, o = int(self.sample_pos[j]), int(self.sample_off[j])
        n = self.seq_len + 1
        out = np.empty(n, np.int64)
        filled = 0
        while filled < n:  # document p from offset o, then the next ones from their start
            d = self.doc_order[p]
            take = min(int(self.indexed.sizes[d]) - o, n - filled)
            s = int(self._tok_off[d]) + o
            out[filled : filled + take] = self._bin[s : s + take]
            filled, p, o = filled + take, p + 1, 0
        return out

    def get_batch(self, indices) -> np.ndarray:
        """Samples `indices` as one (len(indices), seq_len + 1) int64 array."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"sample index out of range [0, {self.length})")
        return self._read_many(self.shuffle[idx].astype(np.int64))

    __getitems__ = get_batch  # torch DataLoader batched fetch

    def _read_many(self, j: np.ndarray) -> np.ndarray:
        """Unshuffled samples j: their document pieces found vectorised, copied as slices."""
        n = self.seq_len + 1
        out = np.empty((len(j), n), np.int64)
        p0, p1 = self.sample_pos[j].astype(np.int64), self.sample_pos[j + 1].astype(np.int64)
        o0, o1 = self.sample_off[j], self.sample_off[j + 1]
        n_pieces = p1 - p0 + 1  # documents each sample touches
        first = np.cumsum(n_pieces) - n_pieces
        owner = np.repeat(np.arange(len(j)), n_pieces)
        k = np.arange(owner.size) - first[owner]  # piece number within its sample
        p = p0[owner] + k
        d = self.doc_order[p]
        lo = np.where(k == 0, o0[owner], 0)
        hi = np.where(p == p1[owner], o1[owner] + 1, self.indexed.sizes[d])
        lens = (hi - lo).astype(np.int64)
        ends = np.cumsum(lens)
        dst = owner * n + (ends - lens) - (ends - lens)[first][owner]
        src = self._tok_off[d] + lo
        flat, bin_ = out.reshape(-1), self._bin
        # a memmap slice is a view copied once: ~8x faster than fancy indexing here
        for s_, d_, l_ in zip(src.tolist(), dst.tolist(), lens.tolist(), strict=True):
            flat[d_ : d_ + l_] = bin_[s_ : s_ + l_]
        return out

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
