"""Post-training speed, side by side: ZeroLLM SFT and reward model vs TRL's SFTTrainer and RewardTrainer.

    .venv/bin/pip install '.[bench]'      # TRL: a benchmark-only extra, never needed to train or test
    .venv/bin/python benchmarks/bench_posttrain.py [--steps 8] [--rounds 3] [--warmup 2] [--threads 2]
    .venv/bin/python benchmarks/bench_posttrain.py --quick                  # 2 rounds of 5 steps
    .venv/bin/python benchmarks/bench_posttrain.py --threads 1 --clock cpu  # ratios on a busy machine

One ~5M-parameter Llama-style model of ours (train/model.py, random init) exported with
train/hf_export.export_hf, so TRL loads the identical weights; the same data (the shared
hh-rlhf pairs; the SFT conversations are their chosen dialogues); micro batch 8, max length
256, fp32 on CPU, `--threads` torch threads, all in this one process.

ZeroLLM runs each stage as `zerollm sft` / `zerollm reward` / `zerollm pretrain` do at world
size 1: the stage's own `stage_run` (config, data, a real DeepSpeed ZeRO-0 engine); only the
shared step loop (train/loop.py) is then driven in chunks of `--steps` steps, so that all
runners interleave: chunk 1 of every runner, then chunk 2, ... (load from other processes hits
each alike). TRL runs `trainer.train()` for each chunk; its trainers are built before this
process joins a process group, so it runs as a plain `python train.py` does (built after,
accelerate would wrap the model in a 1-rank DistributedDataParallel). The first `--warmup` steps
of each chunk are dropped; a rate is units / seconds summed over the other steps, a step being
the time from one batch fetch to the next (collate, forward, backward, optimizer, the loop's
bookkeeping). `--clock cpu` counts this process's CPU seconds instead of wall seconds: with
`--threads 1` that is the work done, nearly whatever else runs on the machine.

- trained tokens: tokens with a loss (SFT: assistant content + end of turn; pretraining: all);
  processed tokens: real (non-padding) tokens through the model; pairs: preference pairs.
- TRL: SFTTrainer with assistant_only_loss (ChatML with `{% generation %}` around exactly the
  tokens ours trains: assistant content + `<|im_end|>`; packing off, its default) and
  RewardTrainer (pairs over max_length are filtered out; ours cuts the prompt from the left and
  keeps them: the "TRL's pairs" row trains ours on only the pairs TRL keeps, like for like).
  Both with gradient_checkpointing off (TRL's default is on; ours is off), fp32, constant lr.
- SFT over-long rule: ours keeps the last response (drops old turns); TRL keeps the start.
  Each side counts its own trained tokens.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_1800.jsonl.gz"
MODEL = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False,
         "vocab_size": 4096, "n_layer": 5, "n_head": 4, "d_model": 256, "max_seq_len": 512, "dropout": 0.0}  # fmt: skip
BATCH, MAX_LEN, LR = 8, 256, 1e-4
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # main() sets it from --clock
# Our ChatML template (data_pipeline/tokenizer.py) with TRL's assistant-mask markers: the same text.
TRL_CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def require_trl() -> str:
    try:
        import trl
    except ImportError:
        sys.exit("bench_posttrain: TRL is not installed; it is a benchmark-only extra: pip install '.[bench]'")
    return trl.__version__


# ----------------------------------------------------------------------------- data and model


def hh_messages(dialogue: str) -> list[dict[str, str]]:
    """An hh-rlhf dialogue ("\\n\\nHuman: ..\\n\\nAssistant: ..") -> chat messages."""
    parts = re.split(r"\n\n(Human|Assistant):", dialogue)[1:]  # [role, text, role, text, ...]
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": t.strip()} for r, t in zip(parts[::2], parts[1::2])]


def prepare(work: Path) -> dict:
    """Tokenizer, SFT rows, a pretraining corpus and the exported random model, under `work`."""
    import numpy as np
    import torch

    from data_pipeline.indexed import IndexedDatasetWriter
    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
    from train.chat_data import row_messages
    from train.hf_export import export_hf
    from train.model import CustomLanguageModel, ModelConfig

    with gzip.open(HH, "rt") as f:
        pairs = [json.loads(line) for line in f]
    train_tokenizer([p[k] for p in pairs for k in ("chosen", "rejected")], work / "tok", MODEL["vocab_size"])
    convs = [m for m in (hh_messages(p["chosen"]) for p in pairs) if row_messages({"messages": m})[1] is None]
    with open(work / "sft.jsonl", "w") as f:
        for m in convs:
            f.write(json.dumps({"messages": m}) + "\n")
    tok = load_tokenizer(work / "tok")
    with IndexedDatasetWriter(work / "corpus", np.uint16) as w:  # the same dialogues as plain text
        for m in convs:
            w.add_document(np.array(tok(tok.apply_chat_template(m, tokenize=False)).input_ids + [tok.eos_token_id]))
        w.finalize()
    with open(work / "hh_trl_kept.jsonl", "w") as f:  # the pairs TRL keeps: whole sequences within MAX_LEN
        for p in pairs:
            if max(len(tok(p[k] + tok.eos_token).input_ids) for k in ("chosen", "rejected")) <= MAX_LEN:
                f.write(json.dumps(p) + "\n")
    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL)
    model = CustomLanguageModel(cfg)
    export_hf(model, cfg, work / "hf", tokenizer_dir=work / "tok")
    return {"pairs": pairs, "convs": convs, "params": model.num_parameters(), "pad": tok.pad_token_id}


# ----------------------------------------------------------------------------- runners


class Runner:
    """One trainer; `chunk(n)` runs n more steps and returns, per step, (seconds, trained tokens,
    processed tokens, padded positions, pairs)."""

    def __init__(self, name: str, what: str):
        self.name, self.what, self.steps = name, what, []

    def chunk(self, n: int) -> list[tuple[float, int, int, int, int]]:
        raise NotImplementedError


class _NoCheckpoint:
    def __init__(self, folder: Path):
        self.folder, self.dir = folder, folder

    def save(self, engine, step, state) -> Path:
        return self.folder


class _NoMetrics:
    def advance(self) -> None:
        pass

    def log(self, step, row) -> None:
        pass


class OursRunner(Runner):
    """A ZeroLLM stage: its `stage_run` builds everything; the shared loop is then driven in chunks."""

    def __init__(self, name, what, module, cfg: dict, work: Path, units):
        import yaml

        from train import run

        super().__init__(name, what)
        path = work / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = argparse.Namespace(config=str(path), deepspeed_config=str(REPO / "ds_configs/zero0.json"), set=[])
        got = {}

        def capture(r, engine, stage, ckpt, state, resumed):  # instead of running the loop
            got.update(r=r, engine=engine, stage=stage, state=state)
            return 1  # not 0: the reward stage's after-training evaluation is skipped

        real, run.loop = run.loop, capture
        try:
            module.stage_run(args)
        finally:
            run.loop = real
        self.r, self.engine, self.stage, self.state = got["r"], got["engine"], got["stage"], got["state"]
        self.ckpt = _NoCheckpoint(work)
        fetch, self.marks, self.counts = self.stage.next_batches, [], []

        def timed():
            self.marks.append(clock())
            batches = fetch()
            self.counts.append(tuple(map(sum, zip(*(units(b) for b in batches)))))
            return batches

        self.stage.next_batches = timed

    def chunk(self, n):
        from train import loop

        self.marks, self.counts = [], []
        self.r.cfg.train.max_steps = self.state["step"] + n
        loop.train(self.engine, self.stage, self.r.cfg, self.ckpt, self.state, self.r.stop, _NoMetrics())
        self.marks.append(clock())
        return [(b - a, *c) for a, b, c in zip(self.marks, self.marks[1:], self.counts)]


class TRLRunner(Runner):
    """A TRL trainer: `trainer.train()` for each chunk (another data seed each time)."""

    def __init__(self, name, what, trainer, units):
        from transformers import TrainerCallback

        super().__init__(name, what)
        self.trainer, self.marks, self.counts, self.round = trainer, [], [], 0
        runner = self

        class Marks(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                runner.marks.append(clock())

            def on_step_end(self, args, state, control, **kw):
                runner.marks.append(clock())

        trainer.add_callback(Marks())
        step = trainer.training_step

        def counted(model, inputs, *a, **kw):
            self.counts.append(units(inputs))
            return step(model, inputs, *a, **kw)

        trainer.training_step = counted

    def chunk(self, n):
        self.marks, self.counts = [], []
        self.trainer.args.max_steps = n
        self.trainer.args.seed = self.round = self.round + 1
        self.trainer.train()
        return [(b - a, *c) for a, b, c in zip(self.marks, self.marks[1:], self.counts)]


class PlainRunner(Runner):
    """A bare torch step on our model: forward, backward, clip, AdamW; random tokens (as bench_train)."""

    def __init__(self, name, what):
        import torch

        from train.model import CustomLanguageModel, ModelConfig

        super().__init__(name, what)
        torch.manual_seed(0)
        self.model = CustomLanguageModel(ModelConfig(**MODEL))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)

    def chunk(self, n):
        import torch

        out = []
        for _ in range(n):
            t0 = clock()
            x = torch.randint(0, MODEL["vocab_size"], (BATCH, MAX_LEN + 1))
            _, loss = self.model(x[:, :-1], x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            out.append((clock() - t0, *[BATCH * MAX_LEN] * 3, 0))
        return out


def ours_config(work: Path, name: str, section: dict) -> dict:
    return {
        "data": {"seed": 0},
        "train": {"micro_batch_size": BATCH, "grad_accum_steps": 1, "max_steps": 1000, "lr": LR, "min_lr": LR,
                  "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "precision": "fp32",
                  "eval_interval": 0, "save_interval": 0, "seed": 0},
        "logging": {"run_dir": str(work / name), "log_interval": 10**6, "tensorboard": False},
    } | section  # fmt: skip


def units_of(pad: int) -> dict:
    """Per micro batch: (trained tokens, processed tokens, padded positions, pairs)."""
    return {
        "sft": lambda b: (int((b["y"] != -100).sum()), int((b["x"] != pad).sum()), b["x"].numel(), 0),
        "lm": lambda b: (b[:, 1:].numel(), b[:, 1:].numel(), b[:, 1:].numel(), 0),
        "pairs": lambda b: (0, int(b["attention_mask"].sum()), b["attention_mask"].numel(),
                            b["attention_mask"].size(0) // 2),
        "trl_sft": lambda b: (int((b["labels"][:, 1:] != -100).sum()), int(b["attention_mask"].sum()),
                              b["attention_mask"].numel(), 0),
    }  # fmt: skip


def trl_runners(work: Path, prep: dict) -> list[Runner]:
    """TRL's trainers, built before this process joins a process group: TRL then runs as in a plain
    `python train.py` (accelerate's state is made once; after DeepSpeed's init it would wrap the
    model in a 1-rank DistributedDataParallel)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    hf, units = str(work / "hf"), units_of(prep["pad"])
    common = dict(per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, use_cpu=True,
                  report_to="none", save_strategy="no", disable_tqdm=True, max_length=MAX_LEN)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(work / "tok")
    tok.chat_template = TRL_CHATML
    sft = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
        args=SFTConfig(output_dir=str(work / "trl_sft"), assistant_only_loss=True, **common),
        train_dataset=Dataset.from_list([{"messages": m} for m in prep["convs"]]),
        processing_class=tok,
    )
    rm = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    reward = RewardTrainer(
        model=rm,
        args=RewardConfig(output_dir=str(work / "trl_rm"), **common),
        train_dataset=Dataset.from_list(prep["pairs"]),
        processing_class=tok,
    )
    if sft.accelerator.distributed_type != "NO":
        sys.exit(f"bench_posttrain: TRL would run distributed ({sft.accelerator.distributed_type}); unset RANK etc.")
    return [TRLRunner("TRL SFTTrainer", "sft", sft, units["trl_sft"]),
            TRLRunner("TRL RewardTrainer", "reward", reward, units["pairs"])]  # fmt: skip


def ours_runners(work: Path, prep: dict) -> list[Runner]:
    """ZeroLLM's stages at world size 1, each from its own stage_run."""
    from train import pretrain, reward, sft

    hf, tok, units = str(work / "hf"), str(work / "tok"), units_of(prep["pad"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    corpus = {"train": [str(work / "corpus")], "tokenizer": tok, "seq_len": MAX_LEN, "seed": 0, "cache_dir": str(work)}
    sft_section = {"train_file": str(work / "sft.jsonl"), "init_from": hf, "max_len": MAX_LEN, "eval_prompts": 0}
    reward_section = {"train_file": str(HH), "valid_fraction": 0.0, "init_from": hf, "max_len": MAX_LEN,
                      "tokenizer": tok, "stats_pairs": 1}  # fmt: skip
    return [
        OursRunner("zerollm pretrain", "pretrain", pretrain,
                   ours_config(work, "pretrain", {"model": MODEL, "data": corpus}), work, units["lm"]),
        OursRunner("zerollm sft packed", "sft", sft,
                   ours_config(work, "sft_packed", {"sft": sft_section | {"packing": True}}), work, units["sft"]),
        OursRunner("zerollm sft unpacked", "sft", sft,
                   ours_config(work, "sft_unpacked", {"sft": sft_section | {"packing": False}}), work, units["sft"]),
        OursRunner("zerollm reward", "reward", reward, ours_config(work, "reward", {"model": MODEL,
                   "data": {"seed": 0, "seq_len": MAX_LEN}, "reward": reward_section}), work, units["pairs"]),
        OursRunner("zerollm reward, TRL's pairs", "reward", reward, ours_config(work, "reward_trl_kept", {
                   "model": MODEL, "data": {"seed": 0, "seq_len": MAX_LEN},
                   "reward": reward_section | {"train_file": str(work / "hh_trl_kept.jsonl")}}), work, units["pairs"]),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- report


def rates(steps: list[tuple]) -> dict[str, float]:
    secs = sum(s[0] for s in steps)
    tot = [sum(s[k] for s in steps) for k in range(1, 5)]
    return {"trained": tot[0] / secs, "processed": tot[1] / secs, "fill": tot[1] / max(1, tot[2]),
            "pairs": tot[3] / secs, "s_per_step": secs / len(steps)}  # fmt: skip


def report(runners: list[Runner], trl_version: str, prep: dict, a: argparse.Namespace) -> None:
    r = {x.name: rates(x.steps) for x in runners}
    trl = {"sft": r["TRL SFTTrainer"], "reward": r["TRL RewardTrainer"]}
    pre = r["zerollm pretrain"]["processed"]
    print(f"\nmodel: {prep['params']:,} parameters (Llama-style, 5 x 256), micro batch {BATCH}, max length {MAX_LEN}, "
          f"fp32, {a.threads} threads, {a.clock} clock; TRL {trl_version}; {a.rounds} interleaved rounds of "
          f"{a.steps} steps, the first {a.warmup} of each dropped")  # fmt: skip
    print()
    print("| stage | runner | trained tokens/s | processed tokens/s | fill | pairs/s | s/step | vs TRL "
          "| processed vs pretrain |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in runners:
        v, reward = r[x.name], x.what == "reward"
        cells = ["", f"{v['processed']:,.0f}", f"{100 * v['fill']:.0f}%", "", f"{v['s_per_step']:.3f}", "", ""]
        if reward:
            cells[3] = f"{v['pairs']:.1f}"
        else:
            cells[0], cells[6] = f"{v['trained']:,.0f}", f"{v['processed'] / pre:.2f}x"
        if x.what in trl and not x.name.startswith("TRL"):
            key = "pairs" if reward else "trained"
            cells[5] = f"**{v[key] / trl[x.what][key]:.2f}x**"
        print(f"| {x.what} | {x.name} | " + " | ".join(cells) + " |")
    print("\nvs TRL: trained tokens/s (SFT) or pairs/s (reward) over TRL's (target >= 1.5x); processed vs pretrain: "
          "over `zerollm pretrain` on the same model and length (target >= 0.90x); fill: processed tokens / "
          "positions computed (the rest is padding)")  # fmt: skip


def main() -> None:
    global clock
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="steps per chunk")
    p.add_argument("--rounds", type=int, default=3, help="chunks per runner, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock",
        default="wall",
        choices=list(CLOCKS),
        help="cpu: this process's CPU seconds (with --threads 1: the work done, even on a busy machine)",
    )
    p.add_argument("--quick", action="store_true", help="2 rounds of 5 steps")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.steps = 2, 5
    trl_version = require_trl()
    if not HH.is_file():
        sys.exit(f"bench_posttrain: {HH} is absent")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # TRL must see a plain single process
        os.environ.pop(var, None)
    import logging

    import torch

    torch.set_num_threads(a.threads)
    clock = CLOCKS[a.clock]
    with tempfile.TemporaryDirectory(prefix="bench_posttrain_") as tmp:
        work = Path(tmp)
        prep = prepare(work)
        trl = trl_runners(work, prep)
        ours = ours_runners(work, prep)
        logging.getLogger("zerollm").setLevel(logging.WARNING)
        runners = [PlainRunner("plain PyTorch step", "pretrain"), ours[0], trl[0], *ours[1:3], trl[1], *ours[3:]]
        for k in range(a.rounds):
            for x in runners:
                steps = x.chunk(a.steps)
                x.steps += steps[a.warmup :]
                print(f"round {k + 1}: {x.name}: {sum(s[0] for s in steps):.1f} s", file=sys.stderr, flush=True)
        report(runners, trl_version, prep, a)


if __name__ == "__main__":
    main()
