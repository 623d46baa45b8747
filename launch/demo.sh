#!/usr/bin/env bash
# `make demo`: the whole path on this machine, no download: the Python standard library's
# own sources -> BPE tokenizer -> .bin/.idx -> 2-rank pretraining -> Hugging Face export.
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
echo "demo done: runs/demo (metrics.jsonl, loss.png, checkpoints/, hf/)"
