#!/usr/bin/env bash
# Knowledge base at scale: `kvpack eval routing` on synthetic facts (5,000 and 100,000), against a Chroma
# server, and on HotpotQA dev passages. Data is regenerated (seeded) under benchmarks/data/, stores live
# under benchmarks/stores/ (both ignored by git); a knowledge base already built is reused, not rebuilt.
# Usage: bash benchmarks/run_routing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
DATA=benchmarks/data
STORES=benchmarks/stores
mkdir -p "$OUT" "$DATA" "$STORES"
[ -f "$DATA/synthetic_5000.jsonl" ] || kvpack synthesize 5000 --output "$DATA/synthetic_5000.jsonl"
[ -f "$DATA/synthetic_100000.jsonl" ] || kvpack synthesize 100000 --output "$DATA/synthetic_100000.jsonl"
python benchmarks/hotpotqa_facts.py ../shared/data/hotpotqa_dev_300.jsonl "$DATA/hotpotqa_dev_facts.jsonl"

run() { local name=$1; shift; [ -f "$OUT/$name.json" ] || kvpack eval routing "$@" --json --output "$OUT/$name.json" | tail -1; }

run routing_synthetic_5000 --facts "$DATA/synthetic_5000.jsonl" --kb-dir "$STORES/kb-5000" --limit 200
run routing_synthetic_5000_probes4 --facts "$DATA/synthetic_5000.jsonl" --kb-dir "$STORES/kb-5000" --limit 1000 \
  --probes 4 --routing-only
run routing_hotpotqa_dev --facts "$DATA/hotpotqa_dev_facts.jsonl" --kb-dir "$STORES/kb-hotpotqa" --limit 100

PORT=${PORT:-8765}
chroma run --path "$STORES/chroma-server" --host 127.0.0.1 --port "$PORT" > "$STORES/chroma-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/api/v2/heartbeat" > /dev/null && break; sleep 1; done
run routing_synthetic_5000_server --facts "$DATA/synthetic_5000.jsonl" --host 127.0.0.1 --port "$PORT" --limit 1000 \
  --routing-only

run routing_synthetic_100000 --facts "$DATA/synthetic_100000.jsonl" --kb-dir "$STORES/kb-100000" --limit 1000 \
  --routing-only
