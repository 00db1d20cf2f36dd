#!/usr/bin/env bash
# Held-out KL(full attention || packet layout) (`kvpack packet divergence`) of plain caches and of each
# adapter of benchmarks/train_packet.sh, on dev rows no adapter was trained on, every passage a document
# in the data's order (as `kvpack eval packet` lays them out). Minutes instead of the hour an F1 eval
# takes. Each result is skipped when it exists (delete it to rerun).
# Usage: bash benchmarks/run_packet_divergence.sh [ROWS_HOTPOTQA] [ROWS_MUSIQUE]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
DATA=../shared/data
ADAPTERS=benchmarks/adapters
mkdir -p "$OUT"
score() {  # data rows adapter-name adapter
  local out="$OUT/packet_divergence_$1_$3.json"
  # kept only if it scored as many rows as asked now (another row count is rerun, not reported as this one)
  [ -f "$out" ] && [ "$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["n"])' "$out")" = "$2" ] && return
  kvpack packet divergence --data "$DATA/$1.jsonl" --limit "$2" --adapter "$4" --json | tail -1 > "$out.tmp"
  mv "$out.tmp" "$out"  # a failed run leaves no result behind
}
for adapter in none mixture mixture_passages10 mixture_passages10_long mixture_passages10_128 mixture16 mixture16_passages10 \
  mixture16_passages10_long mixture_dataorder; do
  path=$([ "$adapter" = none ] && echo none || echo "$ADAPTERS/$adapter.safetensors")
  score hotpotqa_dev_300 "${1:-12}" "$adapter" "$path"
  score musique_dev_200 "${2:-8}" "$adapter" "$path"
done
