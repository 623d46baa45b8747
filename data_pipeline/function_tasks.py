"""A post-training task whose success can be checked: write the body of a stdlib function.

    zerollm demo-tasks runs/demo/data/stdlib.jsonl --out runs/demo/tasks

From the demo corpus (the interpreter's own stdlib sources), every short function or
method with a docstring becomes a task: the prompt is its `def` line and docstring, the
answer its body (1-4 statements, at most MAX_BODY_CHARS characters), both dedented.
Functions are split into train / valid by a hash of their source file, so a held-out
prompt comes from a module the model never fine-tuned on. Written files:

    sft_train.jsonl, sft_valid.jsonl        {"prompt", "response"}: the real body
    prefs_train.jsonl, prefs_valid.jsonl    {"prompt", "chosen", "rejected"}: the real
                                            body vs a body that fails `success` (below)
    prompts_train.jsonl, prompts_valid.jsonl {"prompt"}: for PPO / GRPO rollouts

`success(prompt, completion)` is the verifiable reward, 1.0 or 0.0: the prompt plus the
completion (up to the end of its last complete line) parses as Python with `ast`, the
function's body holds a statement other than a docstring, `pass`, `...`, `return` /
`return None` or `raise NotImplementedError`, and it reads at least one of the
function's own parameters, `self` / `cls` only when there is no other (so no one fixed
answer, e.g. `return 0` or `self.x`, succeeds everywhere).
The rejected answer of a preference pair fails it in one of three seeded ways: the body
cut mid-way (no longer parses), a trivial body (`pass` and kin), or the body of another
function that reads none of this one's parameters.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import textwrap
from pathlib import Path
from typing import Any

from train.errors import ZeroLLMError

MAX_BODY_CHARS = 160
MAX_PROMPT_CHARS = 400
VALID_SHARE = 0.1  # share of source files (hashed) whose functions are held out
TRIVIAL = ["pass", "...", "return", "return None", "raise NotImplementedError"]


# ----------------------------------------------------------------------------- extraction


def functions_of(source: str) -> list[tuple[str, str]]:
    """(prompt, body) for each short documented function of one module's source."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.decorator_list or len(node.body) < 2:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        rest = node.body[1:]
        if len(rest) > 4 or not _useful(rest, node):
            continue
        head = textwrap.dedent("\n".join(lines[node.lineno - 1 : doc.end_lineno])) + "\n"
        body_lines = lines[rest[0].lineno - 1 : rest[-1].end_lineno]
        indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
        body = "\n".join(line[indent:] for line in body_lines) + "\n"
        if len(body) > MAX_BODY_CHARS or len(head) > MAX_PROMPT_CHARS or "\t" in head + body:
            continue
        if success(head, body) == 1.0:
            out.append((head, body))
    return out


def _useful(stmts: list[ast.stmt], fn: ast.FunctionDef) -> bool:
    names = _param_names(fn)
    return not all(_trivial(s) for s in stmts) and any(_reads(s, names) for s in stmts)


def _param_names(fn: ast.FunctionDef) -> set[str]:
    """The parameters a body must read one of: `self` / `cls` count only in a method that has
    no other parameter (else `self.x` would be one fixed answer passing for every method: a
    GRPO run on the demo learned `self.call(self._w)` for 26 of 32 held-out prompts)."""
    a = fn.args
    every = [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []), *([a.kwarg] if a.kwarg else [])]
    names = {x.arg for x in every}
    return (names - {"self", "cls"}) or names


def _trivial(s: ast.stmt) -> bool:
    if isinstance(s, ast.Pass):
        return True
    if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):  # docstring, `...`
        return True
    if isinstance(s, ast.Return) and (s.value is None or (isinstance(s.value, ast.Constant) and s.value.value is None)):
        return True
    if isinstance(s, ast.Raise) and s.exc is not None:
        exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _reads(s: ast.stmt, names: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in names and isinstance(n.ctx, ast.Load) for n in ast.walk(s))


# ----------------------------------------------------------------------------- the check


def success(prompt: str, completion: str) -> float:
    """1.0 when `prompt` + `completion` is a function with a real body reading its parameters."""
    text = completion if completion.endswith("\n") else completion[: completion.rfind("\n") + 1]
    try:
        tree = ast.parse(prompt + text)
    except (SyntaxError, ValueError):  # ValueError: NUL bytes
        return 0.0
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    if len(fns) != 1 or len(tree.body) != 1:
        return 0.0  # code after the function (dedented lines) is not a body
    return 1.0 if _useful(fns[0].body, fns[0]) else 0.0


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The batch form PPO / GRPO call (`data_pipeline.function_tasks:reward`)."""
    return [success(p, c) for p, c in zip(prompts, completions, strict=True)]


def partial_credit(prompt: str, completion: str) -> float:
    """Shaped reward in [0, 1] for RL on a model too small to pass `success` by chance:
    a quarter for each check passed, 1.0 exactly when `success` is 1.0.

    The checks read the longest run of the completion's complete lines that, after the
    prompt, still parses as the one function (so a good first line followed by noise earns
    credit): 1. that run adds a statement to the docstring; 2. it is the whole completion
    (the `success` parse); 3. a statement of it is not trivial (`pass` and kin); 4. it reads
    one of the function's parameters. An empty or blank answer earns 0.
    """
    text = completion if completion.endswith("\n") else completion[: completion.rfind("\n") + 1]
    lines = text.splitlines(keepends=True)
    for k in range(len(lines), 0, -1):  # longest first: a whole answer that parses costs one parse
        try:
            tree = ast.parse(prompt + "".join(lines[:k]))
        except (SyntaxError, ValueError):  # ValueError: NUL bytes
            continue
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
            continue  # dedented code after the function
        fn = tree.body[0]
        stmts = fn.body[1:] if _is_docstring(fn.body[0]) else fn.body
        if not stmts:
            continue  # blank lines only: nothing added to the prompt
        checks = [True, k == len(lines), not all(_trivial(s) for s in stmts),
                  any(_reads(s, _param_names(fn)) for s in stmts)]  # fmt: skip
        return sum(checks) / len(checks)
    return 0.0


def partial_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The batch form of `partial_credit` (`data_pipeline.function_tasks:partial_reward`)."""
    return [partial_credit(p, c) for p, c in zip(prompts, completions, strict=True)]


def _is_docstring(s: ast.stmt) -> bool:
    return isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)


# ----------------------------------------------------------------------------- files


def rejected_for(prompt: str, body: str, others: list[str], rng: random.Random) -> str:
    """A body for `prompt` that fails `success`: cut, trivial, or another function's."""
    kinds = ["cut", "trivial", "other"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "cut":
            cut = body[: max(1, rng.randrange(len(body) // 3, max(len(body) // 3 + 1, 2 * len(body) // 3)))]
            cand = cut.rstrip() + "\n"
        elif kind == "trivial":
            cand = f"    {rng.choice(TRIVIAL)}\n"
        else:
            cand = rng.choice(others)
        if cand != body and success(prompt, cand) == 0.0:
            return cand
    return "    pass\n"


def build_tasks(corpus: str | Path, out_dir: str | Path, seed: int = 0) -> dict[str, int]:
    """Write the six task files (atomically) from a demo-corpus jsonl; returns rows per file."""
    corpus = Path(corpus)
    if not corpus.is_file():
        raise ZeroLLMError(f"{corpus}: not found (make it with `zerollm demo-corpus DIR`)")
    split: dict[str, list[tuple[str, str]]] = {"train": [], "valid": []}
    with open(corpus, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ZeroLLMError(f"{corpus}: line {n}: expected a JSON object with a 'text' field") from None
            part = "valid" if _hash01(text[:2000]) < VALID_SHARE else "train"
            split[part] += functions_of(text)
    if not split["train"] or not split["valid"]:
        raise ZeroLLMError(f"{corpus}: found too few short documented functions for the tasks")
    rng = random.Random(seed)
    files: dict[str, list[dict[str, Any]]] = {}
    for part, items in split.items():
        rng.shuffle(items)
        bodies = [b for _, b in items]
        files[f"sft_{part}"] = [{"prompt": p, "response": b} for p, b in items]
        files[f"prefs_{part}"] = [
            {"prompt": p, "chosen": b, "rejected": rejected_for(p, b, bodies, rng)} for p, b in items
        ]
        files[f"prompts_{part}"] = [{"prompt": p} for p, _ in items]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        path = out / f"{name}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, path)
    return {name: len(rows) for name, rows in files.items()}


def _hash01(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
