"""Byte-level BPE tokenizer: train, save as a Hugging Face tokenizer dir, load, hash.

    zerollm tokenizer train corpus.jsonl --vocab-size 32000 --out runs/tok

The saved directory (tokenizer.json + tokenizer_config.json with a chat template) loads
with `transformers.AutoTokenizer.from_pretrained(dir)`. Special tokens:

    <|endoftext|>   end of text: the tokenizer's eos_token, appended to every document
    <|pad|>         padding, distinct from end of text (so loss masks can tell them apart)
    <|im_start|>, <|im_end|>   chat turns (ChatML), used by the chat template for SFT

No BOS and no post-processor: `tokenizer(text).input_ids` is exactly the BPE of the
text, which is what Megatron-LM's preprocess with `--append-eod` stores (plus EOD).

Preprocessing may encode with a faster library than `tokenizers` (`Encoder`, `ENCODERS`):
`fastokens` (loads tokenizer.json itself) or `tiktoken` built from the same vocabulary,
merges, pre-tokenization pattern and special tokens (`FastEncoder`, for the byte-level
shape `_fast_spec` accepts). `pick_encoder` uses one only when it gives exactly the ids
of `tokenizers` on a probe text and a sample of the corpus; else `tokenizers` runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from train.errors import ZeroLLMError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS]

# ChatML: <|im_start|>role\ncontent<|im_end|>\n ; generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# GPT-2's pre-tokenization regex, as the `tokenizers` ByteLevel pre-tokenizer uses it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    min_frequency: int = 2,
    length: int | None = None,
) -> Path:
    """Train a byte-level BPE on `texts` and save it as a Hugging Face tokenizer dir."""
    # heavy: tokenizers/transformers/tiktoken/fastokens, kept local (numpy too: not needed at the top)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ZeroLLMError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS) + 1} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    seen = {"n": 0}

    def counted(it: Iterable[str]) -> Iterator[str]:
        for t in it:
            seen["n"] += 1
            yield t

    tok.train_from_iterator(counted(texts), trainer=trainer, length=length)
    if seen["n"] == 0:
        raise ZeroLLMError("tokenizer train: the input holds no documents (all files empty?).")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=CHAT_TOKENS,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    hf.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def load_tokenizer(path: str | Path):
    """Load a Hugging Face tokenizer dir; refuse one without an end-of-text (eos) token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise ZeroLLMError(f"{p}: no tokenizer.json (field: tokenizer dir); train one first.")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad tokenizer dir
        raise ZeroLLMError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {e}).") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ZeroLLMError(f"{p}: expected a fast (tokenizer.json) tokenizer.")
    if tok.eos_token_id is None:
        raise ZeroLLMError(
            f"{p}/tokenizer_config.json: no eos_token (end-of-text); documents need one as their separator."
        )
    return tok


def check_distinct_pad(tok, where: str, why: str) -> None:
    """Padding must be a token of its own (post-training masks and reward reads tell padding
    from end-of-text by id); one line naming `where` and `why` otherwise."""
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise ZeroLLMError(
            f"{where}: the tokenizer's pad token must exist and differ from eos ({tok.eos_token!r}), {why}; "
            "set a distinct pad_token in tokenizer_config.json"
        )


def tokenizer_hash(path: str | Path) -> str:
    """Stable hash of tokenizer.json's content (sha256 hex, first 16 chars)."""
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise ZeroLLMError(f"{f}: missing (field: tokenizer dir).")
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16]


def token_dtype_for(vocab_size: int):
    """Megatron's rule: uint16 below 65,500 tokens, else int32."""
    import numpy as np

    return np.uint16 if vocab_size < 65500 else np.int32


# --------------------------------------------------------------------------- fast path
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in `tokenizers` ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _fast_spec(tokenizer_json: dict) -> dict | None:
    """The pieces a tiktoken Encoding needs, or None when the tokenizer is another shape."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or tokenizer_json.get("normalizer"):
        return None
    if model.get("dropout") or model.get("continuing_subword_prefix"):
        return None
    if model.get("end_of_word_suffix") or model.get("byte_fallback"):
        return None
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex"):
        return None
    if not _adds_no_tokens(tokenizer_json.get("post_processor")):
        return None
    byte_dec = {c: b for b, c in _bytes_to_unicode().items()}
    vocab: dict[str, int] = model["vocab"]
    ranks: dict[bytes, int] = {}
    for tok_str, i in vocab.items():
        try:
            ranks[bytes(byte_dec[c] for c in tok_str)] = i
        except KeyError:
            return None
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    # tiktoken merges the adjacent pair whose concatenation has the lowest id; HF merges
    # by position in `merges`. They agree when merged ids rise in merge order.
    last = -1
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None or i <= last:
            return None
        last = i
    specials = {}
    for t in tokenizer_json.get("added_tokens", []):
        if t.get("single_word") or t.get("lstrip") or t.get("rstrip") or t.get("normalized"):
            return None
        specials[t["content"]] = t["id"]
    return {"ranks": ranks, "specials": specials}


def _adds_no_tokens(post: dict | None) -> bool:
    """True for post-processors that add no tokens (none, ByteLevel, or a bare template)."""
    if post is None or post.get("type") == "ByteLevel":
        return True
    if post.get("type") == "TemplateProcessing":
        return post.get("single") == [{"Sequence": {"id": "A", "type_id": 0}}]
    if post.get("type") == "Sequence":
        return all(_adds_no_tokens(p) for p in post.get("processors", []))
    return False


class FastEncoder:
    """tiktoken with the tokenizer's own merges and specials; `encode_batch` like HF's."""

    def __init__(self, spec: dict):
        import tiktoken

        self.enc = tiktoken.Encoding(
            name="zerollm-bytelevel",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=spec["ranks"],
            special_tokens=spec["specials"],
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        enc = self.enc.encode
        return [enc(t, allowed_special="all") for t in texts]


# Probe text for the per-run equivalence check: code, prose, digits, whitespace runs,
# contractions, scripts, emoji, combining marks and the special-token strings.
PROBE_TEXT = (
    "def f(x):\n    return x**2  # it's 'quoted'\n\n\n\tIt'll be 12,345.67 -- ok?\r\n"
    "Ünïcödé naïve café 東京 Москва العربية हिन्दी 🙂👍🏽 e\u0301 \u200b\u00a0 x\u3000y"
    "<|endoftext|>a<|im_start|>user\nhi<|im_end|>\n<|pad|> <|endoftext|><|endoftext|>"
    "I'M YOU'RE we've  \n  \n\n1234567890 ...!!! ___ $$$ \\n \x00\x01 \uffff \U0001f600"
)

# --------------------------------------------------------------------------- encoders
# Preprocessing encoders, fastest first. `tokenizers` is the reference: the others are
# used only when they give the very same ids on the probe text and a sample of the corpus
# (`pick_encoder`), and tests prove them equal on arbitrary Unicode.
#   fastokens   Rust BPE on PCRE2-JIT pre-tokenization, loads tokenizer.json as is
#   tiktoken    needs the byte-level shape `_fast_spec` accepts
ENCODERS = ("fastokens", "tiktoken", "tokenizers")


class Encoder:
    """`encode_flat(texts)` -> (ids, lengths): every text's ids, concatenated, as numpy."""

    def __init__(self, name: str, tok_dir: str | Path):
        self.name = name
        tj = Path(tok_dir) / "tokenizer.json"
        if name == "fastokens":
            from fastokens import Tokenizer as FastTokenizer

            self._fast = FastTokenizer.from_file(str(tj))
        elif name == "tiktoken":
            spec = _fast_spec(json.loads(tj.read_text("utf-8")))
            if spec is None:
                raise ValueError("not a byte-level BPE of the shape tiktoken implements")
            self._lists = FastEncoder(spec).encode_batch
        elif name == "tokenizers":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tj))
            self._lists = lambda texts: [e.ids for e in tok.encode_batch(texts)]
        else:
            raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")

    def encode_flat(self, texts: list[str]):
        import numpy as np

        if self.name == "fastokens":
            ids, offsets = self._fast.encode_batch_flat(texts, add_special_tokens=True)
            return np.frombuffer(ids, "<u4"), np.diff(np.frombuffer(offsets, "<u8")).astype(np.int64)
        lists = self._lists(texts)
        lengths = np.fromiter(map(len, lists), np.int64, len(lists))
        return np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(lengths.sum())), lengths

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        import numpy as np

        ids, lengths = self.encode_flat(texts)
        bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        flat = ids.tolist()
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def reference_ids(tok_dir: str | Path, texts: list[str]) -> list[list[int]]:
    """`tokenizers`' ids, one text at a time (encode_batch would start its thread pool)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    return [tok.encode(t).ids for t in texts]


def pick_encoder(tok_dir: str | Path, sample: list[str], mode: str = "auto") -> tuple[str, dict[str, str]]:
    """The fastest encoder exactly equal to `tokenizers` on the probe text and `sample`.

    Returns (name, {skipped encoder: why}). `mode` forces one encoder (an error when it
    is not equivalent); "auto" tries them fastest first and always ends at tokenizers.
    """
    if mode not in ("auto", *ENCODERS):
        raise ZeroLLMError(f"--encoder {mode}: choose auto or one of {', '.join(ENCODERS)}.")
    texts = [PROBE_TEXT, *PROBE_TEXT.split("\n"), *sample]
    want = None
    skipped: dict[str, str] = {}
    for name in ENCODERS if mode == "auto" else (mode,):
        if name == "tokenizers":
            return name, skipped
        try:
            enc = Encoder(name, tok_dir)
            want = want if want is not None else reference_ids(tok_dir, texts)
            got = enc.encode_batch(texts)
            why = None if got == want else "gives other ids than tokenizers on the probe/sample"
        except Exception as e:  # noqa: BLE001 - any failure: try the next encoder
            why = f"{type(e).__name__}: {e}"
        if why is None:
            return name, skipped
        skipped[name] = why
        log.info("encoder %s not used: %s", name, why)
    raise ZeroLLMError(
        f"{tok_dir}: --encoder {mode} asked for, but it is not exactly equivalent to tokenizers "
        f"for this tokenizer ({skipped[mode]}); use --encoder auto."
    )
