#!/usr/bin/env bash
# The candidate banks of the test-time-scaling comparison (issue 38, docs/pay-off.md "Test-time
# scaling"): one `ivonserve bench gsm8k --candidates` run per configuration, every candidate of
# every question kept (src/ivonserve/bench/bank.py), replayed offline at every budget and split by
# `ivonserve bench tts`. One server serves every bank: the default posterior (IVON, epoch, ess 1e8)
# as `ivon`, the same folder at the ess it was trained with (1e7; made with `posterior set-ess`) as
# `ivon-ess1e7`, and its AdamW twin as `adamw`; pool 8, max in flight 4, bf16 on an AVX512-BF16
# CPU (the server's default). Temperature 0.7 (greedy for 0x1), max_tokens 256, seed 0 + index.
#
# The banks grow together, a chunk of questions at a time (LIMITS), so that at every stop all of
# them hold the same questions and the replay pairs them. Resumable: rerun the same command and
# only the questions a bank lacks are asked (a fresh checkout resumes from records.jsonl.gz).
#
#   setsid nohup bash bench/tts.sh > bench/results/tts/run.log 2>&1 &   # GSM8k test, first 500
#   LIMITS=20 OUT=/tmp/tts bash bench/tts.sh                           # the cost on 20 questions
#   BANKS="ivon-ess1e6:ivon-ess1e6:8x8" ESS_COPIES="1e7 1e6" bash bench/tts.sh   # more spreads
#   bash bench/tts.sh replay                # only the replay of the banks as they are (minutes)
#
# The replay (`ivonserve bench tts`, OUT/replay): every bank against the IVON mean's 0 x B at
# the same budget, and the comparison table against the mean's 0x32, its greedy 0x1 and AdamW's
# 0x32.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data}
DATASET=${DATASET:-gsm8k}
LIMITS=${LIMITS:-$(seq -s " " 50 50 500)}
OUT=${OUT:-bench/results/tts/$DATASET}
PORT=${PORT:-8141}
POSTERIOR=${POSTERIOR:-posteriors/smollm2-135m-gsm8k-epoch}
ADAMW=${ADAMW:-posteriors/smollm2-135m-gsm8k-epoch-adamw}
POOL_SIZE=${POOL_SIZE:-8}
ESS_COPIES=${ESS_COPIES:-1e7}
# NAME:MODEL:GRID, in the order each chunk runs them (cheapest first)
BANKS=${BANKS:-ivon-greedy:ivon:0x1 ivon-mean:ivon:0x32 adamw-greedy:adamw:0x1
adamw-mean:adamw:0x32 ivon-ess1e8:ivon:8x8 ivon-ess1e7:ivon-ess1e7:8x8}
PY=.venv/bin/python

replay() {
  local folders=()
  for bank in $BANKS; do folders+=("$OUT/${bank%%:*}"); done
  .venv/bin/ivonserve bench tts "${folders[@]}" --baseline ivon-mean --versus ivon-greedy:0x1 \
    --versus adamw-mean:0x32 --out "$OUT/replay"
}
if [ "${1:-}" = replay ]; then
  replay
  exit
fi

mkdir -p "$OUT"
# the posterior at other spreads: the same tensors (linked), posterior.json's ess rewritten
copies=$OUT/.posteriors
posteriors=(--posterior "ivon=$POSTERIOR")
for ess in $ESS_COPIES; do
  copy=$copies/ess$ess
  mkdir -p "$copy"
  for file in "$POSTERIOR"/*.safetensors "$POSTERIOR"/adapter_config.json; do
    ln -sf "$(realpath "$file")" "$copy/"
  done
  cp "$POSTERIOR/posterior.json" "$copy/"
  .venv/bin/ivonserve posterior set-ess "$copy" "$ess" >/dev/null
  posteriors+=(--posterior "ivon-ess$ess=$copy")
done

log=$OUT/serve.log
.venv/bin/ivonserve serve "${posteriors[@]}" --adapter "adamw=$ADAMW" --pool-size "$POOL_SIZE" \
  --port "$PORT" --max-in-flight 4 --kv-cache-gib 4 --log-level warning >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
until curl -sf "127.0.0.1:$PORT/ready" >/dev/null; do
  kill -0 $server 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
  sleep 5
done
echo "$(date -u +%FT%TZ) server ready; load $(cut -d' ' -f1-3 /proc/loadavg)"

for limit in $LIMITS; do
  for bank in $BANKS; do
    IFS=: read -r name model grid <<<"$bank"
    held=$({ cat "$OUT/$name/records.jsonl" || zcat "$OUT/$name/records.jsonl.gz"; } 2>/dev/null |
      wc -l)
    ((held >= limit)) && continue # asked before: a resumed run goes on where it stopped
    began=$(date +%s)
    .venv/bin/ivonserve bench gsm8k --url "http://127.0.0.1:$PORT" --model "$model" \
      --data "$DATA/$DATASET/test.jsonl" --dataset "$DATASET" --limit "$limit" --grid "$grid" \
      --concurrency 4 --max-tokens 256 --temperature 0.7 --candidates --label "$name" \
      --out "$OUT/$name" --no-progress >/dev/null
    $PY -c "import sys; from ivonserve.bench.bank import pack_records; pack_records(sys.argv[1])" \
      "$OUT/$name"
    echo "$(date -u +%FT%TZ) $name: first $limit in $(($(date +%s) - began)) s;" \
      "load $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
replay
