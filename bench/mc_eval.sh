#!/usr/bin/env bash
# Does the posterior pay off on multiple choice? Accuracy and calibration (`ivonserve bench mc`,
# through POST /score/choices) of the IVON posterior (mean, predictive of K = 1..10 draws, and
# with 10% uncertainty-guided pruning), its AdamW twin, AdamW + temperature scaling fitted on
# validation, and the base model with no adapter (a LoRA adapter of zeros: `train --steps 0`),
# every arm on the same questions. Resumable: rerun and finished (arm, question) pairs are skipped.
#
#   bash bench/mc_eval.sh validation   # the last 300 rows of ARC-Easy train (never trained on)
#   bash bench/mc_eval.sh test         # ARC-Easy test (2365), temperature fitted on validation
#   LIMIT=1000 bash bench/mc_eval.sh test   # its first 1000 questions (a later run without LIMIT
#                                           # scores only the rest)
#
# One server per configuration (pruning is a pool setting), float32 (scores equal peft's), pool of
# 10; each configuration adds its arms under its label to one folder.
set -euo pipefail
cd "$(dirname "$0")/.."

split=${1:?usage: bash bench/mc_eval.sh validation|test}
TASK=${TASK:-arc-easy}
FORM=${FORM:-text}  # how the model answers (src/ivonserve/choices.py): text or letter
DATA=${DATA:-../shared/data/mc/$TASK}
IVON=${IVON:-posteriors/smollm2-135m-$TASK}
ADAMW=${ADAMW:-posteriors/smollm2-135m-$TASK-adamw}
BASE=${BASE:-runs/mc-base-adapter}
RESULTS=${RESULTS:-bench/results/mc/$TASK}
PORT=${PORT:-8131}

[[ -f $BASE/adapter_model.safetensors ]] ||
  .venv/bin/ivonserve train --optimizer adamw --steps 0 --data "$DATA/train.jsonl" \
    --out "$BASE" --no-progress

# measure LABEL SERVE_FLAGS KS MODEL...: serve one configuration, score its arms, stop it.
measure() {
  local label=$1 serve_flags=$2 ks=$3 log=$out/serve-$1.log server
  shift 3
  mkdir -p "$out"
  # shellcheck disable=SC2086
  .venv/bin/ivonserve serve --posterior "ivon=$IVON" --adapter "adamw=$ADAMW" \
    --adapter "base=$BASE" --pool-size 10 --dtype float32 --port "$PORT" --max-in-flight 8 \
    --log-level warning $serve_flags >"$log" 2>&1 &
  server=$!
  until curl -sf "127.0.0.1:$PORT/ready" >/dev/null; do
    kill -0 $server 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
    sleep 2
  done
  .venv/bin/ivonserve bench mc --url "http://127.0.0.1:$PORT" "${data[@]}" --dataset "$TASK" --form "$FORM" \
    --n-models "$ks" --label "$label" --out "$out" --no-progress "${extra[@]}" \
    "${@/#/--model=}"
  kill -TERM $server
  wait $server || true
}

case $split in
  validation)  # what the temperature scaling of the K = 0 arms is fitted on (the draws'
    # validation figures are each training run's own validation.json)
    out=$RESULTS/validation
    data=(--data "$DATA/train.jsonl" --holdout 300)
    extra=()
    measure prune-none "--prune 0" 0 ivon adamw base
    ;;
  test)
    out=$RESULTS/test
    data=(--data "$DATA/test.jsonl" ${LIMIT:+--limit "$LIMIT"})
    extra=(--fit-temperature "$RESULTS/validation")
    measure prune-none "--prune 0" 0,1,2,4,8,10 ivon adamw base
    measure prune-0.1 "--prune 0.1 --prune-by variance" 0,10 ivon
    ;;
  *)
    echo "usage: bash bench/mc_eval.sh validation|test" >&2
    exit 2
    ;;
esac
