"""`zerollm pretrain` / `sft` / `reward`, `zerollm export`, `zerollm reward score`,
`zerollm checkpoint universal` (light at import)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
from pathlib import Path

from train.errors import ZeroLLMError

log = logging.getLogger("zerollm")


STAGE_HELP = {
    "pretrain": "pretrain",
    "sft": "supervised fine-tuning on chat data",
    "reward": "train a reward model on preference pairs",
    "ppo": "PPO of a policy against a reward model (or a reward function), with a critic",
    "dpo": "direct preference optimisation of a policy on preference pairs",
    "grpo": "group-relative policy optimisation with a verifiable reward function",
}


def register(sub: argparse._SubParsersAction) -> None:
    # `zerollm STAGE ARGS` is rewritten to `zerollm launch STAGE ARGS` (launch/cli.py ALIASES);
    # these parsers only show the stages in `zerollm --help`.
    stages = {}
    for stage, what in STAGE_HELP.items():
        stages[stage] = p = sub.add_parser(
            stage,
            help=f"{what} (same as `zerollm launch {stage} ...`, e.g. --config R.yaml --ds ds_configs/zero2.json)",
            description=f"Run train.{stage} under the deepspeed launcher; every option of `zerollm launch` "
            "applies (see `zerollm launch --help`). Re-running resumes from the last checkpoint.",
        )
        p.set_defaults(func=lambda args: 0)
    register_reward_score(stages["reward"].add_subparsers(dest="reward_command", metavar="TOOL"))

    p = sub.add_parser(
        "export",
        help="export a checkpoint to a Hugging Face model directory",
        description="An LM run gives GPT2LMHeadModel / LlamaForCausalLM; a reward run gives "
        "GPT2ForSequenceClassification / LlamaForSequenceClassification (num_labels=1) with its "
        "reward_stats.json (mean, std, tokenizer hash, max_len); a PPO run gives its policy (the actor).",
    )
    p.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the resume point)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir to copy (default: reward.tokenizer or data.tokenizer)"
    )
    p.set_defaults(func=run_export)

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    u = csub.add_parser(
        "universal",
        help="convert a checkpoint to DeepSpeed's universal format (resume on another world size / ZeRO stage)",
    )
    u.add_argument("run_dir")
    u.add_argument("--tag", default=None, help="checkpoint tag (default: the resume point)")
    u.set_defaults(func=run_universal)


def run_universal(args: argparse.Namespace) -> int:
    # heavy: train.checkpoint/config/model/hf_export import torch, kept out of zerollm --help
    from train.checkpoint import convert_to_universal

    out = convert_to_universal(args.run_dir, args.tag)
    print(out)
    return 0


def load_run_dir_config(run_dir: str | Path):
    """A run dir's config.yaml, with the sections of the stage that wrote it (`sft:`, `reward:`)."""
    from train.config import load_run_config, read_yaml

    path = Path(run_dir) / "config.yaml"
    extra: dict[str, type] = {}
    for stage in STAGE_HELP:
        if stage in read_yaml(path):
            extra.update(getattr(importlib.import_module(f"train.{stage}"), "CONFIG_SECTIONS", {}))
    return load_run_config(path, extra_sections=extra)


def load_checkpoint_model(run_dir: str, tag: str | None = None, engine: str | None = None):
    """(model, run_config) from a DeepSpeed checkpoint of any ZeRO stage, fp32 weights: a
    CustomLanguageModel, or a RewardModel for a reward run (its `reward:` section, or
    `head.weight` among the checkpoint's keys).

    `engine` names one engine of a checkpoint that holds several (policy, value, ...).
    """
    from train.checkpoint import checkpoint_folder, consolidated_state_dict
    from train.hf_export import is_reward_state
    from train.model import CustomLanguageModel

    cfg = load_run_dir_config(run_dir)
    folder = checkpoint_folder(run_dir, tag)
    sd = consolidated_state_dict(folder, engine)
    if "reward" in cfg.sections or is_reward_state(sd):
        from train.reward import RewardModel

        model = RewardModel(cfg.model)
    else:
        model = CustomLanguageModel(cfg.model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # A tied head has no entry of its own in ZeRO's consolidated state dict.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise ZeroLLMError(f"{folder}: checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model, cfg


def run_export(args: argparse.Namespace) -> int:
    from train.checkpoint import checkpoint_folder
    from train.hf_export import export_hf, is_reward_state

    model, cfg = load_checkpoint_model(args.run_dir, args.tag)
    reward = is_reward_state(model.state_dict())
    rc = cfg.sections.get("reward")
    stage_tok = next((t for t in (getattr(sec, "tokenizer", "") for sec in cfg.sections.values()) if t), "")
    tok = args.tokenizer or stage_tok or cfg.data.tokenizer or None  # reward.tokenizer, ppo.tokenizer, ...
    out = Path(args.out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf(model, cfg.model, tmp, tokenizer_dir=tok)
    if reward:
        from train.reward import write_export_stats

        max_len = rc.max_len if rc else cfg.model.max_seq_len
        write_export_stats(args.run_dir, checkpoint_folder(args.run_dir, args.tag), tmp, tok, max_len)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(out)
    return 0


# ----------------------------------------------------------------------------- zerollm reward score


def register_reward_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score rows with a trained reward model (one json line per row)",
        description="Score each row of --input with a reward model: an exported reward dir (`zerollm "
        "export` of a reward run) or a reward run dir. Rows (jsonl / jsonl.gz / parquet): "
        '{"prompt","response"}, {"messages"} (the last turn is scored), {"text"}, or preference rows '
        '{"prompt","chosen","rejected"} (both scored). Tokenized exactly as in training: prompt ids + '
        "response ids + eos, the prompt cut from the left to fit --max-len. Each output line, in input "
        'order: "score" (or "chosen_score" / "rejected_score") and "normalized" = (score - mean) / std '
        "with the training mean/std of reward_stats.json. A bad row stops with one line before the "
        "model loads.",
    )
    p.add_argument("--model", required=True, help="exported reward dir or reward run dir")
    p.add_argument("--input", required=True, help="rows to score: .jsonl, .jsonl.gz or .parquet")
    p.add_argument(
        "--out", default=None, help="output jsonl (written atomically; default: ./<input stem>.scores.jsonl)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default 32)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer of the text's producer (e.g. the policy's); refused unless it is the reward model's",
    )
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence (default: the training max_len)")
    p.add_argument("--tag", default=None, help="checkpoint tag of a run dir (default: the resume point)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=run_reward_score)


def default_scores_path(inp: Path) -> Path:
    """./<input stem>.scores.jsonl: pairs.jsonl.gz -> pairs.scores.jsonl."""
    name = inp.name
    for ext in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(ext)
    return Path.cwd() / f"{name}.scores.jsonl"


def run_reward_score(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline.tokenizer import load_tokenizer
    from train import reward
    from train.preference_data import check_tokenizer, read_records, score_sequences

    if args.batch_size < 1:
        raise ZeroLLMError(f"--batch-size: {args.batch_size}, expected at least 1")
    rd = reward.open_reward_dir(args.model, args.tag)
    if args.tokenizer:
        reward.check_same_tokenizer(args.tokenizer, args.model)
    tok_dir = args.tokenizer or rd.tokenizer
    tok = load_tokenizer(tok_dir)
    check_tokenizer(tok, tok_dir)
    if len(tok) > rd.model.vocab_size:
        raise ZeroLLMError(f"{tok_dir}: {len(tok)} tokens, more than the model's vocab_size {rd.model.vocab_size}")
    max_len = args.max_len or rd.max_len
    if max_len > rd.model.max_seq_len and rd.model.pos_emb == "learned":
        raise ZeroLLMError(f"--max-len: {max_len} > the model's max_seq_len {rd.model.max_seq_len}")
    inp = Path(args.input)
    out = Path(args.out) if args.out else default_scores_path(inp)
    if out.resolve() == inp.resolve():
        raise ZeroLLMError(f"--out: {out} is the input file; name another")
    rows = score_sequences(read_records(inp), tok, max_len, str(inp))  # bad rows stop here, before the model
    stats = rd.stats if rd.stats and rd.stats.get("std", 0) > 0 else None
    if stats is None:
        log.warning("%s: no reward mean/std: writing raw scores without `normalized`", args.model)
    model = reward.load_reward_model(rd)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    flat = reward.score(model, [s for row in rows for s in row], tok.pad_token_id, args.batch_size, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w") as f:
        at = 0
        for row in rows:
            names = ["score"] if len(row) == 1 else ["chosen_score", "rejected_score"]
            line = {}
            for name, value in zip(names, flat[at : at + len(row)]):
                line[name] = value
                if stats is not None:
                    line[name.replace("score", "normalized")] = (value - stats["mean"]) / stats["std"]
            at += len(row)
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, out)
    log.info("scored %d rows (%d sequences) of %s with %s", len(rows), len(flat), inp, args.model)
    print(out)
    return 0
