"""Post-training tasks whose success can be checked, from the stdlib's own sources.

    zerollm demo-tasks runs/demo/data/stdlib.jsonl --out runs/demo/tasks --task line   # make demo
    zerollm demo-tasks runs/demo/data/stdlib.jsonl --out runs/demo/tasks_body           # body

Two tasks, the same six files, from the stdlib's short documented functions:

- `line` (`make demo`'s): from the function's `def` line alone, write its first statement,
  one line; checked by `line_success` (after the body task's code).
- `body` (the default): from its `def` line and docstring, write the whole body; checked by
  `success` (below). Too hard for the demo's model: its strict success stayed 0.

The body task in detail:
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

The line task: its prompt is the `def` line without the docstring, so the parameter names
sit right above the answer. Measured with the demo's 1.5M-parameter model: it copies a name
from the line just above far more readily than across a docstring; with the docstrings in
the prompt (400 pretraining steps) its SFT answers passed 0 held-out prompts and PPO / GRPO
drifted to prompt-independent answers; without them `make demo` starts at about 10%.
3 in 7 of its rejected answers (LINE_REJECTS) are the real line with its parameter names
swapped for another answer's names (`renamed`: the small model's commonest mistake), the
rest cut, trivial, another function's line, or a bare parameter. Its held-out split is
larger (a fifth of the files) and takes at most 4 tasks of a file (LINE_PER_FILE), so no
one module's parameter names fill it: measured on the demo corpus (Python 3.11, 138 held-out prompts),
the best single fixed answer, of every training answer and `return f(name)`-like guesses,
passes 10.9% of them (a line reading `args`). Its training split takes at most 8 of a file
(tkinter's alone held 204 of 1,308, and the SFT model answered `self.tk.call(self._w, ...)`
to everything).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import json
import keyword
import os
import random
import textwrap
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.errors import ZeroLLMError

MAX_BODY_CHARS = 160
MAX_PROMPT_CHARS = 400
VALID_SHARE = 0.1  # share of source files (hashed) whose functions are held out
TRIVIAL = ["pass", "...", "return", "return None", "raise NotImplementedError"]
MAX_LINE_CHARS = 80
LINE_VALID_SHARE = 0.2
LINE_PER_FILE = {"train": 8, "valid": 4}  # line tasks of one source file at most
LINE_REJECTS = ("renamed",) * 3 + ("cut", "trivial", "other", "bare")  # 3 in 7 rejected lines are renamed


# ----------------------------------------------------------------------------- extraction


def _documented_functions(source: str):
    """(node, lines, prompt, indent) for each undecorated function of `source` with a
    docstring and at least one statement after it; the prompt is its `def` line(s) and
    docstring, dedented."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.decorator_list or len(node.body) < 2:
            continue
        doc = node.body[0]
        if not _is_docstring(doc):
            continue
        head = textwrap.dedent("\n".join(lines[node.lineno - 1 : doc.end_lineno])) + "\n"
        indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
        yield node, lines, head, indent


def functions_of(source: str) -> list[tuple[str, str]]:
    """(prompt, body) for each short documented function of one module's source."""
    out = []
    for node, lines, head, indent in _documented_functions(source):
        rest = node.body[1:]
        if len(rest) > 4 or not _useful(rest, node):
            continue
        body_lines = lines[rest[0].lineno - 1 : rest[-1].end_lineno]
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
    names = _all_params(fn)
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


# ----------------------------------------------------------------------------- the line task

SIMPLE = (ast.Return, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Raise, ast.Assert)
OPERATIONS = (
    *(ast.Call, ast.Attribute, ast.Subscript, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp),
    *(ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.JoinedStr, ast.Lambda, ast.AugAssign),
)  # a line that holds one of these does something (`return x` and `a = b` do not)
BUILTINS = frozenset(dir(builtins))


def first_lines_of(source: str) -> list[tuple[str, str]]:
    """(prompt, first line) for each documented function whose first statement, one line of
    at most MAX_LINE_CHARS characters, passes `line_success`; the prompt is the `def` line(s)
    alone, without the docstring (the parameters right above the answer: see the module doc)."""
    out = []
    for node, lines, _, indent in _documented_functions(source):
        first = node.body[1]
        if first.lineno != first.end_lineno:
            continue
        head = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1])) + "\n"
        line = lines[first.lineno - 1][indent:] + "\n"
        if len(line) > MAX_LINE_CHARS or len(head) > MAX_PROMPT_CHARS or "\t" in head + line:
            continue
        if line_success(head, line) == 1.0:
            out.append((head, line))
    return out


def line_success(prompt: str, completion: str) -> float:
    """1.0 when `completion` is one statement that does something with the function's own
    parameters: prompt + completion (its complete lines) parses as the one function, whose
    body after the docstring is exactly one simple statement (`return`, an assignment, a
    call...), not trivial and not names alone (`return x`, `a = b`: an operation, a call, an
    attribute or an index is needed), reading a parameter other than `self` / `cls` (a
    function without one is no task), and at most one name that is neither a parameter, a
    builtin nor bound in the line (a module global it calls; a guessed list of common
    parameter names, one fixed answer for many prompts, reads more). An answer without a
    newline is read as one line (a model may end its turn right after the code)."""
    text = _lines(completion)
    try:
        tree = ast.parse(prompt + text)
    except (SyntaxError, ValueError):  # ValueError: NUL bytes
        return 0.0
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return 0.0
    fn = tree.body[0]
    stmts = fn.body[1:] if _is_docstring(fn.body[0]) else fn.body
    if len(stmts) != 1 or not isinstance(stmts[0], SIMPLE) or _trivial(stmts[0]):
        return 0.0
    s, params = stmts[0], _all_params(fn)
    if not any(isinstance(n, OPERATIONS) for n in ast.walk(s)) or not _reads(s, params - {"self", "cls"}):
        return 0.0
    return 1.0 if len(_unknown_names(s, params)) <= 1 else 0.0


def line_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The batch form PPO / GRPO / DPO call (`data_pipeline.function_tasks:line_reward`)."""
    return [line_success(p, c) for p, c in zip(prompts, completions, strict=True)]


def line_partial_credit(prompt: str, completion: str) -> float:
    """Shaped `line_success` in [0, 1], 1.0 exactly when it is 1.0, and 0.5 for an answer whose
    first line, after the prompt, parses as one statement of the function that reads a
    parameter other than `self` / `cls`; 0 otherwise, however well-formed: only the part of
    the task that depends on the prompt pays. Measured: an earlier form that paid half of
    its credit for a well-formed line led a demo GRPO run to fixed answers that earn it on
    every method (`self.name = self.path.get()`, 9 of 32 held-out prompts, strict 0 -> 0);
    with this one the demo's GRPO raised the held-out strict success (README)."""
    if line_success(prompt, completion) == 1.0:
        return 1.0
    first = _lines(completion).split("\n", 1)[0] + "\n"
    try:
        tree = ast.parse(prompt + first)
    except (SyntaxError, ValueError):
        return 0.0
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return 0.0  # dedented code
    fn = tree.body[0]
    stmts = fn.body[1:] if _is_docstring(fn.body[0]) else fn.body
    if len(stmts) != 1:
        return 0.0  # no statement added to the prompt
    return 0.5 * _reads(stmts[0], _all_params(fn) - {"self", "cls"})


def _lines(completion: str) -> str:
    """The complete lines of a completion (the text after the last newline is not code: a
    cut-off answer), or the whole of it as one line when it holds no newline."""
    if "\n" not in completion:
        return completion + "\n" if completion.strip() else ""
    return completion[: completion.rfind("\n") + 1]


def line_partial_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The batch form of `line_partial_credit` (`data_pipeline.function_tasks:line_partial_reward`)."""
    return [line_partial_credit(p, c) for p, c in zip(prompts, completions, strict=True)]


def _all_params(fn: ast.FunctionDef) -> set[str]:
    """Every parameter's name, `self` / `cls` included."""
    a = fn.args
    every = [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []), *([a.kwarg] if a.kwarg else [])]
    return {x.arg for x in every}


def _unknown_names(s: ast.stmt, params: set[str]) -> set[str]:
    """Names `s` reads that are not parameters, builtins or bound in `s` (targets, loop and
    lambda variables)."""
    walk = list(ast.walk(s))
    bound = {n.id for n in walk if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    bound |= {a.arg for n in walk if isinstance(n, ast.Lambda) for a in [*n.args.args, *n.args.kwonlyargs]}
    read = {n.id for n in walk if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return read - params - bound - BUILTINS


# ----------------------------------------------------------------------------- files


def rejected_for(
    prompt: str, body: str, others: list[str], rng: random.Random, check=None, kinds=("cut", "trivial", "other")
) -> str:
    """An answer for `prompt` that fails `check` (`success`): cut, trivial, another function's,
    (kind "bare") a parameter's name alone, or (kind "renamed") the real answer with each
    parameter it reads replaced by a name from another answer: the same line, with names
    that are not this function's (the mistake a small model makes most)."""
    check = check or success
    kinds = list(kinds)
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "cut":
            cut = body[: max(1, rng.randrange(len(body) // 3, max(len(body) // 3 + 1, 2 * len(body) // 3)))]
            cand = cut.rstrip() + "\n"
        elif kind == "trivial":
            cand = f"    {rng.choice(TRIVIAL)}\n"
        elif kind == "renamed":
            cand = _renamed(prompt, body, rng.choice(others), rng)
        elif kind == "bare":
            cand = f"    return {min(_prompt_params(prompt) - {'self', 'cls'} or {'self'})}\n"
        else:
            cand = rng.choice(others)
        if cand != body and check(prompt, cand) == 0.0:
            return cand
    return "    pass\n"


def _prompt_params(prompt: str) -> set[str]:
    """The parameters of the function whose `def` line (and docstring) `prompt` is."""
    return _all_params(ast.parse(prompt + "    pass\n").body[0])


def _renamed(prompt: str, body: str, other: str, rng: random.Random) -> str:
    """`body` with each parameter's name in it (not attributes: `x.name` stays) replaced by
    one name of `other` that is no parameter here; `body` itself when there is none."""
    params = _prompt_params(prompt)
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(body).readline))
        pool = sorted({t.string for t in tokenize.generate_tokens(io.StringIO(other).readline)
                       if t.type == tokenize.NAME and t.string.isidentifier() and not keyword.iskeyword(t.string)}
                      - params - BUILTINS - {"self", "cls"})  # fmt: skip
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return body
    if not pool:
        return body
    swap = {n: rng.choice(pool) for n in sorted(params - {"self", "cls"})}
    lines = body.splitlines(keepends=True)
    for k in range(len(toks) - 1, -1, -1):  # from the end: earlier columns stay valid
        t = toks[k]
        if t.type == tokenize.NAME and t.string in swap and not (k and toks[k - 1].string == "."):
            (row, a), (_, b) = t.start, t.end
            lines[row - 1] = lines[row - 1][:a] + swap[t.string] + lines[row - 1][b:]
    return "".join(lines)


@dataclass(frozen=True)
class Task:
    """How `build_tasks` makes one task's files."""

    extract: Callable[[str], list[tuple[str, str]]]  # a module's source -> (prompt, answer)s
    check: Callable[[str, str], float]  # (prompt, completion) -> 1.0 / 0.0; every chosen answer passes
    valid_share: float  # share of source files (hashed) held out
    per_file: dict[str, int] | None  # train / valid tasks of one source file at most (None: all)
    rejects: tuple[str, ...]  # kinds of rejected answers (`rejected_for`)


TASKS = {
    "body": Task(functions_of, success, VALID_SHARE, None, ("cut", "trivial", "other")),
    "line": Task(first_lines_of, line_success, LINE_VALID_SHARE, LINE_PER_FILE, LINE_REJECTS),
}


def build_tasks(corpus: str | Path, out_dir: str | Path, seed: int = 0, task: str = "body") -> dict[str, int]:
    """Write one task's six files (atomically) from a demo-corpus jsonl; returns rows per file."""
    if task not in TASKS:
        raise ZeroLLMError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    spec = TASKS[task]
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
            part = "valid" if _hash01(text[:2000]) < spec.valid_share else "train"
            split[part] += spec.extract(text)[: spec.per_file[part] if spec.per_file else None]
    if not split["train"] or not split["valid"]:
        raise ZeroLLMError(f"{corpus}: found too few short documented functions for the tasks")
    rng = random.Random(seed)
    files: dict[str, list[dict[str, Any]]] = {}
    for part, items in split.items():
        rng.shuffle(items)
        bodies = [b for _, b in items]
        files[f"sft_{part}"] = [{"prompt": p, "response": b} for p, b in items]
        files[f"prefs_{part}"] = [
            {"prompt": p, "chosen": b, "rejected": rejected_for(p, b, bodies, rng, spec.check, spec.rejects)}
            for p, b in items
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
