"""Post-training speed, side by side: ZeroLLM SFT, reward model, DPO and GRPO vs TRL's trainers; PPO alone.

    .venv/bin/pip install '.[bench]'      # TRL: a benchmark-only extra, never needed to train or test
    .venv/bin/python benchmarks/bench_posttrain.py [--steps 8] [--rounds 3] [--warmup 2] [--threads 2]
    .venv/bin/python benchmarks/bench_posttrain.py --quick                  # 2 rounds of 5 steps
    .venv/bin/python benchmarks/bench_posttrain.py --threads 1 --clock cpu  # ratios on a busy machine
    .venv/bin/python benchmarks/bench_posttrain.py --only dpo,grpo          # some stages (pretrain rows come along)

One ~5M-parameter Llama-style model of ours (train/model.py, random init) exported with
train/hf_export.export_hf, so TRL loads the identical weights; the same data (the shared
hh-rlhf pairs; the SFT conversations are their chosen dialogues; the RL prompts are their
dialogues up to the last "Assistant:", those within 192 prompt tokens); micro batch 8, max
length 256, fp32 on CPU, `--threads` torch threads, all in this one process.

ZeroLLM runs each stage as `zerollm sft` / `reward` / `dpo` / `grpo` / `ppo` / `pretrain` do at
world size 1: the stage's own `stage_run` (config, data, a real DeepSpeed ZeRO-0 engine); only
the shared step loop (train/loop.py) is then driven in chunks of `--steps` steps, so that all
runners interleave: chunk 1 of every runner, then chunk 2, ... (load from other processes hits
each alike). TRL runs `trainer.train()` for each chunk; its trainers are built before this
process joins a process group, so it runs as a plain `python train.py` does (built after,
accelerate would wrap the model in a 1-rank DistributedDataParallel). The first `--warmup` steps
of each chunk are dropped; a rate is units / seconds summed over the other steps, a step being
the time from one batch fetch to the next (collate, forward, backward, optimizer, the loop's
bookkeeping; for GRPO/PPO also the rollout: generation, reward, old/reference/value forwards).
`--clock cpu` counts this process's CPU seconds instead of wall seconds: with `--threads 1` that
is the work done, nearly whatever else runs on the machine.

- trained tokens: tokens with a loss (SFT: assistant content + end of turn; DPO: both answers +
  end of turn; GRPO/PPO: the sampled answers; pretraining: all); processed tokens: real
  (non-padding) tokens through the model; pairs: preference pairs; completions: sampled answers.
- TRL: SFTTrainer with assistant_only_loss (ChatML with `{% generation %}` around exactly the
  tokens ours trains: assistant content + `<|im_end|>`; packing off, its default) and
  RewardTrainer (pairs over max_length are filtered out; ours cuts the prompt from the left and
  keeps them: the "TRL's pairs" row trains ours on only the pairs TRL keeps, like for like).
  All with gradient_checkpointing off (TRL's default is on; ours is off), fp32, constant lr.
- SFT over-long rule: ours keeps the last response (drops old turns); TRL keeps the start.
  Each side counts its own trained tokens.
- DPO: beta 0.1, sigmoid loss, 8 pairs a step, the same conversational pairs (the first 512 hh
  pairs; TRL gets the prompt turns and answers ours builds, train/dpo.prompt_messages). TRL's DPOTrainer is given an
  explicit ref_model (the same weights) and, by default, runs the reference forward on every
  step (in its rate); ours computes the reference log-probs of every pair once, before the
  first step: not in its rate, timed and printed apart, with the one-epoch rate that counts it.
  `--trl-precomputed-ref` adds TRL with precompute_ref_log_probs (its reference pass, untimed,
  takes minutes). Over-long pairs: TRL keeps the start (cuts the answer), ours drops old
  prompt turns. TRL's answer tokens include the "\n" after `<|im_end|>` (one more per answer).
- GRPO: 4 prompts x group 4 = 16 completions an iteration, 32 new tokens at temperature 1
  (top-p 1, no top-k), stopping at `<|im_end|>`; a cheap length reward (`length_reward`) on both;
  KL beta 0.04 (k3) on both (TRL's default is 0); one optimizer step an iteration over the 16
  completions as 2 micro batches of 8 (TRL: gradient_accumulation_steps 2, steps_per_generation
  2, num_iterations 1, loss_type dapo = ours' mean over all answer tokens). What differs: ours
  runs one extra no-grad forward per rollout for the behaviour log-probs (the ratio of the first
  update is exactly 1 by construction); TRL, on policy, takes them from the training forward.
  Ours generates with its KV-cache `generate` (train/model.py), TRL with transformers'
  `model.generate` (see benchmarks/bench_generate.py for generation alone).
- PPO: TRL 1.16 has no PPO trainer (removed in 1.13), so ours runs alone: 16 prompts x 1
  completion an iteration, the same length reward, kl_coef 0.05, a critic from the same LM,
  epochs 1 (one optimizer step of actor and critic per rollout, 2 micro batches of 8).
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
DPO_BETA, DPO_PAIRS = 0.1, 512  # DPO trains on the first DPO_PAIRS hh pairs (ours' reference pass: all of them)
# RL: prompts (whole, never cut) of at most PROMPT_LEN tokens; GROUP answers to each of ROLLOUT_ROWS / GROUP prompts
PROMPT_LEN, NEW_TOKENS, GROUP, ROLLOUT_ROWS, KL_BETA = 192, 32, 4, 16, 0.04
REWARD = "benchmarks.bench_posttrain:length_reward"
STAGES = ("sft", "reward", "dpo", "grpo", "ppo")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # main() sets it from --clock
GEN = {"s": 0.0, "tokens": 0}  # generation seconds and sampled tokens so far (both sides' generate, timed)
REF = {"s": 0.0, "pairs": 0}  # ours' DPO reference pass (once, before the first step)
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


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """The RL reward on both sides: answer length in characters / 100 (cheap: the bench times
    the trainers, not a reward). Ours passes texts; TRL passes [{"role": "assistant", ...}] lists."""
    return [len(c if isinstance(c, str) else c[-1]["content"]) / 100 for c in completions]


# ----------------------------------------------------------------------------- data and model


def hh_messages(dialogue: str) -> list[dict[str, str]]:
    """An hh-rlhf dialogue ("\\n\\nHuman: ..\\n\\nAssistant: ..") -> chat messages."""
    parts = re.split(r"\n\n(Human|Assistant):", dialogue)[1:]  # [role, text, role, text, ...]
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": t.strip()} for r, t in zip(parts[::2], parts[1::2])]


def preference_rows(pairs: list[dict]) -> list[dict]:
    """hh pairs -> (prompt turns, chosen, rejected) as ours' DPO builds them, in TRL's conversational form."""
    from train.dpo import prompt_messages
    from train.preference_data import BadRow, row_parts

    rows = []
    for p in pairs:
        try:
            prompt, chosen, rejected = row_parts(p)
        except BadRow:
            continue
        rows.append({"prompt": prompt_messages(prompt), "chosen": [{"role": "assistant", "content": chosen.strip()}],
                     "rejected": [{"role": "assistant", "content": rejected.strip()}]})  # fmt: skip
    return rows


def prepare(work: Path) -> dict:
    """Tokenizer, SFT rows, RL prompts, a pretraining corpus and the exported random model, under `work`."""
    import numpy as np
    import torch

    from data_pipeline.indexed import IndexedDatasetWriter
    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
    from train.chat_data import generation_prompt, row_messages
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
    with open(work / "hh_dpo.jsonl", "w") as f:
        for p in pairs[:DPO_PAIRS]:
            f.write(json.dumps(p) + "\n")
    prompts, seen = [], set()
    for row in preference_rows(pairs):  # RL prompts: each distinct dialogue up to its last "Assistant:", whole
        msgs, key = row["prompt"], json.dumps(row["prompt"])
        if key not in seen and msgs[-1]["role"] == "user":
            seen.add(key)
            if len(generation_prompt(tok, [*msgs, {"role": "assistant", "content": "x"}])) <= PROMPT_LEN:
                prompts.append(msgs)
    with open(work / "prompts.jsonl", "w") as f:
        for m in prompts:
            f.write(json.dumps({"messages": m}) + "\n")
    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL)
    model = CustomLanguageModel(cfg)
    export_hf(model, cfg, work / "hf", tokenizer_dir=work / "tok")
    return {"pairs": pairs, "convs": convs, "prefs": preference_rows(pairs[:DPO_PAIRS]), "prompts": prompts,
            "params": model.num_parameters(), "pad": tok.pad_token_id, "model": model}  # fmt: skip


# ----------------------------------------------------------------------------- runners


def snap() -> tuple[float, float, int]:
    """(clock, generation seconds so far, sampled tokens so far)."""
    return clock(), GEN["s"], GEN["tokens"]


def timed_generation(fn, sampled):
    """fn, its time and sampled tokens (`sampled(output)`) added to GEN."""

    def wrapper(*args, **kwargs):
        t0 = clock()
        out = fn(*args, **kwargs)
        GEN["s"] += clock() - t0
        GEN["tokens"] += sampled(out)
        return out

    return wrapper


def steps_of(marks: list[tuple], counts: list[tuple]) -> list[tuple]:
    """Per step: (seconds, *units, generation seconds, sampled tokens) between consecutive marks."""
    return [(b[0] - a[0], *c, b[1] - a[1], b[2] - a[2]) for a, b, c in zip(marks, marks[1:], counts)]


class Runner:
    """One trainer; `chunk(n)` runs n more steps and returns, per step, (seconds, trained tokens,
    processed tokens, padded positions, rows (pairs or completions), generation seconds, sampled tokens)."""

    def __init__(self, name: str, what: str):
        self.name, self.what, self.steps = name, what, []

    def chunk(self, n: int) -> list[tuple]:
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

        def timed():  # a step starts at its fetch (for GRPO/PPO: the rollout is made inside it)
            self.marks.append(snap())
            batches = fetch()
            self.counts.append(tuple(map(sum, zip(*(units(b) for b in batches)))))
            return batches

        self.stage.next_batches = timed

    def chunk(self, n):
        from train import loop

        self.marks, self.counts = [], []
        self.r.cfg.train.max_steps = self.state["step"] + n
        loop.train(self.engine, self.stage, self.r.cfg, self.ckpt, self.state, self.r.stop, _NoMetrics())
        self.marks.append(snap())
        return steps_of(self.marks, self.counts)


class TRLRunner(Runner):
    """A TRL trainer: `trainer.train()` for each chunk (another data seed each time). Units are
    counted on each micro batch `training_step` gets, or (GRPO) on what `_prepare_inputs` makes
    of it: the prompts with their sampled completions."""

    def __init__(self, name, what, trainer, units, count_prepared: bool = False):
        from transformers import TrainerCallback

        super().__init__(name, what)
        self.trainer, self.marks, self.counts, self.round, self.pending = trainer, [], [], 0, None
        runner = self

        class Marks(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                runner.marks.append(snap())

            def on_step_end(self, args, state, control, **kw):
                runner.marks.append(snap())
                runner.counts.append(runner.pending)
                runner.pending = None

        trainer.add_callback(Marks())

        def add(u):
            self.pending = u if self.pending is None else tuple(a + b for a, b in zip(self.pending, u))

        if count_prepared:
            prep = trainer._prepare_inputs

            def prepared(inputs):
                out = prep(inputs)
                add(units(out))
                return out

            trainer._prepare_inputs = prepared
        else:
            step = trainer.training_step

            def counted(model, inputs, *a, **kw):
                add(units(inputs))
                return step(model, inputs, *a, **kw)

            trainer.training_step = counted

    def chunk(self, n):
        self.marks, self.counts = [], []
        self.trainer.args.max_steps = n
        self.trainer.args.seed = self.round = self.round + 1
        self.trainer.train()
        return steps_of(self.marks, self.counts)


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
            out.append((clock() - t0, *[BATCH * MAX_LEN] * 3, 0, 0.0, 0))
        return out


def ours_config(work: Path, name: str, section: dict, **train) -> dict:
    return {
        "data": {"seed": 0},
        "train": {"micro_batch_size": BATCH, "grad_accum_steps": 1, "max_steps": 1000, "lr": LR, "min_lr": LR,
                  "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "precision": "fp32",
                  "eval_interval": 0, "save_interval": 0, "seed": 0, **train},
        "logging": {"run_dir": str(work / name), "log_interval": 10**6, "tensorboard": False},
    } | section  # fmt: skip


def units_of(pad: int) -> dict:
    """Per micro batch: (trained tokens, processed tokens, padded positions, rows: pairs or completions)."""
    return {
        "sft": lambda b: (int((b["y"] != -100).sum()), int((b["x"] != pad).sum()), b["x"].numel(), 0),
        "lm": lambda b: (b[:, 1:].numel(), b[:, 1:].numel(), b[:, 1:].numel(), 0),
        "pairs": lambda b: (0, int(b["attention_mask"].sum()), b["attention_mask"].numel(),
                            int(b["margin"].numel()) if "margin" in b else b["attention_mask"].size(0) // 2),
        "trl_sft": lambda b: (int((b["labels"][:, 1:] != -100).sum()), int(b["attention_mask"].sum()),
                              b["attention_mask"].numel(), 0),
        "dpo": lambda b: (int((b["y"] != -100).sum()), int((b["x"] != pad).sum()), b["x"].numel(),
                          int(b["idx"].numel())),
        "trl_dpo": lambda b: (int(b["completion_mask"].sum()), int(b["attention_mask"].sum()),
                              b["attention_mask"].numel(), b["input_ids"].size(0) // 2),
        "rl": lambda b: (int(b["mask"].sum()), int(((b["doc_ids"] >= 0) & (b["x"] != pad)).sum()), b["x"].numel(),
                         b["x"].size(0)),
        "trl_rl": lambda b: (int(b["completion_mask"].sum()), int(b["prompt_mask"].sum() + b["completion_mask"].sum()),
                             b["prompt_ids"].numel() + b["completion_ids"].numel(), b["completion_ids"].size(0)),
    }  # fmt: skip


def trl_runners(work: Path, prep: dict, only: set[str], precomputed_ref: bool = False) -> list[Runner]:
    """TRL's trainers, built before this process joins a process group: TRL then runs as in a plain
    `python train.py` (accelerate's state is made once; after DeepSpeed's init it would wrap the
    model in a 1-rank DistributedDataParallel)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    hf, units = str(work / "hf"), units_of(prep["pad"])
    common = dict(per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, use_cpu=True,
                  report_to="none", save_strategy="no", disable_tqdm=True)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(work / "tok")
    tok.chat_template = TRL_CHATML

    def lm():
        return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)

    out = []
    if "sft" in only:
        sft = SFTTrainer(
            model=lm(),
            args=SFTConfig(output_dir=str(work / "trl_sft"), assistant_only_loss=True, max_length=MAX_LEN, **common),
            train_dataset=Dataset.from_list([{"messages": m} for m in prep["convs"]]),
            processing_class=tok,
        )
        out.append(TRLRunner("TRL SFTTrainer", "sft", sft, units["trl_sft"]))
    if "reward" in only:
        rm = AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1, dtype=torch.float32)
        rm.config.pad_token_id = tok.pad_token_id
        reward = RewardTrainer(
            model=rm,
            args=RewardConfig(output_dir=str(work / "trl_rm"), max_length=MAX_LEN, **common),
            train_dataset=Dataset.from_list(prep["pairs"]),
            processing_class=tok,
        )
        out.append(TRLRunner("TRL RewardTrainer", "reward", reward, units["pairs"]))
    if "dpo" in only:
        variants = [("TRL DPOTrainer", False)] + [("TRL DPOTrainer, precomputed ref", True)] * precomputed_ref
        for name, precompute in variants:
            dpo = DPOTrainer(
                model=lm(),
                ref_model=lm(),  # explicit: the same weights
                args=DPOConfig(
                    output_dir=str(work / "trl_dpo"),
                    beta=DPO_BETA,
                    loss_type=["sigmoid"],
                    max_length=MAX_LEN,
                    precompute_ref_log_probs=precompute,
                    **common,
                ),  # fmt: skip
                train_dataset=Dataset.from_list(prep["prefs"]),
                processing_class=tok,
            )
            out.append(TRLRunner(name, "dpo", dpo, units["trl_dpo"]))
    if "grpo" in only:
        policy = lm()
        policy.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")  # stop as ours does
        grpo = GRPOTrainer(
            model=policy,
            reward_funcs=[length_reward],
            args=GRPOConfig(
                output_dir=str(work / "trl_grpo"),
                gradient_accumulation_steps=ROLLOUT_ROWS // BATCH,
                num_generations=GROUP,
                max_completion_length=NEW_TOKENS,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                beta=KL_BETA,
                epsilon=0.2,
                num_iterations=1,
                loss_type="dapo",
                scale_rewards="group",
                logging_steps=10**6,
                **common,
            ),  # fmt: skip
            train_dataset=Dataset.from_list([{"prompt": m} for m in prep["prompts"]]),
            processing_class=tok,
        )
        grpo._generate_single_turn = timed_generation(grpo._generate_single_turn, lambda o: sum(map(len, o[0])))
        out.append(TRLRunner("TRL GRPOTrainer", "grpo", grpo, units["trl_rl"], count_prepared=True))
    if out and out[0].trainer.accelerator.distributed_type != "NO":
        sys.exit(f"bench_posttrain: TRL would run distributed ({out[0].trainer.accelerator.distributed_type}); "
                 "unset RANK etc.")  # fmt: skip
    return out


def ours_runners(work: Path, prep: dict, only: set[str]) -> list[Runner]:
    """ZeroLLM's stages at world size 1, each from its own stage_run."""
    from train import dpo, grpo, ppo, pretrain, reward, rollout, sft

    hf, tok, units = str(work / "hf"), str(work / "tok"), units_of(prep["pad"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rollout.generate = timed_generation(rollout.generate, lambda o: sum(map(len, o)))  # GRPO's and PPO's sampling
    reference_logps = dpo.reference_logps

    def timed_reference(r, engine, data, *args, **kwargs):  # ours' one reference pass, before the first DPO step
        t0 = clock()
        out = reference_logps(r, engine, data, *args, **kwargs)
        REF.update(s=clock() - t0, pairs=len(data.train) + len(data.valid))
        return out

    dpo.reference_logps = timed_reference
    corpus = {"train": [str(work / "corpus")], "tokenizer": tok, "seq_len": MAX_LEN, "seed": 0, "cache_dir": str(work)}
    sft_section = {"train_file": str(work / "sft.jsonl"), "init_from": hf, "max_len": MAX_LEN, "eval_prompts": 0}
    reward_section = {"train_file": str(HH), "valid_fraction": 0.0, "init_from": hf, "max_len": MAX_LEN,
                      "tokenizer": tok, "stats_pairs": 1}  # fmt: skip
    rl = {"prompts_file": str(work / "prompts.jsonl"), "init_from": hf, "tokenizer": tok, "reward": REWARD,
          "max_prompt_len": PROMPT_LEN, "max_new_tokens": NEW_TOKENS, "temperature": 1.0, "top_p": 1.0,
          "epochs": 1, "minibatches": 1}  # fmt: skip
    rl_train = {"grad_accum_steps": ROLLOUT_ROWS // BATCH}
    out = []
    if only & {"sft", "reward", "dpo"}:
        config = ours_config(work, "pretrain", {"model": MODEL, "data": corpus})
        out.append(OursRunner("zerollm pretrain", "pretrain", pretrain, config, work, units["lm"]))
    if "sft" in only:
        out += [
            OursRunner("zerollm sft packed", "sft", sft,
                       ours_config(work, "sft_packed", {"sft": sft_section | {"packing": True}}), work, units["sft"]),
            OursRunner("zerollm sft unpacked", "sft", sft,
                       ours_config(work, "sft_unpacked", {"sft": sft_section | {"packing": False}}), work,
                       units["sft"]),
        ]  # fmt: skip
    if "reward" in only:
        out += [
            OursRunner("zerollm reward", "reward", reward, ours_config(work, "reward", {"model": MODEL,
                       "data": {"seed": 0, "seq_len": MAX_LEN}, "reward": reward_section}), work, units["pairs"]),
            OursRunner("zerollm reward, TRL's pairs", "reward", reward, ours_config(work, "reward_trl_kept", {
                       "model": MODEL, "data": {"seed": 0, "seq_len": MAX_LEN},
                       "reward": reward_section | {"train_file": str(work / "hh_trl_kept.jsonl")}}), work,
                       units["pairs"]),
        ]  # fmt: skip
    if "dpo" in only:
        section = {"train_file": str(work / "hh_dpo.jsonl"), "valid_fraction": 0.0, "init_from": hf,
                   "tokenizer": tok, "max_len": MAX_LEN, "beta": DPO_BETA, "loss": "sigmoid"}  # fmt: skip
        out.append(OursRunner("zerollm dpo", "dpo", dpo, ours_config(work, "dpo", {"dpo": section}), work,
                              units["dpo"]))  # fmt: skip
    if "grpo" in only:
        section = rl | {"group_size": GROUP, "beta": KL_BETA, "kl": "k3", "clip_eps": 0.2}
        out.append(OursRunner("zerollm grpo", "grpo", grpo, ours_config(work, "grpo", {"model": {"dropout": 0.0},
                              "grpo": section}, **rl_train), work, units["rl"]))  # fmt: skip
    if "ppo" in only:
        section = rl | {"kl_coef": 0.05, "kl": "k1", "clip_eps": 0.2}
        out.append(OursRunner("zerollm ppo", "ppo", ppo, ours_config(work, "ppo", {"model": {"dropout": 0.0},
                              "ppo": section}, **rl_train), work, units["rl"]))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- report


def rates(steps: list[tuple]) -> dict[str, float]:
    secs = sum(s[0] for s in steps)
    tot = [sum(s[k] for s in steps) for k in range(1, 7)]
    return {"trained": tot[0] / secs, "processed": tot[1] / secs, "fill": tot[1] / max(1, tot[2]),
            "rows": tot[3] / secs, "s_per_step": secs / len(steps), "gen_share": tot[4] / secs,
            "gen_tokens": tot[5] / max(tot[4], 1e-9)}  # fmt: skip


def report(runners: list[Runner], trl_version: str, prep: dict, a: argparse.Namespace) -> None:
    r = {x.name: rates(x.steps) for x in runners}
    trl = {x.what: r[x.name] for x in reversed(runners) if x.name.startswith("TRL")}  # the first TRL row per stage
    pre = r.get("zerollm pretrain", {}).get("processed")
    print(f"\nmodel: {prep['params']:,} parameters (Llama-style, 5 x 256), micro batch {BATCH}, max length {MAX_LEN}, "
          f"fp32, {a.threads} threads, {a.clock} clock; TRL {trl_version}; {a.rounds} interleaved rounds of "
          f"{a.steps} steps, the first {a.warmup} of each dropped (RL: {a.rl_steps} iterations, the first "
          "dropped)")  # fmt: skip
    sup = [x for x in runners if x.what in ("pretrain", "sft", "reward", "dpo")]
    if sup:
        print()
        print("| stage | runner | trained tokens/s | processed tokens/s | fill | pairs/s | s/step | vs TRL "
              "| processed vs pretrain |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in sup:
        v, reward = r[x.name], x.what == "reward"
        cells = ["", f"{v['processed']:,.0f}", f"{100 * v['fill']:.0f}%", "", f"{v['s_per_step']:.3f}", "", ""]
        if x.what in ("reward", "dpo"):
            cells[3] = f"{v['rows']:.1f}"
        if not reward:
            cells[0] = f"{v['trained']:,.0f}"
            cells[6] = f"{v['processed'] / pre:.2f}x" if pre else ""
        if x.what in trl and not x.name.startswith("TRL"):
            key = "rows" if x.what in ("reward", "dpo") else "trained"
            cells[5] = f"**{v[key] / trl[x.what][key]:.2f}x**"
            if x.what == "dpo" and "TRL DPOTrainer, precomputed ref" in r:
                cells[5] += f" ({v[key] / r['TRL DPOTrainer, precomputed ref'][key]:.2f}x vs precomputed ref)"
        print(f"| {x.what} | {x.name} | " + " | ".join(cells) + " |")
    if sup:
        print("\nvs TRL: trained tokens/s (SFT) or pairs/s (reward, DPO) over TRL's (target >= 1.5x); processed vs "
              "pretrain: over `zerollm pretrain` on the same model and length (target >= 0.90x); fill: processed "
              "tokens / positions computed (the rest is padding)")  # fmt: skip
    if "zerollm dpo" in r and REF["pairs"]:
        v, n = r["zerollm dpo"]["rows"], REF["pairs"]
        whole = n / (n / v + REF["s"])  # one epoch, the reference pass included
        vs = f" ({whole / trl['dpo']['rows']:.2f}x TRL's pairs/s)" if "dpo" in trl else ""
        print(f"DPO: ours computes the reference log-probs once, before step 1 ({REF['s']:.0f} s for {n} pairs, not "
              f"in the rates above; TRL's DPOTrainer runs the reference on every step, in its rate); one epoch with "
              f"that pass counted: {whole:.1f} pairs/s{vs}")  # fmt: skip
    rl = [x for x in runners if x.what in ("grpo", "ppo")]
    if rl:
        print(f"\nRL: {ROLLOUT_ROWS} completions an iteration (GRPO: {ROLLOUT_ROWS // GROUP} prompts x {GROUP}; PPO: "
              f"{ROLLOUT_ROWS} x 1), up to {NEW_TOKENS} new tokens, prompts within {PROMPT_LEN} tokens, one optimizer "
              f"step an iteration ({ROLLOUT_ROWS // BATCH} micro batches of {BATCH})\n")  # fmt: skip
        print("| stage | runner | s/iteration | completions/s | rollout tokens/s (while generating) "
              "| trained tokens/s | share generating | vs TRL |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in rl:
        v = r[x.name]
        vs = f"**{v['rows'] / trl[x.what]['rows']:.2f}x**" if x.what in trl and not x.name.startswith("TRL") else ""
        print(f"| {x.what} | {x.name} | {v['s_per_step']:.3f} | {v['rows']:.1f} | {v['gen_tokens']:,.0f} | "
              f"{v['trained']:,.0f} | {100 * v['gen_share']:.0f}% | {vs} |")  # fmt: skip
    if rl:
        print(
            "\nvs TRL: completions/s (= iterations/s) over TRL's; an iteration: sampling, reward, the no-grad "
            "forwards (ours: behaviour + reference log-probs, PPO also values; TRL: reference only) and the update"
        )
        if any(x.what == "ppo" for x in rl):
            print(f"PPO: TRL {trl_version} has no PPO trainer (PPOTrainer was removed in TRL 1.13; 1.12 was the "
                  "last with it): ZeroLLM only")  # fmt: skip


def main() -> None:
    global clock
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="steps per chunk")
    p.add_argument("--rl-steps", type=int, default=4, help="GRPO/PPO iterations per chunk (the first one dropped)")
    p.add_argument("--rounds", type=int, default=3, help="chunks per runner, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock",
        default="wall",
        choices=list(CLOCKS),
        help="cpu: this process's CPU seconds (with --threads 1: the work done, even on a busy machine)",
    )
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {', '.join(STAGES)}")
    p.add_argument(
        "--trl-precomputed-ref",
        action="store_true",
        help="also TRL's DPOTrainer with precompute_ref_log_probs (its reference pass is slow: minutes)",
    )
    p.add_argument("--quick", action="store_true", help="2 rounds of 5 steps (RL: 3 iterations)")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.steps, a.rl_steps = 2, 5, 3
    only = set(a.only.split(","))
    if only - set(STAGES):
        sys.exit(f"bench_posttrain: --only: {', '.join(sorted(only - set(STAGES)))}: not one of {', '.join(STAGES)}")
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
        trl = {x.name: x for x in trl_runners(work, prep, only, a.trl_precomputed_ref)}
        ours = {x.name: x for x in ours_runners(work, prep, only)}
        logging.getLogger("zerollm").setLevel(logging.WARNING)
        order = ["plain PyTorch step", "zerollm pretrain", "TRL SFTTrainer", "zerollm sft packed",
                 "zerollm sft unpacked", "TRL RewardTrainer", "zerollm reward", "zerollm reward, TRL's pairs",
                 "TRL DPOTrainer", "TRL DPOTrainer, precomputed ref", "zerollm dpo", "TRL GRPOTrainer",
                 "zerollm grpo", "zerollm ppo"]  # fmt: skip
        if "zerollm pretrain" in ours:
            ours["plain PyTorch step"] = PlainRunner("plain PyTorch step", "pretrain")
        runners = [(trl | ours)[n] for n in order if n in trl | ours]
        for k in range(a.rounds):
            for x in runners:
                rl = x.what in ("grpo", "ppo")
                steps = x.chunk(a.rl_steps if rl else a.steps)
                x.steps += steps[1 if rl else a.warmup :]
                print(f"round {k + 1}: {x.name}: {sum(s[0] for s in steps):.1f} s", file=sys.stderr, flush=True)
        report(runners, trl_version, prep, a)


if __name__ == "__main__":
    main()
