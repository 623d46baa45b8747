"""`zerollm launch` pre-flight: `--set` overrides apply before the checks, each stage
brings its own config sections and input check, and the shared input checks
(`check_token_data`, `check_record_file`) stop with one line naming file and key."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from launch.cli import main as cli_main
from train.config import check_record_file, check_token_data, load_run_config, parse_overrides
from train.errors import ConfigError, ZeroLLMError


def write_run(tmp: Path, **train) -> Path:
    """A run config whose token data exists (empty .bin/.idx files are enough here)."""
    for ext in (".bin", ".idx"):
        (tmp / f"tokens{ext}").touch()
    cfg = {
        "model": {"preset": "tiny"},
        "data": {"train": [str(tmp / "tokens")], "seq_len": 32},
        "train": {"micro_batch_size": 2, "max_steps": 40, "warmup_steps": 20, "precision": "fp32", **train},
        "logging": {"run_dir": str(tmp / "run"), "tensorboard": False},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, *extra: str) -> int:
    argv = ["launch", "pretrain", "--config", str(config), "--deepspeed_config", "ds_configs/zero2.json"]
    return cli_main([*argv, "--num_gpus", "1", "--dry-run", *extra])


def test_set_overrides_are_checked_before_any_rank_starts(tmp_path, capsys):
    run = write_run(tmp_path)
    assert launch(run, "--set", "train.max_steps=16") == 2
    err = capsys.readouterr().err
    assert "train.warmup_steps: 20 exceeds train.max_steps=16" in err
    assert launch(run, "--set", "train.max_steps=16", "--set", "train.warmup_steps=4") == 0
    assert "--set train.max_steps=16" in capsys.readouterr().out  # still passed on to the ranks


def test_malformed_set_is_one_clear_line(tmp_path, capsys):
    assert launch(write_run(tmp_path), "--set", "train.max_steps") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zerollm: error: --set 'train.max_steps': expected SECTION.KEY=VALUE"]


def test_parse_overrides_reads_values_as_yaml(tmp_path):
    assert parse_overrides(["train.lr=0.5", "data.train=[a, b]", "train.compile=true", "x.y= 3 "]) == {
        "train.lr": 0.5,
        "data.train": ["a", "b"],
        "train.compile": True,
        "x.y": 3,
    }
    # YAML 1.1 reads 1e-3 as a string; a float field still takes it.
    assert load_run_config(write_run(tmp_path), parse_overrides(["train.lr=1e-3"])).train.lr == 1e-3
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        parse_overrides(["=3"])


def test_missing_token_data_names_the_key(tmp_path):
    cfg = load_run_config(write_run(tmp_path))
    check_token_data(cfg)
    (tmp_path / "tokens.idx").unlink()
    with pytest.raises(ZeroLLMError, match=r"run.yaml: data.train: .*tokens.idx not found"):
        check_token_data(cfg)


STAGE_MODULE = """
    from dataclasses import dataclass
    from typing import ClassVar

    from train.config import check_record_file


    @dataclass
    class ToyConfig:
        RANGES: ClassVar[dict] = {"beta": (0, 1)}
        train_file: str = ""
        beta: float = 0.1


    CONFIG_SECTIONS = {"toy": ToyConfig}


    def preflight(cfg):
        check_record_file(cfg.toy.train_file, f"{cfg.path}: toy.train_file")
"""


def test_a_stage_brings_its_own_sections_and_input_check(tmp_path, capsys, monkeypatch):
    (tmp_path / "toy_stage.py").write_text(textwrap.dedent(STAGE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = write_run(tmp_path)
    (tmp_path / "tokens.bin").unlink()  # the stage's own check replaces the token-data one
    text = run.read_text() + f"toy:\n  train_file: {tmp_path / 'rows.jsonl'}\n"
    run.write_text(text)
    argv = ["--module", "toy_stage"]
    assert launch(run, *argv) == 2
    assert "run.yaml: toy.train_file: " in (err := capsys.readouterr().err) and "rows.jsonl not found" in err
    (tmp_path / "rows.jsonl").write_text('\n{"prompt": "a", "response": "b"}\n')
    assert launch(run, *argv) == 0
    capsys.readouterr()
    assert launch(run, *argv, "--set", "toy.beta=2") == 2
    assert "toy.beta: value 2.0 is out of range [0, 1]" in capsys.readouterr().err
    assert launch(run) == 2  # pretraining knows no toy section
    assert "toy: unknown section (valid sections: model, data, train, logging)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("rows.jsonl", "", "has no records"),
        ("rows.jsonl", "\n[1, 2]\n", "rows.jsonl:2: expected a JSON object per line, got list"),
        ("rows.jsonl", "{oops\n", "rows.jsonl:1: not valid JSON"),
        ("rows.parquet", "not parquet", "is not a parquet file"),
        ("rows.csv", "a,b\n", "expected a .jsonl, .jsonl.gz or .parquet file or a Hugging Face dataset directory"),
    ],
)
def test_bad_record_file_is_one_line_naming_file_and_key(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ZeroLLMError, match="^cfg.yaml: sft.train_file: ") as e:
        check_record_file(path, "cfg.yaml: sft.train_file")
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_record_inputs_that_pass(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    check_record_file(rows, "k")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1" + b"\0" * 8 + b"PAR1")
    check_record_file(tmp_path / "rows.parquet", "k")
    saved = tmp_path / "saved"  # datasets' save_to_disk layout
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    check_record_file(saved, "k")
    hub = tmp_path / "hub" / "data"  # a downloaded dataset repo: folders of shards
    hub.mkdir(parents=True)
    (hub / "train-00000.parquet").write_bytes(b"PAR1")
    check_record_file(tmp_path / "hub", "k")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZeroLLMError, match="is not a Hugging Face dataset directory"):
        check_record_file(tmp_path / "empty", "k")


def test_record_check_reads_gzipped_jsonl(tmp_path):
    import gzip

    good = tmp_path / "pairs.jsonl.gz"
    with gzip.open(good, "wt") as f:
        f.write('\n{"chosen": "a", "rejected": "b"}\n')
    check_record_file(good, "run.yaml: reward.train_file")
    bad = tmp_path / "list.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write("[1, 2]\n")
    with pytest.raises(ZeroLLMError, match=r"list.jsonl.gz:1: expected a JSON object per line, got list"):
        check_record_file(bad, "run.yaml: reward.train_file")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(ZeroLLMError, match=r"reward.train_file: .*broken.jsonl.gz: cannot be read"):
        check_record_file(broken, "run.yaml: reward.train_file")
