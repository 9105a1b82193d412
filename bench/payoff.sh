#!/usr/bin/env bash
# Does the posterior pay off? The likelihood benchmark (`ivonserve bench likelihood`, through
# POST /score) over the paper's ablations, every arm on the same questions. docs/pay-off.md
# ("Likelihood on GSM8k"). Resumable: rerun the same command and finished (arm, question) pairs
# are skipped.
#
#   bash bench/payoff.sh validation      # choose pruning and temperature: the 8 configurations
#                                        # below at K <= 2 on the first 50 of the last 300 rows of
#                                        # GSM8k train (kept out of training by --holdout 300)
#   bash bench/payoff.sh test            # report: the chosen configuration (CONFIG, default
#                                        # prune-none) at K = 0,1,2,4,8 against AdamW, GSM8k test,
#                                        # the first 300 questions
#   bash bench/payoff.sh test-ablations  # the other configurations on the same 300 test questions
#
# CONFIGS picks the configurations (labels below) that validation and test-ablations run (default:
# the 8 above), e.g. CONFIGS="prune-none temperature-0.1 temperature-10" for a spread sweep alone.
# IVON and ADAMW pick the pair (default: the default posterior and its twin); NAME (default
# none) names its models NAME-ivon and NAME-adamw, so another pair's arms join the same folder
# and its report pairs them with the first pair's on the same questions:
#   IVON=posteriors/smollm2-135m-gsm8k-epoch ADAMW=posteriors/smollm2-135m-gsm8k-epoch-adamw \
#     NAME=epoch bash bench/payoff.sh test
#
# One server per configuration (pruning and temperature are pool settings), float32 (scores
# equal peft's), pool of 8; each configuration adds its arms under its label to one folder.
# vLLM's OpenMP threads run on every core (ivonserve's default since 2026-12-02; the results
# here were made with VLLM_CPU_OMP_THREADS_BIND=0-1, the same cores on this 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."

split=${1:?usage: bash bench/payoff.sh validation|test|test-ablations}
DATA=${DATA:-../shared/data/gsm8k}
IVON=${IVON:-posteriors/smollm2-135m-gsm8k}
ADAMW=${ADAMW:-posteriors/smollm2-135m-gsm8k-adamw}
CONFIG=${CONFIG:-prune-none}
PORT=${PORT:-8130}
ivon=${NAME:+$NAME-}ivon
adamw=${NAME:+$NAME-}adamw

# label -> serve flags. temperature-T scales the variance, sigma^2 = T / (ess (h + delta)): with
# the posterior trained at ess 1e8, T = 10 and 100 stand for ess 1e7 and 1e6, the rest of the ess
# sweep at test time (another posterior's sweep: CONFIGS with its own T, e.g. temperature-0.1 and
# temperature-10 for one trained at ess 1e7). The temperature configurations leave pruning off.
declare -A flags=(
  [prune-none]="--prune 0"
  [prune-variance]="--prune 0.1 --prune-by variance"
  [prune-snr]="--prune 0.1 --prune-by snr"
  [prune-random]="--prune 0.1 --prune-by random"
)
ablations=(prune-none prune-variance prune-snr prune-random
  temperature-0.5 temperature-2 temperature-10 temperature-100)
[ -z "${CONFIGS:-}" ] || read -ra ablations <<<"$CONFIGS"
for label in "${ablations[@]}" "$CONFIG"; do
  [[ $label != temperature-* ]] ||
    flags[$label]="--prune 0 --posterior-temperature ${label#temperature-}"
  [ -n "${flags[$label]:-}" ] || {
    echo "payoff: no configuration $label (CONFIGS, CONFIG)" >&2
    exit 2
  }
done

# measure LABEL KS MODEL...: serve configuration LABEL, score its arms, stop it.
measure() {
  local label=$1 ks=$2 log=$out/serve-$1.log server
  shift 2
  mkdir -p "$out"
  # shellcheck disable=SC2086
  .venv/bin/ivonserve serve --posterior "$ivon=$IVON" --adapter "$adamw=$ADAMW" --pool-size 8 \
    --dtype float32 --port "$PORT" --max-in-flight 2 --log-level warning ${flags[$label]} \
    >"$log" 2>&1 &
  server=$!
  until curl -sf "127.0.0.1:$PORT/ready" >/dev/null; do
    kill -0 $server 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
    sleep 2
  done
  .venv/bin/ivonserve bench likelihood --url "http://127.0.0.1:$PORT" "${data[@]}" \
    --n-models "$ks" --label "$label" --out "$out" --no-progress "${@/#/--model=}"
  kill -TERM $server
  wait $server || true
  rm -f "$log"
}

# The ablations' arms: K <= 2 (the draws are nested, so K = 1 comes free); temperature leaves
# the mean adapter as it is, so its configurations score draws only.
ablation_ks() { case $1 in temperature-*) echo 1,2 ;; *) echo 0,1,2 ;; esac; }

case $split in
  validation)
    data=(--data "$DATA/train.jsonl" --holdout 300 --limit "${LIMIT:-50}")
    out=bench/results/likelihood/validation
    for label in "${ablations[@]}"; do
      if [ "$label" = prune-none ]; then
        measure prune-none 0,1,2 "$ivon" "$adamw"
      else
        measure "$label" "$(ablation_ks "$label")" "$ivon"
      fi
    done ;;
  test | test-ablations)
    data=(--data "$DATA/test.jsonl" --limit "${LIMIT:-300}")
    out=bench/results/likelihood/test
    if [ "$split" = test ]; then
      measure "$CONFIG" 0,1,2,4,8 "$ivon" "$adamw"
    else
      for label in "${ablations[@]}"; do
        [ "$label" = "$CONFIG" ] || measure "$label" "$(ablation_ks "$label")" "$ivon"
      done
    fi ;;
  *) echo "payoff: the split is validation, test or test-ablations, not $split" >&2; exit 2 ;;
esac
echo "payoff: $out/report.md"
