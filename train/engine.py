"""The DeepSpeed engine, shared by every training stage (pretrain, SFT, reward, PPO, DPO).

Everything that touches DeepSpeed's setup lives here, so a stage file only runs its
loop:

    init_distributed(timeout_s)               # process groups with bounded timeouts
    ds = resolve_ds_config(path, cfg, world)  # "auto" filled, batch arithmetic checked
    engine = build_engine(cfg, ds, make_model)  # zero.Init under ZeRO-3, act. ckpt wiring
    set_lr(engine, lr)                        # our schedule, driven per optimizer step

Checkpoints (atomic save, verified resume, RNG and data position) are in
`train/checkpoint.py`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from train.config import RunConfig, load_ds_config
from train.errors import ZeroLLMError

log = logging.getLogger("zerollm")

EXIT_PREEMPTED = 75  # graceful stop after SIGTERM / SIGUSR1: checkpoint saved, resume later
EXIT_BAD_LOSS = 3  # too many consecutive NaN/inf losses


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Start (or join) the process group; returns (rank, world_size).

    Every group, including those DeepSpeed creates later, gets `timeout_s`
    (env ZEROLLM_PG_TIMEOUT, default 600 s) instead of torch's 30 minutes, so a
    frozen peer stops the job instead of hanging it.
    """
    import deepspeed
    import torch.distributed as dist

    timeout_s = float(timeout_s or os.environ.get("ZEROLLM_PG_TIMEOUT", 600))
    try:
        from launch.watchdog import install_pg_timeouts
    except ImportError:  # the launch layer is optional for library use
        install_pg_timeouts = None
    if install_pg_timeouts is not None:
        install_pg_timeouts(timeout_s)
    if not dist.is_initialized():
        # Run without a launcher (python -m train.pretrain): a single local rank.
        single = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
        for var, value in single.items():
            os.environ.setdefault(var, value)
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    _unlink_shm_buffer(rank, world)
    return rank, world


def _unlink_shm_buffer(rank: int, world: int) -> None:
    """Remove DeepSpeed's CPU all-reduce buffer name from /dev/shm once every rank has it.

    DeepSpeed's shared-memory all-reduce (CPU, all ranks on one machine) creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, ~69 MB per rank,
    and never removes it: 15 GB of them had filled /dev/shm here after a day of runs.
    When init returns, this rank has mapped every peer's buffer; after a barrier every
    peer has mapped this one, so the name can go. The mappings stay valid and the
    memory is freed when the last process exits.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":  # the same answer on every rank
        return  # GPU collectives: no such buffer (and no barrier before the device is set)
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    if world > 1:
        dist.barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:  # no shared-memory all-reduce (ranks on several nodes)
        pass


def resolve_ds_config(path: str, cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed dict for this run: "auto" filled from `cfg`, batch checked."""
    ds = load_ds_config(path, cfg, world_size)
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ZeroLLMError(f"{cfg.path}: train.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (weights of Linear/Embedding); not biases or norm gains (as GPT-2/nanoGPT)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Under ZeRO-3 a parameter is a 0-size placeholder; ds_shape is its real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(cfg: RunConfig, ds: dict[str, Any], make_model: Callable[[], torch.nn.Module]):
    """Construct the model (inside zero.Init under ZeRO-3) and wrap it with DeepSpeed.

    Returns the DeepSpeed engine; the model is `engine.module`.
    """
    import deepspeed

    if zero_stage(ds) == 3:
        # No rank ever materialises the whole model: each parameter is partitioned
        # as soon as its module is constructed.
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = make_model()
    else:
        model = make_model()
    wire_activation_checkpointing(model, cfg, ds)
    if cfg.train.compile:
        model.compile()
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(model, cfg.train.weight_decay),
        config=ds,
    )
    return engine


def wire_activation_checkpointing(model: torch.nn.Module, cfg: RunConfig, ds: dict[str, Any]) -> None:
    """Recompute each block in backward, via DeepSpeed's checkpointing when the ds_config
    has an `activation_checkpointing` section (partitioning, CPU checkpointing), else torch's."""
    if "activation_checkpointing" in ds:
        import deepspeed

        deepspeed.checkpointing.configure(None, deepspeed_config=ds)
        model.set_activation_checkpointing(deepspeed.checkpointing.checkpoint)
    elif cfg.train.activation_checkpointing or cfg.model.activation_checkpointing:
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        model.set_activation_checkpointing(partial(checkpoint, use_reentrant=False))


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every param group (our schedule owns the lr)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64 on CPU/GPU)."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    t = torch.tensor(values, dtype=torch.float64, device=get_accelerator().current_device_name())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()
