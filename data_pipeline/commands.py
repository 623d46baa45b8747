"""`zerollm` data subcommands: tokenizer train, preprocess, merge-datasets, demo-corpus, demo-tasks.

    zerollm demo-corpus D
    zerollm tokenizer train D/stdlib.jsonl --vocab-size 4096 --out D/tokenizer
    zerollm preprocess D/stdlib.jsonl --tokenizer D/tokenizer --out-prefix D/stdlib \\
        --valid-fraction 0.02          # -> D/stdlib_train.{bin,idx}, D/stdlib_valid.{bin,idx}
    zerollm merge-datasets OUT PREFIX [PREFIX ...]
    zerollm demo-tasks D/stdlib.jsonl --out D/tasks   # post-training tasks (function bodies)
    zerollm demo-tasks D/stdlib.jsonl --out D/tasks --task line   # (first lines: make demo's)

Only the standard library and train.errors are imported here; each handler imports the
stage module it runs (keeps --help fast).
"""

from __future__ import annotations

import argparse
import logging
import time

from train.errors import ZeroLLMError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tr = tsub.add_parser(
        "train",
        help="train a byte-level BPE on text / jsonl / parquet files (or hf:DATASET)",
        description="Train a byte-level BPE (HF tokenizers) and save a Hugging Face "
        "tokenizer dir with <|endoftext|> (eos), <|pad|> and ChatML chat tokens.",
    )
    tr.add_argument("inputs", nargs="+", help="files, globs, directories or hf:NAME[:SPLIT]")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--out", required=True, help="output tokenizer directory")
    tr.add_argument("--seed", type=int, default=0, help="seed for --max-mb document sampling")
    tr.add_argument("--max-mb", type=float, default=None, help="train on a seeded sample of ~this many MB")
    tr.add_argument("--min-frequency", type=int, default=2)
    _input_args(tr)
    tr.set_defaults(func=run_tokenizer_train)
    tok.set_defaults(func=lambda a: (tok.print_help(), 2)[1])

    pp = sub.add_parser(
        "preprocess",
        help="tokenize documents into Megatron .bin/.idx",
        description="Tokenize documents (jsonl / parquet / txt) into Megatron-LM "
        "MMapIndexedDataset files <prefix>.bin/.idx (+ .meta.json), one EOD per document; "
        "with --valid-fraction: <prefix>_train.* and <prefix>_valid.*.",
    )
    pp.add_argument("inputs", nargs="+", help="files, globs or directories")
    pp.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer dir")
    pp.add_argument("--out-prefix", required=True)
    pp.add_argument("--workers", type=int, default=None, help="encoding processes (all CPUs)")
    pp.add_argument("--valid-fraction", type=float, default=0.0)
    pp.add_argument("--shard", default="0/1", help="i/n: process the i-th of n input shards")
    pp.add_argument(
        "--skip-bad-documents",
        action="store_true",
        help="skip and count unreadable records (bad JSON/UTF-8) instead of stopping",
    )
    pp.add_argument(
        "--encoder",
        choices=("auto", "fastokens", "tiktoken", "tokenizers"),
        default="auto",
        help="auto: the fastest of fastokens, tiktoken that gives exactly tokenizers' ids on a probe "
        "and a sample of the corpus, else tokenizers (the reference)",
    )
    _input_args(pp)
    pp.set_defaults(func=run_preprocess)

    mg = sub.add_parser(
        "merge-datasets",
        help="concatenate .bin/.idx pairs (e.g. shards) into one",
    )
    mg.add_argument("out_prefix")
    mg.add_argument("prefixes", nargs="+", help="input prefixes, in order")
    mg.set_defaults(func=run_merge)

    dc = sub.add_parser(
        "demo-corpus",
        help="write the embedded demo corpus (this Python's stdlib sources) as jsonl",
    )
    dc.add_argument("out_dir")
    dc.add_argument("--max-mb", type=float, default=None, help="stop after ~this many MB")
    dc.set_defaults(func=run_demo_corpus)

    dt = sub.add_parser(
        "demo-tasks",
        help="post-training task files from the demo corpus: write a stdlib function's body or first line (checkable)",
        description="SFT, preference and prompt files (train/valid) from a demo-corpus jsonl; "
        "see data_pipeline/function_tasks.py for the task and its check",
    )
    dt.add_argument("corpus", help="the demo corpus jsonl (zerollm demo-corpus DIR)")
    dt.add_argument("--out", required=True, help="output directory")
    dt.add_argument("--seed", type=int, default=0, help="shuffle and rejected-answer seed")
    dt.add_argument(
        "--task",
        choices=["body", "line"],
        default="body",
        help="body: its body, from the def line and docstring; line: its first statement, from the def line "
        "alone (make demo's: a small model can learn it)",
    )
    dt.set_defaults(func=run_demo_tasks)


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-key", default="text", help="jsonl field / parquet column")
    p.add_argument(
        "--txt-split",
        default="blank-line",
        choices=("blank-line", "line", "file"),
        help="how .txt files split into documents",
    )


def _parse_shard(s: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise ZeroLLMError(f"--shard {s!r}: expected i/n, e.g. 0/4.") from None
    if not 0 <= i < n:
        raise ZeroLLMError(f"--shard {s}: needs 0 <= i < n.")
    return i, n


def run_tokenizer_train(args: argparse.Namespace) -> int:
    # stage modules stay local: tokenizers/numpy behind them, kept out of zerollm --help
    from data_pipeline.tokenizer import train_tokenizer
    from data_pipeline.training_corpus import training_texts

    t0 = time.perf_counter()
    texts, nbytes = training_texts(args.inputs, args.text_key, args.txt_split, args.max_mb, args.seed)
    out = train_tokenizer(texts, args.out, args.vocab_size, args.min_frequency)
    secs = time.perf_counter() - t0
    log.info(
        "tokenizer: %s (vocab %d) from %.1f MB in %.1f s (%.2f MB/s)",
        out,
        args.vocab_size,
        nbytes() / 1e6,
        secs,
        nbytes() / 1e6 / max(secs, 1e-9),
    )
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    from data_pipeline.preprocess import preprocess

    r = preprocess(
        args.inputs,
        args.tokenizer,
        args.out_prefix,
        workers=args.workers,
        text_key=args.text_key,
        txt_split=args.txt_split,
        valid_fraction=args.valid_fraction,
        shard=_parse_shard(args.shard),
        skip_bad=args.skip_bad_documents,
        encoder=args.encoder,
    )
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()) if k not in ("documents",))
    log.info(
        "preprocess: %s | encoder %s | %d docs, %d tokens, %.1f MB in %.2f s = %.2f MB/s, %.0f tokens/s | %s",
        " ".join(r.prefixes),
        r.encoder,
        r.documents,
        r.tokens,
        r.input_bytes / 1e6,
        r.seconds,
        r.input_bytes / 1e6 / max(r.seconds, 1e-9),
        r.tokens / max(r.seconds, 1e-9),
        skipped,
    )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from data_pipeline.indexed import merge_datasets

    r = merge_datasets(args.prefixes, args.out_prefix)
    log.info("merged %d datasets -> %s (%d sequences)", len(args.prefixes), args.out_prefix, r["sequences"])
    return 0


def run_demo_corpus(args: argparse.Namespace) -> int:
    from data_pipeline.training_corpus import write_demo_corpus

    path, n, nbytes = write_demo_corpus(args.out_dir, args.max_mb)
    log.info("demo corpus: %s (%d documents, %.1f MB)", path, n, nbytes / 1e6)
    return 0


def run_demo_tasks(args: argparse.Namespace) -> int:
    from data_pipeline.function_tasks import build_tasks

    counts = build_tasks(args.corpus, args.out, args.seed, args.task)
    log.info("demo tasks: %s (%s)", args.out, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
