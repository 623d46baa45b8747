"""Will it fit, and how long will it take? Memory and time of a run per rank, before launch.

    est = estimate(cfg, ds, world=8, stage="pretrain", device_bytes=80e9, peak_flops=989e12)
    print(est.table())          # what `zerollm estimate` and every launch's log show
    est.fits, est.advice        # and, when it does not fit, the smallest changes that would

Memory per rank, for each model a stage holds (its roles: PPO's actor, critic, reference and
reward; GRPO's policy and reference; the one model of pretraining, SFT, reward and DPO):

- parameters, gradients and optimizer states by ZeRO stage, as DeepSpeed allocates them
  (U = the rank's fp32 partition of the parameters, 4 * N / world bytes; N the parameters):
    stage 0: weights, full gradients and AdamW's two moments (+ fp32 master weights in bf16/fp16);
    stage 1: weights; full gradients until the boundary; fp32 master partition (1 U, a copy
             even in fp32), AdamW moments (2 U);
    stage 2: as 1 with the gradients reduced into a partition as backward goes;
    stage 3: as 2 with the weights partitioned too, plus the gathered working set (the
             largest layer's full weights and the prefetch bucket);
  CPU offload of the optimizer moves master, moments and gradient partition to host memory;
  offload of the parameters (ZeRO-3) their partitions too.
- the optimizer step's temporaries (stages 1-3): the flattened gradient partition (1 U), its
  fp64 copy for the gradient norm (2 U: DeepSpeed's `get_grad_norm_direct` norms in double)
  and AdamW's foreach square root of the second moment (1 U); stage 0: the square roots (1 U).
- activations: the tensors autograd saves for backward, counted exactly by running the
  model's forward on the meta device (no memory, no compute) for this micro batch, sequence
  length, dtype, dropout and attention kernel (flash-style kernels save the output and its
  log-sum-exp; the math kernel, which CPU runs use with attention dropout, saves the T x T
  probabilities); with activation checkpointing, each block's input plus one block
  recomputed in backward; plus the logits and the loss's fp32 softmax and its gradients.
- buffers: ZeRO's gradient buckets (reduce_bucket_size, 2 with overlap_comm) and, for
  generation, the KV cache of a rollout batch (and under ZeRO-3 the gathered replica the
  rollout generates with, see train/rollout.py).

Peak: on a GPU (`max_memory_allocated`) the most that is live at once, the larger of
forward/backward (states + activations + the gradients made so far) and the optimizer step
(states + gradients + temporaries). On CPU (peak resident set) memory freed in backward stays
in the process heap (glibc keeps it for reuse), so the step's peak adds the activations.

Time per step: `flops_per_token` (6N + attention, `CustomLanguageModel.flops_per_token`) x
tokens per step / (ranks x peak x MFU), with the MFU assumed stated (default 0.4 on a GPU);
without a peak, a measured matmul rate of this machine is used.

Checked against measured runs (not against itself): benchmarks/bench_estimate.py and
tests/train/test_estimate.py run real 1- and 2-rank jobs and compare each rank's measured
peak (`train.memory`) with this estimate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from train.config import RunConfig
from train.engine import zero_stage
from train.model import CustomLanguageModel, ModelConfig

GB = 1e9
# DeepSpeed's shared-memory all-reduce on CPU (csrc/cpu/comm/shm.cpp): a buffer per rank of two
# slots of 1 MiB + 32 MiB; a large all-reduce goes through both slots of every rank's buffer,
# and each page a rank writes or reads counts in its resident set.
SHM_ALLREDUCE_TOUCHED = 2 * (1 + 32) * 2**20
ADAM_MOMENTS = 2  # AdamW keeps exp_avg and exp_avg_sq, fp32, per trained parameter
DEFAULT_MFU = 0.4  # what a well-tuned dense GPT on a modern GPU reaches (stated in the table)


@dataclass
class Part:
    """One line of the table: bytes per rank of one thing one role holds."""

    role: str
    what: str
    bytes: float
    where: str = "device"  # "device" or "host" (offloaded)
    note: str = ""
    phase: str = "always"  # always | fwdbwd (live in forward/backward) | step (in the optimizer step) | rollout


@dataclass
class Estimate:
    parts: list[Part]
    peak_bytes: float  # device memory per rank at the peak
    host_bytes: float  # offloaded bytes per rank (host memory)
    device_kind: str  # "cuda" or "cpu"
    device_bytes: float | None  # memory of one device (None: unknown)
    world: int
    step_s: float | None = None
    run_s: float | None = None
    time_note: str = ""
    advice: list[str] = field(default_factory=list)  # smallest changes that would fit, in order
    notes: list[str] = field(default_factory=list)  # what the estimate could not read

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.peak_bytes <= self.device_bytes

    def table(self) -> str:
        lines = [f"memory per rank ({self.world} ranks, {self.device_kind}):"]
        width = max(len(f"{p.role}: {p.what}") for p in self.parts)
        for p in self.parts:
            where = " (host)" if p.where == "host" else ""
            phase = "" if p.phase == "always" else f" [{PHASES[p.phase]}]"
            note = f"  {p.note}" if p.note else ""
            lines.append(f"  {f'{p.role}: {p.what}':<{width}}  {p.bytes / GB:9.3f} GB{where}{phase}{note}")
        budget = f" of {self.device_bytes / GB:.1f} GB" if self.device_bytes else ""
        verdict = "" if self.device_bytes is None else ("  fits" if self.fits else "  DOES NOT FIT")
        rule = PEAK_RULE[self.device_kind]
        lines.append(f"  {'peak':<{width}}  {self.peak_bytes / GB:9.3f} GB{budget}{verdict}  ({rule})")
        if self.host_bytes:
            lines.append(f"  {'host (offloaded)':<{width}}  {self.host_bytes / GB:9.3f} GB")
        if self.step_s is not None:
            lines.append(
                f"time: {_duration(self.step_s)} per step, {_duration(self.run_s)} for the run ({self.time_note})"
            )
        elif self.time_note:
            lines.append(f"time: {self.time_note}")
        if self.advice:
            lines.append("would fit with: " + "; or ".join(self.advice))
        lines += [f"note: {n}" for n in dict.fromkeys(self.notes)]
        return "\n".join(lines)


PHASES = {"fwdbwd": "forward/backward", "step": "optimizer step", "rollout": "rollout"}
PEAK_RULE = {
    "cuda": "all lines without a [phase] + the largest phase",
    "cpu": "all lines without a [phase] + forward/backward + the larger of step and rollout: the CPU heap keeps "
    "what backward freed",
}


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 1:
        return f"{1000 * s:.3g} ms"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ----------------------------------------------------------------------------- activations


class _FlashLike(torch.autograd.Function):
    """Stands in for a flash / memory-efficient attention kernel on the meta device: saves
    what those kernels save for backward (q, k, v, the output, fp32 log-sum-exp per query)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace only counts
        raise NotImplementedError


class _EmbeddingLike(torch.autograd.Function):
    """An embedding lookup on the meta device that saves what torch's saves (the indices),
    without its reference implementation (which imports torch._decomp: a second or more)."""

    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx)
        return weight.new_empty(*idx.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad):  # never run: the trace only counts
        raise NotImplementedError


def _dropout_like(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """torch's CPU dropout (`input * noise`, the noise saved) without bernoulli_ on meta."""
    if p == 0.0 or not training:
        return x
    return x * torch.empty_like(x)


def _math_attention_like(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch's math SDPA kernel (`_scaled_dot_product_attention_math`) op for op, so autograd
    saves the same tensors: scaled q and k^T, the softmax output, the dropout noise and the
    dropped probabilities (each B x H x T x T), v."""
    factor = (scale if scale is not None else q.size(-1) ** -0.5) ** 0.5
    query = q * factor
    if is_causal:
        attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    attn = torch.matmul(query, k.transpose(-2, -1) * factor)
    if attn_mask is not None:
        attn.add_(attn_mask)
    attn = torch.softmax(attn, -1)
    attn = _dropout_like(attn, dropout_p)
    return torch.matmul(attn, v)


@contextlib.contextmanager
def _meta_kernels(flash: bool):
    """Inside: attention runs as a flash-style kernel (`flash`) or op for op as torch's math
    kernel, embeddings and dropout as the stand-ins above; each saves for backward what the
    real kernel saves (tests/train/test_estimate.py compares with a real CPU forward)."""
    F = torch.nn.functional
    saved = {n: getattr(F, n) for n in ("scaled_dot_product_attention", "embedding", "dropout")}

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if flash:
            return _FlashLike.apply(q, k, v)
        return _math_attention_like(q, k, v, attn_mask, dropout_p, is_causal, **kw)

    F.scaled_dot_product_attention = sdpa
    F.embedding = lambda idx, weight, *a, **k: _EmbeddingLike.apply(idx, weight)
    F.dropout = _dropout_like
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(F, n, fn)


@contextlib.contextmanager
def _no_init():
    """torch.nn.init's fills do nothing inside: on the meta device they would only cost time
    (their reference implementations import torch._refs, seconds on the first call)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def flash_attention(device_kind: str, dropout: float) -> bool:
    """Whether training attention runs a flash-style kernel: always on a GPU; on CPU only
    without attention dropout (torch's CPU flash kernel has none; the math kernel runs)."""
    return device_kind == "cuda" or dropout == 0.0


REAL_TRACE_BYTES = 64 * 2**20  # a forward this small runs for real on the CPU instead (no meta set-up)


def saved_activation_bytes(
    model: ModelConfig,
    batch: int,
    seq: int,
    dtype: torch.dtype,
    flash: bool,
    lm_head: bool = True,
    device: str | None = None,
) -> int:
    """Bytes autograd saves in one training forward (with the loss), parameters excluded;
    tensors sharing storage count once. lm_head=False: the trunk only (a reward model or
    critic reads a scalar head instead).

    The model is built (uninitialised) and run on the meta device: no memory, no compute,
    but about a second the first time in a process (torch's reference kernels import dynamo).
    A forward under REAL_TRACE_BYTES whose attention kernel the CPU would pick anyway (flash
    exactly when there is no dropout) runs on the CPU instead, in milliseconds; both give
    the same bytes (tests/train/test_estimate.py)."""
    cfg = dataclasses.replace(model, activation_checkpointing=False, max_seq_len=max(model.max_seq_len, seq))
    if device is None:
        device = (
            "cpu" if flash == (cfg.dropout == 0.0) and _forward_bytes(cfg, batch, seq) < REAL_TRACE_BYTES else "meta"
        )
    with torch.device(device), _no_init():
        m = CustomLanguageModel(cfg).to(dtype)
    m.train()
    params = {p.untyped_storage()._cdata for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in params:
            seen.setdefault(s._cdata, s.nbytes())
        return t

    idx = torch.zeros(batch, seq, dtype=torch.long, device=device)
    # on the CPU, dropout draws from torch's RNG: the caller's stream is left as it was
    kernels = _meta_kernels(flash) if device == "meta" else torch.random.fork_rng(devices=[])
    with kernels, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(idx, idx) if lm_head else m.hidden_states(idx)
    return sum(seen.values())


def _forward_bytes(cfg: ModelConfig, batch: int, seq: int) -> float:
    """A generous bound (fp32) of the weights and activations of a real forward of `cfg`."""
    n = batch * seq
    per_layer = n * (12 * cfg.d_model + 4 * cfg.ffn_dim) + batch * cfg.n_head * seq * seq
    return 4 * (parameter_count(cfg) + cfg.n_layer * per_layer + 3 * n * cfg.padded_vocab_size)


def activation_bytes(
    model: ModelConfig,
    batch: int,
    seq: int,
    dtype: torch.dtype,
    device_kind: str,
    checkpointing: bool,
    lm_head: bool = True,
) -> tuple[int, int, str]:
    """(saved for backward, loss transient, note) of one micro batch.

    Saved: the meta trace of the whole model, or with checkpointing: the trace without the
    blocks (embeddings, final norm, head, loss) + each block's input + one block (the one
    recomputed in backward). Transient: the logits (model dtype) and, at the start of
    backward, the gradients of the fp32 log-softmax and of the logits."""
    flash = flash_attention(device_kind, model.dropout)
    one = saved_activation_bytes(dataclasses.replace(model, n_layer=1), batch, seq, dtype, flash, lm_head)
    two = saved_activation_bytes(dataclasses.replace(model, n_layer=2), batch, seq, dtype, flash, lm_head)
    per_block, rest = two - one, 2 * one - two
    width = torch.empty((), dtype=dtype).element_size()
    if checkpointing:
        saved = rest + model.n_layer * batch * seq * model.d_model * width + per_block
    else:
        saved = rest + model.n_layer * per_block
    logits = batch * seq * model.vocab_size if lm_head else 0
    transient = logits * width + 2 * logits * 4
    kernel = "flash-style attention" if flash else "math attention (T x T saved)"
    return saved, transient, f"{kernel}{', checkpointed blocks' if checkpointing else ''}"


# ----------------------------------------------------------------------------- model states


@dataclass
class Role:
    """One model a stage holds."""

    name: str  # "model", "actor", "critic", "reference", "reward"
    config: ModelConfig
    trains: bool
    head: int = 0  # extra parameters of a scalar head (reward model / critic)


def parameter_count(model: ModelConfig, head: int = 0) -> int:
    return CustomLanguageModel.num_parameters(_Shape(model)) + head


class _Shape:
    """What `CustomLanguageModel`'s counting methods read (`self.cfg`), without building it."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    _block_params = CustomLanguageModel._block_params
    _norm_params = CustomLanguageModel._norm_params


def largest_layer(model: ModelConfig) -> int:
    """Parameters of the largest module ZeRO-3 gathers at once (the embedding or a block)."""
    return max(model.padded_vocab_size * model.d_model, CustomLanguageModel._block_params(_Shape(model)))


def role_parts(role: Role, ds: dict[str, Any], world: int, wbytes: int, device_kind: str) -> list[Part]:
    """Parameters, gradients, optimizer states, step temporaries and buckets of one role."""
    zero = ds.get("zero_optimization", {}) or {}
    stage = zero_stage(ds) if role.trains else (3 if zero_stage(ds) == 3 else 0)  # frozen: ZeRO-3 or a replica
    n = parameter_count(role.config, role.head)
    u = 4 * n / world  # the rank's fp32 partition
    opt_where = "host" if (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme") else "device"
    param_where = "host" if (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme") else "device"
    r, parts = role.name, []
    if role.trains and stage == 3 and world > 1 and device_kind == "cpu":
        # measured: ZeRO-3's runs on several CPU ranks touch them all; stages 0-2 showed no such term
        parts.append(Part(r, "shared-memory all-reduce buffers", SHM_ALLREDUCE_TOUCHED * min(world, 8),
                          note="DeepSpeed's CPU all-reduce: its own and its peers' pages"))  # fmt: skip
    if stage == 3:
        parts.append(Part(r, "parameters (partition)", wbytes * n / world, param_where, f"ZeRO-3, 1/{world}"))
        parts.append(Part(r, "gathered parameters", wbytes * gathered_parameters(role.config, zero, n),
                          note=gathered_note(zero, n)))  # fmt: skip
    else:
        parts.append(Part(r, "parameters", wbytes * n))
    if not role.trains:
        return parts
    if stage == 0:
        parts.append(Part(r, "gradients", wbytes * n))
        if wbytes != 4:
            parts.append(Part(r, "fp32 master weights", 4 * n))
        parts.append(Part(r, "AdamW moments", ADAM_MOMENTS * 4 * n))
        parts.append(Part(r, "optimizer step temporaries", 4 * n, phase="step", note="AdamW's foreach sqrt"))
        return parts
    if stage == 1:  # full gradients until the accumulation boundary
        parts.append(Part(r, "gradients (full)", wbytes * n))
    else:
        parts.append(Part(r, "gradients (partition)", wbytes * n / world, opt_where))
    parts.append(Part(r, "fp32 master partition", u, opt_where))
    parts.append(Part(r, "AdamW moments (partition)", ADAM_MOMENTS * u, opt_where))
    parts.append(Part(r, "optimizer step temporaries", 4 * u, opt_where, "flat grads, fp64 norm copy, sqrt", "step"))
    buckets = _bucket(zero, "reduce_bucket_size", 5e8) * (2 if zero.get("overlap_comm") else 1)
    parts.append(Part(r, "gradient buckets", wbytes * buckets, note="reduce_bucket_size"))
    if stage == 3 and world > 1 and device_kind == "cpu":
        parts.append(Part(r, "all-gather staging", wbytes * n, phase="fwdbwd",
                          note="measured: gloo's CPU all-gather copies through its own buffers"))  # fmt: skip
    if stage >= 2 and device_kind == "cpu":
        parts.append(Part(r, "gradients before reduce-scatter", wbytes * n, phase="fwdbwd",
                          note="full size as backward makes them; freed, but kept in the CPU heap"))  # fmt: skip
    return parts


def gathered_parameters(model: ModelConfig, zero: dict[str, Any], n: int) -> float:
    """Parameters a ZeRO-3 rank holds gathered (whole) at once. DeepSpeed releases a gathered
    parameter after use only when its next use is further than stage3_max_reuse_distance
    parameters away; in forward the next use is in backward, about 2N away, so a reuse
    distance of at least that keeps every parameter gathered up to stage3_max_live_parameters.
    Otherwise: the largest layer and the prefetch bucket."""
    reuse = _bucket(zero, "stage3_max_reuse_distance", 1e9)
    live = _bucket(zero, "stage3_max_live_parameters", 1e9)
    if reuse >= 2 * n:
        return min(n, live)
    return largest_layer(model) + _bucket(zero, "stage3_prefetch_bucket_size", 0)


def gathered_note(zero: dict[str, Any], n: int) -> str:
    if _bucket(zero, "stage3_max_reuse_distance", 1e9) >= 2 * n:
        return "stage3_max_reuse_distance >= 2N: kept gathered until backward (min(N, max_live_parameters))"
    return "largest layer + prefetch bucket"


def _bucket(zero: dict[str, Any], key: str, default: float) -> float:
    value = zero.get(key, default)
    return float(value) if isinstance(value, (int, float)) else default


# ----------------------------------------------------------------------------- the estimate


def estimate(
    cfg: RunConfig,
    ds: dict[str, Any],
    world: int,
    stage: str = "pretrain",
    device_kind: str | None = None,
    device_bytes: float | None = None,
    peak_flops: float | None = None,
    mfu: float | None = None,
    timed: bool = True,
) -> Estimate:
    """The estimate of one run (`ds` resolved for `world` ranks, see `load_ds_config`)."""
    device_kind = device_kind or ("cuda" if torch.cuda.is_available() else "cpu")
    t = cfg.train
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[t.precision]
    wbytes = torch.empty((), dtype=dtype).element_size()
    notes: list[str] = []
    roles, batch, seq, gen = stage_roles(cfg, stage, notes)
    parts: list[Part] = []
    for role in roles:
        parts += role_parts(role, ds, world, wbytes, device_kind)
    trained = [r for r in roles if r.trains]
    checkpointing = bool(
        t.activation_checkpointing or cfg.model.activation_checkpointing or "activation_checkpointing" in ds
    )
    stage_n = zero_stage(ds)
    for role in trained:  # one trains at a time (PPO: actor, then critic), but both leave heap behind on CPU
        # CPU, ZeRO-0/1: backward makes each parameter's gradient between the recomputed blocks'
        # activations, so the heap grows to the un-checkpointed size (measured; a GPU frees them)
        interleaved = checkpointing and device_kind == "cpu" and stage_n <= 1
        saved, transient, note = activation_bytes(
            role.config, batch, seq, dtype, device_kind, checkpointing and not interleaved, lm_head=not role.head
        )
        if interleaved:
            note += ", checkpointed blocks (no saving in a CPU heap at ZeRO-0/1)"
        parts.append(Part(role.name, "activations", saved, note=f"micro batch {batch} x {seq}, {note}", phase="fwdbwd"))
        if transient:
            parts.append(Part(role.name, "logits and loss", transient, phase="fwdbwd"))
    if gen is not None:
        rows, length = gen
        policy = trained[0].config
        kv = 2 * policy.n_layer * rows * length * policy.kv_heads * policy.head_dim * wbytes
        parts.append(Part(trained[0].name, "KV cache (rollout)", kv, note=f"{rows} rows x {length}", phase="rollout"))
        if stage_n == 3:
            parts.append(Part(trained[0].name, "gathered replica (rollout)", wbytes * parameter_count(policy),
                              note="ZeRO-3: generates with whole weights", phase="rollout"))  # fmt: skip
    peak = peak_of(parts, device_kind)
    host = sum(p.bytes for p in parts if p.where == "host")
    est = Estimate(parts, peak, host, device_kind, device_bytes, world, notes=notes)
    if timed:
        _add_time(est, cfg, roles, seq, world, peak_flops, mfu, device_kind, checkpointing)
        if gen is not None and est.step_s is not None:
            est.time_note += "; rollout generation not included"
    if not est.fits:
        est.advice = fitting_changes(cfg, ds, world, stage, device_kind, device_bytes)
    return est


def peak_of(parts: list[Part], device_kind: str) -> float:
    """Device bytes at the peak (see the module doc: GPU live maximum, CPU heap retention)."""
    dev = [p for p in parts if p.where == "device"]
    always = sum(p.bytes for p in dev if p.phase == "always")
    fwdbwd = sum(p.bytes for p in dev if p.phase == "fwdbwd")
    step = sum(p.bytes for p in dev if p.phase == "step")
    rollout = sum(p.bytes for p in dev if p.phase == "rollout")
    if device_kind == "cpu":
        return always + fwdbwd + max(step, rollout)
    return always + max(fwdbwd, step, rollout)


def stage_roles(
    cfg: RunConfig, stage: str, notes: list[str] | None = None
) -> tuple[list[Role], int, int, tuple[int, int] | None]:
    """(roles, micro batch rows, sequence length, (rollout rows, rollout length) or None);
    `notes` gets a line for each starting model that could not be read."""
    notes = [] if notes is None else notes
    t, model = cfg.train, cfg.model
    if stage == "pretrain":
        return [Role("model", model, True)], t.micro_batch_size, cfg.data.seq_len, None
    sec = cfg.sections.get(stage)
    src = _source_config(getattr(sec, "init_from", ""), model, notes)
    if stage == "sft":
        return [Role("model", src, True)], t.micro_batch_size, sec.max_len, None
    if stage == "reward":
        return [Role("model", src, True, head=src.d_model)], 2 * t.micro_batch_size, sec.max_len, None
    if stage == "dpo":
        return [Role("policy", src, True)], 2 * t.micro_batch_size, sec.max_len, None
    length = sec.max_prompt_len + sec.max_new_tokens
    if stage == "grpo":
        roles = [Role("policy", src, True)]
        if sec.beta:
            roles.append(Role("reference", src, False))
        return roles, t.micro_batch_size, length, (t.micro_batch_size, length)
    if stage == "ppo":
        critic = (
            _source_config(sec.critic_from or sec.reward_model, src, notes)
            if (sec.critic_from or sec.reward_model)
            else src
        )
        roles = [Role("actor", src, True), Role("critic", critic, True, head=critic.d_model),
                 Role("reference", src, False)]  # fmt: skip
        if sec.reward_model and ":" not in sec.reward_model:
            rm = _source_config(sec.reward_model, src, notes)
            roles.append(Role("reward", rm, False, head=rm.d_model))
        return roles, t.micro_batch_size, length, (t.micro_batch_size, length)
    raise ValueError(f"no estimate for stage {stage!r}")


def _source_config(path: str, fallback: ModelConfig, notes: list[str]) -> ModelConfig:
    """The model shape a stage takes from its starting weights (configs only are read)."""
    if not path:
        return fallback
    import logging

    from train.engine import open_initial_weights

    quiet = logging.getLogger("zerollm")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the source's "model from ..." line belongs to the run's log
    try:
        return open_initial_weights(path).config
    except Exception as e:  # noqa: BLE001 (a missing source is the stage's own preflight error)
        notes.append(f"{path}: not readable ({e}); its shape is taken from the config's model section")
        return fallback
    finally:
        quiet.setLevel(level)


# ----------------------------------------------------------------------------- time


def step_flops_per_token(roles: list[Role], seq: int, checkpointing: bool) -> float:
    """Training FLOPs per token of one step: each trained role's flops_per_token (forward +
    backward), x 4/3 with activation checkpointing (the forward runs again in backward), and
    each frozen role's forward (a third). Rollout generation is not counted."""
    total = 0.0
    for r in roles:
        f = CustomLanguageModel.flops_per_token(_Shape(r.config), seq)
        total += f * (4 / 3 if checkpointing else 1.0) if r.trains else f / 3
    return total


def _add_time(est, cfg, roles, seq, world, peak_flops, mfu, device_kind, checkpointing) -> None:
    t = cfg.train
    tokens = t.micro_batch_size * t.grad_accum_steps * seq * world
    flops = step_flops_per_token(roles, seq, checkpointing) * tokens
    if peak_flops:
        mfu = mfu or DEFAULT_MFU
        est.time_note = f"{flops / tokens:.3g} FLOPs/token at MFU {mfu:.2f} of {peak_flops / 1e12:g} TFLOP/s per rank"
    elif device_kind == "cuda" and not torch.cuda.is_available():
        est.time_note = "no time: give the GPU's --peak-tflops"
        return
    else:
        peak_flops, mfu = measured_matmul_flops(device_kind), mfu or 1.0
        est.time_note = (f"{flops / tokens:.3g} FLOPs/token at MFU {mfu:.2f} of this machine's measured "
                         f"matmul rate, {peak_flops / 1e9:.1f} GFLOP/s per rank")  # fmt: skip
    est.step_s = flops / (world * peak_flops * mfu)
    est.run_s = est.step_s * t.max_steps


@functools.cache
def measured_matmul_flops(device_kind: str = "cpu", n: int = 512, seconds: float = 0.1) -> float:
    """FLOP/s of an n x n matmul on this process's threads (CPU, fp32) or its GPU (bf16)."""
    dev, dtype = ("cuda", torch.bfloat16) if device_kind == "cuda" else ("cpu", torch.float32)
    if dev == "cuda":
        n *= 8
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    if dev == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * done / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- advice


def fitting_changes(cfg, ds, world, stage, device_kind, device_bytes) -> list[str]:
    """The smallest single changes (in this order) that bring the peak under `device_bytes`."""
    zero = dict(ds.get("zero_optimization") or {})
    tried: list[tuple[str, RunConfig, dict]] = []
    if not (cfg.train.activation_checkpointing or cfg.model.activation_checkpointing):
        ckpt = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=True))
        tried.append(("train.activation_checkpointing: true", ckpt, ds))
    if int(zero.get("stage", 0)) < 3:
        tried.append(("ZeRO-3 (zero_optimization.stage 3)", cfg, {**ds, "zero_optimization": {**zero, "stage": 3}}))
    if not zero.get("offload_optimizer"):
        offload = {**zero, "stage": max(int(zero.get("stage", 0)), 1), "offload_optimizer": {"device": "cpu"}}
        tried.append(("offload_optimizer to cpu", cfg, {**ds, "zero_optimization": offload}))
    mb, gas = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    while mb > 1:
        mb, gas = mb // 2, gas * 2
        smaller = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, micro_batch_size=mb, grad_accum_steps=gas)
        )
        tried.append((f"micro_batch_size {mb} x grad_accum_steps {gas}", smaller, ds))
    out = []
    for what, c, d in tried:
        if estimate(c, d, world, stage, device_kind, None, timed=False).peak_bytes <= device_bytes:
            out.append(what)
            if len(out) == 3:
                break
    return out or ["nothing single: combine ZeRO-3, offload and activation checkpointing, or add ranks"]


# ----------------------------------------------------------------------------- commands


def parse_bytes(text: str) -> float:
    """ "80GB", "80GiB", "141 GB", "80" (GB) -> bytes."""
    t = text.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "TB": 1e12, "GB": 1e9, "MB": 1e6, "T": 1e12, "G": 1e9, "M": 1e6}
    for unit, scale in units.items():
        if t.endswith(unit):
            return float(t[: -len(unit)]) * scale
    return float(t) * GB


def host_available_bytes() -> float | None:
    """MemAvailable of this machine (ranks on one CPU node share it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        return None
    return None


def device_budget(device_kind: str, ranks_per_node: int, given: float | None) -> tuple[float | None, str]:
    """Memory one rank may use: the given size, this GPU's, or on CPU the node's available
    memory shared by its ranks; and where the number came from."""
    if given:
        return given, "given"
    if device_kind == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
    if device_kind == "cpu":
        avail = host_available_bytes()
        if avail:
            return avail / max(1, ranks_per_node), f"this node's available memory / {ranks_per_node} ranks"
    return None, "unknown"


def stage_of_config(path: str) -> str:
    """The stage a run config is for: its own section (sft:, reward:, dpo:, ppo:, grpo:), else pretrain."""
    from train.config import read_yaml

    raw = read_yaml(path) or {}
    return next((s for s in ("ppo", "grpo", "dpo", "reward", "sft") if s in raw), "pretrain")


def not_fitting_error(est: Estimate, where: str) -> str:
    """The one line a launch stops with when the estimate does not fit."""
    return (f"{where}: estimated peak {est.peak_bytes / GB:.2f} GB per rank > {est.device_bytes / GB:.2f} GB "
            f"of device memory; would fit with: {'; or '.join(est.advice)} "
            "(zerollm estimate shows the table; --skip_memory_check launches anyway)")  # fmt: skip
