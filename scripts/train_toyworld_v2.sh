#!/usr/bin/env bash
# Train toy world v2 end to end on a CUDA machine, then measure its headroom (docs/toyworld.md).
#
#   scripts/train_toyworld_v2.sh [python]      # from the repository root; default .venv/bin/python, else python3
#
# Step counts are toyworld/v2/train.py's SCHEDULES (vae 4000 x 64, text 3000 x 256, dit 10000 x 256,
# weak 2500 x 256, classifier 2000 x 128); estimated 10-15 minutes on one H200, about 40 hours on this
# repository's 2-core CPU box.  Each call trains for at most TIME_LIMIT seconds (default 500: a lent machine
# runs one command for 10 minutes at most) and the same call resumes from the checkpoints in WORK, so run
# it until it prints "complete": true; it then samples the validation prompts at cfg 1 and 4 (20 Euler
# steps, two seeds each) and prints the oracle's pass and fact rates per kind.  ComfyUI's classes must be
# importable: this checkout's .comfyui/ (on a lent machine: carry ".comfyui/comfy") or COMFYUI_DIR.
# When $OUT is set (a lent machine's output folder), the weights, the log and the headroom figures are
# copied there.
set -euo pipefail
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WORK=${WORK:-.toyworld-train-v2}
WEIGHTS=${WEIGHTS:-toyworld/v2/weights}
export PYTHONUNBUFFERED=1

mkdir -p "$WORK"
"$PY" -m toyworld.v2.train --stage all --seed 0 --device cuda --time-limit "${TIME_LIMIT:-500}" \
    --work "$WORK" --out "$WEIGHTS" | tee "$WORK/last_call.log"
if grep -q '"complete": true' "$WORK/last_call.log"; then
    "$PY" -m toyworld.v2.sample --cfg 1 4 --set validation --samples 2 --steps 20 --device cuda \
        --weights "$WEIGHTS" | tee "$WORK/headroom.jsonl"
fi
if [ -n "${OUT:-}" ]; then
    cp "$WEIGHTS"/*.safetensors "$WORK/train.log" "$OUT/"
    [ ! -f "$WORK/headroom.jsonl" ] || cp "$WORK/headroom.jsonl" "$OUT/"
fi
