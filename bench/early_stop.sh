#!/usr/bin/env bash
# Early stopping (issue 30, docs/early-stopping.md): every rule against `off` on the same
# questions, grid point and seeds, through the GSM8k client (`ivonserve bench gsm8k
# --early-stop`), then one table and one plot (bench/early_stop_tables.py). Resumable: rerun the
# same command and finished (arm, question) pairs are skipped.
#
#   bash bench/early_stop.sh                        # GSM8k test (first 100) and SVAMP (first
#                                                   # 200), 4 x 8, temperature 0.7: hours here
#   LIMIT=3 OUT=/tmp/es bash bench/early_stop.sh    # a smoke run of the tooling (minutes)
#
# Arms: off, exact, confidence at each of THRESHOLDS (its curve of tokens saved against
# agreement with off), and off-repeat: off once more, last. Seeded sampling on the real model is
# not bit-reproducible from run to run (likely float32 rounding that changes with how the steps
# are batched: a sample near a tie goes the other way), so off-repeat's agreement with off is the
# floor every arm's agreement is read against. CONCURRENCY requests in flight (default 4: latency under load, and the
# requests per second of each arm). One server (the default posterior, MAX_IN_FLIGHT 4) serves
# every arm; URL=... measures a running one instead. REPLAY="DIR ..." (bench/early_stop_replay.py
# folders) draws their replayed thresholds behind the live arms in the plot.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data}
DATASETS=${DATASETS:-gsm8k svamp}
GRID=${GRID:-4x8}
THRESHOLDS=${THRESHOLDS:-0.8 0.9 0.95 0.99}
CONCURRENCY=${CONCURRENCY:-4}
TEMPERATURE=${TEMPERATURE:-0.7}
MAX_TOKENS=${MAX_TOKENS:-256}
PORT=${PORT:-8140}
OUT=${OUT:-bench/results/early-stop}
URL=${URL:-}

limit_of() {
  case $1 in
    gsm8k) echo "${LIMIT:-100}" ;;
    svamp) echo "${LIMIT:-200}" ;;
    *) echo "${LIMIT:-100}" ;;
  esac
}

server=
if [ -z "$URL" ]; then
  URL="http://127.0.0.1:$PORT"
  mkdir -p "$OUT"
  log=$OUT/serve.log
  .venv/bin/ivonserve serve --port "$PORT" --max-in-flight 4 --log-level warning >"$log" 2>&1 &
  server=$!
  trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
  until curl -sf "$URL/ready" >/dev/null; do
    kill -0 $server 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
    sleep 2
  done
fi

# arm NAME DATASET [--early-stop RULE [--early-stop-threshold T]]
arm() {
  local name=$1 dataset=$2
  shift 2
  .venv/bin/ivonserve bench gsm8k --url "$URL" --data "$DATA/$dataset/test.jsonl" \
    --limit "$(limit_of "$dataset")" --dataset "$dataset" --grid "$GRID" \
    --concurrency "$CONCURRENCY" --temperature "$TEMPERATURE" --max-tokens "$MAX_TOKENS" \
    --label "$name" --out "$OUT/$dataset/$name" --no-progress "$@"
}

for dataset in $DATASETS; do
  arm off "$dataset" --early-stop off
  arm exact "$dataset" --early-stop exact
  for threshold in $THRESHOLDS; do
    arm "confidence-$threshold" "$dataset" --early-stop confidence \
      --early-stop-threshold "$threshold"
  done
  arm off-repeat "$dataset" --early-stop off
done
replays=()
for folder in ${REPLAY:-}; do replays+=(--replay "$folder"); done
.venv/bin/python bench/early_stop_tables.py "$OUT" "${replays[@]}"
