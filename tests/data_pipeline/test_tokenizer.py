"""Tokenizer: HF-loadable dir with eos/pad/chat tokens, exact round trip, exact fast path."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.tokenizer import (
    SPECIAL_TOKENS,
    Encoder,
    _fast_spec,
    load_tokenizer,
    pick_encoder,
    tokenizer_hash,
)
from train.errors import ZeroLLMError

# Arbitrary Unicode (no lone surrogates: not encodable text) mixed with special-token strings.
texts = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(SPECIAL_TOKENS + ["<|", "|>", "<|endoftext", " ", "\n\n", "'s", "  "]),
    ),
    max_size=8,
).map("".join)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def test_autotokenizer_loads_with_distinct_eos_pad_and_chat_template(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok("hi there").input_ids == tok.encode("hi there")  # no BOS/EOS added
    assert tok.eos_token_id not in tok("hi there").input_ids
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    ids = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    assert len(tok) == 600


@SETTINGS
@given(text=texts)
def test_decode_encode_round_trip(tok_dir, text):
    tok = _cached_hf(tok_dir)
    assert tok.decode(tok(text).input_ids) == text


# Whitespace runs next to letters, digits, quotes and specials: where pre-tokenization
# regexes (lookahead, \\s classes) could disagree.
spacey = st.lists(
    st.sampled_from(
        [
            " ",
            "  ",
            "\t",
            "\n",
            "\r\n",
            "\x0b",
            "\x0c",
            "\x85",
            "\xa0",
            "\u2028",
            "\u3000",
            "\x1c",
            "\u200b",
            "a",
            "Z",
            "é",
            "1",
            "'s",
            "'",
            ".",
            "東",
            "🙂",
            "<|endoftext|>",
            "<|im_start|>",
        ]
    ),
    max_size=30,
).map("".join)


@pytest.mark.parametrize("name", ["fastokens", "tiktoken"])
@SETTINGS
@given(text=st.one_of(texts, spacey))
def test_fast_encoders_are_token_identical(tok_dir, name, text):
    tok = _cached_hf(tok_dir)
    assert _cached_encoder(tok_dir, name).encode_batch([text]) == [tok(text).input_ids]


@pytest.mark.parametrize("name", ["fastokens", "tiktoken"])
def test_fast_encoders_are_token_identical_on_long_documents(tok_dir, name):
    """Whole files as single documents: long whitespace runs, every shape of line."""
    import inspect

    _assert_same_tokens(tok_dir, name, [inspect.getsource(inspect), " " * 5000 + "x\n\n\t\t\n" * 300, "a" * 20000])


@pytest.mark.parametrize("name", ["fastokens", "tiktoken"])
def test_fast_encoders_are_token_identical_on_tiny_shakespeare(tok_dir, name):
    """Real text, 1 MB as one document (skips when ../shared/data is absent; fails in CI)."""
    from tests.data_pipeline.conftest import need_shared

    _assert_same_tokens(tok_dir, name, [need_shared("tinyshakespeare.txt").read_text("utf-8")])


def _assert_same_tokens(tok_dir, name: str, docs: list[str]) -> None:
    tok = _cached_hf(tok_dir)
    ids, lengths = _cached_encoder(tok_dir, name).encode_flat(docs)
    assert ids.tolist() == [i for d in docs for i in tok(d).input_ids]
    assert lengths.tolist() == [len(tok(d).input_ids) for d in docs]


def test_pick_encoder_takes_the_fastest_equivalent_one(tok_dir, monkeypatch):
    assert pick_encoder(tok_dir, ["some text"]) == ("fastokens", {})
    assert pick_encoder(tok_dir, [], "tiktoken") == ("tiktoken", {})
    real = Encoder.encode_flat

    def off_by_one(self, texts):  # a fast library that disagrees with tokenizers
        ids, lengths = real(self, texts)
        return (ids + 1, lengths) if self.name == "fastokens" else (ids, lengths)

    monkeypatch.setattr(Encoder, "encode_flat", off_by_one)
    name, skipped = pick_encoder(tok_dir, ["some text"])
    assert name == "tiktoken" and "other ids" in skipped["fastokens"]
    with pytest.raises(ZeroLLMError, match="--encoder fastokens .*not exactly equivalent"):
        pick_encoder(tok_dir, [], "fastokens")
    monkeypatch.setitem(__import__("sys").modules, "fastokens", None)  # not installed
    monkeypatch.setattr(Encoder, "encode_flat", real)
    name, skipped = pick_encoder(tok_dir, [])
    assert name == "tiktoken" and "ModuleNotFoundError" in skipped["fastokens"]


def test_tiktoken_shape_check_refuses_other_shapes(tok_dir, tmp_path):
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFC"}
    assert _fast_spec(spec) is None
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    assert _fast_spec(spec) is None
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]  # merge order != id order
    assert _fast_spec(spec) is None


def test_load_refuses_tokenizer_without_eos(tok_dir, tmp_path):
    bad = tmp_path / "noeos"
    shutil.copytree(tok_dir, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in ("special_tokens_map.json",):
        (bad / f).unlink(missing_ok=True)
    with pytest.raises(ZeroLLMError, match="eos_token"):
        load_tokenizer(bad)


def test_tokenizer_hash_is_stable_and_content_based(tok_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tok_dir, copy)
    assert tokenizer_hash(copy) == tokenizer_hash(tok_dir)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text() + " ")
    assert tokenizer_hash(copy) != tokenizer_hash(tok_dir)


def test_train_refuses_empty_input_and_tiny_vocab(tmp_path):
    from data_pipeline.tokenizer import train_tokenizer

    with pytest.raises(ZeroLLMError, match="no documents"):
        train_tokenizer(iter([]), tmp_path / "t", 500)
    with pytest.raises(ZeroLLMError, match="too small"):
        train_tokenizer(["abc"], tmp_path / "t", 100)


_HF: dict = {}


def _cached_hf(path):
    if path not in _HF:
        _HF[path] = load_tokenizer(path)
    return _HF[path]


def _cached_encoder(path, name) -> Encoder:
    key = (name, path)
    if key not in _HF:
        _HF[key] = Encoder(name, path)
    return _HF[key]


def test_training_sample_is_seeded_and_bounded(tmp_path):
    from data_pipeline.training_corpus import training_texts

    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(f"document number {i} " * 20 for i in range(300)))
    take = lambda seed: list(training_texts([str(src)], max_mb=0.02, seed=seed)[0])  # noqa: E731
    a, b, c = take(1), take(1), take(2)
    assert a == b and a != c
    assert 0.02e6 <= sum(len(x) for x in a) < 0.02e6 + 500
