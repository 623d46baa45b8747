"""Checkpointer.find_resume on real folders: latest missing, dangling, incomplete, truncated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.checkpoint import MANIFEST, Checkpointer, write_atomic
from train.errors import ZeroLLMError


def make_ckpt(root: Path, step: int, complete: bool = True, truncate: bool = False) -> Path:
    folder = root / "checkpoints" / f"step{step:08d}"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    if complete:
        size = 100 + (1 if truncate else 0)  # the manifest says more bytes than the file has
        manifest = {"step": step, "world_size": 2, "files": {"mp_rank_00_model_states.pt": size}}
        (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def set_latest(root: Path, tag: str) -> None:
    write_atomic(root / "checkpoints" / "latest", tag.encode())


def test_fresh_run_has_nothing_to_resume(tmp_path):
    assert Checkpointer(tmp_path, 0, 1).find_resume() is None


def test_latest_is_followed(tmp_path):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 4)
    set_latest(tmp_path, "step00000002")
    assert Checkpointer(tmp_path, 0, 1).find_resume().name == "step00000002"


def test_missing_latest_takes_newest_complete(tmp_path, caplog):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 4)
    assert Checkpointer(tmp_path, 0, 1).find_resume().name == "step00000004"
    assert "'latest' is missing" in caplog.text


def test_dangling_latest_takes_newest_complete(tmp_path, caplog):
    make_ckpt(tmp_path, 2)
    set_latest(tmp_path, "step00000099")
    assert Checkpointer(tmp_path, 0, 1).find_resume().name == "step00000002"
    assert "step00000099" in caplog.text


def test_incomplete_and_truncated_checkpoints_are_skipped(tmp_path):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 4, truncate=True)
    make_ckpt(tmp_path, 6, complete=False)
    (tmp_path / "checkpoints" / ".tmp-step00000008").mkdir()  # a save killed half way
    set_latest(tmp_path, "step00000006")
    ckpt = Checkpointer(tmp_path, 0, 1)
    assert ckpt.complete_tags() == ["step00000002"]
    assert ckpt.find_resume().name == "step00000002"


def test_only_broken_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    make_ckpt(tmp_path, 4, complete=False)
    with pytest.raises(ZeroLLMError, match="none is complete"):
        Checkpointer(tmp_path, 0, 1).find_resume()


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "latest"
    write_atomic(path, b"step00000002")
    write_atomic(path, b"step00000004")
    assert path.read_bytes() == b"step00000004"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
