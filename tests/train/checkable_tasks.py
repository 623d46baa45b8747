"""Checkable tasks for the post-training tests (numbers drawn at random: held-out prompts are new).

copy:   prompt "123=", chosen "123", rejected a corrupted copy (two digits swapped or one
        changed); `reward` (tests.train.checkable_tasks:reward): 1.0 for exactly the number.
parity: prompt "4 8 2 1 ?", chosen "odd" / "even" (of the number), rejected the other word;
        `parity_reward`: 1.0 for exactly the right word. `parity_sft_rows` are
        demonstrations of mixed quality (right with probability p_right), as unfiltered
        data is: SFT on them teaches the format and half the task, preferences the rest.
"""

from __future__ import annotations

import random
from pathlib import Path


def rows(n: int, seed: int = 0) -> list[dict]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        digits = [rng.randrange(10) for _ in range(3)]
        wrong = list(digits)
        i = rng.randrange(3)
        if rng.random() < 0.5:
            j = (i + 1) % 3
            wrong[i], wrong[j] = wrong[j], wrong[i]
        else:
            wrong[i] = (wrong[i] + rng.randrange(1, 10)) % 10
        if wrong != digits:
            number = "".join(map(str, digits))
            out.append({"prompt": f"{number}=", "chosen": number, "rejected": "".join(map(str, wrong))})
    return out


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(c.strip() == p.rstrip("=")) for p, c in zip(prompts, completions, strict=True)]


def raises(prompts, completions):
    raise RuntimeError("boom")


def returns_nan(prompts, completions):
    return [float("nan")] * len(prompts)


def parity_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        number = rng.randrange(1000, 10000)
        right, wrong = ("even", "odd") if number % 2 == 0 else ("odd", "even")
        out.append({"prompt": " ".join(str(number)) + " ?", "chosen": right, "rejected": wrong})
    return out


def parity_sft_rows(n: int, seed: int = 0, p_right: float = 0.5) -> list[dict]:
    rng = random.Random(seed + 1)
    return [{"prompt": r["prompt"], "response": r["chosen"] if rng.random() < p_right else r["rejected"]}
            for r in parity_rows(n, seed)]  # fmt: skip


def parity_reward(prompts: list[str], completions: list[str]) -> list[float]:
    want = ["even" if int(p.replace(" ", "").rstrip("?")) % 2 == 0 else "odd" for p in prompts]
    return [float(c.strip() == w) for w, c in zip(want, completions, strict=True)]


def says_even(prompts, completions):
    """A verifiable reward every policy can reach (always answer "even"): the GRPO test's
    target, where the SFT model's greedy answer is "odd" for every prompt."""
    return [float(c.strip() == "even") for c in completions]


def make_sft_start(root: Path) -> Path:
    """A tiny Llama-style model SFT'd on parity answers that are right half the time
    (the answer format, half the task), and train / held-out parity prompts."""
    import argparse
    import json

    import torch
    import yaml

    from data_pipeline.tokenizer import train_tokenizer
    from train.hf_export import export_hf
    from train.model import CustomLanguageModel, from_name
    from train.sft import stage_run

    texts = [f"{r['prompt']}{r['chosen']} {r['rejected']}" for r in parity_rows(1000, seed=1)]
    tok_dir = train_tokenizer(texts, root / "tok", 300)
    torch.manual_seed(0)
    cfg = from_name("tiny", vocab_size=300, dropout=0.0, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    export_hf(CustomLanguageModel(cfg), cfg, root / "hf", tokenizer_dir=tok_dir)
    sft = parity_sft_rows(400, seed=5, p_right=0.5)
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    for name, seed, n in (("prompts", 11, 512), ("valid", 12, 64)):
        rows = [{"prompt": r["prompt"]} for r in parity_rows(n, seed=seed)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft_cfg = {"model": {"dropout": 0.0},
               "sft": {"train_file": str(root / "sft.jsonl"), "init_from": str(root / "hf"), "max_len": 32,
                       "eval_prompts": 0},
               "train": {"micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 60, "warmup_steps": 0,
                         "lr": 1e-3, "schedule": "constant", "precision": "fp32", "eval_interval": 0,
                         "save_interval": 60, "weight_decay": 0.0},
               "logging": {"run_dir": str(root / "sft"), "log_interval": 10, "tensorboard": False}}  # fmt: skip
    (root / "sft.yaml").write_text(yaml.safe_dump(sft_cfg))
    zero0 = str(Path(__file__).resolve().parents[2] / "ds_configs" / "zero0.json")
    assert stage_run(argparse.Namespace(config=str(root / "sft.yaml"), deepspeed_config=zero0, set=[])) == 0
    return root
