"""Chat data for supervised fine-tuning: records -> token-exact samples with a loss mask.

    records, report = load_records("sft.jsonl")               # via the `datasets` library
    tok = load_chat_tokenizer("runs/hf_model")                 # pad must differ from eos
    samples, report = build_samples(records, tok, max_len=512, report=report)
    rows = pack(samples, max_len) if packing else [[s] for s in samples]
    batch = collate([rows[i] for i in idx], tok.pad_token_id, max_len)

Records are `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"}`, read
with `datasets.load_dataset("json" | "parquet", data_files=...)` or `load_from_disk`.
A bad record (missing field, unknown role, non-text content, empty response, no
assistant turn, a dialogue that does not end with an assistant turn) is skipped and
counted by reason in the report, never used.

Token-exact samples: the tokenizer's own chat template renders the conversation prefix
up to and including turn k; the text delta to the prefix up to turn k-1 is turn k.
Each turn's text is tokenized on its own and the ids are concatenated (never the joined
text re-tokenized, which may merge tokens across a turn boundary). An assistant turn is
split by the template itself (rendered with a sentinel content) into header, content
and trailer: the content and the trailer up to and including the end-of-turn token
(`<|im_end|>` for ChatML; eos when the tokenizer has no `<|im_end|>`) carry loss, the
header (`<|im_start|>assistant\\n`), the text after the end-of-turn token, every prompt
turn and padding never. Every assistant turn of a dialogue carries loss.

Over-long samples (more than max_len + 1 tokens: max_len input positions) keep the
response (the last assistant turn): 1. the oldest turns after a leading system turn are
dropped, whole, while more than the last prompt turn remains before the response
("turns_dropped"); 2. the prompt is cut on its left, after the system turn, and the system
turn too if it alone is too long ("prompt_trimmed"); 3. a response longer than the limit
alone is cut on its right ("response_truncated"). Each rule counts its samples.

Packing puts several samples in one row of max_len positions with `doc_ids` (attention
stays inside a sample, positions restart: see train/model.py), best-fit decreasing (`pack`);
without packing a row holds one sample. Padding targets are IGNORE_INDEX.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipeline.tokenizer import check_distinct_pad
from train.errors import ZeroLLMError
from train.losses import IGNORE_INDEX

log = logging.getLogger("zerollm")

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|im_end|>"  # ChatML's end of turn; tokenizers without it end turns with eos
_SENTINEL = "\x00SFT-CONTENT\x00"
_HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


# ----------------------------------------------------------------------------- records


@dataclass
class Report:
    """What happened to the rows of one file (written to RUN_DIR/data_report.json)."""

    file: str
    rows: int = 0
    used: int = 0
    bad: Counter = field(default_factory=Counter)  # reason -> rows skipped
    over_long: Counter = field(default_factory=Counter)  # rule -> samples it changed

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "rows": self.rows, "used": self.used, "bad": dict(self.bad),
                "over_long": dict(self.over_long)}  # fmt: skip

    def summary(self) -> str:
        bad = ", ".join(f"{k}: {v}" for k, v in sorted(self.bad.items())) or "none"
        over = ", ".join(f"{k}: {v}" for k, v in sorted(self.over_long.items())) or "none"
        return f"{self.file}: {self.used} of {self.rows} rows used; bad rows: {bad}; over-long: {over}"


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a .jsonl / .parquet file or an HF dataset dir, through `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(path)
    if path.is_dir() and any((path / m).is_file() for m in _HF_DATASET_MARKERS):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    else:
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        by_kind = {"json": [str(f) for f in files if f.suffix == ".jsonl"],
                   "parquet": [str(f) for f in files if f.suffix == ".parquet"]}  # fmt: skip
        kind = "json" if by_kind["json"] else "parquet"
        if not by_kind[kind]:
            raise ZeroLLMError(f"{path}: no .jsonl or .parquet files to read")
        ds = datasets.load_dataset(kind, data_files=by_kind[kind], split="train")
    return ds.to_list()


def row_messages(row: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None]:
    """A record -> (messages, None), or (None, reason) for a bad record."""
    if row.get("messages") is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "missing field"
    elif row.get("prompt") is not None and row.get("response") is not None:
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        return None, "missing field"
    out = []
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return None, "missing field"
        if m["role"] not in ROLES:
            return None, "unknown role"
        if not isinstance(m["content"], str):
            return None, "non-text content"
        if m["role"] == "assistant" and not m["content"].strip():
            return None, "empty response"
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant turn"
    if out[-1]["role"] != "assistant":
        return None, "ends without an assistant turn"
    return out, None


def load_records(path: str | Path) -> tuple[list[list[dict[str, str]]], Report]:
    """Good conversations of a file and the report of its bad rows; no usable row: one line."""
    report = Report(str(path))
    convs = []
    for row in read_rows(path):
        report.rows += 1
        msgs, reason = row_messages(row)
        if reason:
            report.bad[reason] += 1
        else:
            convs.append(msgs)
    if not convs:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.bad.items())) or "the file is empty"
        raise ZeroLLMError(f"{path}: no usable SFT row ({report.rows} rows; {reasons})")
    return convs, report


# ----------------------------------------------------------------------------- tokens


def load_chat_tokenizer(path: str | Path):
    """A fast HF tokenizer with a chat template and a pad token distinct from eos."""
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    check_chat_tokenizer(tok, str(path))
    return tok


def check_chat_tokenizer(tok, where: str) -> None:
    if not getattr(tok, "chat_template", None):
        raise ZeroLLMError(f"{where}: the tokenizer has no chat_template (tokenizer_config.json)")
    check_distinct_pad(tok, where, "or padding and end of text cannot be told apart in the loss mask")


def end_of_turn_id(tok) -> int:
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    return eot if isinstance(eot, int) and eot != tok.unk_token_id and eot is not None else tok.eos_token_id


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def _render(tok, msgs: list[dict[str, str]]) -> str:
    return tok.apply_chat_template(msgs, tokenize=False) if msgs else ""


@dataclass
class Turn:
    ids: list[int]
    mask: list[bool]  # True: the token is a loss target
    role: str


def encode_turns(tok, messages: list[dict[str, str]]) -> list[Turn]:
    """Each turn's template text tokenized on its own; assistant content + end of turn masked in."""
    eot = end_of_turn_id(tok)
    turns = []
    for k, m in enumerate(messages):
        prev = _render(tok, messages[:k])
        text = _render(tok, messages[: k + 1])
        if not text.startswith(prev):
            raise ZeroLLMError("the chat template is not prefix-stable: rendering more turns changes earlier text")
        delta = text[len(prev) :]
        if m["role"] != "assistant":
            ids = _encode(tok, delta)
            turns.append(Turn(ids, [False] * len(ids), m["role"]))
            continue
        probe = _render(tok, [*messages[:k], {"role": "assistant", "content": _SENTINEL}])[len(prev) :]
        header, _, trailer = probe.partition(_SENTINEL)
        content = delta[len(header) : len(delta) - len(trailer)]
        if header + content + trailer != delta or not delta.startswith(header) or not delta.endswith(trailer):
            raise ZeroLLMError("the chat template changes assistant text in a way the loss mask cannot follow")
        h, c, t = _encode(tok, header), _encode(tok, content), _encode(tok, trailer)
        n_tail = t.index(eot) + 1 if eot in t else len(t)  # trailer tokens through end of turn
        turns.append(Turn(h + c + t, [False] * len(h) + [True] * len(c) + [True] * n_tail + [False] *
                          (len(t) - n_tail), "assistant"))  # fmt: skip
    return turns


def generation_prompt(tok, messages: list[dict[str, str]]) -> list[int]:
    """Ids of the prompt turns (all but the last assistant turn) + the assistant header,
    tokenized turn by turn as in training."""
    turns = encode_turns(tok, messages)
    header = turns[-1].ids[: turns[-1].mask.index(True)]
    return [i for t in turns[:-1] for i in t.ids] + header


@dataclass
class Sample:
    ids: list[int]  # at most max_len + 1 tokens
    mask: list[bool]


def fit_turns(turns: list[Turn], limit: int, counts: Counter) -> Sample:
    """Concatenate turns into at most `limit` tokens by the module's over-long rule."""
    total = sum(len(t.ids) for t in turns)
    if total <= limit:
        return _join(turns)
    system = turns[:1] if turns[0].role == "system" else []
    rest, response = turns[len(system) : -1], turns[-1]
    dropped = False
    while len(rest) > 1 and sum(len(t.ids) for t in [*system, *rest, response]) > limit:
        rest = rest[1:]
        dropped = True
    counts["turns_dropped"] += int(dropped)
    kept = [*system, *rest, response]
    if sum(len(t.ids) for t in kept) <= limit:
        return _join(kept)
    counts["prompt_trimmed"] += 1
    room = limit - len(response.ids)
    if room <= 0:
        counts["response_truncated"] += 1
        return Sample(response.ids[:limit], response.mask[:limit])
    sys_s, rest_s = _join(system), _join(rest)
    if len(sys_s.ids) > room:  # the system turn alone does not fit: cut it on its left too
        sys_s, rest_s = Sample(sys_s.ids[-room:], sys_s.mask[-room:]), Sample([], [])
    keep = room - len(sys_s.ids)
    rest_s = Sample(rest_s.ids[len(rest_s.ids) - keep :], rest_s.mask[len(rest_s.mask) - keep :])
    return Sample(sys_s.ids + rest_s.ids + response.ids, sys_s.mask + rest_s.mask + response.mask)


def _join(turns: list[Turn]) -> Sample:
    return Sample([i for t in turns for i in t.ids], [b for t in turns for b in t.mask])


def build_samples(convs: list[list[dict[str, str]]], tok, max_len: int, report: Report) -> list[Sample]:
    """Token-exact samples of at most max_len + 1 tokens; over-long ones counted in `report`."""
    samples = [fit_turns(encode_turns(tok, msgs), max_len + 1, report.over_long) for msgs in convs]
    report.used = len(samples)
    return samples


# ----------------------------------------------------------------------------- rows and batches


def pack(samples: list[Sample], max_len: int) -> list[list[Sample]]:
    """Best-fit decreasing: rows of samples whose (len - 1) positions sum to <= max_len.

    On the hh-rlhf chosen dialogues at max_len 256 the rows are 98% real tokens; filling
    rows in order (a row closed when the next sample did not fit) left 24% of every packed
    step to padding. ShuffledRows shuffles the rows, and attention never crosses samples,
    so neither the order of rows nor that inside a row carries anything.
    """
    return [[samples[i] for i in row] for row in best_fit([len(s.ids) - 1 for s in samples], max_len)]


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of `lengths` in rows whose lengths sum to <=
    capacity (a longer item gets a row of its own). Longest first, each into the fullest row
    that still has room for it (a new row when none has); deterministic (equal lengths keep
    the input order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable
    rows: list[list[int]] = []
    rooms: list[int] = []  # the distinct room left in rows not yet full, ascending
    rows_with: dict[int, list[int]] = {}  # room left -> the rows with exactly that room
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)  # the least room that still fits n
        if k < len(rooms):
            room = rooms[k]
            r = rows_with[room].pop()
            if not rows_with[room]:
                del rows_with[room], rooms[k]
        else:
            room, r = max(capacity, n), len(rows)
            rows.append([])
        rows[r].append(i)
        if room > n:
            if room - n not in rows_with:
                bisect.insort(rooms, room - n)
                rows_with[room - n] = []
            rows_with[room - n].append(r)
    return rows


def collate(rows: list[list[Sample]], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor | None]:
    """Rows of samples -> {"x" (B, T), "y" (B, T) with IGNORE_INDEX off the mask, "doc_ids"}.

    T is the longest row (or max_len when given). doc_ids is None when every row holds
    one sample (plain causal attention; right padding cannot be attended by real tokens).
    """
    lengths = [sum(len(s.ids) - 1 for s in row) for row in rows]
    T = max_len or max(lengths)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    doc = torch.full((len(rows), T), -1, dtype=torch.long)  # padding: its own document
    for b, row in enumerate(rows):
        pos = 0
        for d, s in enumerate(row):
            n = len(s.ids) - 1
            ids = torch.tensor(s.ids)
            tgt = torch.where(torch.tensor(s.mask[1:]), ids[1:], IGNORE_INDEX)
            x[b, pos : pos + n], y[b, pos : pos + n], doc[b, pos : pos + n] = ids[:-1], tgt, d
            pos += n
    packed = any(len(row) > 1 for row in rows)
    return {"x": x, "y": y, "doc_ids": doc if packed else None}


def fingerprint(rows: list[list[Sample]], seed: int) -> str:
    """Hash of the exact training rows and the shuffle seed (a resume must see the same)."""
    h = hashlib.sha256(str(seed).encode())
    for row in rows:
        for s in row:
            h.update(torch.tensor(s.ids).numpy().tobytes())
            h.update(bytes(s.mask))
        h.update(b"|")
    return h.hexdigest()[:16]


class ShuffledRows:
    """Global sample number -> row: epoch e = i // len(rows) visits the rows in the order of
    a permutation seeded by (seed, e), so the position depends on nothing but the number."""

    def __init__(self, rows: list[list[Sample]], seed: int):
        self.rows, self.seed, self._perms = rows, seed, {}

    def __getitem__(self, i: int) -> list[Sample]:
        epoch, k = divmod(int(i), len(self.rows))
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.rows), generator=g).tolist()}
        return self.rows[self._perms[epoch][k]]
