"""Supervised fine-tuning (train/chat_data.py, train/sft.py).

the unmasked tokens decode to exactly the assistant turns + end of turn (ChatML, and a
    template whose joined text tokenizes differently from its turns)
pad == eos is refused; bad rows are counted by reason; a file with no usable row stops
over-long samples keep the response (turns dropped, prompt trimmed, response cut), counted
packed loss == unpacked loss on the same conversations
the stage at world size 1: micro 1 x accum 4 == micro 4 x accum 1; SFT answers held-out prompts
    exactly (greedy, up to the end-of-turn token) and names where its model settings came from
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from train.chat_data import (
    Report,
    build_samples,
    check_chat_tokenizer,
    collate,
    encode_turns,
    fit_turns,
    load_records,
    pack,
)
from train.errors import ZeroLLMError
from train.losses import IGNORE_INDEX

LETTERS = "abcdefgh"


def reverse_pair(rng: random.Random) -> dict[str, str]:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(2, 4))]
    return {"prompt": "reverse: " + " ".join(letters), "response": " ".join(reversed(letters))}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A 400-token ChatML byte-level BPE trained on a few KB of text (the project's own trainer)."""
    from data_pipeline.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = "reverse the order of these letters please and answer with a short reply hello world".split()
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    texts += [reverse_pair(rng)["prompt"] for _ in range(200)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), 400)


@pytest.fixture(scope="module")
def tok(tok_dir):
    from train.chat_data import load_chat_tokenizer

    return load_chat_tokenizer(tok_dir)


def unmasked_text(tok, turns) -> str:
    return tok.decode([i for t in turns for i, m in zip(t.ids, t.mask) if m])


DIALOGUE = [
    {"role": "system", "content": "be short"},
    {"role": "user", "content": "reverse: a b c"},
    {"role": "assistant", "content": "c b a"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "world"},
]


def test_chatml_mask_is_exactly_the_assistant_turns_and_end_of_turn(tok):
    turns = encode_turns(tok, DIALOGUE)
    assert unmasked_text(tok, turns) == "c b a<|im_end|>world<|im_end|>"
    ids = [i for t in turns for i in t.ids]
    assert tok.decode(ids) == tok.apply_chat_template(DIALOGUE, tokenize=False)
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert turns[2].ids[: len(header)] == header and not any(turns[2].mask[: len(header)])


def test_mask_stays_exact_where_joined_text_tokenizes_differently(tok_dir):
    """No separator between turns: "reverse" + "the order" joins to "reversethe order", which
    BPE tokenizes across the boundary; turn-by-turn ids differ from the joined text's, and
    the mask still picks exactly the assistant text + eos."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok_dir))
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "rev"}, {"role": "assistant", "content": "erse the order"}]
    turns = encode_turns(t, msgs)
    ours = [i for x in turns for i in x.ids]
    joined = t(t.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert joined != ours  # the joined text merges "rev" + "erse" into other tokens
    assert t.decode(ours) == t.decode(joined) == "reverse the order<|endoftext|>"
    assert unmasked_text(t, turns) == "erse the order<|endoftext|>"


def test_pad_equal_to_eos_is_refused(tok_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok_dir))
    t.pad_token = t.eos_token
    with pytest.raises(ZeroLLMError, match="pad token must exist and differ from eos"):
        check_chat_tokenizer(t, "tok")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BAD_ROWS = [
    {"text": "no field"},
    {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"prompt": "p", "response": "  "},
    {"messages": [{"role": "user", "content": "only a question"}]},
]


def test_bad_rows_are_counted_by_reason_across_formats(tmp_path):
    import datasets

    good = [reverse_pair(random.Random(i)) for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", good + BAD_ROWS)
    convs, report = load_records(path)
    assert len(convs) == 3 and report.rows == 7
    assert dict(report.bad) == {"missing field": 1, "unknown role": 1, "empty response": 1, "no assistant turn": 1}
    msgs = [{"messages": [{"role": "user", "content": g["prompt"]}, {"role": "assistant", "content": g["response"]}]}
            for g in good]  # fmt: skip
    datasets.Dataset.from_list(msgs).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(msgs).save_to_disk(str(tmp_path / "hf"))
    for src in (tmp_path / "d.parquet", tmp_path / "hf"):
        assert load_records(src)[0] == load_records(path)[0]


def test_a_file_with_no_usable_row_stops_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(ZeroLLMError, match=r"bad\.jsonl: no usable SFT row \(4 rows"):
        load_records(path)


def test_over_long_samples_keep_the_response_and_are_counted(tok):
    long_user = {"role": "user", "content": "hello world " * 20}
    msgs = [DIALOGUE[0], long_user, {"role": "assistant", "content": "old"}, *DIALOGUE[1:3]]
    turns = encode_turns(tok, msgs)
    keep = [turns[0], *turns[3:]]  # system + last prompt turn + response
    report = Report("x")
    s = fit_turns(turns, sum(len(t.ids) for t in keep), report.over_long)
    assert tok.decode(s.ids) == tok.apply_chat_template([DIALOGUE[0], *DIALOGUE[1:3]], tokenize=False)
    assert dict(report.over_long) == {"turns_dropped": 1}
    s = fit_turns(turns, len(turns[-1].ids) + 3, report.over_long)  # 3 prompt tokens left
    assert s.ids[3:] == turns[-1].ids and report.over_long["prompt_trimmed"] == 1
    s = fit_turns(turns, 5, report.over_long)
    assert s.ids == turns[-1].ids[:5] and report.over_long["response_truncated"] == 1


LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False}


def tiny_model(vocab: int, seed: int = 0, **style):
    from train.model import CustomLanguageModel, from_name

    torch.manual_seed(seed)
    return CustomLanguageModel(from_name("tiny", vocab_size=vocab, dropout=0.0, **style)).float().eval()


def summed_loss(model, batch) -> torch.Tensor:
    from train.losses import lm_loss

    logits, _ = model(batch["x"], doc_ids=batch["doc_ids"])
    return lm_loss(logits, batch["y"])[0]


def test_packed_loss_equals_unpacked_loss(tok):
    rng = random.Random(3)
    convs = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]
             for p in (reverse_pair(rng) for _ in range(6))] + [DIALOGUE]  # fmt: skip
    samples = build_samples(convs, tok, 64, Report("x"))
    rows = pack(samples, 64)
    assert len(rows) < len(samples) and max(len(r) for r in rows) > 1
    model = tiny_model(len(tok))
    with torch.no_grad():
        packed = collate(rows, tok.pad_token_id, 64)
        assert packed["doc_ids"] is not None
        unpacked = collate([[s] for s in samples], tok.pad_token_id)
        assert int((packed["y"] != IGNORE_INDEX).sum()) == int((unpacked["y"] != IGNORE_INDEX).sum())
        a, b = summed_loss(model, packed), summed_loss(model, unpacked)
    assert abs(float(a) - float(b)) < 1e-5 * max(1.0, float(b)), (float(a), float(b))


# ----------------------------------------------------------------------------- the stage, world size 1


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory, tok_dir, tok):
    """A random tiny-preset model exported as an HF dir (with the tokenizer) and the
    reverse task: train/valid jsonl of {"prompt": "reverse: a b c", "response": "c b a"};
    the 32 valid prompts are none of the training prompts."""
    from train.hf_export import export_hf

    root = tmp_path_factory.mktemp("sft")
    model = tiny_model(len(tok))
    export_hf(model, model.cfg, root / "hf", tokenizer_dir=tok_dir)
    rng = random.Random(7)
    train = [reverse_pair(rng) for _ in range(256)]
    seen = {r["prompt"] for r in train}
    valid = [r for r in (reverse_pair(rng) for _ in range(64)) if r["prompt"] not in seen][:32]
    write_jsonl(root / "train.jsonl", train + BAD_ROWS[:1])
    write_jsonl(root / "valid.jsonl", valid)
    return root, model


def sft_config(root: Path, run_dir: Path, packing: bool = True, init_from: str = "hf", **train) -> Path:
    import yaml

    cfg = {
        "model": {"dropout": 0.0},
        "sft": {
            "train_file": str(root / "train.jsonl"),
            "valid_file": str(root / "valid.jsonl"),
            "init_from": str(root / init_from),
            "max_len": 64,
            "packing": packing,
            "eval_prompts": 2,
            "max_new_tokens": 8,
        },  # fmt: skip
        "train": {
            "micro_batch_size": 2,
            "grad_accum_steps": 1,
            "max_steps": 2,
            "warmup_steps": 0,
            "lr": 3e-3,
            "schedule": "constant",
            "precision": "fp32",
            "eval_interval": 0,
            "save_interval": 0,
            "eval_steps": 8,
            **train,
        },  # fmt: skip
        "logging": {"run_dir": str(run_dir), "log_interval": 1, "tensorboard": False},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_sft(config: Path) -> list[dict]:
    import argparse

    from tests.conftest import REPO
    from train.sft import stage_run

    args = argparse.Namespace(config=str(config), deepspeed_config=str(REPO / "ds_configs" / "zero0.json"), set=[])
    assert stage_run(args) == 0
    run_dir = config.with_suffix("")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_invariance(single_rank_group, sft_inputs, tmp_path):
    root, _ = sft_inputs
    a = run_sft(sft_config(root, tmp_path / "a", micro_batch_size=1, grad_accum_steps=4))
    b = run_sft(sft_config(root, tmp_path / "b", micro_batch_size=4, grad_accum_steps=1))
    la, lb = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
    assert len(la) == len(lb) == 2
    assert la == pytest.approx(lb, rel=1e-5)


def exact_match(model, tok, valid: Path) -> float:
    """Share of held-out prompts whose greedy answer, up to the end-of-turn token, is exactly
    the expected response (an answer that never ends its turn counts as wrong)."""
    from train.chat_data import end_of_turn_id, generation_prompt

    convs, _ = load_records(valid)
    eot, hits = end_of_turn_id(tok), 0
    with torch.no_grad():
        for conv in convs:
            prompt = generation_prompt(tok, conv)
            new = model.generate(torch.tensor([prompt]), 12, temperature=0.0, eos_token_id=eot)[0, len(prompt) :]
            new = new.tolist()
            hits += eot in new and tok.decode(new[: new.index(eot)]) == conv[-1]["content"]
    return hits / len(convs)


@pytest.fixture(scope="module")
def llama_start(sft_inputs, tok, tok_dir):
    """A random Llama-style (RoPE) tiny model exported as an HF dir, beside sft_inputs' files."""
    from train.hf_export import export_hf

    root, _ = sft_inputs
    model = tiny_model(len(tok), **LLAMA)
    export_hf(model, model.cfg, root / "llama", tokenizer_dir=tok_dir)
    return model


@pytest.fixture
def one_thread():
    """torch on one thread: a 64-wide model gains nothing from two, and on a loaded machine
    two threads spinning for each other made this 150-step run 15x slower (134 s, not 9 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sft_answers_held_out_prompts_exactly_and_logs_samples(
    single_rank_group, sft_inputs, llama_start, tok, tmp_path, caplog, one_thread
):
    """150 steps of 16 conversations (no packing) on the reverse task: the greedy answers to
    32 prompts never seen in training are exactly right; the random start gets none right."""
    import logging

    from train.engine import load_initial_weights, open_initial_weights
    from train.model import CustomLanguageModel

    root, _ = sft_inputs
    convs, rep = load_records(root / "valid.jsonl")
    with torch.no_grad():
        batch = collate([[s] for s in build_samples(convs, tok, 64, rep)], tok.pad_token_id)
        before = float(summed_loss(llama_start, batch)) / int((batch["y"] != IGNORE_INDEX).sum())
    em_before = exact_match(llama_start, tok, root / "valid.jsonl")
    caplog.set_level(logging.INFO, logger="zerollm")
    # The stage's logging setup replaces the root handlers, caplog's among them: listen on ours.
    logging.getLogger("zerollm").addHandler(caplog.handler)
    config = sft_config(root, tmp_path / "run", packing=False, init_from="llama", max_steps=150,
                        eval_interval=150, micro_batch_size=16)  # fmt: skip
    try:
        rows = run_sft(config)
    finally:
        logging.getLogger("zerollm").removeHandler(caplog.handler)
    # The start log (rank 0) names the source, the settings taken from it and the override.
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model from")]
    assert line.startswith(f"model from {root / 'llama'} (Hugging Face llama dir): vocab_size={len(tok)} "), line
    assert " n_layer=2 n_head=4 n_kv_head=4 d_model=64 " in line and " pos_emb=rope " in line, line
    assert line.endswith("; overridden by the config: dropout 0.0 (as the source)"), line
    changed = open_initial_weights(root / "llama", {"dropout": 0.1}).describe()
    assert changed.endswith("; overridden by the config: dropout 0.0 -> 0.1") and " dropout=" not in changed
    after = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    source = open_initial_weights(tmp_path / "run")  # the SFT run as the next stage would start from it
    assert source.describe().startswith(f"model from {tmp_path / 'run'} (ZeroLLM run, step 150): ")
    trained = CustomLanguageModel(source.config).eval()
    load_initial_weights(trained, source)
    em_after = exact_match(trained, tok, root / "valid.jsonl")
    print(f"held-out loss {before:.2f} -> {after:.2f}, exact match {em_before:.2f} -> {em_after:.2f}")
    # Measured on the 2-core dev machine, seeds as here (train.seed = data.seed = 1234): exact
    # match 0.00 -> 0.97, held-out loss 5.80 -> 0.03; seeds 0, 1, 2, 3 gave 0.97, 1.00, 1.00,
    # 1.00 (loss 0.00-0.05). The GPT-2 style start (learned positions) needs many more steps:
    # 0.00-0.03 after 90-120 steps of 4-16 conversations, packed or not.
    assert em_before <= 0.05 and em_after >= 0.75, (em_before, em_after)
    assert after < 0.5 < before, (before, after)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train"]["bad"] == {"missing field": 1} and report["train"]["used"] == 256
    assert (tmp_path / "run" / "samples.txt").read_text().count("--- prompt:") == 2


def test_shape_fields_in_the_model_section_are_refused(single_rank_group, sft_inputs, tmp_path):
    import argparse

    import yaml

    from tests.conftest import REPO
    from train.sft import stage_run

    root, _ = sft_inputs
    path = sft_config(root, tmp_path / "run")
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["n_layer"] = 4
    path.write_text(yaml.safe_dump(cfg))
    args = argparse.Namespace(config=str(path), deepspeed_config=str(REPO / "ds_configs" / "zero0.json"), set=[])
    with pytest.raises(ZeroLLMError, match="model.n_layer: the model shape comes from sft.init_from"):
        stage_run(args)


def test_resume_repeats_the_losses_of_an_uninterrupted_run(single_rank_group, sft_inputs, tmp_path):
    """2 steps, checkpoint, rerun to 4: steps 3-4 see the same rows and give the same losses."""
    import yaml

    root, _ = sft_inputs
    straight = run_sft(sft_config(root, tmp_path / "a", max_steps=4))
    path = sft_config(root, tmp_path / "b", max_steps=2)
    run_sft(path)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["max_steps"] = 4
    path.write_text(yaml.safe_dump(cfg))
    resumed = run_sft(path)
    la = [r["loss"] for r in straight if "loss" in r]
    lb = [r["loss"] for r in resumed if "loss" in r]
    assert lb[-2:] == pytest.approx(la[2:], rel=1e-6)


# ----------------------------------------------------------------------------- the real launcher, 2 ranks


def launch_sft(config: Path, log: Path, env: dict | None = None):
    """`deepspeed --num_gpus 2 --module train.sft ...` as a user runs it (ZeRO-2, CPU ranks),
    its output to `log`; returns the launcher's process."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO, SINGLE_RANK_VARS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "--module", "train.sft", "--config", str(config),
           "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json")]  # fmt: skip
    inherited = {k: v for k, v in os.environ.items() if k not in (*SINGLE_RANK_VARS, "ZEROLLM_FAULT")}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", "ZEROLLM_RANK_LOG": "1", "PYTHONPATH": str(REPO), **(env or {})}
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip


def finished(proc, log: Path) -> tuple[int, str]:
    """(exit status, output) of a launch."""
    return proc.wait(timeout=600), log.read_text()


def step_losses(run_dir: Path) -> dict[str, dict[int, float]]:
    """Loss by step: the global one (metrics.jsonl) and each rank's own (ranks/rank<r>.jsonl);
    the last value of a step wins, as after a resume."""
    files = {"global": (run_dir / "metrics.jsonl", "loss")}
    files |= {f"rank{r}": (run_dir / "ranks" / f"rank{r}.jsonl", "loss_local") for r in (0, 1)}
    out = {}
    for name, (path, key) in files.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        out[name] = {r["step"]: r[key] for r in rows if key in r}
    return out


def sigterm_once_logged(proc, run_dir: Path, step: int) -> None:
    """SIGTERM to both ranks (as Slurm sends it) once `step` is in the run's metrics."""
    import signal
    import time

    import psutil

    deadline, ranks = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None:
        if len(ranks) < 2:
            children = psutil.Process(proc.pid).children(recursive=True)
            ranks = [p for p in children if any(a.startswith("--local_rank=") for a in p.cmdline())]
        if len(ranks) == 2 and max(step_losses(run_dir)["global"], default=0) >= step:
            for p in ranks:
                p.send_signal(signal.SIGTERM)
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_two_rank_sft_resumes_after_sigkill_and_sigterm_with_the_same_losses(sft_inputs, tmp_path):
    """2 CPU ranks, ZeRO-2, dropout 0.1 (so the RNG streams must resume too): a run where rank 1
    is SIGKILLed after step 5, re-run (resumes at step 4), SIGTERMed on both ranks a few steps
    later (checkpoint at the step the ranks agree on, exit 75), re-run to the end, logs for
    every step the same global and per-rank losses as a run never interrupted (launched
    beside the first interrupted one: the two start-ups share the wait)."""
    import yaml

    root, _ = sft_inputs
    max_steps, ckpts = 20, tmp_path / "run" / "checkpoints"

    def config(name: str) -> Path:
        path = sft_config(root, tmp_path / name, max_steps=max_steps, save_interval=2, keep_last=20)
        cfg = yaml.safe_load(path.read_text())
        cfg["model"]["dropout"] = 0.1
        path.write_text(yaml.safe_dump(cfg))
        return path

    cfg, logs = config("run"), [tmp_path / f"launch{i}.log" for i in range(4)]
    ref = launch_sft(config("ref"), logs[0])
    killed = launch_sft(cfg, logs[1], env={"ZEROLLM_FAULT": "step:1:5"})
    code, out = finished(ref, logs[0])
    assert code == 0, out[-3000:]
    code, out = finished(killed, logs[1])
    assert code != 0 and (ckpts / "latest").read_text() == "step00000004", out[-3000:]
    stopped = launch_sft(cfg, logs[2])
    sigterm_once_logged(stopped, tmp_path / "run", step=6)
    code, out = finished(stopped, logs[2])
    assert code == 75 and f"resumed from {ckpts / 'step00000004'}" in out, out[-3000:]
    assert "terminate called" not in out, out[-3000:]  # no rank aborted while exiting
    tag = (ckpts / "latest").read_text()
    manifest = json.loads((ckpts / tag / "complete.json").read_text())
    assert "stopped at step" in out and 6 <= manifest["step"] < max_steps, (manifest["step"], out[-3000:])
    code, out = finished(launch_sft(cfg, logs[3]), logs[3])
    assert code == 0 and f"resumed from {ckpts / tag}" in out, out[-3000:]
    want, got = step_losses(tmp_path / "ref"), step_losses(tmp_path / "run")
    for name in ("global", "rank0", "rank1"):
        assert sorted(got[name]) == sorted(want[name]) == list(range(1, max_steps + 1)), name
        assert got[name] == want[name], name  # exactly: same rows, same dropout masks, same updates
