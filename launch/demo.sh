#!/usr/bin/env bash
# `make demo`: the whole path on this machine, no download: the Python standard library's
# own sources -> BPE tokenizer -> .bin/.idx -> 2-rank pretraining -> Hugging Face export
# -> post-training on a checkable task (a stdlib function's first statement from its `def`
# line, from the same sources): SFT -> reward model -> PPO against it, and beside them DPO and
# GRPO (shaped verifiable reward) from the SFT model -> HF export of the GRPO policy; then
# held-out samples, curves (PNG) and a table of what each stage changed. Re-running resumes (or
# skips) finished steps. DeepSpeed's own output goes to runs/*/logs/; VERBOSE=1 shows it here too.
set -euo pipefail
BIN=${VENV:-.venv}/bin
DATA=runs/demo/data
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# `quiet NAME CMD...`: CMD's output to runs/demo/logs/NAME.log, shown only if it fails (or VERBOSE=1).
quiet() {
  local log=runs/demo/logs/$1.log; shift
  if [ -n "${VERBOSE:-}" ]; then "$@"; return; fi
  mkdir -p runs/demo/logs
  "$@" >"$log" 2>&1 || { cat "$log"; echo "demo: failed: $* (output above, and in $log)" >&2; return 1; }
}
[ -f "$DATA/stdlib.jsonl" ] || "$BIN/zerollm" demo-corpus "$DATA"
[ -f runs/demo/tokenizer/tokenizer.json ] || "$BIN/zerollm" tokenizer train "$DATA/stdlib.jsonl" --vocab-size 4096 --out runs/demo/tokenizer
[ -f "$DATA/stdlib_train.idx" ] || "$BIN/zerollm" preprocess "$DATA/stdlib.jsonl" --tokenizer runs/demo/tokenizer --out-prefix "$DATA/stdlib" --valid-fraction 0.02
"$BIN/zerollm" pretrain --config configs/demo.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2 ${VERBOSE:+--verbose}
quiet export "$BIN/zerollm" export runs/demo --out runs/demo/hf
echo "demo: exported runs/demo/hf (Hugging Face format)"
"$BIN/python" - <<'PY'
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained("runs/demo/hf")
model = AutoModelForCausalLM.from_pretrained("runs/demo/hf")
ids = tok("def main(", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=50, pad_token_id=tok.pad_token_id)
print("sample from the exported model (transformers):", repr(tok.decode(out[0])))
PY
[ -f runs/demo/tasks/prompts_valid.jsonl ] || "$BIN/zerollm" demo-tasks "$DATA/stdlib.jsonl" --out runs/demo/tasks --task line
"$BIN/zerollm" sft --config configs/demo_sft.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2 ${VERBOSE:+--verbose}
"$BIN/zerollm" reward --config configs/demo_reward.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2 ${VERBOSE:+--verbose}
"$BIN/zerollm" dpo --config configs/demo_dpo.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2 ${VERBOSE:+--verbose}
"$BIN/zerollm" ppo --config configs/demo_ppo.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2 ${VERBOSE:+--verbose}
"$BIN/zerollm" grpo --config configs/demo_grpo.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2 ${VERBOSE:+--verbose}
quiet export_grpo "$BIN/zerollm" export runs/demo_grpo --out runs/demo_grpo/hf --tokenizer runs/demo/tokenizer
echo "demo: exported the final policy (GRPO) to runs/demo_grpo/hf (Hugging Face format)"
# the python below: its chatter (DeepSpeed's checkpoint reader, warnings) to runs/demo/logs/report.log
"$BIN/python" - <<'PY' 2>runs/demo/logs/report.log || { cat runs/demo/logs/report.log; exit 1; }
# Greedy answers to the held-out prompts the runs evaluate on (all of them), before (SFT)
# and after PPO / GRPO, scored by the strict check and its shaped form; curves; the table.
import contextlib
import json
import sys

import torch
from transformers import AutoModelForCausalLM
from data_pipeline.function_tasks import line_partial_credit as partial_credit, line_success as success
from train import rollout
from train.chat_data import end_of_turn_id, load_chat_tokenizer
from train.commands import load_checkpoint_model
from train.metrics import plot_curves, read_metrics

tok = load_chat_tokenizer("runs/demo/tokenizer")
eot = end_of_turn_id(tok)
valid = rollout.load_prompts("runs/demo/tasks/prompts_valid.jsonl", tok, 192)

def answers(model):
    model.eval()
    out = []
    for i in range(0, len(valid), 16):
        ids = [p.ids for p in valid[i : i + 16]]
        out += [rollout.completion_text(tok, a, eot) for a in rollout.generate(model, ids, 32, eot, tok.pad_token_id)]
    return out

def scores(texts):
    strict = [success(p.text, t) for p, t in zip(valid, texts)]
    shaped = [partial_credit(p.text, t) for p, t in zip(valid, texts)]
    mean = {"strict_success": sum(strict) / len(strict), "shaped_reward": sum(shaped) / len(shaped)}
    return mean | {"distinct_answers": len(set(texts))}, strict, shaped  # a collapse to one answer shows here

with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's checkpoint reader prints
    got = {"sft": answers(load_checkpoint_model("runs/demo_sft")[0]),
           "ppo": answers(load_checkpoint_model("runs/demo_ppo", engine="policy")[0]),  # actor, not critic
           "grpo": answers(load_checkpoint_model("runs/demo_grpo")[0])}
summary = {}
for run in ("ppo", "grpo"):
    (before, s0, p0), (after, s1, p1) = scores(got["sft"]), scores(got[run])
    summary[run] = {"before (sft)": before, f"after ({run})": after}
    with open(f"runs/demo_{run}/samples.txt", "w") as f:
        f.write(f"held-out greedy answers, before (SFT) and after {run.upper()}: strict = function_tasks.success, "
                f"shaped = function_tasks.partial_credit\n{json.dumps(summary[run])}\n")
        for i, p in enumerate(valid):
            f.write(f"\n=== prompt {i}\n{p.text}--- sft: strict {s0[i]:.0f}, shaped {p0[i]:.2f}\n{got['sft'][i]}\n"
                    f"--- {run}: strict {s1[i]:.0f}, shaped {p1[i]:.2f}\n{got[run][i]}\n")
    json.dump(summary[run], open(f"runs/demo_{run}/samples_eval.json", "w"), indent=1)

# the export answers as the run does: transformers' greedy decoding of the same prompts
hf = AutoModelForCausalLM.from_pretrained("runs/demo_grpo/hf")
same = 0
for p, want in list(zip(valid, got["grpo"]))[:8]:
    out = hf.generate(torch.tensor([p.ids]), max_new_tokens=32, do_sample=False, eos_token_id=eot,
                      pad_token_id=tok.pad_token_id)[0, len(p.ids) :].tolist()
    same += rollout.completion_text(tok, out[: out.index(eot) + 1] if eot in out else out, eot) == want
print(f"demo: runs/demo_grpo/hf in transformers gives the run's greedy answer on {same}/8 held-out prompts")

pngs = [plot_curves(f"{run}/metrics.jsonl", f"{run}/curves.png", panels, title) for run, title, panels in [
    ("runs/demo_sft", "SFT", {"loss": ["loss", "eval_loss"]}),
    ("runs/demo_reward", "reward model", {"loss": ["loss", "eval_loss"], "held-out": ["eval_accuracy"]}),
    ("runs/demo_dpo", "DPO", {"loss": ["loss"], "held-out": ["eval_accuracy", "eval_success"]}),
    ("runs/demo_ppo", "PPO", {"reward-model score": ["reward", "eval_reward"], "KL to reference": ["kl_to_ref"],
                              "answers": ["eot_rate"]}),
    ("runs/demo_grpo", "GRPO (shaped reward)", {"reward": ["reward", "eval_success"],
                                                "KL to reference": ["kl_to_ref"], "answers": ["eot_rate"]}),
]]

def logged(run, key):
    return [(r["step"], r[key]) for r in read_metrics(f"{run}/metrics.jsonl") if key in r]

def evals(run, key):
    got = logged(run, key)
    return got[0], got[-1]

def spans(run, key, k=6):  # the mean of the first and of the last k rollouts (one is 8 prompts: noisy)
    got = logged(run, key)
    return [(f"{g[0][0]}-{g[-1][0]}", sum(v for _, v in g) / len(g)) for g in (got[:k], got[-k:])]

def sampled(run, key):  # before (the SFT model) and after, at the run's first and last eval step
    steps = evals(f"runs/demo_{run}", "eval_success")
    return (steps[0][0], summary[run]["before (sft)"][key]), (steps[1][0], summary[run][f"after ({run})"][key])

print("demo: what each stage changed (held-out data unless marked; runs/*/metrics.jsonl)")
print(f"{'stage':<9} {'metric':<50} {'before':>13} {'after':>13}")
for stage, run, key, what in [
    ("pretrain", "runs/demo", "eval_loss", "eval loss (stdlib, per token)"),
    ("sft", "runs/demo_sft", "eval_loss", "held-out loss per answer token"),
    ("reward", "runs/demo_reward", "eval_accuracy", "held-out preference accuracy"),
    ("dpo", "runs/demo_dpo", "eval_accuracy", "held-out preference accuracy"),
    ("dpo", "runs/demo_dpo", "eval_success", "held-out strict success (function check)"),
    ("ppo", "runs/demo_ppo", "eval_reward", "held-out reward-model score (normalised)"),
    ("ppo", "runs/demo_ppo", "kl_to_ref", "KL to reference per token (rollouts)"),
    ("ppo", "runs/demo_ppo", "eval_success", "held-out strict success (function check)"),
    ("ppo", "runs/demo_ppo", "eot_rate", "sampled answers ending within 32 tokens"),
    ("grpo", "runs/demo_grpo", "reward", "shaped reward of sampled answers (6 rollouts)"),
    ("grpo", "runs/demo_grpo", "eval_success", "held-out shaped reward (line_partial_reward)"),
    ("grpo", "grpo", "strict_success", "held-out strict success (samples_eval.json)"),
    ("grpo", "grpo", "distinct_answers", f"distinct held-out answers (of {len(valid)})"),
    ("grpo", "runs/demo_grpo", "kl_to_ref", "KL to reference per token (rollouts)"),
]:
    (s0, v0), (s1, v1) = (spans(run, key) if "(6 rollouts)" in what else evals(run, key)) if "/" in run else sampled(run, key)
    v0, v1 = (f"{v:.3f}" if isinstance(v, float) else str(v) for v in (v0, v1))
    print(f"{stage:<9} {what:<50} {f'{v0} @{s0}':>13} {f'{v1} @{s1}':>13}")
train_answers = sorted({json.loads(line)["response"] for line in open("runs/demo/tasks/sft_train.jsonl")})
fixed = max((sum(success(p.text, a) for p in valid), a) for a in train_answers)  # no fixed answer should win
print(f"demo: for scale, the best single fixed answer (of the training answers) passes {fixed[0]:.0f} of "
      f"{len(valid)} held-out prompts ({fixed[0] / len(valid):.3f}): {fixed[1].strip()!r}")
print("demo: curves:", " ".join(str(p) for p in pngs if p), "(and loss.png beside each)")
print("demo: held-out samples: runs/demo_ppo/samples.txt runs/demo_grpo/samples.txt (scores in samples_eval.json)")
PY
echo "demo done: runs/demo (pretraining: metrics.jsonl, loss.png, checkpoints/, hf/), runs/demo_sft (samples.txt), runs/demo_reward (reward_stats.json), runs/demo_dpo, runs/demo_ppo, runs/demo_grpo (hf/: the final policy)"
