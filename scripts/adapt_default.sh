#!/usr/bin/env bash
# The run that makes the shipped adapter of `default`
# (dijiang_edge/adapters/smollm2-135m-instruct.safetensors): window 64 with the shared
# normaliser, LoRA fine-tuning with distillation on the general English mix, 80 minutes of
# one CPU thread. Checkpoints every 5 minutes outside the work tree; run the script again
# after an interruption or a restart and it resumes.
#   OUT=~/.cache/dijiang-default bash scripts/adapt_default.sh
#   cp "$OUT/adapted/adapter.safetensors" dijiang_edge/adapters/smollm2-135m-instruct.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$HOME/.cache/dijiang-default}
R=(); [ -f "$OUT/checkpoint/checkpoint.pt" ] && R=(--resume)
exec dijiang-export adapt default --data general --heldout heldout-a heldout-b \
  --out "$OUT/adapted" --variant normalized --window 64 --window-mode shared \
  --stages finetune --time-budget 80m --seq-len 256 --batch-size 4 --eval-tokens 8192 \
  --threads 1 --checkpoint-dir "$OUT/checkpoint" --checkpoint-minutes 5 --keep-checkpoint "${R[@]}"
