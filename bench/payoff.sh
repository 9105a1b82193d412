#!/usr/bin/env bash
# Does the posterior pay off? The likelihood benchmark (`ivonserve bench likelihood`, through
# POST /score) over the paper's ablations, every arm on the same questions. README: "Does it pay
# off?". Resumable: rerun the same command and finished (arm, question) pairs are skipped.
#
#   bash bench/payoff.sh validation   # choose: pruning and temperature, on the first 100 of the
#                                     # last 300 rows of GSM8k train (kept out of training by
#                                     # --holdout 300)
#   bash bench/payoff.sh test         # report: GSM8k test, the first 300 questions
#
# One server per configuration (pruning and temperature are pool settings), float32 (scores
# equal peft's), pool of 8; each configuration adds its arms under its label to one folder.
set -euo pipefail
cd "$(dirname "$0")/.."

split=${1:?usage: bash bench/payoff.sh validation|test}
DATA=${DATA:-../shared/data/gsm8k}
IVON=${IVON:-posteriors/smollm2-135m-gsm8k}
ADAMW=${ADAMW:-posteriors/smollm2-135m-gsm8k-adamw}
PORT=${PORT:-8130}
case $split in
  validation) data=(--data "$DATA/train.jsonl" --holdout 300 --limit ${LIMIT:-100}) ;;
  test) data=(--data "$DATA/test.jsonl" --limit ${LIMIT:-300}) ;;
  *) echo "payoff: split is validation or test, not $split" >&2; exit 2 ;;
esac
out=bench/results/likelihood/$split

# label | serve flags | arms (--n-models) | models. K up to 8 without pruning at T = 1 (the K
# ablation, against the mean and AdamW); the pruning and temperature ablations at K up to 4, the
# server's default n_models (K = 1 and 2 come free: the draws are nested). Temperature T scales
# the variance, sigma^2 = T / (ess (h + delta)): with the posterior trained at ess 1e8, T = 10 and
# 100 stand for ess 1e7 and 1e6, the rest of the ess sweep at test time.
configs=(
  "prune-none|--prune 0|0,1,2,4,8|--model ivon --model adamw"
  "prune-variance|--prune 0.1 --prune-by variance|0,1,2,4|--model ivon"
  "prune-snr|--prune 0.1 --prune-by snr|0,1,2,4|--model ivon"
  "prune-random|--prune 0.1 --prune-by random|0,1,2,4|--model ivon"
  "temperature-0.5|--prune 0 --sampling-temperature 0.5|1,2,4|--model ivon"
  "temperature-2|--prune 0 --sampling-temperature 2|1,2,4|--model ivon"
  "temperature-10|--prune 0 --sampling-temperature 10|1,2,4|--model ivon"
  "temperature-100|--prune 0 --sampling-temperature 100|1,2,4|--model ivon"
)
for config in "${configs[@]}"; do
  IFS='|' read -r label flags ks models <<<"$config"
  log=$out/serve-$label.log
  mkdir -p "$out"
  # shellcheck disable=SC2086
  .venv/bin/ivonserve serve --posterior "ivon=$IVON" --adapter "adamw=$ADAMW" --pool-size 8 \
    --dtype float32 --port "$PORT" --max-in-flight 2 --log-level warning $flags >"$log" 2>&1 &
  server=$!
  until curl -sf "127.0.0.1:$PORT/ready" >/dev/null; do
    kill -0 $server 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
    sleep 2
  done
  # shellcheck disable=SC2086
  .venv/bin/ivonserve bench likelihood --url "http://127.0.0.1:$PORT" "${data[@]}" $models \
    --n-models "$ks" --label "$label" --out "$out" --no-progress
  kill -TERM $server
  wait $server || true
  rm -f "$log"
done
echo "payoff: $out/report.md"
