"""The checkable post-training task (data_pipeline/function_tasks.py): its check and its files."""

from __future__ import annotations

import json
import random

import pytest

from data_pipeline.function_tasks import (
    LINE_PER_FILE,
    build_tasks,
    first_lines_of,
    functions_of,
    line_partial_credit,
    line_partial_reward,
    line_reward,
    line_success,
    partial_credit,
    partial_reward,
    rejected_for,
    reward,
    success,
)
from train.errors import ZeroLLMError

PROMPT = 'def area(w, h):\n    """The area of a w x h rectangle."""\n'

MODULE = '''
def area(w, h):
    """The area of a w x h rectangle."""
    return w * h


class Box:
    def volume(self, depth):
        """Volume of the box."""
        d = depth or 1
        return self.w * self.h * d

    def todo(self):
        """Not written yet."""
        raise NotImplementedError

    def constant(self):
        """Reads no parameter."""
        return 42
'''


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        ("    return w * h\n", 1.0),
        ("    return w * h\n<|im_end|", 1.0),  # the text after the last complete line is not code
        ("    return w *\n", 0.0),  # does not parse
        ("    pass\n", 0.0),
        ("    return None\n", 0.0),
        ("    raise NotImplementedError\n", 0.0),
        ('    """Again."""\n', 0.0),
        ("    return 0\n", 0.0),  # reads no parameter: one fixed answer must not win everywhere
        ("    return w * h\nprint(1)\n", 0.0),  # code after the function is not a body
        ("", 0.0),
    ],
)
def test_success_accepts_only_a_real_body_that_reads_a_parameter(completion, ok):
    assert success(PROMPT, completion) == ok


def test_reading_only_self_is_not_enough_in_a_method_that_has_other_parameters():
    """`self.call(self._w)` was one answer passing for every method (a GRPO run learned it)."""
    method = 'def scale(self, factor):\n    """Scale by factor."""\n'
    assert success(method, "    return self.call(self._w)\n") == 0.0
    assert success(method, "    return self.size * factor\n") == 1.0
    only_self = 'def close(self):\n    """Close it."""\n'
    assert success(only_self, "    self._file.close()\n") == 1.0  # nothing else to read


def test_reward_is_success_per_row():
    assert reward([PROMPT, PROMPT], ["    return h * w\n", "    pass\n"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "credit"),
    [
        ("    return w * h\n", 1.0),  # every check: a statement, the whole answer parses, real, reads w
        ("    return w * h\n    return (\n", 0.75),  # a good first line, then noise: not the whole answer
        ("    return 0\n", 0.75),  # reads no parameter
        ("    pass\n", 0.5),  # parses, trivial, reads nothing
        ("    return 0\n    x = (\n", 0.5),  # a real first line that reads nothing, then noise
        ("    return w *\n", 0.0),  # no line parses
        ("    return w * h\nprint(1)\n", 0.75),  # dedented code after the function: only the first line counts
        ("\n\n", 0.0),  # blank lines add no statement
        ("", 0.0),
    ],
)
def test_partial_credit_is_a_quarter_per_check_of_the_longest_parsing_lines(completion, credit):
    assert partial_credit(PROMPT, completion) == credit


@pytest.mark.parametrize(
    "completion",
    ["    return w * h\n", "    return w * h\n<|im_end|", "    return w *\n", "    pass\n", "    return 0\n",
     "    return w * h\nprint(1)\n", '    """Again."""\n', "    x = w\n    return (\n", "", "\n"],
)  # fmt: skip
def test_partial_credit_is_full_exactly_when_the_strict_check_passes(completion):
    assert (partial_credit(PROMPT, completion) == 1.0) == (success(PROMPT, completion) == 1.0)


def test_partial_reward_is_partial_credit_per_row():
    assert partial_reward([PROMPT, PROMPT], ["    return h * w\n", "    pass\n"]) == [1.0, 0.5]


def test_only_short_documented_useful_functions_become_tasks():
    found = dict(functions_of(MODULE))
    assert list(found) == [PROMPT, 'def volume(self, depth):\n    """Volume of the box."""\n']
    assert found[PROMPT] == "    return w * h\n"
    assert found['def volume(self, depth):\n    """Volume of the box."""\n'] == (
        "    d = depth or 1\n    return self.w * self.h * d\n"
    )


def test_task_files_hold_every_function_and_rejected_answers_fail_the_check(tmp_path):
    corpus = tmp_path / "c.jsonl"
    # Enough distinct modules that both the train and the held-out split get some.
    docs = [MODULE.replace("area", f"area{i}").replace("volume", f"volume{i}") for i in range(60)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    counts = build_tasks(corpus, tmp_path / "tasks")
    assert counts["sft_train"] + counts["sft_valid"] == 120 and counts["sft_valid"] > 0
    for part in ("train", "valid"):
        prefs = [json.loads(line) for line in (tmp_path / "tasks" / f"prefs_{part}.jsonl").open()]
        assert prefs and all(success(p["prompt"], p["chosen"]) == 1.0 for p in prefs)
        assert all(success(p["prompt"], p["rejected"]) == 0.0 for p in prefs)
        prompts = [json.loads(line)["prompt"] for line in (tmp_path / "tasks" / f"prompts_{part}.jsonl").open()]
        assert prompts == [p["prompt"] for p in prefs]


def test_a_bad_corpus_line_is_one_error_naming_the_file_and_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": MODULE}) + "\n" + '{"txt": 1}\n')
    with pytest.raises(ZeroLLMError, match=r"c\.jsonl: line 2: .*'text'"):
        build_tasks(corpus, tmp_path / "tasks")
    assert not (tmp_path / "tasks").exists()


# ----------------------------------------------------------------------------- the line task


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        ("    return w * h\n", 1.0),
        ("    area = w * h\n<|im_end|", 1.0),  # the text after the last complete line is not code
        ("    return len(w)\n", 1.0),  # a builtin is no unknown name
        ("    return math.sqrt(w)\n", 1.0),  # one module global (unknown) is allowed
        ("    return [x * w for x in h]\n", 1.0),  # a loop variable is bound in the line
        ("    return w * h", 1.0),  # no newline: the answer ended its turn right after the code
        ("    return w * (h", 0.0),  # cut off (no newline) and does not parse
        ("    return w\n", 0.0),  # names alone: no operation
        ("    a = h\n", 0.0),
        ("    return w *\n", 0.0),  # does not parse
        ("    return w * h\n    return h\n", 0.0),  # one statement, not two
        ("    if w:\n", 0.0),
        ("    pass\n", 0.0),
        ("    return len(0)\n", 0.0),  # reads no parameter
        ("    return f(w, name, key)\n", 0.0),  # guesses of parameter names: more than one unknown name
        ("", 0.0),
    ],
)
def test_line_success_accepts_one_statement_that_does_something_with_a_parameter(completion, ok):
    assert line_success(PROMPT, completion) == ok


def test_line_success_refuses_self_alone_and_methods_without_another_parameter():
    method = 'def scale(self, factor):\n    """Scale by factor."""\n'
    assert line_success(method, "    return self.call(self._w)\n") == 0.0
    assert line_success(method, "    self.size *= factor\n") == 1.0
    only_self = 'def close(self):\n    """Close it."""\n'
    assert line_success(only_self, "    self._file.close()\n") == 0.0  # `self.x()` would pass everywhere


def test_line_reward_is_line_success_per_row():
    assert line_reward([PROMPT, PROMPT], ["    return h * w\n", "    return h\n"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "credit"),
    [
        ("    return w * h\n", 1.0),
        ("    return w * h", 1.0),
        ("    return w * h\n    x = (\n", 0.5),  # a good first line, then noise: reads w, not the whole answer
        ("    return f(w, name, key)\n", 0.5),  # reads w, but guesses two more names
        ("    return w\n", 0.5),  # reads w, names alone
        ("    return len(0)\n", 0.0),  # well formed, but reads no parameter: nothing
        ("    self.name = self.path.get()\n", 0.0),  # the fixed answer an earlier shaping paid half for
        ("    pass\n", 0.0),
        ("    return w *\n", 0.0),  # does not parse
        ("return w * h\n", 0.0),  # dedented: not in the function
        ("\n", 0.0),
        ("", 0.0),
    ],
)
def test_line_partial_credit_pays_only_for_reading_a_parameter(completion, credit):
    assert line_partial_credit(PROMPT, completion) == credit


@pytest.mark.parametrize(
    "completion",
    ["    return w * h\n", "    return w * h\n\n", "    return w * h\n<|im_end|", "    return w * h", "    return w\n",
     "    return w * h\n    return h\n", "    return f(w, name, key)\n", "    if w:\n", "", "\n"],
)  # fmt: skip
def test_line_partial_credit_is_full_exactly_when_the_line_check_passes(completion):
    assert (line_partial_credit(PROMPT, completion) == 1.0) == (line_success(PROMPT, completion) == 1.0)


def test_line_partial_reward_is_line_partial_credit_per_row():
    assert line_partial_reward([PROMPT, PROMPT], ["    return h * w\n", "    return h\n"]) == [1.0, 0.5]


def test_first_lines_are_tasks_only_where_the_real_line_passes():
    found = dict(first_lines_of(MODULE))  # the prompt: the def line alone, without its docstring
    assert found == {"def area(w, h):\n": "    return w * h\n", "def volume(self, depth):\n": "    d = depth or 1\n"}
    # not todo (trivial) nor constant (reads no parameter); a signature over several lines is kept whole:
    wrapped = 'def span(a,\n         b):\n    """Doc."""\n    return a - b\n'
    assert first_lines_of(wrapped) == [("def span(a,\n         b):\n", "    return a - b\n")]


def test_line_task_files_cap_the_tasks_of_each_module_and_rejected_lines_fail(tmp_path):
    corpus = tmp_path / "c.jsonl"
    per_doc = LINE_PER_FILE["train"] + 3
    many = "".join(f'def f{k}(x{k}):\n    """Doc {k}."""\n    return x{k} + {k}\n\n\n' for k in range(per_doc))
    docs = [many.replace("def f", f"def g{i}_") for i in range(30)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    counts = build_tasks(corpus, tmp_path / "tasks", task="line")
    held_out_docs, rest = divmod(counts["sft_valid"], LINE_PER_FILE["valid"])
    assert held_out_docs > 0 and rest == 0 and counts["sft_train"] == (30 - held_out_docs) * LINE_PER_FILE["train"]
    for part in ("train", "valid"):
        prefs = [json.loads(line) for line in (tmp_path / "tasks" / f"prefs_{part}.jsonl").open()]
        assert prefs and all(line_success(p["prompt"], p["chosen"]) == 1.0 for p in prefs)
        assert all(line_success(p["prompt"], p["rejected"]) == 0.0 for p in prefs)


def test_an_unknown_task_is_one_error(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": MODULE}) + "\n")
    with pytest.raises(ZeroLLMError, match="task 'lines': expected one of body, line"):
        build_tasks(tmp_path / "c.jsonl", tmp_path / "tasks", task="lines")


def test_a_renamed_line_swaps_the_parameters_it_reads_but_not_attributes_and_fails_the_check():
    prompt = "def area(w, h):\n"
    got = rejected_for(prompt, "    return w.h * h + w\n", ["    return g(w)\n"], random.Random(0),
                       line_success, ("renamed",))  # fmt: skip
    assert got == "    return g.h * g + g\n"  # `.h` is an attribute; `g` the other's only name that is no parameter
    assert line_success(prompt, got) == 0.0
