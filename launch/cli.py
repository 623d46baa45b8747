"""The `zerollm` command: one entry point, one subcommand per stage.

Each subcommand lives beside the code it runs; this file only lists them. A
subcommand module exposes `register(subparsers)`, which adds its parser(s) and sets
`func` on them; `func(args)` returns an exit code. Modules are imported lazily so
`zerollm --help` stays fast and a broken stage cannot break the others.

Errors a user can fix (`ZeroLLMError`) print as one line without a traceback;
`zerollm --debug ...` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from train.errors import ZeroLLMError

# Modules that register subcommands, in the order `zerollm --help` lists them.
# Each must import only light modules at the top (heavy imports go inside `func`).
COMMAND_MODULES = [
    "launch.commands",  # check-config
    "data_pipeline.commands",  # tokenizer train, preprocess, merge-datasets
    "train.commands",  # pretrain, export, resume tools
    "launch.launcher",  # launch (multi-node / Slurm wrapper)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerollm",
        description="From zero to a working language model on DeepSpeed.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that stage is not built yet
                continue
            raise
        module.register(sub)
    return parser


# Friendly shorthands: `zerollm pretrain ARGS` is `zerollm launch pretrain ARGS`; a stage's
# tools (`zerollm reward score ...`) are subcommands of their own, not launches.
ALIASES = {stage: ["launch", stage] for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo")}
STAGE_TOOLS = {("reward", "score")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    tool = tuple(argv[first : first + 2]) in STAGE_TOOLS if first is not None else False
    if first is not None and argv[first] in ALIASES and not tool and "-h" not in argv and "--help" not in argv:
        argv = argv[:first] + ALIASES[argv[first]] + argv[first + 1 :]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not args.command else 2
    try:
        return int(args.func(args) or 0)
    except ZeroLLMError as e:
        if debug:
            raise
        print(f"zerollm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zerollm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
