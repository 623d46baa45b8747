"""`zerollm pretrain` / `sft` / `reward`, `zerollm export`, `zerollm checkpoint universal` (light at import)."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from train.errors import ZeroLLMError

log = logging.getLogger("zerollm")


STAGE_HELP = {
    "pretrain": "pretrain",
    "sft": "supervised fine-tuning on chat data",
    "reward": "train a reward model on preference pairs",
}


def register(sub: argparse._SubParsersAction) -> None:
    # `zerollm STAGE ARGS` is rewritten to `zerollm launch STAGE ARGS` (launch/cli.py ALIASES);
    # these parsers only show the stages in `zerollm --help`.
    for stage, what in STAGE_HELP.items():
        p = sub.add_parser(
            stage,
            help=f"{what} (same as `zerollm launch {stage} ...`, e.g. --config R.yaml --ds ds_configs/zero2.json)",
            description=f"Run train.{stage} under the deepspeed launcher; every option of `zerollm launch` "
            "applies (see `zerollm launch --help`). Re-running resumes from the last checkpoint.",
        )
        p.set_defaults(func=lambda args: 0)

    p = sub.add_parser("export", help="export a checkpoint to a Hugging Face model directory")
    p.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the resume point)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir to copy (default: data.tokenizer)")
    p.set_defaults(func=run_export)

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    u = csub.add_parser(
        "universal",
        help="convert a checkpoint to DeepSpeed's universal format (resume on another world size / ZeRO stage)",
    )
    u.add_argument("run_dir")
    u.add_argument("--tag", default=None, help="checkpoint tag (default: the resume point)")
    u.set_defaults(func=run_universal)


def run_universal(args: argparse.Namespace) -> int:
    # heavy: train.checkpoint/config/model/hf_export import torch, kept out of zerollm --help
    from train.checkpoint import convert_to_universal

    out = convert_to_universal(args.run_dir, args.tag)
    print(out)
    return 0


def load_checkpoint_model(run_dir: str, tag: str | None = None, engine: str | None = None):
    """(model, run_config) from a DeepSpeed checkpoint of any ZeRO stage, fp32 weights.

    `engine` names one engine of a checkpoint that holds several (policy, value, ...).
    """
    from train.checkpoint import checkpoint_folder, consolidated_state_dict
    from train.config import load_run_config
    from train.model import CustomLanguageModel

    cfg = load_run_config(Path(run_dir) / "config.yaml")
    folder = checkpoint_folder(run_dir, tag)
    model = CustomLanguageModel(cfg.model)
    sd = consolidated_state_dict(folder, engine)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # A tied head has no entry of its own in ZeRO's consolidated state dict.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise ZeroLLMError(f"{folder}: checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model, cfg


def run_export(args: argparse.Namespace) -> int:
    from train.hf_export import export_hf

    model, cfg = load_checkpoint_model(args.run_dir, args.tag)
    out = Path(args.out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf(model, cfg.model, tmp, tokenizer_dir=args.tokenizer or cfg.data.tokenizer or None)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(out)
    return 0
