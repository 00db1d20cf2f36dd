#!/usr/bin/env bash
# Knowledge base at scale: `kvpack eval routing` on synthetic facts (5,000 and 100,000), against a Chroma
# server, and on HotpotQA dev passages; hybrid routing (the default) beside the paper's dense-only
# routing, full 384-dim vectors beside PCA-128. Data is regenerated (seeded) under benchmarks/data/,
# stores live under benchmarks/stores/ (both ignored by git). Resumable: a result already written is
# skipped and a knowledge base already built is reused.
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

S5=(--facts "$DATA/synthetic_5000.jsonl")
S100=(--facts "$DATA/synthetic_100000.jsonl")
run routing_synthetic_5000 "${S5[@]}" --kb-dir "$STORES/kb-5000" --limit 200
run routing_synthetic_5000_dense "${S5[@]}" --kb-dir "$STORES/kb-5000" --limit 1000 --lexical-weight 0 --routing-only
run routing_synthetic_5000_dense_probes4 "${S5[@]}" --kb-dir "$STORES/kb-5000" --limit 1000 --lexical-weight 0 \
  --probes 4 --routing-only
# the lazy KV build at each precision, side by side on one knowledge base (the model in bf16 on a CPU with AVX512-BF16)
run routing_synthetic_5000_float32 "${S5[@]}" --kb-dir "$STORES/kb-5000" --limit 100 --dtype float32
run routing_synthetic_5000_bfloat16 "${S5[@]}" --kb-dir "$STORES/kb-5000" --limit 100 --dtype bfloat16
run routing_synthetic_5000_dims128 "${S5[@]}" --kb-dir "$STORES/kb-5000-d128" --dims 128 --limit 1000 --routing-only

HQ=(--facts "$DATA/hotpotqa_dev_facts.jsonl" --kb-dir "$STORES/kb-hotpotqa")
run routing_hotpotqa_dev "${HQ[@]}" --limit 100
run routing_hotpotqa_dev_dense "${HQ[@]}" --limit 300 --lexical-weight 0 --routing-only

PORT=${PORT:-8765}
SERVER=
trap '[ -z "$SERVER" ] || kill $SERVER 2>/dev/null || true' EXIT
serve() {  # a Chroma server on its own directory, replacing the last one
  [ -z "$SERVER" ] || { kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; }  # it may have died
  chroma run --path "$STORES/$1" --host 127.0.0.1 --port "$PORT" > "$STORES/$1.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/api/v2/heartbeat" > /dev/null && break; sleep 1; done
}
serve chroma-server
run routing_synthetic_5000_server "${S5[@]}" --host 127.0.0.1 --port "$PORT" --limit 100
# the 100,000-fact base on a server of its own: its directory's size (du -sb, divided by 100,000) is the
# server row's bytes per fact, which the client cannot see
serve chroma-server-100000
run routing_synthetic_100000_server "${S100[@]}" --host 127.0.0.1 --port "$PORT" --dims 128 --limit 100
[ -f "$OUT/routing_synthetic_100000_server.bytes" ] || du -sb "$STORES/chroma-server-100000" > "$OUT/routing_synthetic_100000_server.bytes"

run routing_synthetic_100000_dims128 "${S100[@]}" --kb-dir "$STORES/kb-100000-d128" --dims 128 --limit 100
run routing_synthetic_100000_dims128_routing "${S100[@]}" --kb-dir "$STORES/kb-100000-d128" --limit 1000 --routing-only
