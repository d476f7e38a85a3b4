#!/usr/bin/env bash
# kdml's first-GPU check: the GPU paths no CPU test reaches, in under 8 minutes on one GPU.
#
#   bash tools/gpu_check.sh [OUT_DIR]        # OUT_DIR (default: runs/gpu_check) keeps the logs
#   GPU_CHECK_DRY_RUN=1 bash tools/gpu_check.sh   # CPU smoke test of the script (conv4, 32 px)
#
# Sections, each under its own time limit (45 + 115 + 75 + 45 + 120 + 60 s: the whole
# script ends within 8 minutes even if each one hangs), each logged to OUT_DIR/<section>.log:
#   1. devices     nvidia-smi -L, TensorFlow's visible GPUs, CUDA / cuDNN versions
#   2. tests       the GPU-relevant tests: exact k-NN with TF32 off, mixed_float16,
#                  warm-up, training under MirroredStrategy (pytest, CUDA visible)
#   3. train_cli   `python -m kdml.train` for 1 epoch with XLA (jit_compile auto = on,
#                  one GPU) and --mixed_precision (mixed_float16), quiet start-up checked
#   4. mirrored    MirroredStrategy with NCCL (2 logical GPUs on a single GPU) vs one device
#   5. throughput  train images/s, resnet50 and deit_small at 224 px, XLA off/on x
#                  float32 / mixed_float16 (random weights, no download)
#   6. eval        tools/bench_eval.py at Stanford Online Products size (60,502 x 512)
# and prints one summary table. Exit status: 0 when every section passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-runs/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/*.log "$OUT/devices.txt"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
DRY="${GPU_CHECK_DRY_RUN:-0}"
export KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
START=$SECONDS
declare -a SUMMARY=()

# run_section NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, logs to OUT/NAME.log,
# records pass / FAIL (exit code) / TIMEOUT and the seconds taken.
run_section() {
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS rc=0
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=2 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  local status="pass"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="TIMEOUT"; elif [[ $rc -ne 0 ]]; then status="FAIL (exit $rc)"; fi
  SUMMARY+=("| $name | $status | $((SECONDS - t0)) |")
  grep -E '^RESULT |^\| |[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -n 25 || true
}

# 1. Devices.
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  CPUs: $(nproc)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L || true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  else
    echo "nvidia-smi: not found"
  fi
} | tee "$OUT/devices.txt"
run_section devices 45 "$PY" tools/gpu_check.py devices

if [[ "$DRY" == "1" ]]; then
  # CPU smoke test of this script: the timing code on conv4 at 32 px, 2 steps.
  run_section throughput 300 "$PY" tools/gpu_check.py throughput --dry_run
else
  # 2. Tests that matter on a GPU (they run on GPU:0 when CUDA is visible).
  T=tests/training/test_train.py
  run_section tests 115 "$PY" -m pytest -q -p no:cacheprovider \
    tests/evaluation/test_knn.py tests/training/test_mixed_precision.py \
    tests/training/test_warmup.py tests/test_optimizers.py \
    "$T::test_train_writes_metrics_checkpoints_and_a_reloadable_embedder" \
    "$T::test_two_replicas_take_the_same_step_as_one_on_the_global_batch" \
    "$T::test_train_under_mirrored_strategy_and_mixed_precision"
  # 3. The command line on the GPU: XLA (auto: on for one GPU) + mixed_float16.
  rm -rf "$OUT/run"
  run_section train_cli 75 "$PY" -m kdml.train --dataset=synthetic --epochs=1 --mixed_precision \
    --verbose=2 --output_dir="$OUT/run"
  if grep -qE 'cudart_stub|absl::InitializeLog|cpu_feature_guard' "$OUT/train_cli.log"; then
    SUMMARY+=("| train_cli quiet start-up | FAIL (C++ start-up lines in the log) | - |")
  fi
  # 4. MirroredStrategy with NCCL.
  run_section mirrored 45 "$PY" tools/gpu_check.py mirrored
  # 5. Throughput at 224 px (starts no new configuration after 75 s).
  run_section throughput 120 "$PY" tools/gpu_check.py throughput --budget_s=75 --steps=20
  # 6. SOP-size evaluation (k-NN on the GPU, TF32 off): two bare passes, ranking, NMI, once.
  run_section eval 60 "$PY" tools/bench_eval.py --repeats=1 --bare_rows=256,4096
fi

echo
echo "## kdml GPU check: $(head -n 2 "$OUT/devices.txt" | tail -n 1), $((SECONDS - START)) s in all"
echo
echo "| section | status | seconds |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "| check | status | details |"
echo "|---|---|---|"
cat "$OUT"/*.log | sed -n 's/^RESULT \([^ ]*\) \([^ ]*\) *\(.*\)$/| \1 | \2 | \3 |/p'
grep -hE '^(numpy_knn|kdml_knn|kdml_ranking|kdml_all) ' "$OUT/eval.log" 2>/dev/null | sed 's/^/eval: /' || true
grep -hE '^\| (resnet50|deit_small|conv4) ' "$OUT/throughput.log" 2>/dev/null | sed 's/^/throughput: /' || true
echo
echo "logs: $OUT"
# Exit status 1 when a section did not pass or a check failed (the dry run expects no GPU).
FAILED_CHECKS="$(cat "$OUT"/*.log | grep -E '^RESULT [^ ]+ FAIL' || true)"
if [[ "$DRY" == "1" ]]; then FAILED_CHECKS="$(grep -v '^RESULT tf_visible_gpus ' <<<"$FAILED_CHECKS" || true)"; fi
if printf '%s\n' "${SUMMARY[@]}" | grep -qvE '\| pass \|' || [[ -n "$FAILED_CHECKS" ]]; then exit 1; fi
