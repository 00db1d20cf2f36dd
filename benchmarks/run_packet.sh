#!/usr/bin/env bash
# KV Packet against full recompute and the other baselines (`kvpack eval packet`) on the default model,
# 100 rows each of HotpotQA dev and MuSiQue dev with every passage as a document, and the cross-domain
# runs (packet only) with the adapter trained on HotpotQA alone; then full recompute against packet
# with the adapter fine-tuned on 10 passages per example, at 32, 80 and 128 steps (one run each, so F1 and
# TTFT ratios pair up). Last, the 128-step run and the first shipped adapter's (mixture) run continued over the
# whole dev sets (300 and 200 rows, full and packet only), to narrow the F1 intervals: the first 100 rows
# of each are the 100-row run's records, copied, not rerun. Then the 16 + 16 token adapter at 82 steps
# (mixture16_passages10), step for step against mixture_passages10, and its run continued over the whole
# dev sets like the two above.
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
run() {  # name data adapter methods [rows, default 100]
  [ -f "$OUT/packet_$1.json" ] || kvpack eval packet --data "$DATA/$2.jsonl" --limit "${5:-100}" --adapter "$3" \
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
continued() {  # name-of-a-100-row-run data adapter methods rows: that run's records seed this one's
  [ -f "$OUT/packet_$1_all.records.jsonl" ] || cp "$OUT/packet_$1.records.jsonl" "$OUT/packet_$1_all.records.jsonl"
  run "$1_all" "$2" "$3" "$4" "$5"
}
continued hotpotqa_dev_passages10_128 hotpotqa_dev_300 "$ADAPTERS/mixture_passages10_128.safetensors" full,packet 300
continued musique_dev_passages10_128 musique_dev_200 "$ADAPTERS/mixture_passages10_128.safetensors" full,packet 200
continued musique_dev musique_dev_200 "$ADAPTERS/mixture.safetensors" full,packet 200
continued hotpotqa_dev hotpotqa_dev_300 "$ADAPTERS/mixture.safetensors" full,packet 300
run hotpotqa_dev_wide hotpotqa_dev_300 "$ADAPTERS/mixture16_passages10.safetensors" full,packet
run musique_dev_wide musique_dev_200 "$ADAPTERS/mixture16_passages10.safetensors" full,packet
continued hotpotqa_dev_wide hotpotqa_dev_300 "$ADAPTERS/mixture16_passages10.safetensors" full,packet 300
continued musique_dev_wide musique_dev_200 "$ADAPTERS/mixture16_passages10.safetensors" full,packet 200
# The twelfth session's harness (every method's packet files read just before its timing, so methods
# sharing the plain files no longer profit from whoever ran first): every baseline again, N = 100, with
# the shipped adapter (the default: no --adapter).
fair() {  # name data
  [ -f "$OUT/packet_$1.json" ] || kvpack eval packet --data "$DATA/$2.jsonl" --limit 100 --methods "$ALL" \
    --packets "$PACKETS" --records "$OUT/packet_$1.records.jsonl" --output "$OUT/packet_$1.json" --json | tail -1
}
fair musique_dev_same_state musique_dev_200
fair hotpotqa_dev_same_state hotpotqa_dev_300
# The sixteenth session: the shipped adapter fine-tuned on-policy (train_packet.sh on_policy), full
# recompute against packet, N = 100 each, the same settings as the adapter runs above.
run hotpotqa_dev_onpolicy hotpotqa_dev_300 "$ADAPTERS/mixture_onpolicy.safetensors" full,packet
run musique_dev_onpolicy musique_dev_200 "$ADAPTERS/mixture_onpolicy.safetensors" full,packet
# ... and continued over the whole dev sets (300 and 200 rows; the first 100 copied from the runs above)
continued hotpotqa_dev_onpolicy hotpotqa_dev_300 "$ADAPTERS/mixture_onpolicy.safetensors" full,packet 300
continued musique_dev_onpolicy musique_dev_200 "$ADAPTERS/mixture_onpolicy.safetensors" full,packet 200
