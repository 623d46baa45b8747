#!/usr/bin/env bash
# What only a GPU can show, in one run on one GPU (an H200: about 4-5 minutes, under 8),
# from a bare machine with the repo and a Python that has its dependencies:
#   data  the demo corpus (this Python's stdlib sources) -> BPE tokenizer -> .bin/.idx, and the
#         checkable function-body tasks (zerollm demo-tasks): SFT pairs, preferences, PPO prompts
#   a     fp16 with dynamic loss scaling on ZeRO-2 (ds_configs/zero2_fp16.json): a 20M Llama-style
#         model pretrains 60 steps; the loss must fall; DeepSpeed's loss scale and skipped steps
#   b     bf16 pretraining of gpt2-124m (ZeRO-2, seq 1024 x 32): tokens/s and MFU against
#         --peak-tflops (H200 dense bf16: 989), the median of the loop's own metrics.jsonl rows
#   c     PPO under ZeRO-3 (ds_configs/zero3.json), actor + critic + frozen reference from run (a),
#         reward function data_pipeline.function_tasks:reward: 3 rollouts x 2 epochs; the share of
#         step time spent generating (gen_s over the metrics rows' wall time, rollouts 2-3)
#   d1/d2 SFT and reward-model runs of 4 steps from run (a), so every stage ran on the device
# Then a table on stdout (one row each, DIR/results.json the same as JSON); each step's output
# is in DIR/logs/STEP.log. Exits 1 with a `gpu_check: FAILED: ...` line per failed step or check.
#
#   benchmarks/gpu_check.sh [--peak-tflops 989] [--work DIR]   # on the GPU machine
#   benchmarks/gpu_check.sh --smoke [--work DIR]                # the same steps on CPU, tiny, ~1 min
#   GPU_CHECK_SMOKE=1 benchmarks/gpu_check.sh                    # the same as --smoke
#
# Smoke mode: DeepSpeed's CPU accelerator, the tiny preset for both models, 2 steps each, fp32
# where the GPU run has fp16 (fp16 is GPU-only), each stage as `python -m train.STAGE` (one
# process, no launcher; the GPU run goes through `zerollm STAGE --num_gpus 1`, which users run).
# GPU_CHECK_LAUNCH=launcher|direct overrides that choice. The Python: $PYTHON, else .venv/bin/python,
# else python3 on PATH; the repo is put on PYTHONPATH, so no install is needed (`make` builds .venv:
# launch/bootstrap.sh keeps a cluster's own CUDA torch). DIR defaults to a new temp dir; a run in
# an old DIR reuses its data and redoes every training step.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

MODE=gpu
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] && MODE=smoke
PEAK=${GPU_CHECK_PEAK_TFLOPS:-989}
WORK=${GPU_CHECK_WORK:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --peak-tflops) PEAK=${2:?--peak-tflops needs a number}; shift ;;
    --peak-tflops=*) PEAK=${1#*=} ;;
    --work) WORK=${2:?--work needs a directory}; shift ;;
    --work=*) WORK=${1#*=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

T_START=$(date +%s.%N)
die() { echo "gpu_check: $*" >&2; exit 2; }
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=$(command -v python3 || command -v python) || die "no python3 on PATH (or set PYTHON=...)"
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [ "$MODE" = smoke ]; then
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  LAUNCH=${GPU_CHECK_LAUNCH:-direct}
  PARALLEL=${GPU_CHECK_PARALLEL:-1}  # independent steps side by side (on a GPU they would disturb each other)
  STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-240}
  DEADLINE=${GPU_CHECK_DEADLINE:-900}
else
  LAUNCH=${GPU_CHECK_LAUNCH:-launcher}
  PARALLEL=${GPU_CHECK_PARALLEL:-0}
  STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-150}
  DEADLINE=${GPU_CHECK_DEADLINE:-420}  # s for all steps together: a hang cannot take the whole GPU slot
fi
missing=$("$PY" -c '
import importlib.util as u
print(" ".join(m for m in ("torch", "deepspeed", "tokenizers", "transformers", "yaml", "numpy", "tqdm") if u.find_spec(m) is None))
' 2>&1) || die "$PY does not run: $missing"
[ -z "$missing" ] || die "$PY lacks $missing: run \`make test\` once (launch/bootstrap.sh builds .venv) or pip install -e ."
if [ "$MODE" = gpu ]; then
  gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
  [ -n "$gpu" ] || die "no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); on CPU run --smoke"
else
  gpu="none (CPU smoke)"
fi
versions=$("$PY" -c 'from importlib.metadata import version as v; print("torch", v("torch") + ", deepspeed", v("deepspeed"))' 2>&1 | tail -1)

[ -n "$WORK" ] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
rm -rf "$WORK/runs" "$WORK/status" "$WORK/configs" "$WORK/results.json"
mkdir -p "$WORK/logs" "$WORK/status"
BASE=""
export PY WORK MODE
echo "gpu_check: mode $MODE, device $gpu, python $PY ($versions), work dir $WORK (logs: $WORK/logs)" >&2

elapsed() { "$PY" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# `run_step NAME CMD...`: CMD's output to logs/NAME.log, its status (ok/failed, seconds) to status/NAME.
run_step() {
  local name=$1; shift
  local log=$WORK/logs/$name.log t0 rc wall limit
  limit=$("$PY" -c "import sys, time; print(min(int(sys.argv[1]), int(float(sys.argv[2]) + int(sys.argv[3]) - time.time())))" \
          "$STEP_TIMEOUT" "$T_START" "$DEADLINE")
  if [ "$limit" -lt 20 ]; then skip "$name" "out of time: the whole check has a ${DEADLINE} s deadline"; return 1; fi
  t0=$(date +%s.%N)
  echo "gpu_check: [$name] $*" >"$log"
  if declare -F "$1" >/dev/null; then  # a function of this script: in a bash of its own, for `timeout`
    timeout -k 30 "$limit" bash -c "set -uo pipefail; $(declare -f "$1"); $(printf '%q ' "$@")" >>"$log" 2>&1
  else
    timeout -k 30 "$limit" "$@" >>"$log" 2>&1
  fi
  rc=$?
  wall=$(elapsed "$t0")
  if [ $rc -eq 0 ]; then
    echo "ok $wall" >"$WORK/status/$name"
    echo "gpu_check: [$name] ok in ${wall} s" >&2
    return 0
  fi
  local why="exit $rc"
  [ $rc -eq 124 ] && why="timed out after ${limit} s"
  echo "failed $wall $why (log: $log)" >"$WORK/status/$name"
  echo "gpu_check: [$name] FAILED ($why) after ${wall} s; the end of $log:" >&2
  tail -n 25 "$log" | sed 's/^/    /' >&2
  return 1
}
skip() { echo "skipped 0 $2" >"$WORK/status/$1"; echo "gpu_check: [$1] skipped: $2" >&2; }
ok() { [ "$(cut -d' ' -f1 "$WORK/status/$1" 2>/dev/null)" = ok ]; }

# `stage STEP STAGE`: write STEP's run config, then run STAGE on it (the launcher or one process).
stage() {
  local step=$1 name=$2 module=train.$2 cfg
  [ "$step" = a ] && module=benchmarks.gpu_check_probe
  cfg=$("$PY" benchmarks/gpu_check.py config "$step" --mode "$MODE" --work "$WORK" --peak-tflops "$PEAK" \
        --init-from "${BASE:-}") || { echo "failed 0 could not write its config" >"$WORK/status/$step"; return 1; }
  local ds
  ds=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import gpu_check; print(gpu_check.DS[sys.argv[1]])' "$step")
  if [ "$LAUNCH" = launcher ]; then
    local extra=()
    [ "$step" = a ] && extra=(--module "$module")
    run_step "$step" "$PY" -m launch.cli "$name" --config "$cfg" --deepspeed_config "$ds" --num_gpus 1 \
      --master_addr 127.0.0.1 --stop_grace 20 --verbose "${extra[@]}"
  else
    MASTER_ADDR=127.0.0.1 MASTER_PORT=$(free_port) run_step "$step" "$PY" -m "$module" --config "$cfg" \
      --deepspeed_config "$ds"
  fi
}

build_data() {
  local mb vocab tokmb
  read -r mb vocab tokmb < <("$PY" -c '
import sys; sys.path.insert(0, "benchmarks"); import gpu_check
z = gpu_check.SIZES[sys.argv[1]]; print(z["corpus_mb"] or 0, z["vocab"], z["tok_mb"] or 0)' "$MODE")
  local cli=("$PY" -m launch.cli) d=$WORK/data
  if [ -f "$WORK/data.$MODE.done" ]; then echo "gpu_check: data of an earlier run in $WORK, kept"; return 0; fi
  rm -rf "$d" "$WORK/tokenizer" "$WORK/tasks" "$WORK"/data.*.done
  local corpus_mb=() tok_mb=()
  [ "$mb" != 0 ] && corpus_mb=(--max-mb "$mb")
  [ "$tokmb" != 0 ] && tok_mb=(--max-mb "$tokmb")
  "${cli[@]}" demo-corpus "$d" "${corpus_mb[@]}" &&
  "${cli[@]}" tokenizer train "$d/stdlib.jsonl" --vocab-size "$vocab" --out "$WORK/tokenizer" "${tok_mb[@]}" &&
  "${cli[@]}" preprocess "$d/stdlib.jsonl" --tokenizer "$WORK/tokenizer" --out-prefix "$d/stdlib_train"  # no eval here: no valid split &&
  "${cli[@]}" demo-tasks "$d/stdlib.jsonl" --out "$WORK/tasks" &&
  touch "$WORK/data.$MODE.done"
}

# `steps "A ARGS" "B ARGS" ...`: stage A ARGS, then B ...; side by side in smoke mode.
steps() {
  local s
  for s in "$@"; do
    if [ "$PARALLEL" = 1 ]; then stage $s & else stage $s; fi
  done
  wait
}

if run_step data build_data; then
  steps "a pretrain" "b pretrain"
  # Post-training starts from run (a); if fp16 failed there, from run (b) (both are ZeroLLM run dirs).
  BASE=""
  if ok a; then BASE=$WORK/runs/a; elif ok b; then BASE=$WORK/runs/b; fi
  if [ -n "$BASE" ]; then
    steps "ppo ppo" "sft sft" "reward reward"
  else
    for s in ppo sft reward; do skip $s "no pretrained model: steps a and b failed"; done
  fi
else
  for s in a b ppo sft reward; do skip $s "no data: step data failed"; done
fi

echo "gpu_check: done in $(elapsed "$T_START") s; mode $MODE, device $gpu, peak $PEAK TFLOPs, work dir $WORK" >&2
[ -n "$BASE" ] && [ "$BASE" != "$WORK/runs/a" ] && echo "gpu_check: post-training started from $BASE (step a failed)" >&2
"$PY" benchmarks/gpu_check.py table --mode "$MODE" --work "$WORK" --peak-tflops "$PEAK" --elapsed "$(elapsed "$T_START")"
