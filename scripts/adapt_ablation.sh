#!/usr/bin/env bash
# The recipe ablation of docs/adaptation.md: the same text, token budget and held-out texts
# for each attention form, one after another, one thread each.
#   BUDGET=12k OUT=~/.cache/dijiang-ablation bash scripts/adapt_ablation.sh
# ONLY="w64-shared w64-mix" runs just those (two shells with disjoint ONLY lists run side by side).
# Each finished run is kept (OUT/NAME-BUDGET/report.json) and skipped when run again.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BUDGET:-12k}
OUT=${OUT:-$HOME/.cache/dijiang-ablation}
mkdir -p "$OUT"
run() {  # name, adapt flags...
  local n=$1; shift
  [ -f "$OUT/$n-$B/report.json" ] && return
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $n "* ]] && return
  dijiang-export adapt default --data general --heldout heldout-a heldout-b \
    --out "$OUT/$n-$B" --token-budget "$B" --seq-len 256 --batch-size 4 --eval-tokens 4096 \
    --threads 1 --checkpoint-dir "$OUT/$n-$B-checkpoint" --force "$@" > "$OUT/$n-$B.log" 2>&1
}
run w64-shared --variant normalized --window 64 --window-mode shared --stages finetune
run w64-mix --variant official --window 64 --window-mode mix --stages finetune
run pure-official --variant official
run w16-shared --variant normalized --window 16 --window-mode shared --stages finetune
