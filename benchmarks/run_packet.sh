#!/usr/bin/env bash
# KV Packet against full recompute and the other baselines (`kvpack eval packet`) on the default model,
# 100 rows each of HotpotQA dev and MuSiQue dev with every passage as a document, and the cross-domain
# runs (packet only) with the adapter trained on HotpotQA alone; then full recompute against packet
# with the adapter fine-tuned on 10 passages per example, at 32, 80 and 128 steps (one run each, so F1 and
# TTFT ratios pair up).
# Needs the adapters of benchmarks/train_packet.sh. Resumable: records are appended row by row and an
# interrupted run continues from them; a finished run is skipped (delete its JSON to rerun). Run it
# alone: TTFT is timed.
# Usage: bash benchmarks/run_packet.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
DATA=../shared/data
ADAPTERS=benchmarks/adapters
PACKETS=benchmarks/stores/packets   # document packets, cached once (outside the timing) and reused
mkdir -p "$OUT"
run() {  # name data adapter methods
  [ -f "$OUT/packet_$1.json" ] || kvpack eval packet --data "$DATA/$2.jsonl" --limit 100 --adapter "$3" \
    --methods "$4" --packets "$PACKETS" --records "$OUT/packet_$1.records.jsonl" --output "$OUT/packet_$1.json" \
    --json | tail -1
}
ALL=full,rerotated,packet,blend,epic,naive
run hotpotqa_dev hotpotqa_dev_300 "$ADAPTERS/mixture.safetensors" "$ALL"
run musique_dev musique_dev_200 "$ADAPTERS/mixture.safetensors" "$ALL"
run musique_dev_hotpotqa_adapter musique_dev_200 "$ADAPTERS/hotpotqa.safetensors" packet
run hotpotqa_dev_hotpotqa_adapter hotpotqa_dev_300 "$ADAPTERS/hotpotqa.safetensors" packet
run hotpotqa_dev_passages10 hotpotqa_dev_300 "$ADAPTERS/mixture_passages10.safetensors" full,packet
run musique_dev_passages10 musique_dev_200 "$ADAPTERS/mixture_passages10.safetensors" full,packet
run hotpotqa_dev_passages10_long hotpotqa_dev_300 "$ADAPTERS/mixture_passages10_long.safetensors" full,packet
run musique_dev_passages10_long musique_dev_200 "$ADAPTERS/mixture_passages10_long.safetensors" full,packet
run hotpotqa_dev_passages10_128 hotpotqa_dev_300 "$ADAPTERS/mixture_passages10_128.safetensors" full,packet
run musique_dev_passages10_128 musique_dev_200 "$ADAPTERS/mixture_passages10_128.safetensors" full,packet
