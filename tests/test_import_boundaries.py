"""The layers stay apart: what each part of the package may import (at any depth of a
file: module level and inside functions), read from the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

STAGES = ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"]


def imports(path: Path) -> set[str]:
    """Every module name `path` imports, e.g. {"torch", "train.errors"}."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from train import run`
    return found


def offending(path: Path, banned: list[str]) -> list[str]:
    return sorted(m for m in imports(path) if any(m == b or m.startswith(b + ".") for b in banned))


def test_the_checker_sees_function_local_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    from launch import watchdog\n    import deepspeed.comm\n")
    assert offending(f, ["launch", "deepspeed"]) == ["deepspeed.comm", "launch", "launch.watchdog"]


def test_the_model_imports_no_deepspeed():
    assert offending(REPO / "train" / "model.py", ["deepspeed", "train.engine", "launch"]) == []


def test_losses_import_no_model_engine_or_distributed_code():
    banned = ["train.model", "train.engine", "train.loop", "train.run", "deepspeed", "torch.distributed", "launch"]
    assert offending(REPO / "train" / "losses.py", banned) == []


@pytest.mark.parametrize("path", sorted((REPO / "data_pipeline").glob("*.py")), ids=lambda p: p.name)
def test_data_pipeline_imports_no_trainer(path):
    # train.errors is the project's one exception type, shared by every layer.
    bad = [m for m in offending(path, ["train", "launch", "deepspeed"]) if m.split(".")[:2] != ["train", "errors"]]
    assert bad == []


def test_the_engine_imports_no_stage_and_no_launch_layer():
    banned = ["launch", "train.loop", "train.run", *(f"train.{s}" for s in STAGES)]
    assert offending(REPO / "train" / "engine.py", banned) == []


@pytest.mark.parametrize("path", sorted((REPO / "train").glob("*.py")), ids=lambda p: p.name)
def test_nothing_in_train_imports_the_launch_layer(path):
    assert offending(path, ["launch"]) == []
