"""Text sources for tokenizer training, and the embedded demo corpus.

The demo corpus is real text every machine already has: this interpreter's standard
library `.py` sources (outside test dirs and site-packages), one document per file,
sorted by relative path, written as `OUT_DIR/stdlib.jsonl` lines `{"text": ...}`.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from data_pipeline.sources import expand_inputs, iter_documents
from train.errors import ZeroLLMError

_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_sources() -> list[Path]:
    """The stdlib's .py files, test dirs and site-packages excluded, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _TEST_DIRS]  # prune, don't descend
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def write_demo_corpus(out_dir: str | Path, max_mb: float | None = None) -> tuple[Path, int, int]:
    """Write OUT_DIR/stdlib.jsonl; returns (path, documents, text bytes)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "stdlib.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    limit = None if max_mb is None else int(max_mb * 1e6)
    n = nbytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for p in stdlib_sources():
            try:
                text = p.read_text("utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few files are not UTF-8; the corpus stays deterministic
            if not text.strip():
                continue
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += 1
            nbytes += len(text.encode("utf-8"))
            if limit is not None and nbytes >= limit:
                break
    if n == 0:
        raise ZeroLLMError("demo-corpus: found no stdlib sources (sysconfig stdlib path).")
    os.replace(tmp, path)
    return path, n, nbytes


def training_texts(
    inputs: list[str],
    text_key: str = "text",
    txt_split: str = "blank-line",
    max_mb: float | None = None,
    seed: int = 0,
) -> tuple[Iterator[str], Callable[[], int]]:
    """Documents for tokenizer training and a counter of the bytes they held.

    With `max_mb`, a seeded sample of documents of about that size (each document kept
    with probability max_mb / corpus size). `hf:NAME[:SPLIT]` streams a Hugging Face
    dataset (needs a network), shuffled with `seed` when `max_mb` is set.
    """
    count = {"bytes": 0}
    hf = [s for s in inputs if s.startswith("hf:")]
    local = [s for s in inputs if not s.startswith("hf:")]
    files = expand_inputs(local) if local else []
    total = sum(os.path.getsize(f) for f in files)
    limit = None if max_mb is None else int(max_mb * 1e6)
    keep = 1.0 if limit is None or total <= limit else limit / total
    rng = random.Random(seed)

    def gen() -> Iterator[str]:
        for doc in iter_documents(files, txt_split, text_key) if files else ():
            if keep < 1.0 and rng.random() >= keep:
                continue
            count["bytes"] += len(doc.encode("utf-8"))
            yield doc
            if limit is not None and count["bytes"] >= limit:
                return
        for spec in hf:
            for doc in _hf_texts(spec[3:], text_key, seed if limit else None):
                count["bytes"] += len(doc.encode("utf-8"))
                yield doc
                if limit is not None and count["bytes"] >= limit:
                    return

    return gen(), lambda: count["bytes"]


def _hf_texts(spec: str, text_key: str, seed: int | None) -> Iterator[str]:
    import datasets  # heavy, and only for hf: inputs

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # noqa: BLE001 - network / name errors
        raise ZeroLLMError(f"hf:{spec}: cannot load the dataset ({type(e).__name__}: {e}).") from e
    if seed is not None:
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
    for row in ds:
        t = row.get(text_key)
        if not isinstance(t, str):
            raise ZeroLLMError(f"hf:{spec}: rows have no text field {text_key!r} (--text-key).")
        yield t
