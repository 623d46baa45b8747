"""The `zerollm` data commands end to end, as `make demo` runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def zerollm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_pipeline_cli(tmp_path):
    d = tmp_path / "D"
    r = zerollm("demo-corpus", str(d), "--max-mb", "0.4")
    assert r.returncode == 0, r.stderr
    lines = (d / "stdlib.jsonl").read_text().splitlines()
    assert len(lines) > 5 and all("text" in json.loads(x) for x in lines)
    r = zerollm("tokenizer", "train", str(d / "stdlib.jsonl"), "--vocab-size", "400", "--out", str(d / "tokenizer"))
    assert r.returncode == 0, r.stderr
    r = zerollm(
        "preprocess",
        str(d / "stdlib.jsonl"),
        "--tokenizer",
        str(d / "tokenizer"),
        "--out-prefix",
        str(d / "stdlib"),
        "--valid-fraction",
        "0.2",
        "--workers",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert "encoder fastokens" in r.stderr and "MB/s" in r.stderr
    for split in ("train", "valid"):
        for ext in ("bin", "idx", "meta.json"):
            assert (d / f"stdlib_{split}.{ext}").is_file()
    r = zerollm("demo-tasks", str(d / "stdlib.jsonl"), "--out", str(d / "tasks_line"), "--task", "line")
    assert r.returncode == 0, r.stderr
    assert all((d / "tasks_line" / f"{kind}_{split}.jsonl").stat().st_size for kind in ("sft", "prefs", "prompts")
               for split in ("train", "valid"))  # fmt: skip
    r = zerollm("merge-datasets", str(d / "all"), str(d / "stdlib_train"), str(d / "stdlib_valid"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((d / "all.meta.json").read_text())
    assert meta["documents"] == len(lines) and meta["vocab_size"] == 400


def test_bad_input_prints_one_line_without_traceback(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    r = zerollm(
        "preprocess", str(tmp_path / "empty.jsonl"), "--tokenizer", str(tmp_path), "--out-prefix", str(tmp_path / "o")
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = [x for x in r.stderr.splitlines() if x.startswith("zerollm: error:")]
    assert len(err) == 1 and "empty.jsonl" in err[0]


def test_command_module_is_light_at_import():
    code = (
        "import sys, data_pipeline.commands as c, argparse;"
        "p = argparse.ArgumentParser(); c.register(p.add_subparsers());"
        "heavy = {'numpy', 'tokenizers', 'transformers', 'tiktoken', 'fastokens', 'torch'} & set(sys.modules);"
        "print(sorted(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_demo_corpus_is_deterministic_and_excludes_tests(tmp_path):
    from data_pipeline.training_corpus import stdlib_sources, write_demo_corpus

    files = stdlib_sources()
    assert files and not any("test" in p.parts[:-1] or "site-packages" in p.parts for p in files)
    a, _, _ = write_demo_corpus(tmp_path / "a", max_mb=0.2)
    b, _, _ = write_demo_corpus(tmp_path / "b", max_mb=0.2)
    assert a.read_bytes() == b.read_bytes()
