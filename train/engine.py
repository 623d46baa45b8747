"""The DeepSpeed engine, shared by every training stage (pretrain, SFT, reward, PPO, DPO).

Everything that touches DeepSpeed's setup lives here, so a stage file only runs its
loop:

    init_distributed(timeout_s)               # process groups with bounded timeouts
    ds = resolve_ds_config(path, cfg, world)  # "auto" filled, batch arithmetic checked
    engine = build_engine(cfg, ds, make_model)  # zero.Init under ZeRO-3, act. ckpt wiring
    set_lr(engine, lr)                        # our schedule, driven per optimizer step

A stage that starts from a model (SFT from a pretrain run, PPO's policy from an HF dir):

    src = open_initial_weights("runs/pretrain", overrides={"dropout": 0.1})  # shape from the source
    cfg.model = src.config
    engine = build_engine(cfg, ds, lambda: CustomLanguageModel(src.config), init_from=src)
    ref = build_frozen_engine(lambda: CustomLanguageModel(src.config), ds, init_from=src)

Under ZeRO-3 no rank materialises the whole model: `zero.Init` partitions each module as it
is built, then each rank copies only its slice of each parameter from the source (HF
safetensors are read one tensor at a time); a ZeroLLM checkpoint is consolidated on rank 0
(the whole fp32 state dict, in that one process) and sent one parameter at a time. The
model's random init is skipped when weights are loaded. Peak memory per rank: see
benchmarks/bench_load.py.

Checkpoints (atomic save, verified resume, RNG and data position) are in
`train/checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.config import RunConfig, load_ds_config
from train.errors import ZeroLLMError
from train.model import ModelConfig
from train.pg_timeout import ENV_PG_TIMEOUT, install_pg_timeouts

log = logging.getLogger("zerollm")


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Start (or join) the process group; returns (rank, world_size).

    Every group, including those DeepSpeed creates later, gets `timeout_s`
    (env ZEROLLM_PG_TIMEOUT, default 600 s) instead of torch's 30 minutes, so a
    frozen peer stops the job instead of hanging it.
    """
    import deepspeed
    import torch.distributed as dist

    timeout_s = float(timeout_s or os.environ.get(ENV_PG_TIMEOUT, 600))
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
        SHM_BUFFERS_REMOVED.append(path)
    except FileNotFoundError:  # no shared-memory all-reduce (ranks on several nodes)
        pass


SHM_BUFFERS_REMOVED: list[str] = []  # the /dev/shm names this process removed (the rank log shows them)


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


def build_engine(
    cfg: RunConfig,
    ds: dict[str, Any],
    make_model: Callable[[], torch.nn.Module],
    init_from: InitialWeights | str | Path | None = None,
):
    """Construct the model (inside zero.Init under ZeRO-3) and wrap it with DeepSpeed.

    init_from: weights to start from (see `open_initial_weights`), copied in before
    `deepspeed.initialize` so the optimizer's fp32 master weights are made from them.
    Returns the DeepSpeed engine; the model is `engine.module`.
    """
    import deepspeed

    model = construct_model(ds, make_model, skip_init=init_from is not None)
    if init_from is not None:
        load_initial_weights(model, _as_source(init_from))
    wire_activation_checkpointing(model, cfg, ds)
    if cfg.train.compile:
        model.compile()
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(model, cfg.train.weight_decay),
        config=ds,
    )
    return engine


def construct_model(
    ds: dict[str, Any], make_model: Callable[[], torch.nn.Module], skip_init: bool = False
) -> torch.nn.Module:
    """`make_model()`, inside `deepspeed.zero.Init` when `ds` is ZeRO-3.

    skip_init: the weights are overwritten next (`load_initial_weights`), so the model's
    init pass (`self.apply(_init_weights)`) is skipped; under ZeRO-3 it would gather every
    module in turn, the embedding at full size, only to throw the values away.
    """
    import deepspeed

    skip = _skip_module_apply() if skip_init else contextlib.nullcontext()
    if zero_stage(ds) == 3:
        # No rank ever materialises the whole model: each parameter is partitioned
        # as soon as its module is constructed.
        with deepspeed.zero.Init(config_dict_or_path=ds), skip:
            return make_model()
    with skip:
        return make_model()


@contextlib.contextmanager
def _skip_module_apply():
    """`nn.Module.apply` does nothing inside (nested in zero.Init, it replaces DeepSpeed's
    gathering `apply` and restores it on exit)."""
    original = torch.nn.Module.apply
    torch.nn.Module.apply = lambda self, fn: self
    try:
        yield
    finally:
        torch.nn.Module.apply = original


def build_frozen_engine(
    make_model: Callable[[], torch.nn.Module],
    ds: dict[str, Any],
    init_from: InitialWeights | str | Path | None = None,
    offload_param: bool = False,
):
    """An inference-only engine (PPO/DPO reference or reward model): no optimizer, no
    gradients, `eval()`.

    Takes the training ds_config's batch and precision settings. Under ZeRO-3 the weights
    stay partitioned (gathered layer by layer in forward); `offload_param` keeps this rank's
    partitions in CPU memory (ZeRO-3 only). Other stages give a plain replicated module.
    Call it as the training engine: `logits, _ = engine(idx)`.
    """
    import deepspeed

    frozen = frozen_ds_config(ds, offload_param)
    model = construct_model(frozen, make_model, skip_init=init_from is not None)
    if init_from is not None:
        load_initial_weights(model, _as_source(init_from))
    model.requires_grad_(False)
    model.eval()
    engine, *_ = deepspeed.initialize(model=model, config=frozen)
    engine.eval()
    return engine


def frozen_ds_config(ds: dict[str, Any], offload_param: bool = False) -> dict[str, Any]:
    """`ds` without optimizer, scheduler and gradient settings; ZeRO-3 stays, other stages -> 0."""
    stage = zero_stage(ds)
    if offload_param and stage != 3:
        raise ZeroLLMError(f"offload_param needs zero_optimization.stage 3, the ds_config has {stage}")
    keep = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")
    frozen = {k: copy.deepcopy(ds[k]) for k in keep if k in ds}
    frozen["steps_per_print"] = 10**9
    zero = {"stage": 0}
    if stage == 3:
        zero = {k: v for k, v in ds["zero_optimization"].items() if not k.startswith("offload_")}
        if offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    frozen["zero_optimization"] = zero
    return frozen


# ----------------------------------------------------------------------------- starting weights


@dataclass
class InitialWeights:
    """Weights a stage starts from: a Hugging Face GPT-2/Llama dir or a ZeroLLM run.

    `config` is the source's model config with the caller's overrides; `read(name)` gives
    one of our parameters (full tensor, source dtype); `shape(name)` its shape, cheaply for
    HF dirs. `every_rank`: each rank can read any tensor alone (safetensors); otherwise
    only rank 0 reads (a consolidated checkpoint) and parameters are broadcast.
    `has_head`: the source is a reward model (a reward run, or its export with a
    `score.weight`): `read` gives its trunk by LM names and `read("head.weight")` its
    (1, d_model) scalar head (a PPO critic starts from both).
    """

    path: Path
    kind: str  # "hf" or "run"
    config: ModelConfig
    overridden: dict[str, tuple[Any, Any]]  # field -> (source value, value used)
    read: Callable[[str], torch.Tensor]
    shape: Callable[[str], tuple[int, ...]]
    every_rank: bool
    has_head: bool = False
    origin: str = ""  # the source as the start log names it: "runs/x (ZeroLLM run, step 200)"

    def describe(self) -> str:
        """One line for the start log: the source, the model settings taken from it and those
        the run config overrode, e.g. "model from runs/x (ZeroLLM run, step 200): vocab_size=512
        ... n_layer=2 ...; overridden by the config: dropout 0.1 -> 0.0"."""
        fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in self.overridden]
        taken = " ".join(f"{k}={getattr(self.config, k)}" for k in fields)
        over = ", ".join(f"{k} {a} -> {b}" if a != b else f"{k} {b} (as the source)"
                         for k, (a, b) in self.overridden.items())  # fmt: skip
        return f"model from {self.origin or self.path}: {taken}; overridden by the config: {over or 'nothing'}"


def open_initial_weights(
    path: str | Path, overrides: dict[str, Any] | None = None, tag: str | None = None, engine: str | None = None
) -> InitialWeights:
    """Open an HF model dir (config.json + safetensors) or a ZeroLLM run dir (config.yaml +
    checkpoints/: checkpoint `tag`, default its resume point; `engine` picks one engine of a
    several-engine checkpoint). The model shape comes from the source; `overrides` set
    ModelConfig fields that do not change the weights' shapes (dropout, activation
    checkpointing, ...). Nothing is read but configs and tensor headers until `read`.
    """
    path = Path(path)
    overrides = dict(overrides or {})
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ZeroLLMError(
            f"unknown model field(s) {', '.join(unknown)} to override (valid: {', '.join(sorted(valid))})"
        )
    if (path / "config.json").is_file():
        source = _hf_source(path, overrides)
    elif (path / "config.yaml").is_file():
        source = _run_source(path, overrides, tag, engine)
    else:
        raise ZeroLLMError(f"{path}: neither a Hugging Face model dir (config.json) nor a ZeroLLM run (config.yaml)")
    if _rank() == 0:
        log.info("%s", source.describe())
    return source


def _overridden(base: ModelConfig, cfg: ModelConfig, overrides: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (getattr(base, k), getattr(cfg, k)) for k in overrides}


def _hf_source(path: Path, overrides: dict[str, Any]) -> InitialWeights:
    from train.hf_export import HFTensors, config_from_hf, hf_weight_recipe, read_hf_config

    hf_cfg = read_hf_config(path)
    base, cfg = config_from_hf(hf_cfg), config_from_hf(hf_cfg, **overrides)
    tensors = HFTensors(path)
    try:
        recipe = hf_weight_recipe(cfg, tensors.keys())
    except KeyError as e:
        raise ZeroLLMError(f"{path}: weights lack {e.args[0]!r} for a {cfg.n_layer}-layer {hf_cfg.model_type}") from e

    def read(name: str) -> torch.Tensor:
        keys, fn = recipe[name]
        return fn(*(tensors[k] for k in keys))

    def shape(name: str) -> tuple[int, ...]:
        keys, fn = recipe[name]  # the recipe run on meta tensors: shapes without reading
        return tuple(fn(*(torch.empty(tensors.shape(k), device="meta") for k in keys)).shape)

    over, origin = _overridden(base, cfg, overrides), f"{path} (Hugging Face {hf_cfg.model_type} dir)"
    return InitialWeights(
        path, "hf", cfg, over, read, shape, every_rank=True, has_head="head.weight" in recipe, origin=origin
    )


def _run_source(path: Path, overrides: dict[str, Any], tag: str | None, engine: str | None) -> InitialWeights:
    from train.checkpoint import MANIFEST, checkpoint_folder, consolidated_state_dict
    from train.config import build_section, model_preset, read_yaml

    # Only the model section: the run may be of any stage (its own `sft:` / `reward:` sections).
    raw = read_yaml(path / "config.yaml")
    model = dict(raw.get("model") or {})
    if "preset" in model:  # a snapshot has none; a hand-made config.yaml may
        model = {**model_preset(str(model.pop("preset"))), **model}
    base = build_section(ModelConfig, model, f"{path / 'config.yaml'}: model", "model")
    cfg = dataclasses.replace(base, **overrides)
    folder = checkpoint_folder(path, tag)
    loaded: dict[str, torch.Tensor] = {}

    def state() -> dict[str, torch.Tensor]:
        if not loaded:  # consolidated on first use, by the ranks that read
            sd = consolidated_state_dict(folder, engine)
            loaded.update({k.removeprefix("lm."): v for k, v in sd.items()})  # a reward model's trunk
        return loaded

    def read(name: str) -> torch.Tensor:
        sd = state()
        if name not in sd and name == "lm_head.weight" and cfg.tie_embeddings:
            name = "wte.weight"  # a tied head is stored once
        if name not in sd:
            raise ZeroLLMError(f"{folder}: checkpoint has no {name!r} (is it a run of this model family?)")
        return sd[name]

    over, shape = _overridden(base, cfg, overrides), lambda n: tuple(read(n).shape)
    reward = "reward" in raw  # a reward run (train/reward.py) saved lm.* and head.weight
    origin = f"{path} (ZeroLLM run, step {json.loads((folder / MANIFEST).read_text())['step']})"
    return InitialWeights(folder, "run", cfg, over, read, shape, every_rank=False, has_head=reward, origin=origin)


def _as_source(init_from: InitialWeights | str | Path) -> InitialWeights:
    return init_from if isinstance(init_from, InitialWeights) else open_initial_weights(init_from)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def load_initial_weights(model: torch.nn.Module, source: InitialWeights) -> None:
    """Copy `source` into `model`'s parameters (built by `construct_model`, before
    `deepspeed.initialize`), one parameter at a time.

    ZeRO-3: each rank writes only its partition `p.ds_tensor` (the rank's slice of the
    flattened parameter, zero-padded to a multiple of the group size: DeepSpeed's
    `_partition_param`); a rank-0-only source goes through `GatheredParameters`, one
    parameter gathered at a time. Shapes are checked on rank 0 before anything is copied.
    """
    import deepspeed
    import torch.distributed as dist

    params = list(model.named_parameters())  # a tied head appears once, as wte.weight
    zero3 = any(hasattr(p, "ds_id") for _, p in params)
    rank, world = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    errors = _shape_errors(params, source) if rank == 0 or not zero3 else []
    if zero3 and world > 1:
        box = [errors]
        dist.broadcast_object_list(box, src=0)
        errors = box[0]
    if errors:
        raise ZeroLLMError(f"{source.path}: the model does not match the source: {'; '.join(errors[:5])}")
    with torch.no_grad():
        for name, p in params:
            if not hasattr(p, "ds_id"):
                p.copy_(source.read(name))
            elif source.every_rank and getattr(p, "ds_secondary_tensor", None) is None:
                _fill_partition(p, source.read(name))
            else:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        p.copy_(source.read(name))


def _shape_errors(params: list[tuple[str, torch.nn.Parameter]], source: InitialWeights) -> list[str]:
    errors = []
    for name, p in params:
        want = tuple(getattr(p, "ds_shape", p.shape))
        try:
            got = source.shape(name)
        except (KeyError, ZeroLLMError):
            errors.append(f"{name} is missing")
            continue
        if got != want:
            errors.append(f"{name} is {list(got)} in the source, {list(want)} in the model (an override changed it?)")
    return errors


def _fill_partition(p: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Copy this rank's slice of `full` into ZeRO-3 parameter `p`'s partition."""
    import torch.distributed as dist

    part = p.ds_tensor  # (partition_size,) = ceil(numel / group size)
    start = part.ds_numel * dist.get_rank(group=p.ds_process_group)
    flat = full.reshape(-1)  # (numel,) row-major, as DeepSpeed flattens
    n = max(0, min(part.ds_numel, flat.numel() - start))
    part.narrow(0, 0, n).copy_(flat.narrow(0, start, n))
    part.narrow(0, n, part.ds_numel - n).zero_()  # the padding of the last partition


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


def device_of(where) -> torch.device:
    """The device an engine (DeepSpeed's `.device`), a module (its first parameter's) or a
    device names."""
    if isinstance(where, (torch.device, str)):
        return torch.device(where)
    device = getattr(where, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(where.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(obj, where):
    """`obj` (a tensor, or dicts / lists / tuples holding tensors) with every tensor on the
    device of `where` (see device_of): batches are built on the CPU, engines run on the GPU.
    A no-op for tensors already there."""
    device = device_of(where)
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64 on CPU/GPU)."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    t = torch.tensor(values, dtype=torch.float64, device=get_accelerator().current_device_name())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()
