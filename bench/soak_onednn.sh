#!/usr/bin/env bash
# Does capping oneDNN's primitive cache stop vLLM's CPU worker from growing? The soak
# (bench/soak.py: 600 requests at concurrency 4, a phase of long prompts, a burst) against one
# server per choice, each started the way `make serve` starts it (tcmalloc, the product's
# defaults), one after the other on a quiet machine; memory of every process of the server and
# latency side by side in OUT/report.md (docs/benchmarks.md: oneDNN's primitive cache). A cap is
# a number (1024 is oneDNN's own default), or `unset`: no variable, ivonserve's default
# (engine.CPU_ONEDNN_CACHE_CAPACITY).
#
#   bash bench/soak_onednn.sh                 # CAPS="1024 64" REQUESTS=600
set -euo pipefail
cd "$(dirname "$0")/.."

CAPS=${CAPS:-1024 64}
REQUESTS=${REQUESTS:-600}
PORT=${PORT:-8123}
OUT=${OUT:-bench/results/soak-onednn}
TCMALLOC=$(ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1 || true)
mkdir -p "$OUT"
for cap in $CAPS; do
  log=$OUT/serve-$cap.log
  env=(-u ONEDNN_PRIMITIVE_CACHE_CAPACITY)
  [ "$cap" = unset ] || env+=("ONEDNN_PRIMITIVE_CACHE_CAPACITY=$cap")
  [ -z "$TCMALLOC" ] || env+=("LD_PRELOAD=$TCMALLOC")
  env "${env[@]}" .venv/bin/ivonserve serve --pool-size 4 --port "$PORT" --max-model-len 1024 \
    --max-in-flight 4 --max-queued 8 --log-level warning >"$log" 2>&1 &
  server=$!
  until curl -sf "127.0.0.1:$PORT/ready" >/dev/null; do
    kill -0 $server 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
    sleep 2
  done
  .venv/bin/python bench/soak.py --url "http://127.0.0.1:$PORT" --requests "$REQUESTS" \
    --concurrency 4 --burst 48 --mix 1x1,2x2,4x2 --max-tokens 32 \
    --prompts ../shared/data/gsm8k/test.jsonl --server-pid $server --out "$OUT/$cap" || true
  kill -TERM $server
  wait $server || true
  rm -f "$log"
done
.venv/bin/python - "$OUT" $CAPS <<'EOF'
import json, sys
from pathlib import Path

out, caps = Path(sys.argv[1]), sys.argv[2:]
lines = ["| oneDNN cache cap | memory | MiB, steady phase first -> last | settled trend MiB/min "
         "| verdict | steady p50 s | steady wall s | checks |", "|---|---|---|---|---|---|---|---|"]
for cap in caps:
    r = json.loads((out / cap / "soak.json").read_text())
    steady = r["phases"]["steady"]
    ok = "all pass" if r["ok"] else ", ".join(k for k, v in r["checks"].items() if not v) + " FAIL"
    for key, label in (("api", "ivonserve API process"), ("tree", "server's process tree")):
        m = r["memory"][key]
        lines.append(f"| {cap} | {label} | {m['steady']['first_mib']:.0f} -> "
                     f"{m['steady']['last_mib']:.0f} | {m['settled']['slope_mib_per_min']:+.2f} "
                     f"| {'flat' if m['flat'] else 'GROWING'} | {steady['latency_s']['p50']:.2f} "
                     f"| {steady['wall_s']:.0f} | {ok} |")
    for name, m in r["memory"].get("processes", {}).items():
        lines.append(f"| {cap} | {name} | {m['first_mib']:.0f} -> {m['last_mib']:.0f} | | | | | |")
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
