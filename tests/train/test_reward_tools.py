"""After the reward stage: its head, export, reuse as initial weights and scoring tools.

the scalar head is bias-free and counted as Hugging Face's sequence classification counts it
a reward run exports to AutoModelForSequenceClassification with the same scores (GPT-2, Llama)
a reward run and its export open as initial weights: the trunk by LM names, the head as head.weight
`zerollm reward score`: every row kind scored token-exact, in input order, normalized by the run's stats
a bad row names the file, the row and the field, before the model loads
the tokenizer pairing check names both dirs and both hashes
`zerollm reward score --help` works from the console script; `zerollm reward --config` still launches
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO
from train.errors import ZeroLLMError
from train.reward import RewardModel

pytestmark = pytest.mark.usefixtures("single_rank_group")

LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


def digit_rows(n: int = 48) -> list[dict]:
    """Preference rows: the chosen answer repeats the prompt's number, the rejected is one more."""
    return [{"prompt": f"{100 + 7 * i}=", "chosen": f"{100 + 7 * i}", "rejected": f"{101 + 7 * i}"} for i in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from data_pipeline.tokenizer import train_tokenizer

    texts = [f"{r['prompt']}{r['chosen']} {r['rejected']}" for r in digit_rows()] * 4
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok", 300)


@pytest.fixture(scope="module")
def tok(tok_dir):
    from data_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tok_dir) -> Path:
    """A 2-step GPT-2-style reward run from random weights: checkpoint and reward_stats.json at step 2."""
    from train import reward

    root = tmp_path_factory.mktemp("reward_run")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in digit_rows()))
    cfg = {
        "model": {"preset": "tiny", "dropout": 0.0, "init_std": 0.2},  # scores far from 0, so a wrong one shows
        "data": {"seq_len": 16, "seed": 1},
        "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "max_steps": 2, "lr": 1e-3, "warmup_steps": 0,
                  "precision": "fp32", "eval_interval": 0, "save_interval": 0},
        "logging": {"run_dir": str(root / "run"), "log_interval": 1, "tensorboard": False},
        "reward": {"train_file": str(pairs), "tokenizer": str(tok_dir), "max_len": 16, "valid_fraction": 0.0,
                   "stats_pairs": 16},
    }  # fmt: skip
    config = root / "reward.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ds = str(REPO / "ds_configs" / "zero0.json")
    torch.manual_seed(0)
    assert reward.stage_run(argparse.Namespace(config=str(config), deepspeed_config=ds, set=[])) == 0
    return root / "run"


@pytest.fixture(scope="module")
def exported(reward_run, tmp_path_factory) -> Path:
    from train.commands import run_export

    out = tmp_path_factory.mktemp("export") / "rm"
    assert run_export(argparse.Namespace(run_dir=str(reward_run), out=str(out), tag=None, tokenizer=None)) == 0
    return out


@pytest.fixture(scope="module")
def run_model(reward_run) -> RewardModel:
    from train.commands import load_checkpoint_model

    model, _ = load_checkpoint_model(str(reward_run))
    assert isinstance(model, RewardModel)
    return model.eval()


def right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    from train.preference_data import pad

    return pad(seqs, pad_id, "right")


def some_sequences(tok) -> list[list[int]]:
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    return [ids(p) + ids(r) + [tok.eos_token_id] for p, r in [("107=", "107"), ("114=", "411"), ("5=", "5 5 5 5")]]


# ----------------------------------------------------------------------------- the head


def test_the_head_is_bias_free_and_counted_as_hf_sequence_classification_counts_it():
    from transformers import AutoModelForSequenceClassification

    from train.hf_export import hf_config
    from train.model import from_name

    for style in ({}, LLAMA):
        cfg = from_name("tiny", **style)
        model = RewardModel(cfg)
        assert model.head.bias is None and tuple(model.head.weight.shape) == (1, cfg.d_model)
        assert model.num_parameters() == sum(p.numel() for p in model.parameters())
        hf = AutoModelForSequenceClassification.from_config(hf_config(cfg, reward=True, pad_token_id=1))
        assert model.num_parameters() == sum(p.numel() for p in hf.parameters()), style


# ----------------------------------------------------------------------------- export


def test_a_reward_run_exports_to_hf_sequence_classification_with_the_same_scores(
    reward_run, exported, run_model, tok, tok_dir
):
    from transformers import AutoModelForSequenceClassification

    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    assert (exported / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    stats = json.loads((exported / "reward_stats.json").read_text())
    assert stats == {**json.loads((reward_run / "reward_stats.json").read_text()), "max_len": 16}
    assert not list(exported.parent.glob(".tmp-*"))  # written aside, then renamed
    hf = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    ids, mask = right_padded(some_sequences(tok), tok.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = run_model(ids, mask)
    assert len(set(ours.tolist())) == 3 and ours.std() > 0.1, ours  # scores that tell rows apart
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs, ours)


def test_a_llama_style_reward_model_exports_with_the_same_scores(tmp_path, tok, tok_dir):
    from transformers import AutoModelForSequenceClassification

    from train.hf_export import export_hf
    from train.model import from_name

    torch.manual_seed(0)
    cfg = from_name("tiny", dropout=0.0, n_kv_head=2, **LLAMA)
    model = RewardModel(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    out = export_hf(model, cfg, tmp_path / "rm", tok_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    ids, mask = right_padded(some_sequences(tok), tok.pad_token_id)
    with torch.no_grad():
        theirs, ours = hf(input_ids=ids, attention_mask=mask).logits[:, 0], model(ids, mask)
    assert len(set(ours.tolist())) == 3 and torch.allclose(theirs, ours, atol=1e-5), (theirs, ours)
    with pytest.raises(ZeroLLMError, match="pad token other than eos"):
        export_hf(model, cfg, tmp_path / "no_tok")  # HF could not find the scored token


# ----------------------------------------------------------------------------- as initial weights


def test_a_reward_run_and_its_export_open_as_initial_weights_with_their_head(
    reward_run, exported, run_model, tmp_path, tok_dir
):
    from train.engine import open_initial_weights
    from train.hf_export import export_hf
    from train.model import CustomLanguageModel, from_name
    from train.reward import open_reward_dir, with_head

    trunk = dict(run_model.lm.named_parameters())  # our LM names: wte.weight, blocks.0..., ln_f...
    head = run_model.head.weight.detach()
    for where in (reward_run, exported):
        source = open_initial_weights(where, {"dropout": 0.1})
        assert source.has_head and source.config.dropout == 0.1, where
        assert all(torch.equal(source.read(n), p.detach()) for n, p in trunk.items()), where
        assert torch.equal(source.read("lm_head.weight"), trunk["wte.weight"].detach())  # tied: one tensor
        assert torch.equal(source.read("head.weight"), head)
        assert torch.equal(with_head(source, 0.02, seed=0).read("head.weight"), head)  # not a fresh head
    cfg = from_name("tiny")
    lm_dir = export_hf(CustomLanguageModel(cfg), cfg, tmp_path / "lm", tok_dir)
    lm = open_initial_weights(lm_dir)
    assert not lm.has_head and 0 < float(with_head(lm, 0.02, seed=0).read("head.weight").std()) < 0.05
    with pytest.raises(ZeroLLMError, match=r"a GPT2LMHeadModel, not a reward model"):
        open_reward_dir(lm_dir)


# ----------------------------------------------------------------------------- reward score


def score_args(**kw) -> argparse.Namespace:
    base = dict(out=None, batch_size=2, tokenizer=None, max_len=None, tag=None, device="cpu")
    return argparse.Namespace(**{**base, **kw})


def test_reward_score_scores_every_row_kind_token_exact_in_input_order(
    reward_run, exported, run_model, tok, tmp_path, monkeypatch
):
    from train.commands import run_reward_score

    msgs = [{"role": "user", "content": "121="}]
    rows = [
        {"prompt": "107=", "response": "107"},
        {"text": "114=411"},
        {"messages": msgs + [{"role": "assistant", "content": "121"}]},
        {"prompt": "128=", "chosen": "128", "rejected": "821"},
        {"prompt": "5=", "response": "5 5 5 5"},
    ]
    inp = tmp_path / "rows.jsonl.gz"
    import gzip

    inp.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    ids, eos = (lambda s: tok(s, add_special_tokens=False).input_ids), tok.eos_token_id
    chat = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    chat_turn = chat.input_ids + ids("121") + ids("<|im_end|>\n") + [eos]
    assert len(chat_turn) > 16  # the training max_len: the prompt loses its left end, as in training
    want = [  # what training builds: prompt ids + response ids (+ <|im_end|>\n in chat) + eos
        [ids("107=") + ids("107") + [eos]],
        [ids("114=411") + [eos]],
        [chat_turn[-16:]],
        [ids("128=") + ids("128") + [eos], ids("128=") + ids("821") + [eos]],
        [ids("5=") + ids("5 5 5 5") + [eos]],
    ]
    with torch.no_grad():
        alone = [[float(run_model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]) for s in r]
                 for r in want]  # fmt: skip
    stats = json.loads((reward_run / "reward_stats.json").read_text())
    monkeypatch.chdir(tmp_path)
    assert run_reward_score(score_args(model=str(reward_run), input=str(inp))) == 0  # default ./rows.scores.jsonl
    out_export = tmp_path / "sub" / "export.jsonl"
    assert run_reward_score(score_args(model=str(exported), input=str(inp), out=str(out_export), batch_size=3)) == 0
    for out in (tmp_path / "rows.scores.jsonl", out_export):
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(lines) == len(rows) and not list(out.parent.glob(".*.tmp"))
        for line, scores in zip(lines, alone):
            names = ["score"] if len(scores) == 1 else ["chosen_score", "rejected_score"]
            assert sorted(line) == sorted(names + [n.replace("score", "normalized") for n in names])
            for name, s in zip(names, scores):
                assert line[name] == pytest.approx(s, abs=1e-5), (out, line, scores)
                z = (s - stats["mean"]) / stats["std"]
                assert line[name.replace("score", "normalized")] == pytest.approx(z, abs=1e-4)
    assert len({round(s, 4) for r in alone for s in r}) == 6  # six different scores: a mixed-up row shows


def test_a_bad_row_names_the_file_row_and_field_before_the_model_loads(exported, tmp_path, monkeypatch, capsys):
    from launch import cli
    from train import reward

    def no_model(rd):
        raise AssertionError("the model loaded before the rows were checked")

    monkeypatch.setattr(reward, "load_reward_model", no_model)
    good = {"prompt": "107=", "response": "107"}
    cases = [
        ({"prompt": "107="}, "row 2: response: missing"),
        ({"prompt": "107=", "chosen": "107"}, "row 2: rejected: missing"),
        ({"prompt": "107=", "response": "  "}, "row 2: response: empty"),
        ({"text": "107 " * 40}, "row 2: text: longer than max_len 16"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "row 2: messages: expected a list of at least 2"),
    ]
    for bad, says in cases:
        inp = tmp_path / "bad.jsonl"
        inp.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        out = tmp_path / "bad.scores.jsonl"
        code = cli.main(["reward", "score", "--model", str(exported), "--input", str(inp), "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"zerollm: error: {inp}: {says}"), (err[0], says)
        assert not out.exists()


def test_the_tokenizer_pairing_check_names_both_dirs_and_hashes(reward_run, exported, tok_dir, tmp_path):
    from data_pipeline.tokenizer import tokenizer_hash, train_tokenizer
    from train.commands import run_reward_score
    from train.reward import check_same_tokenizer

    for reward_dir in (reward_run, exported):
        check_same_tokenizer(tok_dir, reward_dir)  # the tokenizer it was trained with: passes
    other = train_tokenizer(["some other text, other merges"] * 50, tmp_path / "other", 300)
    with pytest.raises(ZeroLLMError) as e:
        check_same_tokenizer(other, exported)
    msg = str(e.value)
    assert "\n" not in msg and str(other) in msg and str(exported) in msg
    assert tokenizer_hash(other) in msg and tokenizer_hash(tok_dir) in msg
    inp = tmp_path / "rows.jsonl"
    inp.write_text(json.dumps({"text": "107"}) + "\n")
    with pytest.raises(ZeroLLMError, match=r"is not the one reward model .* was trained with"):
        run_reward_score(score_args(model=str(reward_run), input=str(inp), tokenizer=str(other)))


# ----------------------------------------------------------------------------- the command line


def test_reward_score_help_from_the_console_script_and_reward_still_launches(tmp_path, capsys):
    from launch import cli

    exe = Path(sys.executable).parent / "zerollm"
    result = subprocess.run([str(exe), "reward", "score", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--batch-size" in result.stdout and "scores.jsonl" in result.stdout
    missing = tmp_path / "missing.yaml"  # `zerollm reward --config` is `zerollm launch reward --config`
    assert cli.main(["reward", "--config", str(missing), "--deepspeed_config", "ds.json"]) == 2
    assert f"{missing}: config file not found" in capsys.readouterr().err
