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
