"""The environment every rank gets, and the deepspeed launcher's env file that carries it.

The deepspeed launcher forwards only a few variable prefixes to other nodes and reads
`.deepspeed_env` (or `$DS_ENV_FILE`) only on the multi-node path: one `KEY=VALUE` per
line, no comments or blank lines (they crash it), each value wrapped in double quotes
when it holds anything but `[\\w@%+=:,./-]`, so `$`, `` ` ``, `\\` and `"` would be
expanded by the remote shell. `write_env_file` escapes exactly those characters so a
value arrives byte for byte, e.g. `pa$$ word` -> `pa\\$\\$ word` -> `"pa\\$\\$ word"`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from train.errors import ZeroLLMError

# Forwarded from the launching shell when set (exact names, and prefixes ending in "_").
FORWARD = ["PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "VIRTUAL_ENV"]
FORWARD_PREFIXES = [
    "OMP_", "MKL_", "KMP_", "NCCL_", "GLOO_", "UCX_", "FI_", "HF_", "TRANSFORMERS_", "TOKENIZERS_",
    "TORCH_", "TORCHINDUCTOR_", "TRITON_", "CUDA_", "PYTORCH_", "DEEPSPEED_", "DS_ACCELERATOR",
    "ZEROLLM_", "WANDB_", "MLFLOW_",
]  # fmt: skip
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLAIN = re.compile(r"^[\w@%+=:,./-]*$")  # what the deepspeed launcher leaves unquoted


class EnvError(ZeroLLMError):
    """A variable cannot be forwarded to the ranks as given."""


def parse_env_args(items: list[str], environ: dict[str, str]) -> dict[str, str]:
    """`--env NAME=VALUE` sets a value; `--env NAME` forwards the launching shell's value."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not _NAME.match(name):
            raise EnvError(f"--env {item!r}: {name!r} is not a valid variable name")
        if not sep:
            if name not in environ:
                raise EnvError(f"--env {name}: not set in this shell; use --env {name}=VALUE")
            value = environ[name]
        out[name] = value
    return out


def read_user_env_file(path: str | Path) -> dict[str, str]:
    """A user's .deepspeed_env, read leniently: comments and blank lines are skipped."""
    out = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not _NAME.match(name.strip()):
            raise EnvError(f"{path}:{number}: expected NAME=VALUE, got {raw!r}")
        out[name.strip()] = value
    return out


def forwarded(environ: dict[str, str]) -> dict[str, str]:
    """The variables of the launching shell that every rank should see."""
    return {k: v for k, v in environ.items() if k in FORWARD or any(k.startswith(p) for p in FORWARD_PREFIXES)}


def escape(value: str, name: str = "value") -> str:
    """Escape `value` for the deepspeed launcher's `export NAME="VALUE"` on the remote side."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise EnvError(f"{name}: a value with a newline cannot pass through the launcher's env file")
    if value != value.strip():
        raise EnvError(f"{name}: leading/trailing spaces would be stripped by the launcher; remove them")
    if _PLAIN.match(value):
        return value
    return re.sub(r'([\\"$`])', r"\\\1", value)


def write_env_file(path: str | Path, env: dict[str, str]) -> Path:
    """Write `env` as the deepspeed launcher's env file (mode 0600: it may hold tokens)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in sorted(env):
        if not _NAME.match(name):
            raise EnvError(f"{name!r} is not a valid variable name")
        lines.append(f"{name}={escape(env[name], name)}\n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
    return path
