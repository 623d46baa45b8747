"""PPO: the policy learns from a reward model (or a verifiable reward), with a critic.

One node (2 CPU ranks or N GPUs):
    deepspeed --num_gpus 2 --master_addr 127.0.0.1 -m train.ppo \
        --config RUN.yaml --deepspeed_config ds_configs/zero2.json
    zerollm ppo --config RUN.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2

Four roles (InstructGPT, Ouyang et al. 2022): the actor (trained; from `ppo.init_from`, the
SFT model), the critic (trained, its own DeepSpeed engine and optimizer; a reward model's
trunk and head giving a value per token, from `ppo.critic_from`, default the reward model),
the frozen reference (`ppo.reference`, default init_from) and the frozen reward model
(`ppo.reward_model`: a reward run or its export) or a verifiable reward function
(`ppo.reward`, module:function). Frozen roles are inference-only engines (ZeRO-3 stays
partitioned). One checkpoint holds actor and critic with their optimizers, every rank's
RNG, the prompt position and the KL controller.

A rollout: each rank samples one answer per prompt (KV-cache generate at `temperature` /
`top_p`, ending at the end-of-turn token; ZeRO-3 weights gathered once per rollout); the
behaviour log-probs come from the actor's training forward in fp32 at the sampling
temperature (dropout must be 0), so the first update of a rollout has a ratio of exactly 1;
the reference log-probs and the critic's values of the same tokens; the score: the reward
model read at the appended end-of-text of the prompt + answer as it was trained (token-exact:
train/preference_data.py), normalised with its saved training mean/std and clipped to
+-reward_clip, minus unfinished_penalty for an answer that never ended. Per-token rewards
are -beta KL(policy || reference) (k1 or k3) on every answer token plus the score on the
last; beta is fixed, or adapted toward `kl_target` (Ziegler et al. 2019). Advantages by GAE
(gamma, lambda; Schulman et al. 2016) over the answer tokens, whitened with the moments of
the global batch; returns = advantages + values.

Updates: `epochs` passes over the rollout, `minibatches` optimizer steps each; the actor's
loss is the clipped surrogate (train.losses.ppo_policy_loss) minus entropy_coef x entropy,
the critic's the clipped value loss, both summed over answer tokens and divided by their
global count. A resume lands on a rollout boundary (save_interval and max_steps multiples
of epochs x minibatches, checked) and regenerates the same rollout from the checkpoint's
weights and seeds; a stop signal (SIGTERM / SIGUSR1) takes effect at the next boundary too,
agreed by the ranks before that rollout is made (`rollout.StopBetweenRollouts`).
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
from train.engine import (
    all_reduce_sum,
    build_engine,
    build_frozen_engine,
    device_of,
    open_initial_weights,
    set_lr,
    to_device,
    zero_stage,
)
from train.errors import ZeroLLMError
from train.loop import Stage
from train.losses import compute_gae, kl_penalty, masked_moments, masked_whiten, ppo_policy_loss, value_loss
from train.model import CustomLanguageModel
from train.preference_data import BadRow, encode_sequences, pad
from train.reward import RewardModel, check_same_tokenizer, open_reward_dir, with_head
from train.schedule import lr_at

log = logging.getLogger("zerollm")


@dataclass
class PPOConfig:
    prompts_file: str = ""  # {"prompt": text} or {"messages": [...ending with a user turn]} rows
    valid_prompts_file: str = ""  # held-out prompts: greedy answers scored at each eval
    init_from: str = ""  # the actor (usually the SFT model): HF dir or ZeroLLM run dir
    reference: str = ""  # the frozen KL reference; "" = init_from
    reward_model: str = ""  # a reward run dir or its export; or set `reward`
    reward: str = ""  # module:function(prompts, completions) -> scores, instead of a reward model
    critic_from: str = ""  # the critic's start: a reward model (trunk + head) or an LM; "" = reward_model
    tokenizer: str = ""  # HF tokenizer dir with a chat template; "" = init_from's own or its run's
    eval_reward: str = ""  # module:function for the held-out success rate ("" = none)
    max_prompt_len: int = 192
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.05  # beta: per-token KL penalty in the reward
    kl_target: float = 0.0  # > 0: adapt beta toward this KL per answer token (Ziegler et al. 2019)
    kl: str = "k1"  # KL estimator in the reward: k1 | k3
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    entropy_coef: float = 0.0
    reward_clip: float = 5.0  # normalised reward-model scores are clipped to +-this
    unfinished_penalty: float = 1.0  # subtracted from the score of an answer that never ends
    critic_lr: float = 0.0  # 0 = train.lr
    epochs: int = 4
    minibatches: int = 1
    eval_prompts: int = 32

    RANGES = {"max_prompt_len": (1, None), "max_new_tokens": (1, None), "temperature": (1e-3, None),
              "top_p": (1e-3, 1.0), "kl_coef": (0, None), "kl_target": (0, None), "gamma": (0, 1), "lam": (0, 1),
              "clip_eps": (0, None), "value_clip": (0, None), "entropy_coef": (0, None), "reward_clip": (0, None),
              "critic_lr": (0, None), "epochs": (1, None), "minibatches": (1, None),
              "eval_prompts": (0, None)}  # fmt: skip


CONFIG_SECTIONS = {"ppo": PPOConfig}


def preflight(cfg: RunConfig) -> None:
    """What `zerollm launch` checks on this node before any rank starts."""
    p, t = cfg.ppo, cfg.train
    for key in ("init_from", "reference", "reward_model", "critic_from"):
        path = getattr(p, key)
        if key == "init_from" and not path:
            raise ZeroLLMError(f"{cfg.path}: ppo.init_from: no starting actor given (HF dir or ZeroLLM run dir)")
        if path and not Path(path).is_dir():
            raise ZeroLLMError(f"{cfg.path}: ppo.{key}: {path} not found")
    if bool(p.reward_model) == bool(p.reward):
        raise ZeroLLMError(f"{cfg.path}: ppo.reward_model / ppo.reward: give exactly one (a reward model dir, or "
                           "a module:function)")  # fmt: skip
    for key in ("reward", "eval_reward"):
        if getattr(p, key):
            rollout.load_reward_function(getattr(p, key))
    if not p.prompts_file:
        raise ZeroLLMError(f"{cfg.path}: ppo.prompts_file: no prompts given")
    for key in ("prompts_file", "valid_prompts_file"):
        if getattr(p, key):
            check_record_file(getattr(p, key), f"{cfg.path}: ppo.{key}")
    if p.kl not in ("k1", "k3"):
        raise ZeroLLMError(f"{cfg.path}: ppo.kl: {p.kl!r} is not k1 or k3")
    cycle = p.epochs * p.minibatches
    if t.save_interval % cycle or t.max_steps % cycle:
        raise ZeroLLMError(f"{cfg.path}: train.save_interval and max_steps must be multiples of ppo.epochs x "
                           f"minibatches = {cycle} (a checkpoint lands between rollouts)")  # fmt: skip
    if cfg.model.dropout:
        raise ZeroLLMError(f"{cfg.path}: model.dropout: must be 0 for PPO (the behaviour log-probs must be those "
                           "the update sees: a ratio of exactly 1 on a rollout's first step)")  # fmt: skip


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """Scores of answers: the frozen reward model (normalised, clipped) or a reward function."""

    def __init__(self, cfg: RunConfig, r, tok, tok_dir: str):
        p = cfg.ppo
        self.tok, self.clip = tok, p.reward_clip
        self.fn = rollout.load_reward_function(p.reward) if p.reward else None
        self.engine = None
        if p.reward_model:
            check_same_tokenizer(tok_dir, p.reward_model)
            rd = open_reward_dir(p.reward_model)
            source = with_head(open_initial_weights(rd.path, {"dropout": 0.0}, tag=rd.tag), 0.0, 0)
            if not source.has_head:
                raise ZeroLLMError(f"ppo.reward_model: {rd.path} holds no reward head")
            self.engine = build_frozen_engine(lambda: RewardModel(source.config), r.ds, init_from=source)
            stats = rd.stats or {}
            self.mean, self.std = float(stats.get("mean", 0.0)), float(stats.get("std", 1.0)) or 1.0
            self.max_len = rd.max_len
            if not rd.stats:
                log.warning("%s: no reward_stats.json: scores are used unnormalised", rd.path)

    @torch.no_grad()
    def __call__(self, prompts: list[rollout.Prompt], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw, used) scores, (B,) each: `used` is normalised and clipped for a reward model."""
        if self.fn is not None:
            raw = torch.tensor(rollout.call_reward(self.fn, [p.text for p in prompts], texts))
            return raw, raw
        seqs = []
        for p, text in zip(prompts, texts):
            try:
                (ids,), _ = encode_sequences(self.tok, p.messages, [text], self.max_len)
            except BadRow:  # an answer longer than the reward model's length: scored on its end
                ids = encode_sequences(self.tok, None, [text], 10**9)[0][0][-self.max_len :]
            seqs.append(ids)
        ids, mask = pad(seqs, self.tok.pad_token_id)
        raw = self.engine(*to_device((ids, mask), self.engine)).float().cpu()  # (B,)
        used = ((raw - self.mean) / self.std).clamp(-self.clip, self.clip)
        return raw, used


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    rows: list[dict[str, torch.Tensor]]  # one batch per micro step
    stats: dict[str, float]


class Rollouts:
    """Rollout r on this rank: prompts (r * world + rank) * P .. + P of the seeded order, sampled
    with a generator seeded by (seed, r, rank)."""

    def __init__(self, actor, critic, reference, scorer: Scorer, cfg: RunConfig, tok, prompts, state):
        self.actor, self.critic, self.reference, self.scorer = actor, critic, reference, scorer
        self.cfg, self.tok, self.state = cfg, tok, state
        self.order = ShuffledRows(prompts, cfg.data.seed)
        t, p = cfg.train, cfg.ppo
        self.rows_per_step = t.micro_batch_size * t.grad_accum_steps
        self.n_prompts = self.rows_per_step * p.minibatches
        self.eot = end_of_turn_id(tok)
        self.current: tuple[int, Rollout] | None = None
        self.times = rollout.IterationTimes()

    def get(self, r: int) -> Rollout:
        if self.current is None or self.current[0] != r:
            self.current = (r, self.make(r))
        return self.current[1]

    @torch.no_grad()
    def make(self, r: int) -> Rollout:
        actor, p, t = self.actor, self.cfg.ppo, self.cfg.train
        rank, world = actor.global_rank, actor.world_size
        prompts = [self.order[(r * world + rank) * self.n_prompts + j] for j in range(self.n_prompts)]
        gen = torch.Generator(device_of(actor)).manual_seed(t.seed * 1_000_003 + r * 1009 + rank)  # sampling's device
        actor.eval()
        t0 = time.time()
        with rollout.gathered(actor) as model:
            answers = rollout.generate(model, [q.ids for q in prompts], p.max_new_tokens, self.eot,
                                       self.tok.pad_token_id, p.temperature, p.top_p, gen)  # fmt: skip
        gen_s = time.time() - t0
        texts = [rollout.completion_text(self.tok, a, self.eot) for a in answers]
        raw, score = self.scorer(prompts, texts)
        ended = torch.tensor([bool(a) and a[-1] == self.eot for a in answers])
        score = score - p.unfinished_penalty * (~ended).float()
        beta = self.state["kl_coef"]
        micro, kls = [], []
        mb = t.micro_batch_size
        for k in range(0, len(prompts), mb):
            batch = rollout.sequences([q.ids for q in prompts[k : k + mb]], answers[k : k + mb], self.tok.pad_token_id)
            m = batch["mask"]  # (b, T)
            old = rollout.answer_logps(actor, batch, p.temperature)[0].cpu()  # the training forward: ratio 1
            ref = rollout.answer_logps(self.reference, batch, p.temperature)[0].cpu()
            x, real = to_device((batch["x"], batch["doc_ids"] >= 0), self.critic)
            values = self.critic(x, real, per_token=True).cpu()[m]  # (n,) V(s_t)
            kl = kl_penalty(old, ref, p.kl)  # (n,)
            rewards = torch.zeros(m.shape)
            rewards[m] = -beta * kl
            last = m.long().cumsum(1).argmax(1)  # (b,) each row's last answer position
            rewards[torch.arange(m.size(0)), last] += score[k : k + mb] * m.any(1)
            V = torch.zeros(m.shape)
            V[m] = values
            adv, ret = compute_gae(rewards, V, m, p.gamma, p.lam)
            batch |= {"old": old, "adv": adv[m], "ret": ret[m], "old_values": values}
            micro.append(batch)
            kls.append(kl)
        moments = all_reduce_sum(list(map(sum, zip(*(masked_moments(b["adv"], torch.ones_like(b["adv"]))
                                                     for b in micro)))))  # fmt: skip
        for b in micro:
            b["adv"] = masked_whiten(b["adv"], torch.ones_like(b["adv"]), tuple(moments))
        actor.train()
        kl_all = torch.cat(kls)
        n_tokens = sum(len(a) for a in answers)
        kl_sum, kl_n = all_reduce_sum([float(kl_all.sum()), float(kl_all.numel())])
        adapt_kl(self.state, p, kl_sum / max(kl_n, 1.0), kl_n)  # beta for the next rollout (saved with it)
        stats = {"reward_raw": float(raw.mean()), "reward": float(score.mean()),
                 "eot_rate": float(ended.float().mean()), "response_len": n_tokens / len(answers),
                 "kl_to_ref": float(kl_all.mean()) if kl_all.numel() else 0.0,
                 "gen_tokens_per_s": n_tokens / max(gen_s, 1e-9), "gen_s": gen_s, "kl_coef": beta,
                 **self.times.made(r, t0, gen_s)}  # fmt: skip
        return Rollout(micro, stats)


def adapt_kl(state: dict[str, Any], p: PPOConfig, kl: float, n_tokens: float) -> None:
    """Ziegler et al. 2019: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) x n / horizon),
    horizon 10,000 tokens; only with ppo.kl_target."""
    if p.kl_target > 0:
        err = max(-0.2, min(0.2, kl / p.kl_target - 1.0))
        state["kl_coef"] *= 1.0 + err * n_tokens / 10_000


# ----------------------------------------------------------------------------- the stage


class Checkpoints:
    """The shared loop saves one engine; PPO's checkpoint holds actor and critic together."""

    def __init__(self, ckpt, critic):
        self.ckpt, self.critic, self.dir = ckpt, critic, ckpt.dir

    def save(self, engine, step: int, state: dict[str, Any]):
        return self.ckpt.save({"policy": engine, "value": self.critic}, step, state)


def make_stage(
    actor,
    critic,
    cfg: RunConfig,
    rollouts: Rollouts,
    evaluate,
    state: dict[str, Any],
    stop: rollout.StopBetweenRollouts,
) -> Stage:
    t, p = cfg.train, cfg.ppo
    gas, cycle = t.grad_accum_steps, p.epochs * p.minibatches
    acc = {"clipped": 0.0, "approx_kl": 0.0, "entropy": 0.0, "value_loss": 0.0, "value_clipped": 0.0, "tokens": 0.0}
    step_of = {"scale": 1.0, "stats": {}}
    critic_lr = p.critic_lr or t.lr

    def next_batches():
        step = state["step"]
        r, k = divmod(step, cycle)
        if k == 0 and stop.agree():
            return []  # no rollout: the loop sees the stop, saves this boundary and exits 75
        ro = rollouts.get(r)
        step_of["stats"] = ro.stats
        epoch, m = divmod(k, p.minibatches)
        order = torch.randperm(p.minibatches, generator=torch.Generator().manual_seed(r * 1000 + epoch)).tolist()
        batches = ro.rows[order[m] * gas : order[m] * gas + gas]
        (units,) = all_reduce_sum([sum(int(b["mask"].sum()) for b in batches)])
        step_of["scale"] = gas * actor.world_size / max(units, 1.0)  # as the loop scales the actor's loss
        set_lr(critic, lr_at(step, critic_lr, t.min_lr * critic_lr / t.lr, t.warmup_steps, t.max_steps, t.schedule,
                             t.decay_fraction))  # fmt: skip
        return batches

    def loss(engine, batch):
        logp, logits = rollout.answer_logps(engine, batch, p.temperature)
        ones = torch.ones_like(logp, dtype=torch.bool)
        pg, stats = ppo_policy_loss(logp, batch["old"], batch["adv"], ones, p.clip_eps)
        probs = torch.softmax(logits.float() / p.temperature, -1)
        ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # (n,)
        values = critic(batch["x"], batch["doc_ids"] >= 0, per_token=True)[batch["mask"]]
        vl, vstats = value_loss(values, batch["old_values"], batch["ret"], ones, p.value_clip)
        finite = bool(torch.isfinite(vl))
        critic.backward((vl if finite else values.sum() * 0.0) * step_of["scale"])  # every rank backs up: ZeRO
        critic.step()
        with torch.no_grad():
            acc["clipped"] += stats["clipped"]
            acc["approx_kl"] += stats["approx_kl"]
            acc["entropy"] += float(ent.sum())
            acc["value_loss"] += float(vl)
            acc["value_clipped"] += vstats["clipped"]
            acc["tokens"] += logp.numel()
        actor_loss = pg - p.entropy_coef * ent.sum()
        return actor_loss if finite else actor_loss * float("nan")  # the loop's NaN guard skips the step

    def step_metrics() -> dict[str, float]:
        vals = dict(zip(acc, all_reduce_sum(list(acc.values()))))
        n = max(vals["tokens"], 1.0)
        out = {"clip_fraction": vals["clipped"] / n, "approx_kl": vals["approx_kl"] / n, "entropy": vals["entropy"] / n,
               "value_loss": vals["value_loss"] / n, "value_clip_fraction": vals["value_clipped"] / n}  # fmt: skip
        keys = ["reward_raw", "reward", "eot_rate", "response_len", "kl_to_ref", "gen_tokens_per_s", "gen_s"]
        s = step_of["stats"]
        out |= rollout.mean_over_ranks(s, keys, actor.world_size)
        out["kl_coef"] = s.get("kl_coef", state["kl_coef"])
        for k in acc:
            acc[k] = 0.0
        return out

    return Stage(
        name="ppo",
        next_batches=next_batches,
        count=lambda b: int(b["mask"].sum()),  # answer tokens
        loss=loss,
        samples_per_step=rollouts.rows_per_step * actor.world_size,
        evaluate=evaluate,
        unit="tokens",
        step_metrics=step_metrics,
    )


def evaluation(actor, tok, valid: list[rollout.Prompt], scorer: Scorer, eval_fn, cfg: RunConfig):
    """Greedy answers to the held-out prompts: their mean score (as rollouts score) and, with
    ppo.eval_reward, the mean verifiable reward (success rate)."""
    p = cfg.ppo
    eot = end_of_turn_id(tok)

    def evaluate() -> dict[str, float]:
        was = actor.training
        actor.eval()
        raws, useds, success = [], [], []
        with torch.no_grad(), rollout.gathered(actor) as model:
            for i in range(0, len(valid), 16):
                chunk = valid[i : i + 16]
                answers = rollout.generate(model, [q.ids for q in chunk], p.max_new_tokens, eot,
                                           tok.pad_token_id)  # fmt: skip
                texts = [rollout.completion_text(tok, a, eot) for a in answers]
                raw, used = scorer(chunk, texts)
                raws += raw.tolist()
                useds += used.tolist()
                if eval_fn is not None:
                    success += rollout.call_reward(eval_fn, [q.text for q in chunk], texts)
        actor.train(was)
        out = {"eval_reward_raw": sum(raws) / len(raws), "eval_reward": sum(useds) / len(useds)}
        if success:
            out["eval_success"] = sum(success) / len(success)
        return out

    return evaluate


RESUME_CHECKS = {"model": "model shape (ppo.init_from)", "tokenizer_hash": "tokenizer"}


def stage_run(args) -> int:
    from data_pipeline.tokenizer import tokenizer_hash
    from train.sft import model_overrides

    r = run.start(args, CONFIG_SECTIONS)
    cfg = r.cfg
    preflight(cfg)
    p = cfg.ppo
    # dropout off whatever the source trained with: the behaviour log-probs must be the update's
    source = open_initial_weights(p.init_from, {**model_overrides(cfg, args.set), "dropout": 0.0})
    run.adopt_model(r, source, args.deepspeed_config)
    tok_dir = rollout.find_tokenizer(p.tokenizer, p.init_from, "ppo.tokenizer")
    tok = load_chat_tokenizer(tok_dir)
    prompts = rollout.load_prompts(p.prompts_file, tok, p.max_prompt_len)
    valid = rollout.load_prompts(p.valid_prompts_file, tok, p.max_prompt_len) if p.valid_prompts_file else []
    valid = valid[: p.eval_prompts]
    scorer = Scorer(cfg, r, tok, tok_dir)
    actor = run.build(r, lambda: CustomLanguageModel(source.config), init_from=source)
    critic_src = open_initial_weights(p.critic_from or p.reward_model or p.init_from, {"dropout": 0.0})
    critic_init = with_head(critic_src, source.config.init_std, cfg.train.seed)
    critic = build_engine(cfg, r.ds, lambda: RewardModel(critic_src.config), init_from=critic_init)
    ref_src = open_initial_weights(p.reference, {"dropout": 0.0}) if p.reference else source
    reference = build_frozen_engine(lambda: CustomLanguageModel(ref_src.config), r.ds, init_from=ref_src)
    run.seed_rank(cfg.train.seed, r.rank)
    shape = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("dropout", "activation_checkpointing")}
    state = {"step": 0, "consumed_samples": 0, "model": shape, "config_hash": cfg.hash(),
             "tokenizer_hash": tokenizer_hash(tok_dir), "skipped_steps": 0, "kl_coef": p.kl_coef}  # fmt: skip
    fresh = dict(state)
    ckpt, state, resumed = run.resume(
        r, {"policy": actor, "value": critic}, state,
        lambda saved, where: run.refuse_another_run(saved, fresh, where, RESUME_CHECKS),
    )  # fmt: skip
    run.write_snapshot(r)
    if r.rank == 0:
        log.info("ppo: actor %s parameters, critic from %s; world size %d; ZeRO stage %s; %d prompts; reward %s",
                 f"{actor.module.num_parameters():,}", critic_src.path, r.world, zero_stage(r.ds), len(prompts),
                 p.reward_model or p.reward)  # fmt: skip
        Path(cfg.logging.run_dir, "prompts.json").write_text(json.dumps({"train": len(prompts), "valid": len(valid)}))
    rollouts = Rollouts(actor, critic, reference, scorer, cfg, tok, prompts, state)
    eval_fn = rollout.load_reward_function(p.eval_reward) if p.eval_reward else None
    evaluate = evaluation(actor, tok, valid, scorer, eval_fn, cfg) if valid and cfg.train.eval_interval else None
    r.stop = rollout.StopBetweenRollouts(r.stop)
    stage = make_stage(actor, critic, cfg, rollouts, evaluate, state, r.stop)
    return run.loop(r, actor, stage, Checkpoints(ckpt, critic), state, resumed)


def main(argv: list[str] | None = None) -> None:
    run.main(stage_run, argv, prog="train.ppo", doc=__doc__)


if __name__ == "__main__":
    main()
