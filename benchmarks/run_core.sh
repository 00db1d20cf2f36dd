#!/usr/bin/env bash
# Core benchmarks (issue: exact Knowledge Packs). Resumable: per-row records live in
# benchmarks/results/*.records.jsonl; rerunning skips finished rows. Usage: bash benchmarks/run_core.sh [N_EQ] [N_ACC]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
N_EQ=${1:-100}
N_ACC=${2:-50}
OUT=benchmarks/results
export KVPACK_STORE=${KVPACK_STORE:-benchmarks/stores}
mkdir -p "$OUT"
# A finished result is kept (delete its JSON to rerun): the committed records were made on another machine
# (and under an older fingerprint definition), so a rerun redoes every row rather than resume them.
[ -f "$OUT/equivalence_hotpotqa_dev.json" ] || kvpack eval equivalence --data "$DATA/hotpotqa_dev_300.jsonl" \
  --limit "$N_EQ" --raw --records "$OUT/equivalence_hotpotqa_dev.records.jsonl" \
  --output "$OUT/equivalence_hotpotqa_dev.json"
[ -f "$OUT/accumulation_hotpotqa_dev.json" ] || kvpack eval accumulation --data "$DATA/hotpotqa_dev_300.jsonl" \
  --limit "$N_ACC" --steps 5 --records "$OUT/accumulation_hotpotqa_dev.records.jsonl" \
  --output "$OUT/accumulation_hotpotqa_dev.json"
