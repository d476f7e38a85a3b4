#!/usr/bin/env bash
# A new user's first hour with kdml, replayed: train on the embedded glyphs
# (--dataset=synthetic) and on a generated nested folder (alphabet/character/*.png, with a
# corrupt, a text-as-.png and an empty file in it), evaluate, build and query an index,
# export a search model, use the TF-free kit, and give every command plausible bad input.
#
# Every step checks its exit code; every refusal must be exactly one `error: <path>: ...`
# line on stderr; and no step may print a traceback or a start-up / log noise line
# (TensorFlow's C++ banner, CUDA probing, oneDNN, absl's prefixed log lines, LiteRT's
# XNNPACK line). Any failure: a message naming the step and exit code 1.
#
#   tools/try_as_new_user.sh [work_dir]     # default: a temporary folder, removed after
#
# Runs with .venv/bin/python (make install), about 2-3 minutes on 2 cores; CI runs it
# after `make test` (.ci/run).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="$REPO/.venv/bin/python"
KIT="$REPO/export/kdml_litert.py"
[ -x "$PY" ] || { echo "try_as_new_user: $PY is missing: run make install" >&2; exit 1; }
if [ $# -ge 1 ]; then WORK="$1"; mkdir -p "$WORK"; else
  WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT; fi
cd "$WORK" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" KERAS_BACKEND=tensorflow
unset TF_CPP_MIN_LOG_LEVEL  # as a user's shell: kdml must quiet TensorFlow itself
NOISE='Traceback|cudart_stub|cuInit|cuda_|absl::InitializeLog|cpu_feature_guard|This TensorFlow binary|oneDNN|DT_HALF|XNNPACK|^[IWEF][0-9]{4} [0-9:.]+ +[0-9]+ [a-z_]+\.(cc|py):|^(WARNING|INFO|ERROR):(absl|tensorflow)|UserWarning|DeprecationWarning|FutureWarning'
FAILED=0
STEP=0

fail() { echo "FAIL [$STEP $1]: $2" >&2; FAILED=1; }

# step NAME RC [GREP] -- COMMAND...: run COMMAND, expect exit code RC; RC 2 also needs one
# stderr line "error: ..." containing GREP; output must hold no noise line.
step() {
  local name="$1" want="$2" grep_for="$3"; shift 4
  STEP=$((STEP + 1))
  local out="$WORK/step$STEP.out" err="$WORK/step$STEP.err" start=$SECONDS
  "$@" >"$out" 2>"$err"
  local rc=$?
  printf '%2d %-46s rc %d  %3ds\n' "$STEP" "$name" "$rc" $((SECONDS - start))
  [ "$rc" = "$want" ] || { fail "$name" "exit code $rc, expected $want"; sed 's/^/    /' "$err" | tail -20 >&2; }
  if grep -Eq "$NOISE" "$out" "$err"; then
    fail "$name" "noise or traceback:"; grep -Eh "$NOISE" "$out" "$err" | head -5 | sed 's/^/    /' >&2
  fi
  if [ "$want" = 2 ]; then
    local lines; lines=$(wc -l <"$err")
    [ "$lines" = 1 ] && grep -q '^error: ' "$err" || fail "$name" "expected one 'error:' line, got $lines:"
    [ -z "$grep_for" ] || grep -qF -- "$grep_for" "$err" || fail "$name" "the error does not name $grep_for"
    sed 's/^/    /' "$err"
  elif [ -n "$grep_for" ]; then
    grep -qF -- "$grep_for" "$out" "$err" || fail "$name" "output lacks: $grep_for"
  fi
}

# --- a nested folder of glyphs, as a user's data: alphabet/character/*.png, 3 bad files
# (the set-up is not a kdml command: its TensorFlow start-up lines go to setup.err)
"$PY" - 2>setup.err <<'EOF' || { cat setup.err >&2; echo "FAIL: could not write the folders" >&2; exit 1; }
import os
import numpy as np
from PIL import Image
from kdml.data.sources.synthetic import glyphs

images = glyphs(num_classes=24, images_per_class=6, image_size=28, seed=7)
for i, (pixels, label) in enumerate(zip(images.pixels, images.labels)):
    folder = os.path.join("glyphs", f"alphabet{label // 6}", f"character{label % 6:02d}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
import shutil
shutil.copytree("glyphs", "clean")  # the same folder without bad files
bad = os.path.join("glyphs", "alphabet0", "character00")
png = open(os.path.join(bad, "0000.png"), "rb").read()
open(os.path.join(bad, "truncated.png"), "wb").write(png[: len(png) // 2])
open(os.path.join(bad, "notes.png"), "w").write("not an image\n")
open(os.path.join(bad, "empty.png"), "wb").close()
os.makedirs("queries", exist_ok=True)
gray = images.pixels[0].mean(axis=-1).astype(np.uint8)
Image.fromarray(gray, "L").save("queries/gray.png")
Image.fromarray(gray.astype(np.uint16) * 257).save("queries/gray16.png")
EOF
G="$WORK/glyphs"
GFILE="$G/alphabet1/character02/$(ls "$G/alphabet1/character02" | head -1)"

step "train --helpfull" 0 "--method" -- "$PY" -m kdml.train --helpfull
step "train on synthetic, 1 epoch" 0 "" -- "$PY" -m kdml.train --dataset=synthetic --epochs=1 \
  --embedding_dim=64 --output_dir=runs/synthetic
MODEL="runs/synthetic/embedder.keras"
step "train on the nested folder (bad files skipped)" 0 "skipping 3 of" -- "$PY" -m kdml.train \
  --dataset="folder:$G" --data_kind=glyph --epochs=2 --embedding_dim=64 --classes_per_batch=8 \
  --output_dir=runs/folder
step "evaluate on synthetic" 0 "eval_test.json" -- "$PY" -m kdml.evaluate --model="$MODEL"
step "evaluate another dataset, same report name" 2 "--overwrite" -- "$PY" -m kdml.evaluate \
  --model="$MODEL" --dataset="folder:$G"
step "evaluate it into its own folder" 0 "" -- "$PY" -m kdml.evaluate --model="$MODEL" \
  --dataset="folder:$G" --output_dir=eval_folder
step "evaluate omniglot, n_way too large" 2 "--n_way" -- "$PY" -m kdml.evaluate \
  --model="$MODEL" --protocol=omniglot --dataset="folder:$WORK/clean" --n_way=9 --output_dir=eval_o
step "index build (bad files skipped)" 0 "skipping 3 of" -- "$PY" -m kdml.index build \
  --model="$MODEL" --source="folder:$G" --output_dir=gallery.index --calibrate="folder:$WORK/clean" --target_far=0.05
step "index query a gallery file" 0 '"label_match"' -- "$PY" -m kdml.index query \
  --index=gallery.index --model="$MODEL" --k=3 "$GFILE"
step "index query grayscale + 16-bit files" 0 '"neighbours"' -- "$PY" -m kdml.index query \
  --index=gallery.index --model="$MODEL" --k=3 queries/gray.png queries/gray16.png
step "index query a text file named .png" 2 "notes.png" -- "$PY" -m kdml.index query \
  --index=gallery.index --model="$MODEL" "$G/alphabet0/character00/notes.png"
step "index query a corrupt file" 2 "truncated.png" -- "$PY" -m kdml.index query \
  --index=gallery.index --model="$MODEL" --output_dir=out_q "$G/alphabet0/character00/truncated.png"
step "index query, labels that match nothing" 0 "occur in the gallery" -- "$PY" -m kdml.index \
  query --index=gallery.index --model="$MODEL" --k=1 --query_source="folder:$G/alphabet1" \
  --output_dir=out_labels
step "export with a search model" 0 "search_int8" -- "$PY" -m kdml.export --model="$MODEL" \
  --output_dir=export --quantization=float32,int8 --gallery=gallery.index \
  --calibration_images=64 --parity_images=200 --latency_runs=0
step "evaluate the SavedModel" 0 "" -- "$PY" -m kdml.evaluate --model=export/saved_model \
  --output_dir=eval_saved_model
step "evaluate a search model" 2 "a search model" -- "$PY" -m kdml.evaluate \
  --model=export/embedder_int8_search.tflite
step "index query with a search model" 2 "a search model" -- "$PY" -m kdml.index query \
  --index=gallery.index --model=export/embedder_int8_search.tflite "$GFILE"
step "kit index of the nested folder" 0 "24 labels" -- "$PY" "$KIT" index \
  --model=export/embedder_int8.tflite --gallery="$G" --index=kit.index
step "kit query a gallery file" 0 '"label": "alphabet1/character02"' -- "$PY" "$KIT" query \
  --model=export/embedder_int8.tflite --index=kit.index --k=3 "$GFILE"
step "kit query the kdml index" 0 '"no_match"' -- "$PY" "$KIT" query \
  --model=export/embedder_float32.tflite --index=gallery.index --allow_model_mismatch "$GFILE"
step "kit search" 0 '"accepted"' -- "$PY" "$KIT" search \
  --model=export/embedder_int8_search.tflite "$GFILE" queries/gray16.png
step "kit query an empty file" 2 "empty.png" -- "$PY" "$KIT" query \
  --model=export/embedder_int8.tflite --index=kit.index "$G/alphabet0/character00/empty.png"
step "kit query with a search model" 2 "a search model" -- "$PY" "$KIT" query \
  --model=export/embedder_int8_search.tflite --index=kit.index "$GFILE"
step "kit search with an embedder" 2 "an embedder" -- "$PY" "$KIT" search \
  --model=export/embedder_int8.tflite "$GFILE"
step "kit embed a missing file" 2 "missing.png" -- "$PY" "$KIT" embed \
  --model=export/embedder_int8.tflite --output=e.npy queries/missing.png

if [ "$FAILED" != 0 ]; then
  echo "try_as_new_user: FAILED (outputs in $WORK)" >&2
  [ $# -ge 1 ] || trap - EXIT
  exit 1
fi
echo "try_as_new_user: all $STEP steps as expected"
