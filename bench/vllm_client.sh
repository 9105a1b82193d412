#!/usr/bin/env bash
# vLLM's own serving benchmark client (vllm.benchmarks.serve, a client nobody here wrote) against
# a running ivonserve: the chat backend on /v1/chat/completions and the completions backend on
# /v1/completions, streaming, random prompts, ignore_eos. Results in OUT/vllm-client/*.json.
#
#   bash bench/vllm_client.sh http://127.0.0.1:8000 [PROMPTS] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."

url=${1:-http://127.0.0.1:8000}
prompts=${2:-32}
concurrency=${3:-4}
out=${OUT:-bench/results}/vllm-client
model=$(curl -sf "$url/v1/models" | .venv/bin/python -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
tokenizer=$(.venv/bin/ivonserve prepare-model | tail -n 1)
mkdir -p "$out"
for pair in "openai-chat:/v1/chat/completions" "openai:/v1/completions"; do
  backend=${pair%%:*} endpoint=${pair##*:}
  .venv/bin/python -c "import sys; from vllm.benchmarks.serve import add_cli_args, main; from vllm.utils.argparse_utils import FlexibleArgumentParser; p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))" \
    --backend "$backend" --base-url "$url" --endpoint "$endpoint" --model "$model" \
    --tokenizer "$tokenizer" --dataset-name random --random-input-len 64 --random-output-len 32 \
    --num-prompts "$prompts" --max-concurrency "$concurrency" --ignore-eos --disable-tqdm \
    --percentile-metrics ttft,e2el \
    --save-result --result-dir "$out" --result-filename "$backend.json"
done
.venv/bin/python - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
# TTFT is the stream's opening chunk (the chat role, an empty completion text), sent at once;
# the consensus text comes only after every candidate is generated and selected: E2EL.
lines = ["| backend | completed | failed | mean TTFT ms | mean E2EL s | p99 E2EL s | output tok/s "
         "| req/s |", "|---|---|---|---|---|---|---|---|"]
for name in ("openai-chat", "openai"):
    r = json.loads((out / f"{name}.json").read_text())
    lines.append(f"| {name} | {r['completed']} | {r.get('failed', 0)} | {r['mean_ttft_ms']:.0f} "
                 f"| {r['mean_e2el_ms'] / 1e3:.1f} | {r['p99_e2el_ms'] / 1e3:.1f} "
                 f"| {r['output_throughput']:.1f} | {r['request_throughput']:.3f} |")
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
