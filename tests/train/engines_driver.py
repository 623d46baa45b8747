"""Driver for tests/train/test_engines.py, run on 2 CPU ranks by the real launcher:

    deepspeed --num_gpus 2 --master_addr 127.0.0.1 tests/train/engines_driver.py WORK

WORK holds hf_gpt2/ and hf_llama/ (exported by the test) and expected.pt (their
transformers logits on fixed ids). Each rank writes WORK/rank<r>.json with what it saw, then
the driver saves a second two-engine checkpoint with ZEROLLM_FAULT set by the test (rank 1
is killed inside the save of engine "value").
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import yaml

from train import rollout
from train.checkpoint import Checkpointer
from train.config import DataConfig, LoggingConfig, RunConfig, TrainConfig
from train.engine import (
    build_engine,
    build_frozen_engine,
    init_distributed,
    open_initial_weights,
    resolve_ds_config,
)
from train.model import CustomLanguageModel

REPO = Path(__file__).resolve().parents[2]


def run_config(model_cfg, run_dir: Path) -> RunConfig:
    train = TrainConfig(micro_batch_size=2, grad_accum_steps=1, precision="fp32", lr=1e-2, warmup_steps=0)
    return RunConfig(model_cfg, DataConfig(seq_len=16), train, LoggingConfig(run_dir=str(run_dir)))


def max_diff(engine, idx: torch.Tensor, expected: torch.Tensor) -> float:
    with torch.no_grad():
        logits, _ = engine(idx)
    return (logits.float() - expected).abs().max().item()


def partitions(engine) -> dict[str, torch.Tensor]:
    """This rank's ZeRO-3 partition of every parameter (a copy)."""
    return {n: p.ds_tensor.detach().clone() for n, p in engine.module.named_parameters()}


def resident(engine) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model)."""
    params = list(engine.module.parameters())
    return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)


def train_step(engine, idx: torch.Tensor) -> None:
    engine.train()
    _, loss = engine(idx, idx)
    engine.backward(loss)
    engine.step()
    engine.eval()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(sys.argv[-1])  # the launcher puts --local_rank=N first
    rank, world = init_distributed()
    expected = torch.load(work / "expected.pt")
    out: dict = {"rank": rank}
    engines, sources = {}, {}
    for style in ("gpt2", "llama"):
        src = open_initial_weights(work / f"hf_{style}", overrides={"dropout": 0.0})
        sources[style] = src
        out[f"{style}_overridden"] = {k: list(v) for k, v in src.overridden.items()}
        idx, want = expected[style]["idx"], expected[style]["logits"]
        cfg = run_config(src.config, work / "run")
        ds3 = resolve_ds_config(str(REPO / "ds_configs" / "zero3.json"), cfg, world)

        def make(c=src.config):
            return CustomLanguageModel(c)

        engine = build_engine(cfg, ds3, make, init_from=src)
        engine.eval()
        out[f"{style}_zero3_diff"] = max_diff(engine, idx, want)
        out[f"{style}_zero3_resident"] = resident(engine)
        prompts = [idx[0, :5].tolist(), idx[1, :9].tolist()]  # two lengths: left padding
        with rollout.gathered(engine) as model:  # the rollout path: a hook-free replica
            out[f"{style}_zero3_generated"] = rollout.generate(model, prompts, 6, eot=-1, pad_id=0)
            out[f"{style}_replica_has_ds_params"] = any(hasattr(p, "ds_id") for p in model.parameters())
        out[f"{style}_zero3_resident_after_generate"] = resident(engine)
        engines[style] = engine

        frozen = build_frozen_engine(make, ds3, init_from=src)
        out[f"{style}_frozen_diff"] = max_diff(frozen, idx, want)
        out[f"{style}_frozen_resident"] = resident(frozen)
        out[f"{style}_frozen_trainable"] = sum(p.requires_grad for p in frozen.module.parameters())
        out[f"{style}_frozen_optimizer"] = type(frozen.optimizer).__name__
        out[f"{style}_frozen_training"] = frozen.module.training
        del frozen
        offloaded = build_frozen_engine(make, ds3, init_from=src, offload_param=True)
        out[f"{style}_offload_diff"] = max_diff(offloaded, idx, want)
        del offloaded

        ds0 = resolve_ds_config(str(REPO / "ds_configs" / "zero0.json"), cfg, world)
        plain = build_engine(cfg, ds0, make, init_from=src)
        plain.eval()
        out[f"{style}_zero0_diff"] = max_diff(plain, idx, want)
        out[f"{style}_zero0_generated"] = rollout.generate(plain.module, prompts, 6, eot=-1, pad_id=0)
        del plain

    # Two engines in one checkpoint: train each a step, save, step again, load: same weights.
    run = work / "run"
    if rank == 0:
        run.mkdir(exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(run_config(sources["gpt2"].config, run).to_dict()))
    named = {"policy": engines["gpt2"], "value": engines["llama"]}
    idx = {"policy": expected["gpt2"]["idx"], "value": expected["llama"]["idx"]}
    for name, engine in named.items():
        train_step(engine, idx[name])
    saved = {name: partitions(e) for name, e in named.items()}
    with torch.no_grad():
        saved_logits = engines["gpt2"](idx["policy"])[0]
    ckpt = Checkpointer(run, rank, world)
    ckpt.save(named, 1, {"step": 1})
    for name, engine in named.items():
        train_step(engine, idx[name])
    out["changed_by_step"] = any(
        not torch.equal(saved["policy"][n], p.ds_tensor) for n, p in named["policy"].module.named_parameters()
    )
    state = ckpt.load(named, ckpt.find_resume())
    out["loaded_state"] = state
    out["round_trip_equal"] = all(
        torch.equal(saved[name][n], p.ds_tensor) for name, e in named.items() for n, p in e.module.named_parameters()
    )

    # A ZeRO-3 engine started from that run (engine "policy"): consolidated on rank 0, sent per parameter.
    src = open_initial_weights(run, engine="policy")
    cfg = run_config(src.config, run)
    ds3 = resolve_ds_config(str(REPO / "ds_configs" / "zero3.json"), cfg, world)
    from_run = build_engine(cfg, ds3, lambda: CustomLanguageModel(src.config), init_from=src)
    from_run.eval()
    out["from_run_diff"] = max_diff(from_run, idx["policy"], saved_logits)
    del from_run

    (work / f"rank{rank}.json").write_text(json.dumps(out))
    ckpt.save(named, 2, {"step": 2})  # ZEROLLM_FAULT=in_save:value:1:2 kills rank 1 in here
    if rank == 0:
        logging.info("second save finished")


if __name__ == "__main__":
    main()
