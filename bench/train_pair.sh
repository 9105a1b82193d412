#!/usr/bin/env bash
# A posterior and its AdamW twin (docs/pay-off.md, docs/training.md): each with the settings the
# pilots chose on validation (bench/pilots.sh), at the same budget of STEPS steps of batch 8, the
# authors' recipe otherwise (bench/recipe.sh). Side by side with one thread each; resumable
# (rerun the same command: each run continues from its checkpoint, which is committed as the run
# goes so another machine can too; progress.json in each folder says how far it is).
#
# ARMS picks which of the two to run (default both); a finished run (validation.json) is skipped.
#   IVON_LR=1.0 IVON_ESS=1e6 ADAMW_LR=1e-3 bash bench/train_pair.sh             # ARC-Easy, 500 steps
#   TASK=gsm8k IVON_LR=... IVON_ESS=... ADAMW_LR=... bash bench/train_pair.sh    # GSM8k, 900 steps
#   ADAMW_LR=2e-4 ARMS=adamw bash bench/train_pair.sh
# ARC-Easy: 500 steps = 2 epochs of its 1941 training rows; --batching random, the batch order
# those runs were made with (length batching came later). GSM8k: 900 steps = one epoch of its
# 7173 training rows (the last 300 are validation), into new folders (-epoch): the default
# posterior stays what it is until this pair is trained and compared.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${TASK:-arc-easy}
if [[ $TASK == gsm8k ]]; then
  DATA=${DATA:-../shared/data/gsm8k/train.jsonl}
  STEPS=${STEPS:-900}
  NAME=${NAME:-smollm2-135m-gsm8k-epoch}
  BATCHING=${BATCHING:-length}
  CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-25}
else
  DATA=${DATA:-../shared/data/mc/$TASK/train.jsonl}
  STEPS=${STEPS:-500}
  NAME=${NAME:-smollm2-135m-$TASK}
  BATCHING=${BATCHING:-random}
  CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-50}
fi
FORM=${FORM:-text}  # multiple choice: how the model answers (src/ivonserve/choices.py)
IVONSERVE=${IVONSERVE:-.venv/bin/ivonserve}
ARMS=${ARMS:-ivon adamw}
[[ $ARMS != *ivon* ]] || : "${IVON_LR:?the IVON lr chosen by the pilots}" "${IVON_ESS:?the ess}"
[[ $ARMS != *adamw* ]] || : "${ADAMW_LR:?the AdamW lr chosen by the pilots}"

source bench/recipe.sh
common=(--data "$DATA" --mc-form "$FORM" --holdout 300 --steps "$STEPS" "${recipe[@]}"
  --eval-draws 8 --checkpoint-every "$CHECKPOINT_EVERY" --batching "$BATCHING")
ivon=("${recipe_ivon[@]}" --lr "${IVON_LR:-}" --ess "${IVON_ESS:-}")
adamw=(--optimizer adamw --lr "${ADAMW_LR:-}")

run() {
  local out=$1
  shift
  [[ -f $out/validation.json ]] && return 0
  mkdir -p "$out"
  echo "$IVONSERVE train ${common[*]} $* --out $out" > "$out/command.txt"
  "$IVONSERVE" train "${common[@]}" "$@" --out "$out" >> "$out/train.out" 2>&1
}
[[ $ARMS != *ivon* ]] || run "posteriors/$NAME" "${ivon[@]}" &
[[ $ARMS != *adamw* ]] || run "posteriors/$NAME-adamw" "${adamw[@]}" &
wait
