"""Checkpoints that never lie: atomic save, verified resume, RNG and data position.

DeepSpeed's own `save_checkpoint` writes in place and lets rank 0 write `latest`
before the other ranks finish; its `load_checkpoint` returns (None, None) when
`latest` is missing. So ZeroLLM wraps it:

Layout under `<run_dir>/checkpoints/`:

    step00000200/                  one complete checkpoint (DeepSpeed's files inside)
        mp_rank_00_model_states.pt     DeepSpeed: module + client_state["zerollm"]
        *zero_pp_rank_<r>_*optim_states.pt  DeepSpeed: each rank's optimizer shard
        zerollm_rank<r>.pt             ours: rank r's torch/numpy/python (CUDA) RNG
        complete.json                  ours: written last; step, world size, files
    step00000300/                  several named engines (`save({"policy": e1, "value": e2}, ...)`)
        policy/, value/                each engine's DeepSpeed files, as above
        zerollm_rank<r>.pt, complete.json   one RNG file per rank, one manifest for all
    step00000200_universal/        optional: `zerollm checkpoint universal` output
    latest                         the tag to resume from; replaced atomically
    .tmp-step00000400/             a save in progress (ignored and cleaned on resume)

Save: every rank writes into `.tmp-<tag>` (`save_latest=False`) and verifies the
files it owns can be read back; barrier; rank 0 checks every rank's files, writes
`complete.json`, renames the folder to `<tag>`, then replaces `latest`
(temp file + fsync + rename). A process killed at any point leaves either the
previous checkpoint as the newest complete one, or the new one fully written.

Test hooks: ZEROLLM_FAULT=in_save:<rank>:<step> kills a rank after its DeepSpeed files
are written; in_save:<name>:<rank>:<step> right after engine <name>'s files.

Resume: follow `latest`; when it is missing, dangling or names an incomplete
folder, take the newest complete checkpoint and say so. Loading goes through
`torch.load(weights_only=True)` with an explicit allow-list of DeepSpeed's classes.
Checkpoints must live on a filesystem every node sees (as DeepSpeed assumes).
`consolidated_state_dict` turns any checkpoint into one fp32 state dict (export, and
stages that start from another run's weights).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train.errors import ZeroLLMError

log = logging.getLogger("zerollm")

TAG_RE = re.compile(r"^step(\d{8})$")
MANIFEST = "complete.json"


# ----------------------------------------------------------------------------- safe loading


def allowed_globals() -> list[Any]:
    """The only non-tensor classes a ZeroLLM/DeepSpeed checkpoint may contain."""
    # heavy: deepspeed, kept local so importing this module does not load it
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Some Pythons (Debian bookworm's 3.11.2) pickle enum members as getattr(EnumClass, name);
    # getattr can only reach attributes of the classes allowed here.
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, set, getattr]


@contextlib.contextmanager
def safe_torch_load():
    """Force `torch.load(weights_only=True)` (with the allow-list) for everything inside,
    including DeepSpeed's internal loads, so no checkpoint can run arbitrary code."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed_globals()):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),  # a tensor, not a numpy pickle
        "numpy_pos": np.random.get_state()[2],
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` so a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fault_point(point: str, rank: int, step: int) -> None:
    """Test hook: ZEROLLM_FAULT=point:rank:step SIGKILLs that rank at that point."""
    spec = os.environ.get("ZEROLLM_FAULT", "")
    if spec == f"{point}:{rank}:{step}":
        log.warning("ZEROLLM_FAULT: killing rank %d at %s (step %d)", rank, point, step)
        os.kill(os.getpid(), signal.SIGKILL)


def _rank_files(folder: Path, rank: int) -> list[Path]:
    """DeepSpeed's files owned by `rank` (optimizer shards; rank 0 also the model states)."""
    mine = re.compile(rf"(^|_)rank_{rank}_")
    own = [p for p in folder.iterdir() if mine.search(p.name) or p.name == f"zerollm_rank{rank:05d}.pt"]
    if rank == 0:
        own += list(folder.glob("mp_rank_*_model_states.pt"))
    return own


class Checkpointer:
    """Save and find checkpoints for one run; one instance per rank."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, keep_last: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    # ------------------------------------------------------------------ save

    def save(self, engine: Any, step: int, state: dict[str, Any]) -> Path:
        """Save one engine, or several as {name: engine} (policy, value, ...), as one checkpoint.

        Named engines go to `<tag>/<name>/` under one manifest, one `latest`, one RNG file
        per rank; the checkpoint counts only when every engine's files are verified.
        """
        tag = f"step{step:08d}"
        tmp = self.dir / f".tmp-{tag}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a save of this step killed earlier
            tmp.mkdir()
        dist.barrier()  # also: never start a save on a broken process group
        client = {"zerollm": state}
        if isinstance(engine, dict):
            for name, named in _check_names(engine).items():
                named.save_checkpoint(str(tmp), tag=name, client_state=client, save_latest=False)
                fault_point(f"in_save:{name}", self.rank, step)
        else:
            engine.save_checkpoint(str(self.dir), tag=tmp.name, client_state=client, save_latest=False)
        fault_point("in_save", self.rank, step)
        side = tmp / f"zerollm_rank{self.rank:05d}.pt"
        buf = _torch_bytes(rng_state())
        write_atomic(side, buf)
        sizes = self._verify_own_files(tmp, list(engine) if isinstance(engine, dict) else None)
        dist.barrier()
        all_sizes = [None] * self.world_size
        dist.all_gather_object(all_sizes, sizes)
        final = self.dir / tag
        if self.rank == 0:
            files = {name: size for part in all_sizes for name, size in part.items()}
            manifest = {"step": step, "world_size": self.world_size, "files": files, "state": state}
            if isinstance(engine, dict):
                manifest["engines"] = list(engine)
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            if final.exists():  # an older save of the same step (e.g. after resuming)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            write_atomic(self.dir / "latest", tag.encode())
            self._prune()
        dist.barrier()
        return final

    def _verify_own_files(self, folder: Path, engines: list[str] | None = None) -> dict[str, int]:
        """Read back the files this rank wrote; a truncated file fails here, not at resume.

        Returns {path relative to `folder`: size} (named engines' files under `<name>/`)."""
        sizes = {}
        owned = [folder / f"zerollm_rank{self.rank:05d}.pt"]
        for sub in [folder / n for n in engines] if engines else [folder]:
            owned += [p for p in _rank_files(sub, self.rank) if p not in owned]
        with safe_torch_load():
            for path in owned:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                try:
                    torch.load(path, map_location="cpu")
                except Exception as e:
                    raise ZeroLLMError(f"{path}: checkpoint file unreadable right after saving: {e}") from e
                sizes[str(path.relative_to(folder))] = path.stat().st_size
        return sizes

    def _prune(self) -> None:
        tags = self.complete_tags()
        for tag in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
            shutil.rmtree(self.dir / f"{tag}_universal", ignore_errors=True)

    # ------------------------------------------------------------------ find

    def is_complete(self, folder: Path) -> bool:
        manifest = folder / MANIFEST
        if not manifest.is_file():
            return False
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError):
            return False
        return all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in files.items())

    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if TAG_RE.match(p.name) and self.is_complete(p)]
        return sorted(tags)

    def find_resume(self) -> Path | None:
        """The checkpoint to resume from, or None for a fresh run (never silently)."""
        if not self.dir.is_dir():
            return None
        latest = self.dir / "latest"
        tag = latest.read_text().strip() if latest.is_file() else None
        if tag and self.is_complete(self.dir / tag):
            return self.dir / tag
        complete = self.complete_tags()
        if complete:
            why = f"'latest' names {tag!r}, which is missing or incomplete" if tag else "'latest' is missing"
            if self.rank == 0:
                log.warning("%s: %s; resuming from the newest complete checkpoint %s", self.dir, why, complete[-1])
            return self.dir / complete[-1]
        broken = [p.name for p in self.dir.iterdir() if TAG_RE.match(p.name)]
        if broken:
            raise ZeroLLMError(
                f"{self.dir}: checkpoints {', '.join(sorted(broken))} exist but none is complete "
                f"(no valid {MANIFEST}); move them away to start from scratch"
            )
        if tag:
            raise ZeroLLMError(f"{latest}: names {tag!r} but no checkpoint exists; remove it to start from scratch")
        return None

    # ------------------------------------------------------------------ load

    def load(self, engine: Any, folder: Path) -> dict[str, Any]:
        """Load `folder` into `engine` (or into each of {name: engine}, as saved) and this
        rank's RNG; returns the trainer state."""
        manifest = json.loads((folder / MANIFEST).read_text())
        saved_world, saved_names = manifest["world_size"], manifest.get("engines")
        names = list(_check_names(engine)) if isinstance(engine, dict) else None
        if names != saved_names:
            raise ZeroLLMError(
                f"{folder}: holds engines {saved_names or '(one unnamed)'}, this run loads {names or '(one unnamed)'}"
            )
        sharded = any(folder.rglob("*zero_pp_rank_*"))  # ZeRO / bf16 optimizer shards per rank
        if names is not None:
            if saved_world != self.world_size and sharded:
                raise ZeroLLMError(
                    f"{folder}: written by {saved_world} ranks, this run has {self.world_size}; "
                    "a checkpoint of several engines resumes on the same number of ranks only"
                )
            client = {}
            for name in names:
                client = self._load_engine(engine[name], folder, name)
        else:
            load_dir, tag = self.dir, folder.name
            if saved_world != self.world_size and sharded:
                universal = folder.with_name(folder.name + "_universal")
                if not self.is_complete(universal):
                    raise ZeroLLMError(
                        f"{folder}: written by {saved_world} ranks, this run has {self.world_size}; "
                        f"convert it first: zerollm checkpoint universal {self.dir.parent}"
                    )
                engine._config.load_universal_checkpoint = True
                tag = universal.name
                if self.rank == 0:
                    log.info(
                        "resuming %d-rank checkpoint %s on %d ranks via %s",
                        saved_world,
                        folder.name,
                        self.world_size,
                        tag,
                    )
            client = self._load_engine(engine, load_dir, tag)
        side = folder / f"zerollm_rank{self.rank:05d}.pt"
        if side.is_file() and saved_world == self.world_size:
            with safe_torch_load():
                set_rng_state(torch.load(side, map_location="cpu"))
        return client["zerollm"]

    @staticmethod
    def _load_engine(engine: Any, load_dir: Path, tag: str) -> dict[str, Any]:
        with safe_torch_load():
            path, client = engine.load_checkpoint(
                str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        engine._config.load_universal_checkpoint = False
        if path is None or not client or "zerollm" not in client:
            raise ZeroLLMError(f"{load_dir / tag}: DeepSpeed could not load this checkpoint")
        return client


def _check_names(engines: dict[str, Any]) -> dict[str, Any]:
    """Engine names become folder names: refuse anything but plain identifiers."""
    bad = [n for n in engines if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", n)]
    if not engines or bad:
        raise ZeroLLMError(f"engine names must be non-empty identifiers (letters, digits, _ or -), got {list(engines)}")
    return engines


# ----------------------------------------------------------------------------- consolidated weights


def checkpoint_folder(run_dir: str | Path, tag: str | None = None) -> Path:
    """The complete checkpoint `tag` of a run (default: its resume point)."""
    ckpt = Checkpointer(run_dir, rank=0, world_size=1)
    folder = ckpt.dir / tag if tag else ckpt.find_resume()
    if folder is None or not ckpt.is_complete(folder):
        raise ZeroLLMError(f"{ckpt.dir}: no complete checkpoint {tag or ''} to load")
    return folder


def consolidated_state_dict(folder: Path, engine: str | None = None) -> dict[str, torch.Tensor]:
    """The whole fp32 module state dict of a checkpoint of any ZeRO stage (one process, CPU).

    `engine` picks one of a several-engine checkpoint; None there means "policy" when it
    holds one (a PPO run's actor: what `zerollm export` and a later stage's init_from take).
    A tied head may have no entry of its own (ZeRO's consolidation writes the shared tensor once).
    """
    names = json.loads((folder / MANIFEST).read_text()).get("engines")
    if names and engine is None and "policy" in names:
        engine = "policy"
    if names and engine not in names:
        which = f"not {engine!r}" if engine else "name the one to load"
        raise ZeroLLMError(f"{folder}: holds engines {', '.join(names)}; {which}")
    if not names and engine is not None:
        raise ZeroLLMError(f"{folder}: holds one unnamed engine, not {engine!r}")
    root, tag = (folder, engine) if names else (folder.parent, folder.name)
    with safe_torch_load():
        if list((root / tag).glob("*zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        else:
            sd = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    return {k: v.float() for k, v in sd.items()}


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------- universal


def convert_to_universal(run_dir: str | Path, tag: str | None = None) -> Path:
    """DeepSpeed's universal checkpoint of `tag` (default: the resume point), so a run
    can continue on a different number of ranks or ZeRO stage."""
    from deepspeed.checkpoint import ds_to_universal

    ckpt = Checkpointer(run_dir, rank=0, world_size=1)
    folder = ckpt.dir / tag if tag else ckpt.find_resume()
    if folder is None or not ckpt.is_complete(folder):
        raise ZeroLLMError(f"{ckpt.dir}: no complete checkpoint {tag or ''} to convert")
    if json.loads((folder / MANIFEST).read_text()).get("engines"):
        raise ZeroLLMError(f"{folder}: a checkpoint of several engines cannot be converted to universal")
    out = folder.with_name(folder.name + "_universal")
    tmp = folder.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(folder),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with safe_torch_load():
        ds_to_universal.main(args)
    manifest = json.loads((folder / MANIFEST).read_text())
    files = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(tmp))] = path.stat().st_size
    manifest.update(files=files, universal=True)
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out
