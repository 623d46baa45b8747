"""GRPO: the policy learns from a verifiable reward, without a critic (Shao et al. 2024).

One node (2 CPU ranks or N GPUs):
    deepspeed --num_gpus 2 --master_addr 127.0.0.1 -m train.grpo \
        --config RUN.yaml --deepspeed_config ds_configs/zero2.json
    zerollm grpo --config RUN.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2

Each rollout: every rank takes its next prompts (`grpo.prompts_file`, seeded order) and
samples `grpo.group_size` answers per prompt with the model's KV-cache generate
(temperature / top_p, stopping at the end-of-turn token; under ZeRO-3 the weights are
gathered once per rollout, not per token). The reward function (`grpo.reward`,
module:function, e.g. data_pipeline.function_tasks:reward) scores each answer; an answer
that never ends loses `unfinished_penalty`. Advantages are group-normalised
(train.losses.group_advantages) and shared by every token of the answer. The behaviour
and reference log-probs of the sampled tokens are computed right after sampling, in fp32,
at the sampling temperature and with the training forward itself (dropout must be 0), so
the probability ratio of the first update of a rollout is exactly 1.

The loss of an answer token is the clipped surrogate (train.losses.ppo_policy_loss) plus
beta x the k3 (or k1) estimate of KL(policy || reference), summed over the answer tokens
of the step and divided by their global count (the shared loop's rule). A rollout feeds
`epochs` x `minibatches` optimizer steps: its rows split into `minibatches` slices, each
visited once per epoch (a fresh seeded order per epoch).

Deviation from the paper, on purpose: the loss is a mean over all answer tokens of the
step, not a mean of per-answer means (as Dr. GRPO and DAPO recommend: a per-answer mean
up-weights the tokens of short answers); the KL term is part of the loss (as the paper),
not of the reward.

A resume lands on a rollout boundary (save_interval is a multiple of epochs x
minibatches, checked) and regenerates the same rollout: its prompts and sampling seeds
depend only on the rollout's number and the rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train import rollout, run
from train.chat_data import ShuffledRows, end_of_turn_id, load_chat_tokenizer
from train.config import RunConfig, check_record_file
from train.engine import all_reduce_sum, build_frozen_engine, device_of, open_initial_weights, zero_stage
from train.errors import ZeroLLMError
from train.loop import Stage
from train.losses import group_advantages, kl_penalty, ppo_policy_loss
from train.model import CustomLanguageModel

log = logging.getLogger("zerollm")


@dataclass
class GRPOConfig:
    prompts_file: str = ""  # {"prompt": text} or {"messages": [...ending with a user turn]} rows
    valid_prompts_file: str = ""  # held-out prompts: greedy success rate at each eval ("" = none)
    init_from: str = ""  # the policy to start from (usually the SFT model): HF dir or ZeroLLM run dir
    reference: str = ""  # the frozen KL reference; "" = init_from
    tokenizer: str = ""  # HF tokenizer dir with a chat template; "" = init_from's own or its run's
    reward: str = ""  # module:function(prompts, completions) -> scores
    group_size: int = 4  # answers sampled per prompt
    max_prompt_len: int = 192  # prompt tokens kept (cut from the left)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04  # KL coefficient (0: no KL term)
    kl: str = "k3"  # KL estimator: k1 | k3
    clip_eps: float = 0.2
    epochs: int = 1  # optimizer passes over each rollout
    minibatches: int = 1  # optimizer steps per pass
    unfinished_penalty: float = 0.0  # subtracted from the reward of an answer that never ends
    eval_prompts: int = 32  # held-out prompts answered greedily at each eval

    RANGES = {"group_size": (2, None), "max_prompt_len": (1, None), "max_new_tokens": (1, None),
              "temperature": (1e-3, None), "top_p": (1e-3, 1.0), "beta": (0, None), "clip_eps": (0, None),
              "epochs": (1, None), "minibatches": (1, None), "eval_prompts": (0, None)}  # fmt: skip


CONFIG_SECTIONS = {"grpo": GRPOConfig}


def preflight(cfg: RunConfig) -> None:
    """What `zerollm launch` checks on this node before any rank starts."""
    g, t = cfg.grpo, cfg.train
    if not g.init_from or not Path(g.init_from).is_dir():
        raise ZeroLLMError(f"{cfg.path}: grpo.init_from: {g.init_from or 'no starting policy given'} not found")
    if not g.prompts_file:
        raise ZeroLLMError(f"{cfg.path}: grpo.prompts_file: no prompts given")
    for key in ("prompts_file", "valid_prompts_file"):
        if getattr(g, key):
            check_record_file(getattr(g, key), f"{cfg.path}: grpo.{key}")
    if not g.reward:
        raise ZeroLLMError(f"{cfg.path}: grpo.reward: no reward function given (module:function)")
    rollout.load_reward_function(g.reward)
    if g.kl not in ("k1", "k3"):
        raise ZeroLLMError(f"{cfg.path}: grpo.kl: {g.kl!r} is not k1 or k3")
    rows = t.micro_batch_size * t.grad_accum_steps * g.minibatches
    if rows % g.group_size:
        raise ZeroLLMError(f"{cfg.path}: train.micro_batch_size x grad_accum_steps x grpo.minibatches = {rows} "
                           f"answers per rank per rollout: not a multiple of group_size {g.group_size}")  # fmt: skip
    cycle = g.epochs * g.minibatches
    if t.save_interval % cycle or t.max_steps % cycle:
        raise ZeroLLMError(f"{cfg.path}: train.save_interval and max_steps must be multiples of grpo.epochs x "
                           f"minibatches = {cycle} (a checkpoint lands between rollouts)")  # fmt: skip
    if cfg.model.dropout:
        raise ZeroLLMError(f"{cfg.path}: model.dropout: must be 0 for GRPO (the behaviour log-probs must be "
                           "those the update sees: a ratio of exactly 1 on a rollout's first step)")  # fmt: skip


# ----------------------------------------------------------------------------- prompts


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    rows: list[dict[str, torch.Tensor]]  # one batch per micro step, in order
    stats: dict[str, float]


class Rollouts:
    """Rollout r on this rank: prompts (r * world + rank) * P .. + P of the seeded order, each
    sampled group_size times with a generator seeded by (seed, r, rank)."""

    def __init__(self, engine, reference, cfg: RunConfig, tok, prompts: list[rollout.Prompt], reward_fn):
        self.engine, self.reference, self.cfg, self.tok = engine, reference, cfg, tok
        self.order = ShuffledRows(prompts, cfg.data.seed)
        self.reward_fn = reward_fn
        t, g = cfg.train, cfg.grpo
        self.rows_per_step = t.micro_batch_size * t.grad_accum_steps
        self.n_prompts = self.rows_per_step * g.minibatches // g.group_size
        self.eot = end_of_turn_id(tok)
        self.current: tuple[int, Rollout] | None = None
        self.times = rollout.IterationTimes()

    def get(self, r: int) -> Rollout:
        if self.current is None or self.current[0] != r:
            self.current = (r, self.make(r))
        return self.current[1]

    @torch.no_grad()
    def make(self, r: int) -> Rollout:
        engine, g, t = self.engine, self.cfg.grpo, self.cfg.train
        rank, world = engine.global_rank, engine.world_size
        start = (r * world + rank) * self.n_prompts
        prompts = [self.order[start + j] for j in range(self.n_prompts)]
        rows = [p for p in prompts for _ in range(g.group_size)]  # groups are consecutive
        gen = torch.Generator(device_of(engine)).manual_seed(self.cfg.train.seed * 1_000_003 + r * 1009 + rank)
        engine.eval()
        t0 = time.time()
        with rollout.gathered(engine) as model:
            answers = rollout.generate(model, [p.ids for p in rows], g.max_new_tokens, self.eot,
                                       self.tok.pad_token_id, g.temperature, g.top_p, gen)  # fmt: skip
        gen_s = time.time() - t0
        texts = [rollout.completion_text(self.tok, a, self.eot) for a in answers]
        scores = torch.tensor(rollout.call_reward(self.reward_fn, [p.text for p in rows], texts))
        ended = torch.tensor([bool(a) and a[-1] == self.eot for a in answers])
        rewards = scores - g.unfinished_penalty * (~ended).float()
        adv = group_advantages(rewards, g.group_size)  # (rows,)
        micro = []
        mb = t.micro_batch_size
        # A rollout that feeds exactly one update: the training forward's own (detached) log-probs
        # are the behaviour log-probs (ratio exactly 1), so no extra forward is made for them.
        single = g.epochs * g.minibatches == 1
        for k in range(0, len(rows), mb):
            batch = rollout.sequences([p.ids for p in rows[k : k + mb]], answers[k : k + mb], self.tok.pad_token_id)
            per_row = batch["mask"].sum(1)  # answer tokens per row
            batch["adv"] = adv[k : k + mb].repeat_interleave(per_row)
            if not single:
                batch["old"] = rollout.answer_logps(engine, batch, g.temperature)[0].cpu()  # the training forward
            if g.beta:
                batch["ref"] = rollout.answer_logps(self.reference, batch, g.temperature)[0].cpu()
            micro.append(batch)
        engine.train()
        n_tokens = sum(len(a) for a in answers)
        stats = {"reward": float(scores.mean()), "reward_shaped": float(rewards.mean()),
                 "eot_rate": float(ended.float().mean()), "response_len": n_tokens / len(answers),
                 "gen_tokens_per_s": n_tokens / max(gen_s, 1e-9), "gen_s": gen_s,
                 **self.times.made(r, t0, gen_s)}  # fmt: skip
        return Rollout(micro, stats)


# ----------------------------------------------------------------------------- the stage


def make_stage(
    engine, cfg: RunConfig, rollouts: Rollouts, data_eval, state: dict[str, Any], stop: rollout.StopBetweenRollouts
) -> Stage:
    t, g = cfg.train, cfg.grpo
    gas = t.grad_accum_steps
    cycle = g.epochs * g.minibatches
    acc = {"clipped": 0.0, "approx_kl": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0}
    last: dict[str, Any] = {}

    def next_batches():
        step = state["step"]
        r, k = divmod(step, cycle)
        if k == 0 and stop.agree():
            return []  # no rollout: the loop sees the stop, saves this boundary and exits 75
        ro = rollouts.get(r)
        last["stats"] = ro.stats
        epoch, m = divmod(k, g.minibatches)
        order = torch.randperm(g.minibatches, generator=torch.Generator().manual_seed(r * 1000 + epoch)).tolist()
        first = order[m] * gas
        return ro.rows[first : first + gas]

    def loss(engine, batch):
        logp, logits = rollout.answer_logps(engine, batch, g.temperature)
        mask = torch.ones_like(logp, dtype=torch.bool)
        old = batch["old"] if "old" in batch else logp.detach()  # see Rollouts.make: one update per rollout
        pg, stats = ppo_policy_loss(logp, old, batch["adv"], mask, g.clip_eps)
        kl = kl_penalty(logp, batch["ref"] if "ref" in batch else old, g.kl)  # beta 0: no reference (KL 0)
        with torch.no_grad():
            p = torch.softmax(logits.float() / g.temperature, -1)
            acc["entropy"] += float(-(p * torch.log(p.clamp_min(1e-30))).sum())
            acc["kl"] += float(kl.sum())
            acc["clipped"] += stats["clipped"]
            acc["approx_kl"] += stats["approx_kl"]
            acc["tokens"] += logp.numel()
        return pg + g.beta * kl.sum()

    def step_metrics() -> dict[str, float]:
        vals = all_reduce_sum([acc[k] for k in acc])
        n = max(vals[-1], 1.0)
        out = {"kl_to_ref": vals[2] / n, "clip_fraction": vals[0] / n, "approx_kl": vals[1] / n,
               "entropy": vals[3] / n}  # fmt: skip
        keys = ["reward", "reward_shaped", "eot_rate", "response_len", "gen_tokens_per_s", "gen_s"]
        out |= rollout.mean_over_ranks(last.get("stats", {}), keys, engine.world_size)
        for k in acc:
            acc[k] = 0.0
        return out

    return Stage(
        name="grpo",
        next_batches=next_batches,
        count=lambda b: int(b["mask"].sum()),  # answer tokens
        loss=loss,
        samples_per_step=rollouts.rows_per_step * engine.world_size,
        evaluate=data_eval,
        unit="tokens",
        step_metrics=step_metrics,
    )


RESUME_CHECKS = {"model": "model shape (grpo.init_from)", "tokenizer_hash": "tokenizer"}


def stage_run(args) -> int:
    from data_pipeline.tokenizer import tokenizer_hash
    from train.sft import model_overrides

    r = run.start(args, CONFIG_SECTIONS)
    cfg = r.cfg
    preflight(cfg)
    g = cfg.grpo
    # dropout off whatever the source trained with: the behaviour log-probs must be the update's
    source = open_initial_weights(g.init_from, {**model_overrides(cfg, args.set), "dropout": 0.0})
    run.adopt_model(r, source, args.deepspeed_config)
    ref_source = open_initial_weights(g.reference, {"dropout": 0.0}) if g.reference else source
    tdir = rollout.find_tokenizer(g.tokenizer, g.init_from, "grpo.tokenizer")
    tok = load_chat_tokenizer(tdir)
    prompts = rollout.load_prompts(g.prompts_file, tok, g.max_prompt_len)
    valid = rollout.load_prompts(g.valid_prompts_file, tok, g.max_prompt_len) if g.valid_prompts_file else []
    valid = valid[: g.eval_prompts]
    reward_fn = rollout.load_reward_function(g.reward)
    engine = run.build(r, lambda: CustomLanguageModel(source.config), init_from=source)
    reference = build_frozen_engine(lambda: CustomLanguageModel(ref_source.config), r.ds, init_from=ref_source) \
        if g.beta else None  # fmt: skip
    shape = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("dropout", "activation_checkpointing")}
    state = {"step": 0, "consumed_samples": 0, "model": shape, "config_hash": cfg.hash(),
             "tokenizer_hash": tokenizer_hash(tdir), "skipped_steps": 0}  # fmt: skip
    fresh = dict(state)
    ckpt, state, resumed = run.resume(
        r, engine, state, lambda saved, where: run.refuse_another_run(saved, fresh, where, RESUME_CHECKS)
    )
    run.write_snapshot(r)
    if r.rank == 0:
        log.info("policy: %s parameters; world size %d; ZeRO stage %s; %d prompts, group %d, reward %s",
                 f"{engine.module.num_parameters():,}", r.world, zero_stage(r.ds), len(prompts), g.group_size,
                 g.reward)  # fmt: skip
        Path(cfg.logging.run_dir, "prompts.json").write_text(json.dumps({"train": len(prompts), "valid": len(valid)}))
    rollouts = Rollouts(engine, reference, cfg, tok, prompts, reward_fn)
    eot = end_of_turn_id(tok)

    def evaluate() -> dict[str, float]:
        rate = rollout.success_rate(engine, tok, [p.text for p in valid], [p.ids for p in valid], reward_fn,
                                    g.max_new_tokens, eot)  # fmt: skip
        return {"eval_success": rate}

    r.stop = rollout.StopBetweenRollouts(r.stop)  # a stop takes effect between rollouts only
    stage = make_stage(engine, cfg, rollouts, evaluate if valid and cfg.train.eval_interval else None, state, r.stop)
    return run.loop(r, engine, stage, ckpt, state, resumed)


def main(argv: list[str] | None = None) -> None:
    run.main(stage_run, argv, prog="train.grpo", doc=__doc__)


if __name__ == "__main__":
    main()
