#!/usr/bin/env bash
# The real-verifier session on the GPU machine: the SmolLM2-135M draft distilled, then
# reported (acceptance on test text, the layer map), then the quality sweep (PHASE=sweep,
# SWEEP_ARGS for the window; its layer map is the report's). The inputs (the SmolLM2 GGUF, the
# Gutenberg corpus as tar.xz, the `gguf` wheel) are one tar, too big for one call's working
# tree: `benchmarks/stage_parts.sh` splits it, each call carries one part into /tmp/stage,
# and the last part's call assembles and checks it (PHASE=assemble). With a staged draft
# (stage_parts.sh DRAFT=...), the report and sweep phases need no training. The report phase
# also scores the draft's attention (attention_recall.py) and sends the exported draft back
# as a tar in parts of 15 MiB (cat draft.tar.part* | tar -x).
#
#   PHASE=stage PART=.stage/p1 bash benchmarks/distill_session.sh     # once per part
#   PHASE=stage,assemble,train PART=.stage/p4 bash benchmarks/distill_session.sh  # <= 10 min
#   PHASE=report bash benchmarks/distill_session.sh                   # the same machine, warm
#   PHASE=sweep SWEEP_ARGS="--window 8192 --prefix 4096" bash benchmarks/distill_session.sh
# LAYER_MAP=file sweeps with that map instead of the report's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/distill}
ASSETS=/tmp/specattn_assets
RUN=/tmp/smollm2-draft
mkdir -p "$OUT" /tmp/stage
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
GGUF=$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf
DATA=$ASSETS/gutenberg

if [[ $PHASE == *stage* ]]; then
  cp "$PART"/* /tmp/stage/ && ls -la /tmp/stage
fi

if [[ $PHASE == *assemble* ]]; then
  mkdir -p "$ASSETS" && cat /tmp/stage/assets.tar.part* > /tmp/assets.tar
  (cd /tmp && sha256sum -c stage/assets.tar.sha256) || { ls -la /tmp/stage; exit 3; }
  tar -xf /tmp/assets.tar -C "$ASSETS" && tar -xJf "$ASSETS/gutenberg.tar.xz" -C "$ASSETS"
  if [[ -d $ASSETS/smollm2-draft ]]; then mkdir -p "$RUN" && cp -r "$ASSETS/smollm2-draft" "$RUN/hf"; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$ASSETS"/gguf-*.whl
  ls -la "$ASSETS"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

if [[ $PHASE == *train* ]]; then
  echo "== distill (time budget in the config)"
  # H100: 482 s ran the steps and the final evaluation but not the export (2026-12-06).
  timeout "${TRAIN_S:-570}" python3 -m specattn_jax.cli train \
    --config configs/smollm2-draft/config.json --distill-from "$GGUF" --data-dir "$DATA" \
    --out-dir "$RUN" --export "$RUN/hf" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log" \
    | grep -v "it/s\]\|step/s\]" | tail -n 60
  status=${PIPESTATUS[0]}
  cp "$RUN/history.json" "$OUT/history.json"
  if ((status != 0)); then
    echo "training exited with $status (124: TRAIN_S ran out); no draft was exported" >&2
    exit "$status"
  fi
fi

if [[ $PHASE == *report* ]]; then
  echo "== acceptance on test text"
  timeout "${ACCEPT_S:-200}" python3 benchmarks/draft_acceptance.py --verifier "$GGUF" \
    --draft "$RUN/hf" --data-dir "$DATA" --out "$OUT/acceptance.json" 2>&1 | tail -n 8
  echo "== layer map (the distillation groups'; CHOOSE=kl: the KL map; CHOOSE=mix: the KL map and a layer mix), scored on the validation books"
  mkdir -p /tmp/validation_books
  python3 -c "
import shutil
from specattn_jax.data import split_books
for book in split_books('validation', '$DATA'):
    shutil.copy(book.path, '/tmp/validation_books/')"
  timeout "${CALIBRATE_S:-200}" python3 -m specattn_jax.cli calibrate --verifier "$GGUF" \
    --draft "$RUN/hf" --text /tmp/validation_books --seq-len 2048 --num-sequences 32 \
    --out "$RUN/layer_map.json" --plot "$OUT/layer_map.png" --dtype float32 \
    --choose "${CHOOSE:-groups}" 2>&1 | tail -n 5
  cp "$RUN/layer_map.json" "$OUT/"
  echo "== the draft's attention against the verifier's (validation text)"
  timeout "${RECALL_S:-120}" python3 benchmarks/attention_recall.py --verifier "$GGUF" \
    --draft "$RUN/hf" --layer-map "$RUN/layer_map.json" --data-dir "$DATA" \
    --out "$OUT/attention_recall.json" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -n 30
  tar -cf - -C "$RUN" hf | split -b 15M - "$OUT/draft.tar.part"
fi

if [[ $PHASE == *sweep* ]]; then
  echo "== perplexity against KV reduction on the test books"
  timeout "${SWEEP_S:-560}" python3 benchmarks/ppl_vs_kv.py --verifier "$GGUF" --draft "$RUN/hf" \
    --data-dir "$DATA" --layer-map "${LAYER_MAP:-$RUN/layer_map.json}" --out-dir "$OUT" \
    ${SWEEP_ARGS:-} 2>&1 \
    | grep -v "it/s\]\|s/it\]" | tail -n 40
fi
