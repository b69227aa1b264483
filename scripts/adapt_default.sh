#!/usr/bin/env bash
# The runs that make the shipped adapter of `default`
# (dijiang_edge/adapters/smollm2-135m-instruct.safetensors): window 64 with the shared
# normaliser, LoRA fine-tuning with distillation on the general English mix, in two stages
# of 80 minutes of one CPU thread each:
#   1. from the plain conversion, 256-token sequences (most of the adaptation);
#   2. from stage 1's adapter (`--init-adapter`), 1,024-token sequences, so the DiJiang part
#      learns what lies far past the window (long-range recovery, README *Measured*).
# Checkpoints every 5-10 minutes outside the work tree; run the script again after an
# interruption or a restart and it resumes the stage it was in (a finished stage is kept).
#   OUT=~/.cache/dijiang-default bash scripts/adapt_default.sh
#   cp "$OUT/long/adapter.safetensors" dijiang_edge/adapters/smollm2-135m-instruct.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$HOME/.cache/dijiang-default}
COMMON=(--data general --heldout heldout-a heldout-b --stages finetune --time-budget 80m
        --eval-tokens 8192 --threads 1 --keep-checkpoint)
resume() { [ -f "$1/checkpoint.json" ] && echo --resume || true; }

if [ ! -f "$OUT/adapted/adapter.safetensors" ]; then
  dijiang-export adapt default --out "$OUT/adapted" \
    --variant normalized --window 64 --window-mode shared --seq-len 256 --batch-size 4 \
    --checkpoint-dir "$OUT/checkpoint" --checkpoint-minutes 5 "${COMMON[@]}" $(resume "$OUT/checkpoint")
fi
if [ ! -f "$OUT/long/adapter.safetensors" ]; then
  dijiang-export adapt default --init-adapter "$OUT/adapted/adapter.safetensors" --out "$OUT/long" \
    --seq-len 1024 --batch-size 1 --finetune-lr 5e-4 \
    --checkpoint-dir "$OUT/long-checkpoint" --checkpoint-minutes 10 "${COMMON[@]}" $(resume "$OUT/long-checkpoint")
fi
