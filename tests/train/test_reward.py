"""The reward-model stage (train/reward.py, train/preference_data.py).

pure math: last_token_index, bradley_terry_loss (tests/train/test_losses.py)
the same scores for the same pairs under left and right padding
a tokenizer whose pad is its eos: one line
rows -> token-exact pairs; hh-rlhf split at the last Assistant turn; every row kept or counted
the stage through the shared loop (world size 1, in this process) learns a checkable preference
"""

from __future__ import annotations

import argparse
import json
import math
import socket
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO
from tests.train import checkable_tasks
from train.errors import ZeroLLMError
from train.preference_data import Pair, build_pairs, collate, read_records, split_hh
from train.reward import RewardModel

HH = "hh_rlhf_harmless_1800.jsonl.gz"


pytestmark = pytest.mark.usefixtures("single_rank_group")


def copy_rows(n: int = 1200) -> list[dict]:
    """A checkable preference: the chosen answer repeats the prompt's 3-digit number exactly,
    the rejected one is a corrupted copy (tests/train/checkable_tasks.py `rows`)."""
    return checkable_tasks.rows(n)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from data_pipeline.tokenizer import train_tokenizer

    texts = [f"{r['prompt']}{r['chosen']}" for r in copy_rows()]
    texts += ["\n\nHuman: how do I bake bread?\n\nAssistant: Mix flour, water and yeast, then wait."] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok", 400)


@pytest.fixture(scope="module")
def tok(tok_dir):
    from data_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


# ----------------------------------------------------------------------------- model


def test_scores_are_the_same_under_left_and_right_padding(tok):
    from train.model import from_name

    for style in ({}, {"pos_emb": "rope", "norm": "rmsnorm"}):  # GPT-2 (learned positions) and Llama style
        torch.manual_seed(0)
        model = RewardModel(from_name("tiny", dropout=0.0, **style)).eval()
        nn_head = model.head
        torch.nn.init.normal_(nn_head.weight, std=1.0)  # scores far from 0 so a wrong row shows
        eos = tok.eos_token_id
        pairs = [Pair([5, 6, 7, eos], [5, 6, 8, 9, 10, eos]), Pair([11, eos], [12, 13, 14, 15, 16, 17, 18, eos])]
        with torch.no_grad():
            right = model(**{k: v for k, v in collate(pairs, tok.pad_token_id, "right").items() if k != "margin"})
            left = model(**{k: v for k, v in collate(pairs, tok.pad_token_id, "left").items() if k != "margin"})
            alone = torch.stack([model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))[0]
                                 for x in [p.chosen for p in pairs] + [p.rejected for p in pairs]])  # fmt: skip
        assert torch.allclose(left, right, atol=1e-5), (left, right)
        assert torch.allclose(right, alone, atol=1e-5), (right, alone)
        assert len(set(right.tolist())) == 4


def test_a_shared_prompt_batch_gives_the_scores_and_gradients_of_separate_sequences(tok):
    """collate_shared runs each pair's common prefix once and packs several pairs per row;
    scores and parameter gradients must be those of the 2B separate rows (float rounding)."""
    from train.model import from_name
    from train.preference_data import collate_shared
    from train.reward import pair_scores

    eos = tok.eos_token_id
    pairs = [
        Pair([5, 6, 7, eos], [5, 6, 8, 9, 10, eos]),  # prefix 2
        Pair([11, eos], [12, 13, 14, 15, 16, 17, 18, eos]),  # no prefix
        Pair([20, 21, 22, 23, 24, 25, eos], [20, 21, 22, 23, 24, eos], 0.5),  # one is the other + a token
        Pair([30, 31, 32, 33, eos], [30, 31, 32, 34, eos]),
    ]
    for style in ({}, {"pos_emb": "rope", "norm": "rmsnorm"}):  # learned positions and RoPE
        torch.manual_seed(0)
        model = RewardModel(from_name("tiny", dropout=0.0, **style))
        torch.nn.init.normal_(model.head.weight, std=1.0)
        grads = []
        for batch in (collate(pairs, tok.pad_token_id), collate_shared(pairs, tok.pad_token_id, 16)):
            model.zero_grad()
            scores = pair_scores(model, batch)
            (scores * torch.arange(1.0, 9.0)).sum().backward()  # every score with its own weight
            grads.append((scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (separate, g_sep), (shared, g_sh) = grads
        assert torch.allclose(shared, separate, atol=1e-5), (shared, separate)
        assert len(set(separate.tolist())) == 8
        for name, g in g_sep.items():
            assert (g_sh[name] - g).abs().max() <= 1e-5 * g.abs().max().clamp(min=1.0), name
    b = collate_shared(pairs, tok.pad_token_id, 16)
    assert b["input_ids"].size(0) < len(pairs)  # pairs packed in fewer rows than pairs
    assert int(b["attention_mask"].sum()) == sum(len(p.chosen) + len(p.rejected) for p in pairs) - (2 + 0 + 5 + 3)


def test_a_tokenizer_whose_pad_is_its_eos_stops_with_one_line():
    from train.preference_data import check_tokenizer

    class Tok:
        pad_token_id, eos_token_id, pad_token, eos_token = 0, 0, "<|endoftext|>", "<|endoftext|>"

    with pytest.raises(ZeroLLMError) as e:
        check_tokenizer(Tok(), "tok/")
    assert "\n" not in str(e.value) and "pad token" in str(e.value) and "tok/" in str(e.value)


# ----------------------------------------------------------------------------- data


def test_pairs_are_token_exact_and_long_prompts_lose_their_left_end(tok):
    eos = tok.eos_token_id
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    row = {"prompt": "12=", "chosen": "12", "rejected": "21", "margin": 0.5}
    (pair,) = build_pairs([row], tok, 64, "f").pairs
    assert pair.chosen == ids("12=") + ids("12") + [eos] and pair.rejected == ids("12=") + ids("21") + [eos]
    assert pair.margin == 0.5
    long = {"prompt": "0123456789" * 5 + "=", "chosen": "12", "rejected": "21"}
    out = build_pairs([long], tok, 8, "f")
    p, c = ids(long["prompt"]), ids("12")
    room = 8 - 1 - len(c)  # the responses and eos stay whole
    assert out.truncated == 1 and out.pairs[0].chosen == p[-room:] + c + [eos]


def test_bad_rows_are_counted_by_reason_and_a_file_without_pairs_stops(tok, tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    rows = [
        {"prompt": "1=", "chosen": "1", "rejected": "2"},
        {"prompt": "1=", "chosen": "1"},  # missing_rejected
        {"prompt": "1=", "chosen": "1", "rejected": "1"},  # identical
        {"prompt": "1=", "chosen": "  ", "rejected": "2"},  # empty_chosen
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},  # prompts_differ
        {"chosen": "no turns here", "rejected": "nor here"},  # no_assistant_turn
        {"chosen": msgs + [{"role": "assistant", "content": "hello"}],
         "rejected": msgs + [{"role": "assistant", "content": "go away"}]},  # messages: kept
        {"prompt": "hi", "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},  # prompt + assistant messages: kept
    ]  # fmt: skip
    out = build_pairs(rows, tok, 64, "f")
    assert len(out.pairs) == 3 and out.rows == 8
    assert dict(out.dropped) == {"missing_rejected": 1, "identical": 1, "empty_chosen": 1, "prompts_differ": 1,
                                 "no_assistant_turn": 1}  # fmt: skip
    chat = out.pairs[1]
    prompt = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert chat.chosen[: len(prompt.input_ids)] == prompt.input_ids
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows[1:4]))
    with pytest.raises(ZeroLLMError, match=r"bad.jsonl: no usable preference pair in 3 rows") as e:
        build_pairs(read_records(bad), tok, 64, str(bad))
    assert "\n" not in str(e.value)


def test_hh_rlhf_pairs_split_at_the_last_assistant_turn_and_every_row_is_counted(tok, shared_data):
    rows = read_records(shared_data / HH)
    out = build_pairs(rows, tok, 256, HH)
    report = out.report()
    print("hh-rlhf at max_len 256:", report)
    assert report["rows"] == 1800 and len(out.pairs) + sum(out.dropped.values()) == 1800
    # measured with this file's 400-token BPE (long token strings): 1,169 kept (785 of them with the
    # prompt cut from the left), 625 too_long, 4 empty_response, 2 prompts_differ
    assert len(out.pairs) > 1000 and out.truncated > 0
    prompt, response = split_hh(rows[0]["chosen"])
    assert prompt.endswith("\n\nAssistant:") and "\n\nAssistant:" not in response
    assert prompt == split_hh(rows[0]["rejected"])[0]
    eos, ids = tok.eos_token_id, lambda s: tok(s, add_special_tokens=False).input_ids
    short = next(r for r in rows if len(ids(r["chosen"])) < 100 and len(ids(r["rejected"])) < 100)
    (pair,) = build_pairs([short], tok, 256, HH).pairs
    (p, c), (_, r) = split_hh(short["chosen"]), split_hh(short["rejected"])
    assert pair.chosen == ids(p) + ids(c) + [eos] and pair.rejected == ids(p) + ids(r) + [eos]


# ----------------------------------------------------------------------------- the stage


def write_run(tmp_path: Path, tok_dir: Path, init_from: Path, **train) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in copy_rows()))
    cfg = {
        "model": {"preset": "tiny", "dropout": 0.0},
        "data": {"seq_len": 16, "seed": 1},
        "train": {"micro_batch_size": 16, "grad_accum_steps": 1, "max_steps": 200, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 5, "weight_decay": 0.0, "precision": "fp32", "eval_interval": 200,
                  "save_interval": 0, **train},
        "logging": {"run_dir": str(tmp_path / "run"), "log_interval": 10, "tensorboard": False},
        "reward": {"train_file": str(pairs), "tokenizer": str(tok_dir), "init_from": str(init_from),
                   "max_len": 16, "valid_fraction": 0.1},
    }  # fmt: skip
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_lm_weights_load_into_the_reward_model_and_the_head_starts_small(tmp_path, tok_dir):
    from train.engine import load_initial_weights, open_initial_weights
    from train.hf_export import export_hf
    from train.model import CustomLanguageModel, from_name
    from train.reward import with_head

    torch.manual_seed(0)
    cfg = from_name("tiny", pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    lm = CustomLanguageModel(cfg)
    source = open_initial_weights(export_hf(lm, cfg, tmp_path / "hf", tok_dir))
    torch.manual_seed(1)
    model = RewardModel(source.config)
    load_initial_weights(model, with_head(source, 0.02, seed=0))  # the names build_engine asks for
    want = {f"lm.{n}": p for n, p in lm.named_parameters() if n != "lm_head.weight"}
    got = dict(model.named_parameters())
    assert set(got) == set(want) | {"head.weight"}  # no LM head in a reward model; a bias-free head as HF's
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert 0 < float(got["head.weight"].detach().std()) < 0.05


def test_reward_stage_learns_a_checkable_preference_through_the_shared_loop(tmp_path, tok_dir):
    from train import reward
    from train.hf_export import export_hf
    from train.model import CustomLanguageModel, from_name

    torch.manual_seed(0)
    lm_cfg = from_name("tiny", dropout=0.0)
    lm = CustomLanguageModel(lm_cfg)
    hf_dir = export_hf(lm, lm_cfg, tmp_path / "hf", tok_dir)  # the stage starts from an exported LM
    config = write_run(tmp_path, tok_dir, hf_dir)
    args = argparse.Namespace(config=str(config), deepspeed_config=str(REPO / "ds_configs" / "zero2.json"), set=[])
    assert reward.stage_run(args) == 0
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (ev,) = [r for r in rows if "eval_accuracy" in r]
    print("reward stage held-out:", {k: v for k, v in ev.items() if k.startswith(("eval", "train"))})
    # Measured (200 steps of 16 pairs, tiny preset, seeds as here): held-out accuracy 0.958 on
    # 120 pairs, margin 7.0 (150 steps on 800 rows gave 0.91; two-digit numbers, few enough to
    # memorise, gave 0.78); a model that only guesses sits near 0.5. Sums ("2+3=5" against a
    # wrong sum) learn too slowly for this test: 0.73 after 600 steps of 32 pairs.
    assert ev["eval_accuracy"] >= 0.9 and ev["eval_margin"] > 0
    assert math.isfinite(ev["eval_reward_std"]) and ev["eval_reward_std"] > 0
    data = json.loads((run_dir / "reward_data.json").read_text())
    assert data["train"]["rows"] + data["valid"]["rows"] == 1200 and data["train"]["dropped"] == {}
    stats = json.loads((run_dir / "reward_stats.json").read_text())
    from data_pipeline.tokenizer import tokenizer_hash

    assert stats["tokenizer_hash"] == tokenizer_hash(tok_dir) and stats["std"] > 0 and stats["step"] == 200
    manifest = json.loads((run_dir / "checkpoints" / "step00000200" / "complete.json").read_text())
    assert manifest["state"]["reward_stats"] == stats and manifest["state"]["tokenizer_hash"] == stats["tokenizer_hash"]


def test_micro_batch_and_accumulation_splits_give_the_same_losses(tmp_path, tok_dir):
    """The loop divides the summed pair losses by the global pair count, and scores do not
    depend on how a micro batch is padded: 1 x 4 and 4 x 1 pairs give the same step losses."""
    from train import reward
    from train.hf_export import export_hf
    from train.model import CustomLanguageModel, from_name

    torch.manual_seed(0)
    lm_cfg = from_name("tiny", dropout=0.0)
    hf_dir = export_hf(CustomLanguageModel(lm_cfg), lm_cfg, tmp_path / "hf", tok_dir)
    losses = {}
    for mb, gas in ((1, 4), (4, 1)):
        config = write_run(tmp_path / f"mb{mb}", tok_dir, hf_dir, max_steps=3, eval_interval=0, warmup_steps=1)
        sets = [f"train.micro_batch_size={mb}", f"train.grad_accum_steps={gas}", "logging.log_interval=1"]
        ds = str(REPO / "ds_configs" / "zero0.json")
        assert reward.stage_run(argparse.Namespace(config=str(config), deepspeed_config=ds, set=sets)) == 0
        lines = (tmp_path / f"mb{mb}" / "run" / "metrics.jsonl").read_text().splitlines()
        losses[mb] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[4], rel=1e-5), losses


@pytest.mark.slow
def test_two_rank_zero3_launch_trains_saves_and_resumes(tmp_path, tok_dir):
    """`deepspeed --num_gpus 2 -m train.reward` as a user runs it: ZeRO-3 (the LM loaded
    partition by partition through the name mapping), held-out eval sharded over ranks;
    SIGTERM to both ranks mid-run (as Slurm sends it): a checkpoint at the step they agree
    on and exit 75; the same command again resumes there, finishes and exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from train.hf_export import export_hf
    from train.model import CustomLanguageModel, from_name

    torch.manual_seed(0)
    lm_cfg = from_name("tiny", dropout=0.0)
    hf_dir = export_hf(CustomLanguageModel(lm_cfg), lm_cfg, tmp_path / "hf", tok_dir)
    config = write_run(tmp_path, tok_dir, hf_dir, max_steps=6, eval_interval=3, save_interval=3, micro_batch_size=4)
    run_dir, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch(log: Path) -> subprocess.Popen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--module", "train.reward", "--config", str(config),
               "--deepspeed_config", str(REPO / "ds_configs" / "zero3.json"),
               "--set", "logging.log_interval=1"]  # fmt: skip
        with log.open("w") as out:
            return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)  # fmt: skip

    def logged_steps() -> list[int]:
        path = run_dir / "metrics.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []

    first = launch(tmp_path / "first.log")
    deadline, ranks = time.time() + 300, []
    while time.time() < deadline and first.poll() is None:  # SIGTERM once step 1 is logged
        if len(ranks) < 2:
            children = psutil.Process(first.pid).children(recursive=True)
            ranks = [p for p in children if any(a.startswith("--local_rank=") for a in p.cmdline())]
        if len(ranks) == 2 and logged_steps():
            for p in ranks:
                p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out = (first.wait(timeout=600), (tmp_path / "first.log").read_text())
    assert out[0] == 75 and "reward stopped at step" in out[1], out[1][-3000:]
    # The start log, on rank 0 only, names the starting model and what the config overrode.
    assert f"[rank0] model from {hf_dir} (Hugging Face gpt2 dir): vocab_size=" in out[1], out[1][-3000:]
    assert "[rank1] model from" not in out[1]
    tag = (run_dir / "checkpoints" / "latest").read_text()
    manifest = json.loads((run_dir / "checkpoints" / tag / "complete.json").read_text())
    assert manifest["world_size"] == 2 and 1 <= manifest["step"] == manifest["state"]["step"] < 6, manifest["step"]
    second = launch(tmp_path / "second.log")
    out = (second.wait(timeout=600), (tmp_path / "second.log").read_text())
    assert out[0] == 0 and f"resumed from {run_dir / 'checkpoints' / tag}" in out[1], out[1][-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(0 <= r["eval_accuracy"] <= 1 for r in evals)
    assert sorted({r["step"] for r in rows if "loss" in r}) == [1, 2, 3, 4, 5, 6]
    stats = json.loads((run_dir / "reward_stats.json").read_text())
    assert stats["step"] == 6 and stats["n_rewards"] == 2 * 512  # stats_pairs, sharded and summed over 2 ranks
