#!/usr/bin/env bash
# `make demo`: the whole path on this machine, no download: the Python standard library's
# own sources -> BPE tokenizer -> .bin/.idx -> 2-rank pretraining -> Hugging Face export
# -> post-training on a checkable task (write a stdlib function's body, from the same
# sources): SFT -> reward model, and DPO beside it; then a table of what each stage changed.
# Re-running resumes (or skips) finished steps. DeepSpeed's own output goes to runs/demo/logs/;
# VERBOSE=1 shows it here too.
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
[ -f runs/demo/tasks/prompts_valid.jsonl ] || "$BIN/zerollm" demo-tasks "$DATA/stdlib.jsonl" --out runs/demo/tasks
"$BIN/zerollm" sft --config configs/demo_sft.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2 ${VERBOSE:+--verbose}
"$BIN/zerollm" reward --config configs/demo_reward.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2 ${VERBOSE:+--verbose}
"$BIN/zerollm" dpo --config configs/demo_dpo.yaml --deepspeed_config ds_configs/zero2.json --num_gpus 2 ${VERBOSE:+--verbose}
"$BIN/python" - <<'PY'
import json
def evals(run, key):
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    got = [(r["step"], r[key]) for r in rows if key in r]
    return got[0], got[-1]
print("demo: what each stage changed (held-out data; runs/*/metrics.jsonl)")
print(f"{'stage':<10} {'metric':<34} {'before':>14} {'after':>14}")
for stage, run, key, what in [
    ("pretrain", "runs/demo", "eval_loss", "eval loss (stdlib, per token)"),
    ("sft", "runs/demo_sft", "eval_loss", "held-out loss per answer token"),
    ("reward", "runs/demo_reward", "eval_accuracy", "held-out preference accuracy"),
    ("dpo", "runs/demo_dpo", "eval_accuracy", "held-out preference accuracy"),
    ("dpo", "runs/demo_dpo", "eval_success", "held-out success (function check)"),
]:
    (s0, v0), (s1, v1) = evals(run, key)
    print(f"{stage:<10} {what:<34} {f'{v0:.3f} @{s0}':>14} {f'{v1:.3f} @{s1}':>14}")
PY
echo "demo done: runs/demo (pretraining: metrics.jsonl, loss.png, checkpoints/, hf/), runs/demo_sft (samples.txt), runs/demo_reward (reward_stats.json), runs/demo_dpo"
