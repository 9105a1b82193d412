#!/usr/bin/env bash
# The pilots that choose the training settings on validation (issues 28 and 29), every run at one
# budget with the IVON-LoRA authors' recipe otherwise (bench/recipe.sh). Each run ends by scoring the
# validation slice (the last HOLDOUT rows of train, never trained on): validation.json (multiple
# choice: accuracy, NLL, ECE, Brier; question/answer data: NLL per answer token).
#   phase 1: AdamW lr in {5e-5 (the authors'), 2e-4, 1e-3}; IVON lr in {0.03 (the authors'), 0.1,
#            0.3, 1.0 (lr x clip = AdamW 1e-3's step)} at ess 1e6
#   phase 2: IVON at ess 1e7 with phase 1's best lr (by the 4-draw predictive's NLL); FULL_GRID=1
#            runs ess 1e7 at every lr instead (4 more runs: the cross the issue lists)
# Resumable: a finished run is skipped, a killed one resumes from its checkpoint. JOBS runs side by
# side with one thread each (2 cores: 2 x 1 thread beat 1 x 2 by ~9%, measured 2026-12-05).
#   bash bench/pilots.sh               # ARC-Easy, text answers, 100 steps, 300 validation questions
#   TASK=gsm8k bash bench/pilots.sh    # GSM8k (issue 29)
# FORM (multiple choice) is the answer's form (src/ivonserve/choices.py): text (cloze, the
# default: SmolLM2-135M is at chance with letters, zero-shot and after these pilots:
# bench/results/mc-pilots/arc-easy-letter) or letter (the authors' form). BATCHING: the ARC-Easy
# runs were made with random batches (length batching came later) and keep them.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${TASK:-arc-easy}
FORM=${FORM:-text}
if [[ $TASK == gsm8k ]]; then
  DATA=${DATA:-../shared/data/gsm8k/train.jsonl}
  OUT=${OUT:-bench/results/gsm8k-pilots}
  BATCHING=${BATCHING:-length}
else
  DATA=${DATA:-../shared/data/mc/$TASK/train.jsonl}
  OUT=${OUT:-bench/results/mc-pilots/$TASK-$FORM}
  BATCHING=${BATCHING:-random}
fi
STEPS=${STEPS:-100}
HOLDOUT=${HOLDOUT:-300}
JOBS=${JOBS:-2}
IVONSERVE=${IVONSERVE:-.venv/bin/ivonserve}
PYTHON=${PYTHON:-.venv/bin/python}

source bench/recipe.sh
common="--data $DATA --mc-form $FORM --holdout $HOLDOUT --steps $STEPS ${recipe[*]} --eval-draws 4
  --checkpoint-every 25 --batching $BATCHING"
ivon=${recipe_ivon[*]}

one() {
  local name=${1%%|*} flags=${1#*|}
  local dir="$OUT/$name"
  [[ -f $dir/validation.json ]] && return 0
  mkdir -p "$dir"
  echo "$IVONSERVE train $common $flags --out $dir" | tr -s ' \n' ' ' > "$dir/command.txt"
  # shellcheck disable=SC2086
  $IVONSERVE train $common $flags --out "$dir" > "$dir/train.out" 2>&1
  echo "$(date -u +%FT%TZ) done $name"
}
export -f one
export OUT IVONSERVE common

run_all() { printf '%s\n' "$@" | xargs -d '\n' -P "$JOBS" -I{} bash -c 'one "$@"' _ {}; }

ivon_lr_grid=(
  "ivon-lr0.03-ess1e6|$ivon --lr 0.03 --ess 1e6"
  "ivon-lr0.1-ess1e6|$ivon --lr 0.1 --ess 1e6"
  "ivon-lr0.3-ess1e6|$ivon --lr 0.3 --ess 1e6"
  "ivon-lr1.0-ess1e6|$ivon --lr 1.0 --ess 1e6"
)
adamw_lr_grid=(
  "adamw-lr5e-5|--optimizer adamw --lr 5e-5"
  "adamw-lr2e-4|--optimizer adamw --lr 2e-4"
  "adamw-lr1e-3|--optimizer adamw --lr 1e-3"
)
# IVON's lr grid first: phase 2 needs its winner, and then shares the last round with AdamW's.
run_all "${ivon_lr_grid[@]}"
if [[ ${FULL_GRID:-0} == 1 ]]; then
  lrs="0.03 0.1 0.3 1.0"
else
  lrs=$($PYTHON bench/pilots_table.py "$OUT" --best-ivon-lr)
fi
phase2=()
for lr in $lrs; do phase2+=("ivon-lr$lr-ess1e7|$ivon --lr $lr --ess 1e7"); done
run_all "${adamw_lr_grid[@]}" "${phase2[@]}"
$PYTHON bench/pilots_table.py "$OUT"
