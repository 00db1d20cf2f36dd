#!/usr/bin/env bash
# How far does the F1 / full ratio move for a method that changes nothing but arithmetic? Full recompute
# run in bfloat16 over the whole dev sets (300 HotpotQA and 200 MuSiQue rows, every passage a document),
# to be compared with the fp32 full recompute of benchmarks/run_packet.sh by benchmarks/report.py: the
# same F1 / full ratio and agreement with full that packet is judged by, for a near-exact perturbation.
# Resumable like run_packet.sh (records appended row by row; a finished run is skipped).
# Usage: bash benchmarks/run_packet_precision.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
DATA=../shared/data
for pair in hotpotqa_dev:hotpotqa_dev_300:300 musique_dev:musique_dev_200:200; do
  IFS=: read -r name data rows <<<"$pair"
  [ -f "$OUT/packet_${name}_full_bf16.json" ] || kvpack eval packet --data "$DATA/$data.jsonl" --limit "$rows" \
    --methods full --dtype bfloat16 --records "$OUT/packet_${name}_full_bf16.records.jsonl" \
    --output "$OUT/packet_${name}_full_bf16.json" --json | tail -1
done
