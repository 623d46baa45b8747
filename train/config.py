"""Run configuration: one YAML file -> typed dataclasses, plus the DeepSpeed JSON.

A run config has four sections (`model`, `data`, `train`, `logging`); each maps to
one dataclass below and each function receives only the piece it uses. Loading is
strict: an unknown key, a wrong type or an out-of-range value raises `ConfigError`
with one line naming the file and the dotted key.

A post-training stage adds its own sections the same way: its module holds
`CONFIG_SECTIONS = {"sft": SFTConfig}` (a dataclass whose optional class attribute
`RANGES = {"key": (lo, hi)}` bounds its numbers) and passes it as `extra_sections`;
the result is `cfg.sections["sft"]` (also `cfg.sft`). A section no stage asked for is
still an "unknown section" error.

The DeepSpeed config is passed through as the user wrote it, except fields whose
value is the string "auto", which are filled from the run config (the convention
users know from Hugging Face). Its keys are checked against the ones DeepSpeed reads
(DeepSpeed ignores an unknown top-level key and rejects an unknown nested one only
once every rank started). Batch arithmetic
`train_batch_size = micro_batch * grad_accum * world_size` is checked before any
rank starts.

    cfg = load_run_config("configs/tiny.yaml", parse_overrides(["train.lr=1e-3"]))
    ds = load_ds_config("ds_configs/zero2.json", cfg, world_size=2)

Input checks shared by the stages and `zerollm launch`'s pre-flight:
`check_token_data(cfg)` (the .bin/.idx prefixes of `data:`) and
`check_record_file(path, where)` (a jsonl / parquet / HF dataset directory).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import gzip
import hashlib
import importlib
import json
import logging
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from train.errors import ConfigError, ZeroLLMError
from train.model import ModelConfig, preset_fields

model_preset = preset_fields  # the model fields of train/presets/<name>.yaml (train.model owns the table)


@dataclass
class DataConfig:
    # Training data: one prefix, or a blend list ["0.7", "a/prefix", "0.3", "b/prefix"].
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)  # validation prefixes (same form)
    tokenizer: str = ""  # Hugging Face tokenizer directory
    seq_len: int = 1024  # tokens per training row (windows are seq_len + 1)
    seed: int = 1234  # shuffle seed for the dataset index
    cache_dir: str = ""  # where index arrays are cached; "" = beside the data


@dataclass
class TrainConfig:
    micro_batch_size: int = 4  # rows per rank per micro step
    grad_accum_steps: int = 1
    max_steps: int = 1000  # optimizer steps
    lr: float = 3e-4
    min_lr: float = 3e-5  # floor of the decay
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # WSD: share of max_steps spent decaying
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 1234
    eval_interval: int = 100  # steps between evaluations (0 = never)
    eval_steps: int = 10  # micro batches per evaluation
    eval_at_start: bool = False  # also evaluate before the first step of a fresh run (the "before" row)
    save_interval: int = 200  # steps between checkpoints (0 = only at the end)
    keep_last: int = 3  # checkpoints kept on disk
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run stops
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events
    log_interval: int = 10  # steps between metric lines
    tensorboard: bool = True
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = measure / unknown


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    logging: LoggingConfig
    path: str = ""  # the YAML file it came from
    sections: dict[str, Any] = field(default_factory=dict)  # a stage's own sections, e.g. "sft"

    def __getattr__(self, name: str) -> Any:  # cfg.sft is cfg.sections["sft"]
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or section {name!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}
        return out | {s: dataclasses.asdict(v) for s, v in sorted(self.sections.items())}

    def hash(self) -> str:
        """Stable hash of the resolved config (what a checkpoint was trained with)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "logging": LoggingConfig}

# (section, key) -> (minimum, maximum); None means unbounded on that side.
RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("model", "vocab_size"): (1, None),
    ("model", "max_seq_len"): (1, None),
    ("model", "n_layer"): (1, None),
    ("model", "n_head"): (1, None),
    ("model", "n_kv_head"): (1, None),
    ("model", "d_model"): (1, None),
    ("model", "ffn_hidden"): (1, None),
    ("model", "rope_theta"): (1e-9, None),
    ("model", "norm_eps"): (0, 1),
    ("model", "dropout"): (0, 0.999),
    ("model", "init_std"): (0, None),
    ("model", "pad_vocab_multiple"): (1, None),
    ("model", "ffn_multiple_of"): (1, None),
    ("data", "seq_len"): (1, None),
    ("data", "seed"): (0, None),
    ("train", "micro_batch_size"): (1, None),
    ("train", "grad_accum_steps"): (1, None),
    ("train", "max_steps"): (1, None),
    ("train", "lr"): (0, 10),
    ("train", "min_lr"): (0, 10),
    ("train", "warmup_steps"): (0, None),
    ("train", "decay_fraction"): (0, 1),
    ("train", "weight_decay"): (0, None),
    ("train", "eps"): (0, 1),
    ("train", "grad_clip"): (0, None),
    ("train", "seed"): (0, None),
    ("train", "eval_interval"): (0, None),
    ("train", "eval_steps"): (1, None),
    ("train", "save_interval"): (0, None),
    ("train", "keep_last"): (1, None),
    ("train", "max_bad_steps"): (1, None),
    ("logging", "log_interval"): (1, None),
    ("logging", "peak_flops"): (0, None),
}


# ----------------------------------------------------------------------------- YAML


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


_YAML11_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_EXPONENT.match(value):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build_section(cls: type, data: Any, where: str, section: str) -> Any:
    """Make dataclass `cls` from a mapping, refusing unknown keys and bad values.

    Bounds come from `RANGES[(section, key)]`, else from the class's own `RANGES`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    own_ranges = getattr(cls, "RANGES", {})
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = sorted(names)
            raise ConfigError(f"{where}.{key}: unknown key (valid keys: {', '.join(near)})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
        lo, hi = RANGES.get((section, key)) or own_ranges.get(key, (None, None))
        v = kwargs[key]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                span = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise ConfigError(f"{where}.{key}: value {v} is out of range {span}")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a dataclass's own __post_init__ check
        raise ConfigError(f"{where}: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set SECTION.KEY=VALUE` items -> {"SECTION.KEY": value}, each value read as YAML."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


def load_run_config(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    extra_sections: Mapping[str, type] | None = None,
) -> RunConfig:
    """Load and validate a run config. `overrides` maps "section.key" -> value;
    `extra_sections` maps a stage's own section names to their dataclasses."""
    extra = dict(extra_sections or {})
    clash = sorted(set(extra) & set(SECTIONS))
    if clash:
        raise ConfigError(f"stage section(s) {', '.join(clash)} would replace a built-in section")
    known = [*SECTIONS, *extra]
    raw = copy.deepcopy(read_yaml(path))
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in known or not key:
            raise ConfigError(f"override {dotted!r}: expected section.key with a section of {', '.join(known)}")
        if raw.get(section) is None:
            raw[section] = {}
        if isinstance(raw[section], dict):  # else build_section names the bad section
            raw[section][key] = value
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}: {key}: unknown section (valid sections: {', '.join(known)})")
    model_raw = dict(raw.get("model") or {})
    preset = model_raw.pop("preset", None)
    if preset is not None:
        try:
            model_raw = {**model_preset(str(preset)), **model_raw}
        except ConfigError as e:
            raise ConfigError(f"{path}: model.preset: {e}") from None
    sections = {}
    for name, cls in {**SECTIONS, **extra}.items():
        data = model_raw if name == "model" else raw.get(name)
        sections[name] = build_section(cls, data, f"{path}: {name}", name)
    cfg = RunConfig(**{s: sections.pop(s) for s in SECTIONS}, path=str(path), sections=sections)
    check_cross_fields(cfg)
    return cfg


def check_cross_fields(cfg: RunConfig) -> None:
    """Checks that involve more than one key; each error names the key to change."""
    p, m, t, d = cfg.path, cfg.model, cfg.train, cfg.data
    if m.d_model % m.n_head:
        raise ConfigError(f"{p}: model.d_model: {m.d_model} is not divisible by model.n_head={m.n_head}")
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        raise ConfigError(f"{p}: model.n_kv_head: {kv} must divide model.n_head={m.n_head}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"{p}: data.seq_len: {d.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
            "lower data.seq_len or raise model.max_seq_len"
        )
    if t.min_lr > t.lr:
        raise ConfigError(f"{p}: train.min_lr: {t.min_lr} is above train.lr={t.lr}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"{p}: train.betas: expected two numbers in [0, 1), got {t.betas}")
    if t.warmup_steps > t.max_steps:
        raise ConfigError(f"{p}: train.warmup_steps: {t.warmup_steps} exceeds train.max_steps={t.max_steps}")


# ----------------------------------------------------------------------------- input files


def check_token_data(cfg: RunConfig) -> None:
    """Every `data.train` / `data.valid` prefix has its .bin and .idx; the tokenizer dir exists."""
    for key in ("train", "valid"):
        for item in getattr(cfg.data, key):
            try:
                float(item)
                continue  # a blend weight
            except ValueError:
                pass
            for ext in (".bin", ".idx"):
                if not Path(item + ext).is_file():
                    raise ZeroLLMError(
                        f"{cfg.path}: data.{key}: {item}{ext} not found (run `zerollm preprocess` to make it)"
                    )
    if cfg.data.tokenizer and not Path(cfg.data.tokenizer).is_dir():
        raise ZeroLLMError(f"{cfg.path}: data.tokenizer: directory {cfg.data.tokenizer} not found")


# What `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in a directory.
_HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_RECORD_SUFFIXES = (".jsonl", ".parquet", ".arrow")


def check_record_file(path: str | Path, where: str) -> None:
    """A post-training input exists and looks like records: a .jsonl file whose first
    non-empty line is a JSON object, a .parquet file, or a Hugging Face dataset
    directory (save_to_disk output, or a folder of .jsonl/.parquet/.arrow files).
    `where` names the config key, e.g. "configs/sft.yaml: sft.train_file"."""
    path = Path(path)
    if path.is_dir():
        if any((path / m).is_file() for m in _HF_DATASET_MARKERS):
            return
        if any(p.suffix in _RECORD_SUFFIXES for p in path.rglob("*") if p.is_file()):
            return
        raise ZeroLLMError(f"{where}: {path} is not a Hugging Face dataset directory (no dataset_info.json, "
                           f"state.json, dataset_dict.json or {'/'.join(_RECORD_SUFFIXES)} files)")  # fmt: skip
    if not path.is_file():
        raise ZeroLLMError(f"{where}: {path} not found")
    if path.suffix == ".parquet":
        with path.open("rb") as f:
            if f.read(4) != b"PAR1":
                raise ZeroLLMError(f"{where}: {path} is not a parquet file (no PAR1 header)")
        return
    gz = path.name.endswith(".jsonl.gz")
    if path.suffix != ".jsonl" and not gz:
        raise ZeroLLMError(
            f"{where}: {path}: expected a .jsonl, .jsonl.gz or .parquet file or a Hugging Face dataset directory"
        )
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            first = next(((n, line) for n, line in enumerate(f, 1) if line.strip()), None)
    except OSError as e:  # e.g. a corrupt .gz
        raise ZeroLLMError(f"{where}: {path}: cannot be read ({e})") from None
    if first is not None:
        lineno, line = first
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ZeroLLMError(f"{where}: {path}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            got = type(record).__name__
            raise ZeroLLMError(f"{where}: {path}:{lineno}: expected a JSON object per line, got {got}")
        return
    raise ZeroLLMError(f"{where}: {path} has no records")


# ----------------------------------------------------------------------------- DeepSpeed JSON


def read_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top")
    return data


# Sections DeepSpeed validates with a pydantic model; nested models (offload_param, ...)
# are followed through the fields' annotations.
_DS_MODEL_SECTIONS = {
    "zero_optimization": "deepspeed.runtime.zero.config:DeepSpeedZeroConfig",
    "bf16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "bfloat16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",  # the old name of bf16
    "fp16": "deepspeed.runtime.precision_config:DeepSpeedFP16Config",
    "tensorboard": "deepspeed.monitor.config:TensorBoardConfig",
    "wandb": "deepspeed.monitor.config:WandbConfig",
    "csv_monitor": "deepspeed.monitor.config:CSVConfig",
    "comet": "deepspeed.monitor.config:CometConfig",
    "comms_logger": "deepspeed.comm.config:CommsLoggerConfig",
    "compile": "deepspeed.compile.config:CompileConfig",
    "hybrid_engine": "deepspeed.runtime.config:HybridEngineConfig",
    "tensor_parallel": "deepspeed.runtime.tensor_parallel.config:TPTrainingConfig",
}
# Sections DeepSpeed reads key by key (ignoring any other key): their keys are the ones
# the reader looks up when handed a probe. optimizer/scheduler params are free-form.
_DS_READER_SECTIONS = {
    "activation_checkpointing": (
        "deepspeed.runtime.activation_checkpointing.config:DeepSpeedActivationCheckpointingConfig"
    ),
    "flops_profiler": "deepspeed.profiling.config:DeepSpeedFlopsProfilerConfig",
    "aio": "deepspeed.runtime.swap_tensor.aio_config:get_aio_config",
}
# Read by DeepSpeedConfig.__init__ only once torch.distributed is up, so the probe misses it.
_DS_TOP_KEYS_READ_LATER = {"sequence_parallel_size"}
_PROBE = "\0zerollm-probe"  # keeps a probe truthy for readers that skip an empty dict


class _KeyProbe(dict):
    """A dict that records every key DeepSpeed looks up in it."""

    def __init__(self) -> None:
        super().__init__({_PROBE: None})
        self.seen: set[str] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def keys(self) -> _KeyProbe:  # `KEY in d.keys()` goes through __contains__
        return self

    def __copy__(self) -> _KeyProbe:  # DeepSpeedConfig reads a copy
        return self


def _keys_read(reader: Any, section: str | None = None) -> set[str]:
    """The keys `reader` looks up in the config (or in its `section`), whether or not it fails."""
    probe = _KeyProbe()
    try:
        reader(probe if section is None else {section: probe})
    except Exception:  # an empty config trips DeepSpeed's own checks once it has read the keys
        pass
    return probe.seen - {_PROBE}


def _model_keys(model: Any) -> dict[str, Any]:
    """Accepted key -> nested pydantic model (or None), from a model's fields and aliases."""
    # kept local: pydantic comes with deepspeed, which is imported only in _ds_keys
    from pydantic import BaseModel

    out = {}
    for name, info in model.model_fields.items():
        nested = None
        for tp in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                nested = tp
        for key in (name, info.alias, info.validation_alias):
            if isinstance(key, str):
                out[key] = nested
    return out


@dataclass
class _DSKeys:
    top: set[str]  # empty: this DeepSpeed could not be probed, top level unchecked
    models: dict[str, Any]  # section -> pydantic model
    readers: dict[str, set[str]]  # section -> keys read
    removed: dict[str, str]  # removed key (top level or "zero_optimization.KEY") -> DeepSpeed's message


@functools.lru_cache(maxsize=1)
def _ds_keys() -> _DSKeys:
    """The key sets DeepSpeed itself reads (deepspeed is imported here, not at the top)."""

    def load(spec: str) -> Any:
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # deepspeed's import prints its accelerator choice on stdout
    try:
        from deepspeed.runtime import config as ds_config

        top = _keys_read(ds_config.DeepSpeedConfig)
        models = {s: load(spec) for s, spec in _DS_MODEL_SECTIONS.items()}
        readers = {s: _keys_read(load(spec), s) for s, spec in _DS_READER_SECTIONS.items()}
    finally:
        logging.disable(previous)
    if "train_batch_size" not in top:
        top = set()
    removed = dict(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    removed |= {f"zero_optimization.{k}": m for k, m in getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {}).items()}
    return _DSKeys(top | _DS_TOP_KEYS_READ_LATER if top else top, models, readers, removed)


def _unknown_ds_key(where: str, dotted: str, valid: set[str]) -> ConfigError:
    key = dotted.rpartition(".")[2]
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    hint = f"did you mean {close[0]}?" if close else f"valid: {', '.join(sorted(valid))}"
    return ConfigError(f"{where}: {dotted}: unknown DeepSpeed key ({hint})")


def _check_model_keys(node: dict[str, Any], model: Any, prefix: str, where: str, removed: dict[str, str]) -> None:
    keys = _model_keys(model)
    for key, value in node.items():
        dotted = f"{prefix}.{key}"
        if dotted in removed:
            raise ConfigError(f"{where}: {dotted}: {removed[dotted].strip()}")
        if key not in keys:
            raise _unknown_ds_key(where, dotted, set(keys))
        if isinstance(value, dict) and keys[key] is not None:
            _check_model_keys(value, keys[key], dotted, where, removed)


def check_ds_keys(ds: dict[str, Any], where: str = "ds_config") -> None:
    """Every key is one DeepSpeed reads: top-level keys, and the keys of the sections
    DeepSpeed validates (ZeRO, precision, monitors, activation checkpointing, ...)."""
    known = _ds_keys()
    for key, value in ds.items():
        if key in known.removed:
            raise ConfigError(f"{where}: {key}: {known.removed[key].strip()}")
        if known.top and key not in known.top:
            raise _unknown_ds_key(where, key, known.top)
        if not isinstance(value, dict):
            continue
        if key in known.models:
            _check_model_keys(value, known.models[key], key, where, known.removed)
        elif key in known.readers and known.readers[key]:
            for sub in value:
                if sub not in known.readers[key]:
                    raise _unknown_ds_key(where, f"{key}.{sub}", known.readers[key])


def _auto_values(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Dotted ds_config key -> value owned by the run config."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer.params.lr": t.lr,
        "optimizer.params.betas": list(t.betas),
        "optimizer.params.weight_decay": t.weight_decay,
        "optimizer.params.eps": t.eps,
        "scheduler.params.warmup_num_steps": t.warmup_steps,
        "scheduler.params.total_num_steps": t.max_steps,
        "scheduler.params.warmup_max_lr": t.lr,
        "scheduler.params.warmup_min_lr": 0.0,
        "bf16.enabled": t.precision == "bf16",
        "fp16.enabled": t.precision == "fp16",
        # ZeRO-3 bucket sizes, sized from the hidden width as Hugging Face does.
        "zero_optimization.reduce_bucket_size": cfg.model.d_model * cfg.model.d_model,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * cfg.model.d_model * cfg.model.d_model),
        "zero_optimization.stage3_param_persistence_threshold": 10 * cfg.model.d_model,
    }


def fill_auto(ds: dict[str, Any], cfg: RunConfig, world_size: int, where: str = "ds_config") -> dict[str, Any]:
    """Return a copy of `ds` with every "auto" value filled from the run config."""
    ds = copy.deepcopy(ds)
    values = _auto_values(cfg, world_size)

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                dotted = f"{prefix}{key}"
                if value == "auto":
                    if dotted not in values:
                        raise ConfigError(f'{where}: {dotted}: "auto" is not a value ZeroLLM can fill; set it')
                    node[key] = values[dotted]
                else:
                    walk(value, dotted + ".")

    walk(ds, "")
    return ds


def check_batch(ds: dict[str, Any], cfg: RunConfig, world_size: int, where: str = "ds_config") -> None:
    """train_batch_size must equal micro_batch * grad_accum * world_size."""
    micro = ds.get("train_micro_batch_size_per_gpu", cfg.train.micro_batch_size)
    accum = ds.get("gradient_accumulation_steps", cfg.train.grad_accum_steps)
    total = ds.get("train_batch_size", micro * accum * world_size)
    if (micro, accum) != (cfg.train.micro_batch_size, cfg.train.grad_accum_steps):
        raise ConfigError(
            f"{where}: train_micro_batch_size_per_gpu={micro} / gradient_accumulation_steps={accum} disagree "
            f"with {cfg.path}: train.micro_batch_size={cfg.train.micro_batch_size} / "
            f'train.grad_accum_steps={cfg.train.grad_accum_steps}; set them to "auto"'
        )
    if total != micro * accum * world_size:
        raise ConfigError(
            f"{where}: train_batch_size: {total} != micro_batch {micro} x grad_accum {accum} x world_size "
            f'{world_size} = {micro * accum * world_size}; set train_batch_size to "auto" or change '
            "train.micro_batch_size / train.grad_accum_steps / the number of ranks"
        )


def load_ds_config(path: str | Path, cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """Read a ds_config, fill its "auto" fields, check its keys and the batch arithmetic."""
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1, got {world_size}")
    ds = fill_auto(read_ds_config(path), cfg, world_size, where=str(path))
    check_ds_keys(ds, where=str(path))
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage: unknown ZeRO stage {stage!r} (valid: 0, 1, 2, 3)")
    check_batch(ds, cfg, world_size, where=str(path))
    precision = cfg.train.precision
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: bf16.enabled and fp16.enabled are both true; pick one (train.precision)")
    want = {"bf16": (True, False), "fp16": (False, True), "fp32": (False, False)}[precision]
    have = (bool(ds.get("bf16", {}).get("enabled")), bool(ds.get("fp16", {}).get("enabled")))
    if have != want:
        raise ConfigError(
            f"{path}: bf16.enabled/fp16.enabled = {have[0]}/{have[1]} contradict {cfg.path}: "
            f'train.precision={precision!r}; set them to "auto"'
        )
    return ds
