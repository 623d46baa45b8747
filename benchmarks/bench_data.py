"""Data pipeline benchmarks: tokenizer training, preprocess, dataset reads, index build.

    .venv/bin/python benchmarks/bench_data.py             # 10 MB and 100 MB corpora
    .venv/bin/python benchmarks/bench_data.py --big       # + a 1 GB corpus (minutes)
    .venv/bin/python benchmarks/bench_data.py --work DIR  # keep corpora/outputs in DIR

Corpora (real text, no download): "code" = the first 100 MB of the source files on this
machine (.py, .pyi, .c, .h, .cpp, .cu of this Python's stdlib and site-packages; files
over 1 MiB, generated tables, left out), de-duplicated by content, one document per file,
in path order: long documents, no repeats, so no encoder cache sees a line twice. The
10 MB corpus is its start; the 1 GB corpus is it 10 times, pass r rotating ASCII letters
by r (ROT-r): unique text with the same document sizes (only the corpus size changes),
harder than real code for a tokenizer (its words are not in the vocabulary). "prose" =
../shared/data/tinyshakespeare.txt split at blank lines (short documents), repeated to
size (1.1 MB of unique text), when present.
Preprocess is timed end to end as `zerollm preprocess` (process start to exit, jsonl on
disk to .bin/.idx), peak RSS summed over the process and its workers (sampled every
20 ms). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def make_corpus(path: Path, docs: list[str], mb: float, rotate: bool = False) -> Path:
    """`docs` as jsonl lines until the file reaches `mb` MB; pass r >= 1 over the list
    rotates ASCII letters by r when `rotate` (unique text), else repeats it."""
    if path.is_file():
        return path
    target, size, r = int(mb * 1e6), 0, 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while size < target:
            table = _rot(r) if rotate and r else None
            for d in docs:
                line = json.dumps({"text": d.translate(table) if table else d}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                if size >= target:
                    break
            r += 1
    tmp.replace(path)
    return path


def _rot(r: int) -> dict[int, int]:
    lower, upper = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    k = r % 26 or 1
    return str.maketrans(lower + upper, lower[k:] + lower[:k] + upper[k:] + upper[:k])


CODE_EXT = (".py", ".pyi", ".c", ".h", ".cpp", ".cu", ".cuh")


def code_documents(max_mb: float = 100, max_doc: int = 1 << 20) -> list[str]:
    """Source files of this Python's stdlib and site-packages, unique by content, up to
    `max_mb` in all; files over `max_doc` bytes are left out."""
    import hashlib
    import site
    import sysconfig

    roots = [sysconfig.get_paths()["stdlib"], *site.getsitepackages()]
    seen, docs, total = set(), [], 0
    for root in dict.fromkeys(roots):
        for dirpath, _, filenames in sorted(os.walk(root)):  # whole walk, then path order
            for name in sorted(filenames):
                if not name.endswith(CODE_EXT):
                    continue
                try:
                    text = (Path(dirpath) / name).read_text("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                data = text.encode("utf-8")
                key = hashlib.blake2b(data, digest_size=16).digest()
                if text.strip() and len(data) <= max_doc and key not in seen:
                    seen.add(key)
                    docs.append(text)
                    total += len(data)
                    if total >= max_mb * 1e6:
                        return docs
    return docs


def run_measured(cmd: list[str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes of the process tree, CPU seconds of the tree)."""
    import resource

    import psutil

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = ru.ru_utime + ru.ru_stime
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    ps = psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err.decode()[-2000:]}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the reaped pool workers
    return wall, peak, ru.ru_utime + ru.ru_stime - cpu0


def bench_tokenizer(work: Path, corpus: Path, vocab: int) -> dict:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = work / f"tok{vocab}"
    cmd = [sys.executable, "-m", "launch.cli", "tokenizer", "train", str(corpus)]
    cmd += ["--vocab-size", str(vocab), "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    secs = time.perf_counter() - t0
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime
    mb = corpus.stat().st_size / 1e6
    what = f"tokenizer train (vocab {vocab}, {mb:.0f} MB jsonl)"
    return {"what": what, "MB/s": mb / secs, "seconds": secs, "CPU s": cpu, "MB/CPU-s": mb / cpu}


def bench_preprocess(work: Path, corpus: Path, tok: Path, label: str) -> dict:
    prefix = work / f"out_{corpus.stem}"
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "preprocess",
        str(corpus),
        "--tokenizer",
        str(tok),
        "--out-prefix",
        str(prefix),
    ]
    wall, peak, cpu = run_measured(cmd)
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    mb = corpus.stat().st_size / 1e6
    return {
        "what": f"preprocess {label} {mb:.0f} MB ({meta['documents']} docs)",
        "MB/s": mb / wall,
        "tokens/s": meta["tokens"] / wall,
        "peak RSS MB": peak / 1e6,
        "seconds": wall,
        "CPU s": cpu,
        "MB/CPU-s": mb / cpu,
        "encoder": meta["encoder"],
        "prefix": str(prefix),
    }


def bench_reads(prefix: str, seq_len: int = 1024, n: int = 100_000) -> list[dict]:
    import numpy as np

    from data_pipeline.gpt_dataset import GPTDataset

    rows = []
    for samples in (10**6, 10**7):
        t0, c0 = time.perf_counter(), time.process_time()
        GPTDataset(prefix, seq_len, samples, seed=1)
        what = f"index build, {samples:.0e} samples (seq {seq_len})"
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"what": what, "seconds": secs, "CPU s": cpu})
    ds = GPTDataset(prefix, seq_len, 10**6, seed=1)
    idx = np.random.default_rng(0).integers(0, len(ds), n)
    for batch in (1, 64):
        t0, c0 = time.perf_counter(), time.process_time()
        if batch == 1:
            for i in idx.tolist():
                ds[i]
        else:
            for k in range(0, n, batch):
                ds.get_batch(idx[k : k + batch])
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        how = "ds[i]" if batch == 1 else f"get_batch({batch})"
        rows.append(
            {
                "what": f"GPTDataset random reads, seq {seq_len}, {how}",
                "samples/s": n / secs,
                "GB/s": n * (seq_len + 1) * 8 / secs / 1e9,
                "seconds": secs,
                "CPU s": cpu,
                "samples/CPU-s": n / cpu,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="also preprocess a 1 GB corpus")
    ap.add_argument("--work", default=None, help="work dir (default: a temp dir, removed)")
    args = ap.parse_args()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench_data_")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    code_docs = code_documents()
    unique_mb = sum(len(d.encode("utf-8")) for d in code_docs) / 1e6
    print(f"code corpus: {len(code_docs)} unique source files, {unique_mb:.0f} MB", file=sys.stderr)
    if unique_mb < 99:
        print("fewer than 100 MB of source files here: the code corpora repeat them (rotated)", file=sys.stderr)
    rows = []
    base = make_corpus(work / "code_12mb.jsonl", code_docs, 12)
    rows.append(bench_tokenizer(work, base, 8192))
    print(rows[-1], file=sys.stderr)
    tok = work / "tok8192"
    sizes = [10, 100] + ([1000] if args.big else [])
    for mb in sizes:
        corpus = make_corpus(work / f"code_{mb}mb.jsonl", code_docs, mb, rotate=True)
        rows.append(bench_preprocess(work, corpus, tok, "code (long docs)"))
        print(rows[-1], file=sys.stderr)
    if SHAKESPEARE.is_file():
        paras = [p for p in SHAKESPEARE.read_text("utf-8").split("\n\n") if p.strip()]
        corpus = make_corpus(work / "prose_10mb.jsonl", paras, 10)
        rows.append(bench_preprocess(work, corpus, tok, "prose (short docs)"))
        print(rows[-1], file=sys.stderr)
    else:
        print(f"skipping the prose corpus: {SHAKESPEARE} is absent", file=sys.stderr)
    big_prefix = next(r["prefix"] for r in rows if r.get("what", "").startswith("preprocess code (long docs) 100"))
    rows += bench_reads(big_prefix)
    cols = ["what", "MB/s", "tokens/s", "peak RSS MB", "samples/s", "GB/s", "seconds", "CPU s"]
    cols += ["MB/CPU-s", "samples/CPU-s", "encoder"]
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(
                f"{v:,.3g}" if isinstance(v, float) and v < 100 else f"{v:,.0f}" if isinstance(v, float) else str(v)
            )
        print("| " + " | ".join(cells) + " |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
