"""Preference pairs for the reward model (and DPO): records -> token-exact (chosen, rejected) ids.

Accepted rows (jsonl / jsonl.gz / parquet / a Hugging Face dataset directory, read with
the `datasets` library):

    {"prompt": "2+3=", "chosen": "5", "rejected": "6"}                  # optional "margin": 1.0
    {"prompt": [msgs] or "text", "chosen": [msgs], "rejected": [msgs]}   # chat messages
    {"chosen": [whole dialogue msgs], "rejected": [...]}                 # shared prefix = prompt
    {"chosen": "\\n\\nHuman: ..\\n\\nAssistant: A", "rejected": "..."}    # hh-rlhf

An hh-rlhf pair is split at the last "\\n\\nAssistant:" of each string: the prefix up to and
including the marker is the prompt (both prefixes must agree), the rest the response.

Sequences are token-exact: prompt ids and response ids are tokenized separately and
concatenated (never a re-tokenised joined string), then the end-of-text token is
appended; the reward is read there. Messages go through the tokenizer's chat template
(the prompt with the generation prompt; a response as its content + `<|im_end|>\\n`).

A pair longer than `max_len` loses prompt tokens from the left (the responses, where
chosen and rejected differ, are kept whole); a pair whose responses alone do not fit is
counted as `too_long`. Every row is either kept or counted under a reason; a file with no
usable row stops with one line naming it.

Rows to score (`zerollm reward score`) are built the same way, one sequence per response:

    {"prompt": "2+3=", "response": "5"}     {"prompt": [msgs], "response": "5"}
    {"messages": [..., {"role": "assistant", "content": "5"}]}      # the last turn is scored
    {"text": "a whole sequence"}                                     # its ids + eos
    any preference row above                                         # chosen and rejected both

There a bad row is an error (every row must get its score): one line naming the file,
the row (1-based) and the field.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_pipeline.tokenizer import check_distinct_pad
from train.errors import ZeroLLMError

log = logging.getLogger("zerollm")

HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class Pair:
    chosen: list[int]  # prompt + chosen response + eos
    rejected: list[int]  # prompt + rejected response + eos
    margin: float | None = None


@dataclass
class PairSet:
    pairs: list[Pair]
    rows: int  # rows read
    dropped: Counter = field(default_factory=Counter)  # reason -> rows not kept
    truncated: int = 0  # kept pairs whose prompt lost tokens from the left

    def report(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": len(self.pairs), "truncated_prompt": self.truncated,
                "dropped": dict(sorted(self.dropped.items()))}  # fmt: skip


# ----------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a .jsonl(.gz) / .parquet file or a dataset directory, as dicts."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(path)
    if not p.exists():
        raise ZeroLLMError(f"{p}: not found")
    try:
        if p.is_dir():
            try:
                ds = datasets.load_from_disk(str(p))
            except FileNotFoundError:
                ds = datasets.load_dataset(str(p))
        else:
            kind = "parquet" if p.suffix == ".parquet" else "json"
            ds = datasets.load_dataset(kind, data_files=str(p))
    except ZeroLLMError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise ZeroLLMError(f"{p}: cannot read it as records ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds.to_list()


# ----------------------------------------------------------------------------- one row


class BadRow(Exception):
    """A row that cannot become a pair; args[0] is the reason it is counted under."""


def _text(row: dict[str, Any], key: str) -> Any:
    if key not in row or row[key] is None:
        raise BadRow(f"missing_{key}")
    value = row[key]
    if isinstance(value, str) and not value.strip():
        raise BadRow(f"empty_{key}")
    if isinstance(value, list) and not value:
        raise BadRow(f"empty_{key}")
    if not isinstance(value, (str, list)):
        raise BadRow(f"bad_type_{key}")
    return value


def split_hh(dialogue: str) -> tuple[str, str]:
    """An hh-rlhf dialogue -> (prompt up to and including the last Assistant marker, response)."""
    at = dialogue.rfind(HH_ASSISTANT)
    if at < 0:
        raise BadRow("no_assistant_turn")
    cut = at + len(HH_ASSISTANT)
    return dialogue[:cut], dialogue[cut:]


def row_parts(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(prompt, chosen response, rejected response): strings, or message lists for the prompt."""
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise BadRow("identical")
    if row.get("prompt") is not None:
        prompt = _text(row, "prompt")
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise BadRow("mixed_types")
        if isinstance(chosen, list):  # prompt + assistant turn(s)
            return _as_messages(prompt), _last_content(chosen), _last_content(rejected)
        return prompt, chosen, rejected
    if isinstance(chosen, str) and isinstance(rejected, str):  # hh-rlhf
        (pc, rc), (pr, rr) = split_hh(chosen), split_hh(rejected)
        if pc != pr:
            raise BadRow("prompts_differ")
        if not rc.strip() or not rr.strip():
            raise BadRow("empty_response")
        return pc, rc, rr
    if isinstance(chosen, list) and isinstance(rejected, list):  # whole conversations
        if chosen[:-1] != rejected[:-1]:
            raise BadRow("prompts_differ")
        if not chosen[:-1]:
            raise BadRow("missing_prompt")
        return _as_messages(chosen[:-1]), _last_content(chosen), _last_content(rejected)
    raise BadRow("mixed_types")


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _last_content(messages: list[Any]) -> str:
    last = messages[-1]
    if not isinstance(last, dict) or not isinstance(last.get("content"), str):
        raise BadRow("bad_message")
    if not last["content"].strip():
        raise BadRow("empty_response")
    return last["content"]


# ----------------------------------------------------------------------------- tokens


def check_tokenizer(tok, where: str) -> None:
    """The reward is read at the appended eos: padding must be a different token."""
    check_distinct_pad(tok, where, "or the reward would be read at padding instead of the appended eos")


def encode_prompt(tok, prompt: Any) -> list[int]:
    if isinstance(prompt, list):
        if not tok.chat_template:
            raise ZeroLLMError("messages rows need a tokenizer with a chat_template (tokenizer_config.json)")
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False).input_ids
    return tok(prompt, add_special_tokens=False).input_ids


def encode_response(tok, response: str, chat: bool) -> list[int]:
    ids = tok(response, add_special_tokens=False).input_ids
    if chat:  # the assistant turn closes as the chat template closes it
        ids = ids + tok("<|im_end|>\n", add_special_tokens=False).input_ids
    return ids


def encode_sequences(tok, prompt: Any, responses: list[str], max_len: int) -> tuple[list[list[int]], bool]:
    """prompt ids + each response's ids + eos, the prompt cut from the left so the longest fits
    `max_len`; (sequences, whether the prompt was cut). BadRow("too_long") when the longest
    response leaves no room for one prompt token. `prompt` None: the responses alone."""
    chat = isinstance(prompt, list)
    p = encode_prompt(tok, prompt) if prompt is not None else []
    ids = [encode_response(tok, r, chat) for r in responses]
    room = max_len - 1 - max(len(x) for x in ids)  # prompt tokens that fit beside the longest response + eos
    if room < (1 if prompt is not None else 0):
        raise BadRow("too_long")
    cut = len(p) > room
    if cut:
        p = p[len(p) - room :]  # keep the end of the prompt, next to the responses
    return [p + x + [tok.eos_token_id] for x in ids], cut


def build_pairs(records: list[dict[str, Any]], tok, max_len: int, where: str) -> PairSet:
    """Rows -> token-exact pairs; each row kept or counted by reason. No usable row: one line."""
    out = PairSet([], len(records))
    for row in records:
        try:
            prompt, chosen, rejected = row_parts(row)
            (c, r), cut = encode_sequences(tok, prompt, [chosen, rejected], max_len)
        except BadRow as e:
            out.dropped[e.args[0]] += 1
            continue
        out.truncated += cut
        margin = row.get("margin")
        out.pairs.append(Pair(c, r, None if margin is None else float(margin)))
    if not out.pairs:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(out.dropped.items())) or "no rows"
        raise ZeroLLMError(f"{where}: no usable preference pair in {out.rows} rows ({reasons})")
    return out


# ----------------------------------------------------------------------------- batches


def pad(rows: list[list[int]], pad_id: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """N id lists -> input_ids, attention_mask, both (N, longest)."""
    T = max(len(x) for x in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, x in enumerate(rows):
        sl = slice(0, len(x)) if padding_side == "right" else slice(T - len(x), T)
        ids[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate(pairs: list[Pair], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """B pairs -> input_ids / attention_mask (2B, T): the B chosen rows, then the B rejected
    rows; margin (B,) (zeros when no pair has one)."""
    ids, mask = pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, padding_side)
    margin = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "margin": margin}


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two sequences, leaving each at least its last token."""
    n, top = 0, min(len(a), len(b)) - 1
    while n < top and a[n] == b[n]:
        n += 1
    return n


def collate_shared(pairs: list[Pair], pad_id: int, row_len: int) -> dict[str, torch.Tensor]:
    """B pairs -> rows in which each pair's common prefix (the prompt) is run once.

    A pair becomes one segment [prefix][chosen's rest][rejected's rest]: positions restart at
    the end of the prefix for the rejected part, and attention lets each response see the
    prefix and itself, never the other response nor another pair (a causal "tree" mask). Every
    hidden state is that of the pair's two separate sequences, so the scores are too (float
    rounding aside), for len(prefix) fewer tokens through the model. Segments are packed
    best-fit decreasing into rows of max(`row_len`, the longest segment) positions (every row
    is padded to the longest anyway).

    -> input_ids, position_ids (R, T); attn_mask (R, 1, T, T) bool, True = may attend;
    read_at (2B,) flat indices into R*T of the B chosen then the B rejected last tokens (the
    appended eos); attention_mask (R, T) 1 on real tokens; margin (B,).
    """
    from train.chat_data import best_fit

    prefix = [shared_prefix(p.chosen, p.rejected) for p in pairs]
    seg_len = [len(p.chosen) + len(p.rejected) - n for p, n in zip(pairs, prefix)]
    rows = best_fit(seg_len, max(row_len, *seg_len))  # rows are padded to the longest segment anyway
    T = max(sum(seg_len[i] for i in row) for row in rows)
    R = len(rows)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    group = torch.full((R, T), -1, dtype=torch.long)  # pair number; -1 on padding
    branch = torch.zeros((R, T), dtype=torch.long)  # 0 prefix, 1 chosen, 2 rejected
    read_at = torch.zeros(2 * len(pairs), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            p, n = pairs[i], prefix[i]
            c, j = len(p.chosen), len(p.rejected) - n  # chosen whole, then the rejected rest
            ids[r, at : at + c] = torch.tensor(p.chosen)
            ids[r, at + c : at + c + j] = torch.tensor(p.rejected[n:])
            pos[r, at : at + c] = torch.arange(c)
            pos[r, at + c : at + c + j] = torch.arange(n, n + j)
            group[r, at : at + c + j] = i
            branch[r, at + n : at + c] = 1
            branch[r, at + c : at + c + j] = 2
            read_at[i] = r * T + at + c - 1
            read_at[len(pairs) + i] = r * T + at + c + j - 1
            at += c + j
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = group[:, :, None] == group[:, None, :]  # (R, T, T) query pair == key pair
    sees = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])  # key is prefix or same branch
    real = group >= 0
    mask = (causal & same & sees & real[:, None, :]) | torch.eye(T, dtype=torch.bool)  # padding sees itself
    margin = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    return {"input_ids": ids, "position_ids": pos, "attn_mask": mask[:, None], "read_at": read_at,
            "attention_mask": real.long(), "margin": margin}  # fmt: skip


# ----------------------------------------------------------------------------- rows to score


def score_parts(row: dict[str, Any]) -> tuple[Any, list[str], str]:
    """(prompt or None, responses, the field they come from) of a row to score: one
    response, or a preference row's chosen and rejected (in that order)."""
    if row.get("chosen") is not None or row.get("rejected") is not None:
        prompt, chosen, rejected = row_parts(row)
        return prompt, [chosen, rejected], "chosen/rejected"
    if row.get("messages") is not None:
        msgs = _text(row, "messages")
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise BadRow("bad_messages")
        return _as_messages(msgs[:-1]), [_last_content(msgs)], "messages"
    if row.get("text") is not None:
        text = _text(row, "text")
        if not isinstance(text, str):
            raise BadRow("bad_type_text")
        return None, [text], "text"
    if row.get("prompt") is None and row.get("response") is None:
        raise BadRow("no_fields")
    prompt, response = _text(row, "prompt"), _text(row, "response")
    if isinstance(response, list):  # the assistant turn as messages
        return _as_messages(prompt), [_last_content(response)], "response"
    return prompt, [response], "response"


# What a BadRow reason says about a row, for a user: (field, what is wrong).
_SAYS = {
    "identical": ("chosen/rejected", "the two responses are the same"),
    "prompts_differ": ("chosen/rejected", "the two dialogues differ before their last Assistant turn"),
    "no_assistant_turn": ("chosen/rejected", 'no "\\n\\nAssistant:" turn to split the prompt from the response at'),
    "mixed_types": ("chosen/rejected", "one is a string, the other a list of messages"),
    "bad_message": ("messages", "the last message has no string 'content'"),
    "bad_messages": ("messages", "expected a list of at least 2 messages (a prompt and the turn to score)"),
    "empty_response": ("response", "the scored response is empty"),
    "no_fields": ("prompt", "expected prompt+response, text, messages or prompt+chosen+rejected"),
}


def explain(reason: str) -> str:
    """'FIELD: what is wrong' for a BadRow reason."""
    for kind, what in (("missing_", "missing"), ("empty_", "empty"), ("bad_type_", "not a string or message list")):
        if reason.startswith(kind):
            return f"{reason.removeprefix(kind)}: {what}"
    field, what = _SAYS.get(reason, ("row", reason))
    return f"{field}: {what}"


def score_sequences(records: list[dict[str, Any]], tok, max_len: int, where: str) -> list[list[list[int]]]:
    """Rows to score -> per row its token-exact sequences (one, or chosen and rejected), as
    training builds them. The first bad row stops with one line: file, row, field."""
    out = []
    for n, row in enumerate(records, start=1):
        try:
            prompt, responses, field = score_parts(row)
        except BadRow as e:
            raise ZeroLLMError(f"{where}: row {n}: {explain(e.args[0])}") from None
        try:
            seqs, _ = encode_sequences(tok, prompt, responses, max_len)
        except BadRow:
            raise ZeroLLMError(
                f"{where}: row {n}: {field}: longer than max_len {max_len} tokens with eos even with the prompt "
                "cut from the left; raise --max-len (up to the model's max_seq_len)"
            ) from None
        out.append(seqs)
    return out
