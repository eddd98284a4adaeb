#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run (about 8 minutes on an H200, compilation included).
# Usage: scripts/gpu_bench.sh [OUT_DIR]; every JSON line is appended to OUT_DIR/bench.jsonl as it comes.
# Order: cheapest and most needed first, so a run killed at its limit still returns the most.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
b() { echo "# bench.py $*" >> "$OUT/bench.jsonl"; $PY scripts/bench.py "$@" 2>>"$OUT/err.log" | tee -a "$OUT/bench.jsonl"; }
$PY -c 'import torch; print("#", torch.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/bench.jsonl"
git rev-parse HEAD 2>/dev/null | sed 's/^/# commit /' >> "$OUT/bench.jsonl"
# training step: eager against the original's behaviour, the fp32 head's cost, then compiled
b train --enet-type tf_efficientnet_b3_ns --image-size 256 --batch-size 128 --steps 10 --rounds 3 --baseline --compare-head
b train --enet-type tf_efficientnet_b5_ns --image-size 768 --batch-size 13 --steps 10 --rounds 3 --baseline
b extract --enet-type tf_efficientnet_b5_ns --image-size 768 --batch-size 32 --steps 10 --rounds 3 --baseline
b knn --queries 10000 --gallery 1580000 --dim 512 --models 9 --rounds 3
b loader --image-size 256 --make 512 --images 512 --workers 16 --batch-size 128 --rounds 3 --baseline
b loader --image-size 768 --make 256 --images 256 --workers 16 --batch-size 13 --rounds 3 --baseline
b train --enet-type tf_efficientnet_b3_ns --image-size 256 --batch-size 128 --steps 10 --rounds 3 --compile
b extract --enet-type tf_efficientnet_b5_ns --image-size 768 --batch-size 32 --steps 10 --rounds 3 --compile
b train --enet-type nest101 --image-size 768 --batch-size 16 --steps 10 --rounds 3 --baseline
echo "# done" >> "$OUT/bench.jsonl"
