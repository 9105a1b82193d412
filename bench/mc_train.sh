#!/usr/bin/env bash
# The two ARC-Easy posteriors of docs/pay-off.md: IVON and its AdamW twin, each with the
# settings the pilots chose on validation (bench/mc_pilots.sh, bench/results/mc-pilots/), at the
# same budget of STEPS steps of batch 8 (500 = 2 epochs of the 1941 training rows), the authors'
# recipe otherwise. Side by side with one thread each; resumable (rerun the same command: each run
# continues from its checkpoint, which is committed as the run goes so another machine can too).
#
# ARMS picks which of the two to run (default both); a finished run (validation.json) is skipped.
#   IVON_LR=0.3 IVON_ESS=1e6 ADAMW_LR=1e-3 bash bench/mc_train.sh
#   ADAMW_LR=2e-4 ARMS=adamw bash bench/mc_train.sh
# --batching random: the batch order these runs were made with (length batching came later).
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${TASK:-arc-easy}
FORM=${FORM:-text}  # how the model answers (src/ivonserve/choices.py): text or letter
DATA=${DATA:-../shared/data/mc/$TASK/train.jsonl}
STEPS=${STEPS:-500}
IVONSERVE=${IVONSERVE:-.venv/bin/ivonserve}
ARMS=${ARMS:-ivon adamw}
[[ $ARMS != *ivon* ]] || : "${IVON_LR:?the IVON lr chosen by the pilots}" "${IVON_ESS:?the ess}"
[[ $ARMS != *adamw* ]] || : "${ADAMW_LR:?the AdamW lr chosen by the pilots}"

common=(--data "$DATA" --mc-form "$FORM" --holdout 300 --steps "$STEPS" --batch-size 8 --lr-schedule linear
  --weight-decay 0 --eval-draws 8 --threads 1 --checkpoint-every 50 --seed 0 --no-progress
  --batching random)
ivon=(--optimizer ivon --lr "${IVON_LR:-}" --ess "${IVON_ESS:-}" --clip-radius 1e-3
  --beta2 0.99999 --hess-init 1e-3)
adamw=(--optimizer adamw --lr "${ADAMW_LR:-}")

run() {
  local out=$1
  shift
  [[ -f $out/validation.json ]] && return 0
  mkdir -p "$out"
  echo "$IVONSERVE train ${common[*]} $* --out $out" > "$out/command.txt"
  "$IVONSERVE" train "${common[@]}" "$@" --out "$out" >> "$out/train.out" 2>&1
}
[[ $ARMS != *ivon* ]] || run "posteriors/smollm2-135m-$TASK" "${ivon[@]}" &
[[ $ARMS != *adamw* ]] || run "posteriors/smollm2-135m-$TASK-adamw" "${adamw[@]}" &
wait
