"""Reward-model quality on real preference pairs: hh-rlhf held-out accuracy, ZeroLLM vs TRL's RewardTrainer.

    .venv/bin/pip install '.[bench]'      # TRL: a benchmark-only extra
    .venv/bin/python benchmarks/bench_reward_hh.py [--seeds 1234,1,2,3,4] [--recipe both] [--steps 32] [--pairs 8]
    .venv/bin/python benchmarks/bench_reward_hh.py --report a.json b.json    # the tables of saved --json runs

Per seed: the 1,800 hh-rlhf harmless pairs of ../shared/data split 90/10 by the seed (the split
`reward.valid_fraction` makes), a byte-level BPE (4,096 tokens) trained on the training split's
dialogues, one randomly initialised ~5M-parameter Llama-style model of ours exported with
train/hf_export.export_hf and its scalar head drawn as the stage draws it (train.reward.with_head),
so both sides start from identical weights; `--steps` optimizer steps of `--pairs` pairs, sequences
of at most `--max-len` tokens, fp32, no dropout, gradient clipping 1.0, no weight decay.

- ZeroLLM: the real stage (`train.reward.stage_run`, in this process, world size 1, ZeRO-0,
  `reward.init_from` = the exported model). Over-long pairs: the prompt is cut on its left.
- TRL: `RewardTrainer` on the same training rows (it drops pairs over max_length, in training
  and in its own evaluation).
- Recipes (the same for both sides): "zerollm" = lr 1e-3 cosine to 1e-4 after 4 warm-up
  steps, AdamW betas (0.9, 0.95) (what this bench ran before); "trl" = TRL's defaults: lr 1e-4
  linear to 0, no warm-up, betas (0.9, 0.999) (our `wsd` schedule with decay_fraction 1 and
  min_lr 0 is exactly that line). TRL gets the zerollm recipe through `optimizers=` (torch
  AdamW + a LambdaLR of train/schedule.lr_at).
- Both trained models are scored on the same held-out pairs, as ours tokenizes them: "all"
  (every pair the stage keeps) and "TRL-kept" (those TRL keeps too); TRL's own
  `evaluate()` (its tokenization, its kept pairs) is printed beside.

Held-out accuracy on ~180 pairs has a binomial standard error of ~0.037, and which pairs
a short run sees moves it more: compare means over seeds, not one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_1800.jsonl.gz"
MODEL = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False,
         "vocab_size": 4096, "n_layer": 5, "n_head": 4, "d_model": 256, "max_seq_len": 512, "dropout": 0.0}  # fmt: skip
VALID_FRACTION = 0.1
RECIPES = {  # train-section values; TRL gets the same numbers
    "zerollm": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 4, "schedule": "cosine", "betas": [0.9, 0.95]},
    "trl": {"lr": 1e-4, "min_lr": 0.0, "warmup_steps": 0, "schedule": "wsd", "decay_fraction": 1.0,
            "betas": [0.9, 0.999]},
}  # fmt: skip


def require_trl() -> str:
    try:
        import trl
    except ImportError:
        sys.exit("bench_reward_hh: TRL is not installed; it is a benchmark-only extra: pip install '.[bench]'")
    return trl.__version__


# ----------------------------------------------------------------------------- per seed


def split(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """The stage's seeded split (train/reward.py build_data), reproduced for the tokenizer and for TRL."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(rows))
    n_valid = int(round(len(rows) * VALID_FRACTION))
    return [rows[i] for i in sorted(order[n_valid:])], [rows[i] for i in sorted(order[:n_valid])]


def prepare(work: Path, rows: list[dict], seed: int):
    """Tokenizer (training split only) and the exported random model; returns (tok, model_cfg)."""
    import torch

    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
    from train.hf_export import export_hf
    from train.model import CustomLanguageModel, ModelConfig

    train_rows, _ = split(rows, seed)
    train_tokenizer([r[k] for r in train_rows for k in ("chosen", "rejected")], work / "tok", MODEL["vocab_size"])
    torch.manual_seed(seed)
    cfg = ModelConfig(**MODEL)
    export_hf(CustomLanguageModel(cfg), cfg, work / "hf", tokenizer_dir=work / "tok")
    return load_tokenizer(work / "tok"), cfg


def run_ours(work: Path, seed: int, recipe: str, a: argparse.Namespace):
    """The reward stage as `zerollm reward` runs it; returns (trained model, last eval row, data report)."""
    import yaml

    from train import reward, run

    run_dir = work / f"ours_{recipe}"
    cfg = {
        "model": {"dropout": 0.0},
        "data": {"seq_len": a.max_len, "seed": seed},
        "train": {"micro_batch_size": a.pairs, "grad_accum_steps": 1, "max_steps": a.steps, "weight_decay": 0.0,
                  "grad_clip": 1.0, "precision": "fp32", "eval_interval": a.steps, "save_interval": 0, "seed": seed,
                  **RECIPES[recipe]},
        "logging": {"run_dir": str(run_dir), "log_interval": a.steps, "tensorboard": False},
        "reward": {"train_file": str(HH), "tokenizer": str(work / "tok"), "init_from": str(work / "hf"),
                   "max_len": a.max_len, "valid_fraction": VALID_FRACTION, "stats_pairs": 8},
    }  # fmt: skip
    path = work / f"ours_{recipe}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    got, real = {}, run.loop

    def keep_engine(r, engine, *rest):
        got["engine"] = engine
        return real(r, engine, *rest)

    run.loop = keep_engine
    try:
        code = reward.stage_run(
            argparse.Namespace(config=str(path), deepspeed_config=str(REPO / "ds_configs/zero0.json"), set=[])
        )
    finally:
        run.loop = real
    if code:
        sys.exit(f"bench_reward_hh: the reward stage exited {code} (run dir {run_dir})")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [m for m in metrics if "eval_accuracy" in m][-1]
    return got["engine"].module, ev, json.loads((run_dir / "reward_data.json").read_text())


def run_trl(work: Path, seed: int, recipe: str, a: argparse.Namespace, rows: list[dict], model_cfg):
    """TRL's RewardTrainer from the same weights (LM trunk + the stage's seeded head); returns (model, eval)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from train.schedule import lr_at

    tok = AutoTokenizer.from_pretrained(work / "tok")
    rm = AutoModelForSequenceClassification.from_pretrained(work / "hf", num_labels=1, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)  # the head train.reward.with_head draws (its bias is 0)
    rm.score.weight.data.copy_(torch.randn(1, model_cfg.d_model, generator=gen) * model_cfg.init_std)
    rm.config.pad_token_id = tok.pad_token_id
    h = RECIPES[recipe]
    optimizers = (None, None)
    if recipe != "trl":  # TRL's defaults are the "trl" recipe; otherwise our exact optimizer and schedule
        opt = torch.optim.AdamW(rm.parameters(), lr=h["lr"], betas=tuple(h["betas"]), eps=1e-8, weight_decay=0.0)
        lam = lambda s: lr_at(s, h["lr"], h["min_lr"], h["warmup_steps"], a.steps, h["schedule"]) / h["lr"]  # noqa: E731
        optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lam))
    rank_env = {k: os.environ.pop(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if k in os.environ}
    # accelerate reads these while TRL's arguments are made: without them TRL runs as a plain
    # `python train.py` does (with them, in a 1-rank DistributedDataParallel over our process group)
    args = RewardConfig(output_dir=str(work / f"trl_{recipe}"), per_device_train_batch_size=a.pairs,
                        per_device_eval_batch_size=a.pairs, max_steps=a.steps, max_length=a.max_len, seed=seed,
                        bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none",
                        save_strategy="no", disable_tqdm=True, logging_steps=a.steps)  # fmt: skip
    train_rows, valid_rows = split(rows, seed)
    trainer = RewardTrainer(model=rm, args=args, train_dataset=Dataset.from_list(train_rows),
                            eval_dataset=Dataset.from_list(valid_rows), processing_class=tok,
                            optimizers=optimizers)  # fmt: skip
    if trainer.accelerator.distributed_type != "NO":
        sys.exit(f"bench_reward_hh: TRL would run distributed ({trainer.accelerator.distributed_type})")
    try:
        trainer.train()
        ev = trainer.evaluate()
    finally:
        os.environ.update(rank_env)
    return rm, {
        "accuracy": ev["eval_accuracy"],
        "kept": len(trainer.eval_dataset),
        "train_kept": len(trainer.train_dataset),
    }


def accuracy(score, pairs, pad_id: int, mb: int) -> float:
    """Share of pairs with score(chosen) > score(rejected); `score(ids, mask)` -> (2B,)."""
    import torch

    from train.preference_data import collate

    right = 0
    with torch.no_grad():
        for i in range(0, len(pairs), mb):
            b = collate(pairs[i : i + mb], pad_id)
            s = score(b["input_ids"], b["attention_mask"])
            right += int((s[: s.size(0) // 2] > s[s.size(0) // 2 :]).sum())
    return right / max(1, len(pairs))


def one_seed(seed: int, recipe: str, rows: list[dict], a: argparse.Namespace) -> dict:
    from train.preference_data import build_pairs

    with tempfile.TemporaryDirectory(prefix="bench_reward_") as tmp:
        work = Path(tmp)
        tok, model_cfg = prepare(work, rows, seed)
        t0 = time.time()
        ours, ev, data = run_ours(work, seed, recipe, a)
        t_ours = time.time() - t0
        t0 = time.time()
        trl_model, trl_ev = run_trl(work, seed, recipe, a, rows, model_cfg)
        t_trl = time.time() - t0
        _, valid_rows = split(rows, seed)
        eos = tok.eos_token
        kept_by_trl = [r for r in valid_rows
                       if max(len(tok(r[k] + eos).input_ids) for k in ("chosen", "rejected")) <= a.max_len]  # fmt: skip
        sets = {"all": build_pairs(valid_rows, tok, a.max_len, "held out").pairs,
                "trl_kept": build_pairs(kept_by_trl, tok, a.max_len, "held out, TRL-kept").pairs}  # fmt: skip
        ours.eval(), trl_model.eval()
        out = {"seed": seed, "recipe": recipe, "n_valid": len(valid_rows), "ours_eval": ev["eval_accuracy"],
               "trl_own": trl_ev["accuracy"], "trl_own_n": trl_ev["kept"], "trl_train_kept": trl_ev["train_kept"],
               "ours_train_kept": data["train"]["kept"], "s_ours": t_ours, "s_trl": t_trl}  # fmt: skip
        for name, pairs in sets.items():
            out[f"n_{name}"] = len(pairs)
            out[f"ours_{name}"] = accuracy(ours, pairs, tok.pad_token_id, a.pairs)
            out[f"trl_{name}"] = accuracy(lambda i, m: trl_model(input_ids=i, attention_mask=m).logits.squeeze(-1),
                                          pairs, tok.pad_token_id, a.pairs)  # fmt: skip
        return out


# ----------------------------------------------------------------------------- report


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def report(results: list[dict], a: argparse.Namespace, trl_version: str) -> None:
    print(f"\nhh-rlhf reward model, random ~5M Llama, {a.steps} steps x {a.pairs} pairs, max length {a.max_len}, "
          f"fp32; TRL {trl_version}")  # fmt: skip
    print("\n| recipe | seed | held-out | ours (all) | TRL (all) | TRL-kept | ours (TRL-kept) | TRL (TRL-kept) "
          "| TRL's own eval | train pairs ours / TRL |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['recipe']} | {r['seed']} | {r['n_all']} of {r['n_valid']} | {r['ours_all']:.3f} "
              f"| {r['trl_all']:.3f} | {r['n_trl_kept']} | {r['ours_trl_kept']:.3f} | {r['trl_trl_kept']:.3f} "
              f"| {r['trl_own']:.3f} on {r['trl_own_n']} "
              f"| {r['ours_train_kept']} / {r['trl_train_kept']} |")  # fmt: skip
    print("\n| recipe | seeds | ours (all) | TRL (all) | ours - TRL (all, paired) | ours (TRL-kept) | TRL (TRL-kept) "
          "| TRL's own eval |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        rs = [r for r in results if r["recipe"] == recipe]
        cols = [mean_std([r[k] for r in rs]) for k in ("ours_all", "trl_all")]
        cols.append(mean_std([r["ours_all"] - r["trl_all"] for r in rs]))
        cols += [mean_std([r[k] for r in rs]) for k in ("ours_trl_kept", "trl_trl_kept", "trl_own")]
        print(f"| {recipe} | {len(rs)} | " + " | ".join(cols) + " |")
    for r in results:
        if abs(r["ours_all"] - r["ours_eval"]) > 1e-9:
            print(f"warning: seed {r['seed']}: the stage's eval_accuracy {r['ours_eval']:.3f} != {r['ours_all']:.3f}")
    print("\nall: every held-out pair the ZeroLLM stage keeps; TRL-kept: those whose whole chosen and rejected "
          "sequences fit max length (what TRL trains and evaluates on); both models score the same token ids. "
          "mean ± sample std over seeds.")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--seeds", default="1234,1,2,3,4", help="comma-separated split/init/data-order seeds")
    p.add_argument("--recipe", default="both", choices=["both", *RECIPES])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--json", default="", help="also write the per-seed results here")
    p.add_argument(
        "--report", nargs="+", default=[], metavar="JSON", help="only print the tables of saved --json files"
    )
    a = p.parse_args()
    trl_version = require_trl()
    if a.report:
        report([r for f in a.report for r in json.loads(Path(f).read_text())], a, trl_version)
        return
    if not HH.is_file():
        sys.exit(f"bench_reward_hh: {HH} is absent")
    from train.preference_data import read_records

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rows = read_records(HH)
    recipes = list(RECIPES) if a.recipe == "both" else [a.recipe]
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for recipe in recipes:
            results.append(one_seed(seed, recipe, rows, a))
            logging.getLogger("zerollm").setLevel(logging.WARNING)
            r = results[-1]
            print(f"seed {seed} {recipe}: ours {r['ours_all']:.3f} ({r['s_ours']:.0f} s), TRL {r['trl_all']:.3f} "
                  f"({r['s_trl']:.0f} s) on {r['n_all']} pairs", file=sys.stderr, flush=True)  # fmt: skip
            if a.json:
                Path(a.json).write_text(json.dumps(results, indent=1))
    report(results, a, trl_version)


if __name__ == "__main__":
    main()
