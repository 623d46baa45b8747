"""`zerollm check-config`: validate a run config and a DeepSpeed config without training."""

from __future__ import annotations

import argparse
import json

from launch.launcher import STAGES, import_stage


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a run config (and a DeepSpeed config) and print the resolved values",
        description='Load RUN.yaml strictly, fill the DeepSpeed config\'s "auto" fields for the '
        "given world size and check the batch arithmetic and its keys; print the result as JSON.",
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument("--deepspeed_config", "--ds", dest="ds_config", help="DeepSpeed JSON config")
    p.add_argument("--world-size", type=int, default=1, help="number of ranks the job will run on")
    p.add_argument("--stage", help="accept this stage's own sections (e.g. sft) and run its input checks")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="run-config override")
    p.set_defaults(func=run_check_config)


def run_check_config(args: argparse.Namespace) -> int:
    # heavy: train.config imports torch (via train.model), kept out of zerollm --help
    from train.config import load_ds_config, load_run_config, parse_overrides

    stage = None
    if args.stage:
        stage = import_stage(STAGES.get(args.stage, args.stage), args.stage)
    sections = getattr(stage, "CONFIG_SECTIONS", None)
    cfg = load_run_config(args.config, parse_overrides(args.set), extra_sections=sections)
    if stage is not None and hasattr(stage, "preflight"):
        stage.preflight(cfg)
    out = {"run_config": cfg.to_dict()}
    if args.ds_config:
        out["deepspeed_config"] = load_ds_config(args.ds_config, cfg, args.world_size)
    print(json.dumps(out, indent=2))
    return 0
