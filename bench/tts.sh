#!/usr/bin/env bash
# The paper's test-time-scaling comparison through the client (docs/pay-off.md: "Test-time
# scaling on GSM8k and SVAMP"): one server serving the IVON posterior and its AdamW twin, the
# server's defaults (bf16 on this CPU, the grouped LoRA kernel), temperature 0.7 and max_tokens
# 256 for the sampled arms, greedy for 0x1; IVON 0x1, 0x32, 4x8 (and 8x4 with EXTRA=1), AdamW
# 0x1, 0x32; then `bench compare` per data set (McNemar tests). Resumable: rerun to finish an
# interrupted run.
#
#   bash bench/tts.sh            # GSM8k test, first 100 questions; SVAMP, first 200
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data}
IVON=${IVON:-posteriors/smollm2-135m-gsm8k}
ADAMW=${ADAMW:-posteriors/smollm2-135m-gsm8k-adamw}
PORT=${PORT:-8140}
OUT=${OUT:-bench/results/tts}
ivon_grid=0x1,0x32,4x8${EXTRA:+,8x4}
log=$OUT/serve.log
mkdir -p "$OUT"
.venv/bin/ivonserve serve --posterior "ivon=$IVON" --adapter "adamw=$ADAMW" --pool-size 8 \
  --port "$PORT" --max-in-flight 4 --kv-cache-gib 3 --log-level warning >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
until curl -sf "127.0.0.1:$PORT/ready" >/dev/null; do
  kill -0 $server 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
  sleep 2
done
for set in "gsm8k:${GSM8K_LIMIT:-100}" "svamp:${SVAMP_LIMIT:-200}"; do
  name=${set%%:*} limit=${set##*:}
  for arm in "ivon:$ivon_grid" "adamw:0x1,0x32"; do
    model=${arm%%:*} grid=${arm##*:}
    .venv/bin/ivonserve bench gsm8k --url "http://127.0.0.1:$PORT" --model "$model" \
      --data "$DATA/$name/test.jsonl" --limit "$limit" --grid "$grid" --concurrency 4 \
      --max-tokens 256 --temperature 0.7 --out "$OUT/$name-$model" --no-progress
  done
  .venv/bin/ivonserve bench compare "$OUT/$name-ivon" "$OUT/$name-adamw" --out "$OUT/$name"
done
