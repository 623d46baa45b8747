"""Fixtures for the data pipeline tests: a small real corpus and a tokenizer trained on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def need_shared(name: str) -> Path:
    """A file of ../shared/data; skip when absent (fail under ZEROLLM_REQUIRE_ALL=1)."""
    path = SHARED_DATA / name
    if not path.is_file():
        reason = f"{path} is absent (shared test data)"
        if os.environ.get("ZEROLLM_REQUIRE_ALL") == "1":
            pytest.fail(f"ZEROLLM_REQUIRE_ALL=1 but {reason}")
        pytest.skip(reason)
    return path


def stdlib_docs(n: int = 40) -> list[str]:
    """Real text that every machine has: the first n stdlib sources of the demo corpus."""
    from data_pipeline.training_corpus import stdlib_sources

    docs = []
    for p in stdlib_sources():
        try:
            docs.append(p.read_text("utf-8"))
        except UnicodeDecodeError:
            continue
        if len(docs) == n:
            break
    return docs


def _write_jsonl(path: Path, texts: list, key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return path


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, texts) -> path: one {"text": ...} line per text."""
    return _write_jsonl


@pytest.fixture
def shakespeare() -> Path:
    return need_shared("tinyshakespeare.txt")


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    docs = stdlib_docs(40)
    # prose, scripts and emoji too, so merges exist beyond ASCII code
    docs += ["Ünïcödé naïve café — 東京タワー Москва 🙂", "It's a test. It'll pass; we've seen it."]
    return docs


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus_docs) -> Path:
    from data_pipeline.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(corpus_docs, out, vocab_size=600)
    return out
