"""`zerollm check-config`: validate a run config and a DeepSpeed config without training;
`zerollm estimate`: its memory per rank and time, before launch (train/estimate.py)."""

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

    p = sub.add_parser(
        "estimate",
        help="memory per rank and time of a run, before launch: will it fit?",
        description="Per rank: parameters, gradients and optimizer states by ZeRO stage, precision and "
        "offload; activations of the micro batch (meta-device trace of the model, activation "
        "checkpointing); buckets and temporaries; for post-training, every role and the rollout KV "
        "cache. The peak against the device's memory (when it does not fit, the smallest changes that "
        "would), and the time per step and run from flops_per_token at a stated MFU. Exit 1 when it "
        "does not fit.",
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--deepspeed_config", "--ds", dest="ds_config", required=True, help="DeepSpeed JSON config")
    p.add_argument("--num_gpus", "--num_accelerators", type=int, default=1, help="ranks per node")
    p.add_argument("--num_nodes", type=int, default=1, help="nodes")
    p.add_argument("--stage", help="pretrain, sft, reward, dpo, ppo, grpo (default: from the config's sections)")
    p.add_argument("--gpu-memory", "--gpu_memory", dest="gpu_memory", help='one device\'s memory, e.g. "80GB"')
    p.add_argument("--peak-tflops", "--peak_tflops", dest="peak_tflops", type=float,
                   help="one device's peak TFLOP/s (default: a measured matmul rate of this machine)")  # fmt: skip
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation assumed (default 0.4 with a peak)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="what the ranks run on (default: cuda when "
                   "this machine has one or --gpu-memory is given, else cpu)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="run-config override")
    p.set_defaults(func=run_estimate)


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


def run_estimate(args: argparse.Namespace) -> int:
    import torch

    from train.config import load_ds_config, load_run_config, parse_overrides
    from train.estimate import device_budget, estimate, parse_bytes, stage_of_config

    stage_name = args.stage or stage_of_config(args.config)
    stage = import_stage(STAGES.get(stage_name, stage_name), stage_name)
    cfg = load_run_config(
        args.config, parse_overrides(args.set), extra_sections=getattr(stage, "CONFIG_SECTIONS", None)
    )
    world = args.num_gpus * args.num_nodes
    ds = load_ds_config(args.ds_config, cfg, world)
    kind = args.device or ("cuda" if torch.cuda.is_available() or args.gpu_memory else "cpu")
    budget, source = device_budget(kind, args.num_gpus, parse_bytes(args.gpu_memory) if args.gpu_memory else None)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else cfg.logging.peak_flops or None
    est = estimate(cfg, ds, world, stage_name, kind, budget, peak, args.mfu)
    print(f"zerollm estimate: {stage_name}, {args.config} with {args.ds_config}; device memory: {source}")
    print(est.table())
    return 0 if est.fits else 1
