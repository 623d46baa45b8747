"""The run-config system: strict YAML, "auto" filling, batch arithmetic, clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest

from tests.conftest import REPO, run_cli
from train.config import check_ds_keys, fill_auto, load_ds_config, load_run_config, model_preset, read_ds_config
from train.errors import ConfigError

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
TINY = REPO / "configs" / "tiny.yaml"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_tiny_config_loads_with_preset_and_defaults():
    cfg = load_run_config(TINY)
    assert cfg.model.vocab_size == 512 and cfg.model.n_layer == 2  # from the tiny preset
    assert cfg.train.micro_batch_size == 4 and cfg.train.grad_accum_steps == 2
    assert cfg.logging.tensorboard is True  # default kept
    assert cfg.hash() == load_run_config(TINY).hash()


def test_overrides_change_values_and_hash():
    base = load_run_config(TINY)
    other = load_run_config(TINY, {"train.lr": 0.5, "model.n_layer": 3})
    assert other.train.lr == 0.5 and other.model.n_layer == 3
    assert other.hash() != base.hash()


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_every_ds_config_passes_deepspeeds_own_parser(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    precision = "fp16" if "fp16" in path.name else "bf16"
    cfg = load_run_config(TINY, {"train.precision": precision})
    ds = load_ds_config(path, cfg, world_size=1)
    assert "auto" not in json.dumps(ds)
    parsed = DeepSpeedConfig(ds)
    assert parsed.train_batch_size == cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    assert parsed.gradient_clipping == cfg.train.grad_clip
    assert parsed.optimizer_params["lr"] == cfg.train.lr
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert parsed.bfloat16_config.enabled == (precision == "bf16")


def test_auto_fill_uses_world_size():
    cfg = load_run_config(TINY)
    ds = fill_auto(read_ds_config(REPO / "ds_configs" / "zero2.json"), cfg, world_size=4)
    assert ds["train_batch_size"] == 4 * 2 * 4
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]


def test_unfillable_auto_names_the_field(tmp_path):
    ds = write(tmp_path, "ds.json", json.dumps({"train_batch_size": "auto", "foo": {"bar": "auto"}}))
    with pytest.raises(ConfigError, match=r"ds.json: foo.bar"):
        load_ds_config(ds, load_run_config(TINY), 1)


def test_precision_contradiction_is_an_error():
    cfg = load_run_config(TINY, {"train.precision": "bf16"})
    with pytest.raises(ConfigError, match="train.precision"):
        load_ds_config(REPO / "ds_configs" / "zero2_fp16.json", cfg, 1)


# Each bad input: (file name, file text, ds_config text or None, world size, what the line must name)
BAD_CASES = {
    "missing_file": (None, None, 1, ["nope.yaml", "not found"]),
    "malformed_yaml": ("model: [1, 2\ntrain: {}\n", None, 1, ["run.yaml", "malformed YAML", "line"]),
    "unknown_section": ("modle:\n  n_layer: 2\n", None, 1, ["run.yaml", "modle", "unknown section"]),
    "unknown_key": ("train:\n  learning_rate: 0.1\n", None, 1, ["run.yaml", "train.learning_rate", "unknown key"]),
    "wrong_type": ("train:\n  micro_batch_size: four\n", None, 1, ["run.yaml", "train.micro_batch_size", "int"]),
    "bool_for_int": ("train:\n  max_steps: true\n", None, 1, ["train.max_steps"]),
    "out_of_range": ("train:\n  grad_accum_steps: 0\n", None, 1, ["run.yaml", "train.grad_accum_steps", "range"]),
    "bad_literal": ("train:\n  precision: fp8\n", None, 1, ["train.precision", "'bf16'"]),
    "unknown_preset": ("model:\n  preset: gpt5\n", None, 1, ["gpt5", "tiny"]),
    "heads_not_dividing": ("model:\n  d_model: 65\n  n_head: 4\n", None, 1, ["model.d_model"]),
    "seq_len_too_long": ("model:\n  preset: tiny\ndata:\n  seq_len: 4096\n", None, 1, ["data.seq_len", "max_seq_len"]),
    "malformed_json": ("train: {}\n", '{"train_batch_size": 8,,}', 1, ["ds.json", "malformed JSON", "line 1"]),
    "impossible_batch": (
        "train:\n  micro_batch_size: 4\n  grad_accum_steps: 2\n",
        '{"train_batch_size": 12, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}',
        2,
        ["ds.json", "train_batch_size: 12", "micro_batch 4", "grad_accum 2", "world_size 2", "= 16"],
    ),
    "unknown_zero_stage": ("train: {}\n", '{"zero_optimization": {"stage": 4}}', 1, ["zero_optimization.stage", "4"]),
    "misspelled_ds_top_key": (
        "train: {}\n",
        '{"zero_optimisation": {"stage": 2}}',
        1,
        ["ds.json: zero_optimisation: unknown DeepSpeed key", "did you mean zero_optimization?"],
    ),
    "misspelled_zero_key": (
        "train: {}\n",
        '{"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 10}}',
        1,
        [
            "ds.json: zero_optimization.stage3_prefetch_bucket_sise: unknown",
            "did you mean stage3_prefetch_bucket_size?",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_is_one_clear_line_without_traceback(tmp_path, case):
    yaml_text, ds_text, world, must_name = BAD_CASES[case]
    run_yaml = tmp_path / ("nope.yaml" if yaml_text is None else "run.yaml")
    if yaml_text is not None:
        run_yaml.write_text(yaml_text)
    args = ["check-config", str(run_yaml), "--world-size", str(world)]
    if ds_text is not None:
        args += ["--deepspeed_config", str(write(tmp_path, "ds.json", ds_text))]
    result = run_cli(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in must_name:
        assert needle in lines[0], (needle, lines[0])


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "check-config", str(tmp_path / "missing.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_console_script_lists_subcommands():
    exe = shutil.which("zerollm") or str(Path(__import__("sys").executable).parent / "zerollm")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "check-config" in result.stdout


@dataclasses.dataclass
class ToySectionConfig:  # what a post-training stage's config looks like
    RANGES: ClassVar[dict] = {"beta": (0, 1)}
    beta: float = 0.1
    train_file: str = ""


def test_a_stage_section_loads_strictly_and_is_part_of_the_hash(tmp_path):
    run = write(tmp_path, "run.yaml", TINY.read_text() + "toy:\n  beta: 0.5\n")
    cfg = load_run_config(run, extra_sections={"toy": ToySectionConfig})
    assert cfg.sections["toy"] is cfg.toy and cfg.toy.beta == 0.5
    assert cfg.to_dict()["toy"] == {"beta": 0.5, "train_file": ""}
    other = load_run_config(run, {"toy.beta": 0.25}, extra_sections={"toy": ToySectionConfig})
    assert other.toy.beta == 0.25 and other.hash() != cfg.hash()
    assert load_run_config(TINY).hash() == load_run_config(TINY, extra_sections={}).hash()
    with pytest.raises(ConfigError, match=r"run.yaml: toy.beta: value 2.0 is out of range \[0, 1\]"):
        load_run_config(run, {"toy.beta": 2}, extra_sections={"toy": ToySectionConfig})
    with pytest.raises(ConfigError, match=r"run.yaml: toy.bta: unknown key \(valid keys: beta, train_file\)"):
        load_run_config(run, {"toy.bta": 2}, extra_sections={"toy": ToySectionConfig})
    with pytest.raises(
        ConfigError, match=r"run.yaml: toy: unknown section \(valid sections: model, data, train, logging\)"
    ):
        load_run_config(run)
    with pytest.raises(ConfigError, match="would replace a built-in section"):
        load_run_config(TINY, extra_sections={"train": ToySectionConfig})


def test_one_preset_table_for_the_model_and_the_run_config():
    from train.model import PRESETS, from_name

    assert model_preset("tiny") == PRESETS["tiny"]
    assert load_run_config(TINY).model == from_name("tiny")
    with pytest.raises(ConfigError, match=r"unknown model preset 'gpt5' \(presets: .*tiny"):
        from_name("gpt5")


def test_ds_key_check_follows_nested_models_and_skips_free_form_params():
    check_ds_keys({"optimizer": {"type": "AdamW", "params": {"anything": 1}}, "zero_optimization": False})
    cases = {
        "zero_optimization.offload_param.devcie": (
            {"zero_optimization": {"offload_param": {"devcie": "cpu"}}},
            "device",
        ),
        "bf16.enable": ({"bf16": {"enable": True}}, "enabled"),
        "activation_checkpointing.partition_activation": (
            {"activation_checkpointing": {"partition_activation": True}},
            "partition_activations",
        ),
    }
    for dotted, (ds, near) in cases.items():
        with pytest.raises(ConfigError, match=rf"x.json: {dotted}: unknown DeepSpeed key \(did you mean {near}\?\)"):
            check_ds_keys(ds, "x.json")
    with pytest.raises(ConfigError, match="x.json: elasticity: Elastic training has been removed"):
        check_ds_keys({"elasticity": {}}, "x.json")
