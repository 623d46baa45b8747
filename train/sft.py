"""Supervised fine-tuning: next-token loss on assistant tokens only, from a trained model.

One node (2 CPU ranks or N GPUs):
    deepspeed --num_gpus 2 --master_addr 127.0.0.1 -m train.sft \
        --config configs/sft_tiny.yaml --deepspeed_config ds_configs/zero2.json
    zerollm sft --config configs/sft_tiny.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2

The run config's `sft:` section (SFTConfig below) names the data and the starting
weights (`sft.init_from`: an HF model dir or a ZeroLLM run dir). The model shape comes
from that source; the run config's `model:` section may set only the fields in
OVERRIDABLE_MODEL_FIELDS (dropout, activation checkpointing), anything else is refused.
Samples, loss mask, bad-row counts, the over-long rule and packing: train/chat_data.py;
the counts land in the log and in `<run_dir>/data_report.json`. Each eval logs the
held-out loss per assistant token and appends greedy generations for `sft.eval_prompts`
fixed validation prompts to `<run_dir>/samples.txt`.

Deviation from the usual recipe, on purpose: the loss of a step is the summed loss of
all assistant tokens of the step (all ranks, all micro batches) divided by their global
count, not a mean of per-sample or per-batch means, so every assistant token weighs the
same whatever the micro batch x accumulation split or the packing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline.sampler import DistributedSampler
from train import rollout, run
from train.chat_data import (
    Sample,
    ShuffledRows,
    build_samples,
    collate,
    end_of_turn_id,
    fingerprint,
    generation_prompt,
    load_chat_tokenizer,
    load_records,
    pack,
)
from train.config import check_record_file, parse_overrides, read_yaml
from train.engine import all_reduce_sum, open_initial_weights, to_device, zero_stage
from train.errors import ZeroLLMError
from train.loop import Stage
from train.losses import IGNORE_INDEX, lm_loss
from train.model import CustomLanguageModel

log = logging.getLogger("zerollm")

# `model:` keys a run config may set; the shape comes from sft.init_from.
OVERRIDABLE_MODEL_FIELDS = {"dropout", "activation_checkpointing"}


@dataclass
class SFTConfig:
    train_file: str = ""  # .jsonl / .parquet / HF dataset dir of {"messages"} or {"prompt","response"} rows
    valid_file: str = ""  # held-out rows, same forms ("" = no eval)
    init_from: str = ""  # HF model dir or ZeroLLM run dir to start from
    tokenizer: str = ""  # HF tokenizer dir; "" = init_from's own (HF dir) or its run's data.tokenizer
    max_len: int = 512  # input positions per row (a sample holds at most max_len + 1 tokens)
    packing: bool = True  # several conversations per row (block-diagonal attention via doc_ids)
    eval_prompts: int = 4  # validation prompts whose greedy generations go to samples.txt at each eval
    max_new_tokens: int = 64  # generation length of those samples

    RANGES = {"max_len": (2, None), "eval_prompts": (0, None), "max_new_tokens": (1, None)}


CONFIG_SECTIONS = {"sft": SFTConfig}


def preflight(cfg) -> None:
    """What `zerollm launch` checks on this node before any rank starts."""
    s = cfg.sft
    if not s.init_from:
        raise ZeroLLMError(f"{cfg.path}: sft.init_from: no starting model given (HF dir or ZeroLLM run dir)")
    if not Path(s.init_from).is_dir():
        raise ZeroLLMError(f"{cfg.path}: sft.init_from: {s.init_from} not found")
    if not s.train_file:
        raise ZeroLLMError(f"{cfg.path}: sft.train_file: no training data given")
    check_record_file(s.train_file, f"{cfg.path}: sft.train_file")
    if s.valid_file:
        check_record_file(s.valid_file, f"{cfg.path}: sft.valid_file")


# ----------------------------------------------------------------------------- model and data


def model_overrides(cfg, sets: list[str]) -> dict[str, Any]:
    """The `model:` keys the user wrote (YAML and --set): only OVERRIDABLE_MODEL_FIELDS."""
    written = dict(read_yaml(cfg.path).get("model") or {})
    written |= {k.partition(".")[2]: v for k, v in parse_overrides(sets).items() if k.startswith("model.")}
    for key in written:
        if key not in OVERRIDABLE_MODEL_FIELDS:
            raise ZeroLLMError(
                f"{cfg.path}: model.{key}: the model shape comes from sft.init_from; the model section "
                f"may set only {', '.join(sorted(OVERRIDABLE_MODEL_FIELDS))}"
            )
    return {k: getattr(cfg.model, k) for k in written}


def tokenizer_dir(s: SFTConfig) -> str:
    return rollout.find_tokenizer(s.tokenizer, s.init_from, "sft.tokenizer")


@dataclass
class Data:
    tok: Any
    train: ShuffledRows  # global sample number -> row (list of samples)
    valid: list[list[Sample]]  # one sample per row
    prompts: list[list[int]]  # generation prompts (ids, turn by turn + assistant header)
    fingerprint: str
    report: dict[str, Any]
    max_new_tokens: int = 64


def build_data(cfg, rank: int) -> Data:
    """Tokenizer, token-exact train/valid samples and the data report (also written to the run dir)."""
    from data_pipeline.tokenizer import tokenizer_hash

    s = cfg.sft
    tdir = tokenizer_dir(s)
    tok = load_chat_tokenizer(tdir)
    if len(tok) > cfg.model.vocab_size:
        raise ZeroLLMError(f"{tdir}: the tokenizer has {len(tok)} tokens, the model from sft.init_from only "
                           f"{cfg.model.vocab_size}")  # fmt: skip
    if cfg.model.pos_emb == "learned" and s.max_len > cfg.model.max_seq_len:
        raise ZeroLLMError(f"{cfg.path}: sft.max_len: {s.max_len} exceeds the model's max_seq_len "
                           f"{cfg.model.max_seq_len}")  # fmt: skip
    convs, rep = load_records(s.train_file)
    samples = build_samples(convs, tok, s.max_len, rep)
    rows = pack(samples, s.max_len) if s.packing else [[x] for x in samples]
    report = {"train": rep.to_dict() | {"rows": len(rows)}, "tokenizer_hash": tokenizer_hash(tdir)}
    summaries = [rep.summary()]
    valid, prompts = [], []
    if s.valid_file:
        vconvs, vrep = load_records(s.valid_file)
        valid = [[x] for x in build_samples(vconvs, tok, s.max_len, vrep)]
        prompts = [generation_prompt(tok, c)[-s.max_len :] for c in vconvs[: s.eval_prompts]]
        report["valid"] = vrep.to_dict()
        summaries.append(vrep.summary())
    if rank == 0:
        for line in summaries:
            log.info("sft data: %s", line)
        run_dir = Path(cfg.logging.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))
    seed = cfg.data.seed
    return Data(tok, ShuffledRows(rows, seed), valid, prompts, fingerprint(rows, seed), report, s.max_new_tokens)


# ----------------------------------------------------------------------------- steps


def token_loss(engine, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Summed next-token loss of the assistant tokens of one micro batch. Only those positions
    go through the head (`logits_where`): the head over the whole vocabulary is most of a
    small model's step, and prompt and padding positions would only be thrown away."""
    keep = batch["y"] != IGNORE_INDEX  # (B, T)
    logits, _ = engine(batch["x"], doc_ids=batch["doc_ids"], logits_where=keep)  # (n, V)
    loss, _ = lm_loss(logits, batch["y"][keep])
    return loss


def count(batch) -> int:
    return int((batch["y"] != IGNORE_INDEX).sum())


def evaluate(engine, data: Data, cfg, step_of: dict[str, int]) -> dict[str, float]:
    """Held-out loss per assistant token (first eval_steps micro batches per rank), and
    greedy generations for the fixed prompts appended to samples.txt."""
    mb, rank, world = cfg.train.micro_batch_size, engine.global_rank, engine.world_size
    engine.eval()
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        mine = data.valid[rank::world]
        for k in range(0, min(len(mine), cfg.train.eval_steps * mb), mb):
            batch = collate(mine[k : k + mb], data.tok.pad_token_id)
            loss_sum += float(token_loss(engine, to_device(batch, engine)))
            n += count(batch)
        texts = generate(engine.module, data) if data.prompts else []
    engine.train()
    total, units = all_reduce_sum([loss_sum, n])
    if rank == 0 and texts:
        with open(Path(cfg.logging.run_dir) / "samples.txt", "a") as f:
            f.write(f"=== step {step_of['step']}\n")
            for prompt, text in zip(data.prompts, texts):
                f.write(f"--- prompt: {data.tok.decode(prompt)!r}\n{text}\n")
    return {"eval_loss": total / max(1.0, units), "eval_tokens": units}


def generate(model, data: Data) -> list[str]:
    """Greedy continuations (every rank runs them: ZeRO-3 gathers parameters collectively)."""
    eot = end_of_turn_id(data.tok)
    out = []
    for prompt in data.prompts:
        room = model.cfg.max_seq_len - len(prompt) if model.cfg.pos_emb == "learned" else 1 << 30
        new = min(data.max_new_tokens, room)
        if new < 1:
            out.append("")
            continue
        ids = model.generate(torch.tensor([prompt]), new, temperature=0.0, eos_token_id=eot)
        out.append(data.tok.decode(ids[0, len(prompt) :].tolist()))
    return out


def make_stage(engine, cfg, data: Data, state: dict[str, Any]) -> Stage:
    t = cfg.train
    rank, world = engine.global_rank, engine.world_size
    gas, mb = t.grad_accum_steps, t.micro_batch_size
    total = t.max_steps * mb * gas * world
    sampler = iter(DistributedSampler(total, rank, world, mb, consumed_samples=state["consumed_samples"]))
    max_len = cfg.sft.max_len if cfg.sft.packing else None  # packed rows are full; plain rows padded per batch

    def next_batches():
        return [collate([data.train[i] for i in next(sampler)], data.tok.pad_token_id, max_len) for _ in range(gas)]

    return Stage(
        name="sft",
        next_batches=next_batches,
        count=count,
        loss=token_loss,
        samples_per_step=mb * gas * world,
        evaluate=(lambda: evaluate(engine, data, cfg, state)) if data.valid and t.eval_interval else None,
        unit="tokens",
        flops_per_unit=engine.module.flops_per_token(cfg.sft.max_len),
    )


# ----------------------------------------------------------------------------- state


def model_shape(model_cfg) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in OVERRIDABLE_MODEL_FIELDS | {"init_std"}}


# What a resume must find unchanged, as the user would name it.
RESUME_CHECKS = {
    "data_fingerprint": "data (sft.train_file/max_len/packing, data.seed)",
    "model": "model shape (sft.init_from)",
    "tokenizer_hash": "tokenizer",
}


# ----------------------------------------------------------------------------- main


def stage_run(args) -> int:
    r = run.start(args, CONFIG_SECTIONS)
    cfg = r.cfg
    if not cfg.sft.init_from:
        raise ZeroLLMError(f"{cfg.path}: sft.init_from: no starting model given (HF dir or ZeroLLM run dir)")
    source = open_initial_weights(cfg.sft.init_from, model_overrides(cfg, args.set))
    run.adopt_model(r, source, args.deepspeed_config)  # the source's shape; the model section only set knobs
    data = build_data(cfg, r.rank)
    engine = run.build(r, lambda: CustomLanguageModel(source.config), init_from=source)
    state = {
        "step": 0,
        "consumed_samples": 0,
        "data_fingerprint": data.fingerprint,
        "model": model_shape(cfg.model),
        "config_hash": cfg.hash(),
        "tokenizer_hash": data.report["tokenizer_hash"],
        "skipped_steps": 0,
    }
    fresh = dict(state)
    ckpt, state, resumed = run.resume(
        r, engine, state, lambda saved, where: run.refuse_another_run(saved, fresh, where, RESUME_CHECKS)
    )
    run.write_snapshot(r)
    if r.rank == 0:
        log.info("model: %s parameters; world size %d; ZeRO stage %s; packing %s",
                 f"{engine.module.num_parameters():,}", r.world, zero_stage(r.ds), cfg.sft.packing)  # fmt: skip
    return run.loop(r, engine, make_stage(engine, cfg, data, state), ckpt, state, resumed)


def main(argv: list[str] | None = None) -> None:
    run.main(stage_run, argv, prog="train.sft", doc=__doc__)


if __name__ == "__main__":
    main()
