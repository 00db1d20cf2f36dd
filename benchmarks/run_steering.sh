#!/usr/bin/env bash
# Value-space steering on the default model: `kvpack eval steering` (alpha sweep on the mid and the late
# third, layer thirds, composition on 40 code tasks; dual channel on 100 HotpotQA dev rows at six
# alphas). ~80 min on 2 CPU cores run alone, resumable from its records (every reply is logged as it is
# made; other options start over). Skipped when the result exists (delete it to rerun).
# Usage: bash benchmarks/run_steering.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
[ -f "$OUT/steering_smollm2.json" ] || kvpack eval steering --data ../shared/data/hotpotqa_dev_300.jsonl --limit 100 \
  --tasks 40 --alphas 0.25,0.5,0.75,1 --layers mid,late --max-new-tokens 256 --dual-max-new-tokens 16 \
  --records "$OUT/steering_smollm2.records.jsonl" --output "$OUT/steering_smollm2.json" --json | tail -1
