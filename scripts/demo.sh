#!/usr/bin/env bash
# The whole pipeline on a synthetic GLDv2, on CPU: data -> folds -> two backbones
# x two stages (torchrun, 2 gloo processes) -> ensemble + re-ranking -> GAP.
# Usage: scripts/demo.sh [OUT_DIR]   (make demo runs it with .venv's python)
# Variables: PYTHON (default .venv/bin/python), NPROC (processes per stage, 2), E0 / E1 (epochs of step 0 / 1,
# 20 / 30), BACKBONES ("resnet10t resnet14t"), SYNTH_ARGS (extra synthetic.py flags).
# OUT_DIR is replaced only if an earlier demo made it (it holds .demo_out); any other folder is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
PY=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-2}
E0=${E0:-20}   # epochs of step 0 and step 1
E1=${E1:-30}
D=$OUT/data
if [ -e "$OUT" ]; then
  if [ -f "$OUT/.demo_out" ]; then
    rm -rf "$OUT"
  else
    echo "demo.sh: $OUT exists and was not made by demo.sh; remove it or give another OUT_DIR" >&2
    exit 2
  fi
fi
mkdir -p "$OUT"
touch "$OUT/.demo_out"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

$PY synthetic.py --out "$D" --non-landmark-set 60 ${SYNTH_ARGS:-}
$PY preprocess.py --train-csv "$D/train_competition.csv" --out-dir "$D"

common=(--data-dir "$D" --folds-csv "$D/train_0.csv" --model-dir "$OUT/weights" --log-dir "$OUT/logs"
        --no-pretrained --num-workers 0 --batch-size 16 --fold 0)
port=29650
BACKBONES=(${BACKBONES:-resnet10t resnet14t})
for B in "${BACKBONES[@]}"; do
  # step 0: small images, the full set, every class (one line per epoch; warnings and bars go to train.err)
  echo "== $B step 0: 64 px, every class, $E0 epochs"
  $PY -m torch.distributed.run --nproc_per_node="$NPROC" --master_port=$((port++)) train.py \
      --kernel-type "demo_${B}_s0" --train-step 0 --image-size 64 --enet-type "$B" --n-epochs "$E0" "${common[@]}" \
      2>>"$OUT/train.err" | grep -E "Fold 0, Epoch|summary|skipped"
  # step 1: larger images, the clean classes, a new ArcFace head
  echo "== $B step 1: 96 px, clean classes, new head, $E1 epochs"
  $PY -m torch.distributed.run --nproc_per_node="$NPROC" --master_port=$((port++)) train.py \
      --kernel-type "demo_${B}_s1" --train-step 1 --image-size 96 --enet-type "$B" --n-epochs "$E1" "${common[@]}" \
      --load-from "$OUT/weights/demo_${B}_s0_fold0_final.pth" 2>>"$OUT/train.err" | grep -E "Fold 0, Epoch|summary|skipped"
done
$PY plot_logs.py "$OUT"/logs/demo_*.txt -o "$OUT/curves.png"

# the ensemble: every backbone's step-1 checkpoint at the step-1 size
entries=()
for B in "${BACKBONES[@]}"; do
  entries+=("{\"enet_type\": \"$B\", \"checkpoint\": \"weights/demo_${B}_s1_fold0_final.pth\", \"image_size\": 96}")
done
(IFS=,; echo "{\"models\": [${entries[*]}]}") > "$OUT/spec.json"
pred=(--data-dir "$D" --train-csv "$D/train_competition.csv" --idx2landmark "$D/idx2landmark_id.json"
      --spec "$OUT/spec.json" --cache-dir "$OUT/cache" --num-workers 0)
# beyond the original: sink queries that look like non-landmarks, with a known set, then mined from the queries
$PY predict.py "${pred[@]}" --out "$OUT/submission_nl_auto.csv" --non-landmark auto 2>/dev/null
$PY predict.py "${pred[@]}" --out "$OUT/submission_nl.csv" --non-landmark "$D/non_landmark.csv" --write-parts \
    --report "$OUT/report.html" --solution "$D/solution.csv" --logs "$OUT"/logs/demo_*.txt 2>/dev/null
# your-own-photos path: the same images as folders (gallery/<landmark id>/, queries/), predictions.csv
$PY scripts/as_folders.py split "$D" "$D/train_competition.csv" "$OUT/photos"
# (--no-calibrate: the re-ranked score, so that its GAP must equal the GLDv2 run's ensemble; then the
# calibrated confidence, which orders the same guesses by their estimated chance of being right)
folders=(--spec "$OUT/spec.json" --query-dir "$OUT/photos/queries" --idx2landmark "$D/idx2landmark_id.json"
         --num-workers 0)
$PY predict.py "${folders[@]}" --gallery-dir "$OUT/photos/gallery" --save-index "$OUT/photos/index" --no-calibrate \
    --out "$OUT/photos/predictions_raw.csv" 2>/dev/null
$PY predict.py "${folders[@]}" --index "$OUT/photos/index" --out "$OUT/photos/predictions.csv" 2>/dev/null
$PY scripts/as_folders.py submission "$OUT/photos/predictions_raw.csv" "$OUT/submission_folders.csv"
$PY scripts/as_folders.py submission "$OUT/photos/predictions.csv" "$OUT/submission_folders_calibrated.csv"
rm -f "$OUT/figures.txt"
gap() { $PY evaluate.py --submission "$OUT/$1" --solution "$D/solution.csv" --label "$2" | tee -a "$OUT/figures.txt"; }
gap submission_nl_auto.csv "ensemble + mined non-landmarks"
gap submission_nl.csv "ensemble + known non-landmarks"
gap submission_nl_classifier.csv classifier
gap submission_nl_retrieval.csv retrieval
gap submission_nl_ensemble.csv ensemble
gap submission_folders.csv "folders (own photos)"
gap submission_folders_calibrated.csv "folders, calibrated confidence"
# the README shows these figures: say whether they are still what the demo prints
README="$(dirname "$0")/../README.md"
if [ -f "$README" ]; then
    $PY - "$OUT/figures.txt" "$README" <<'PYEOF'
import re, sys
printed = open(sys.argv[1]).read().strip().splitlines()
block = re.search(r"^```\n(GAP .*?)^```", open(sys.argv[2], encoding="utf-8").read(), re.S | re.M)
shown = block.group(1).strip().splitlines() if block else []
if shown == printed:
    print("README.md shows these figures")
else:
    print("note: README.md's demo figures differ from these (its block after 'make demo'); on another CPU the last "
          "digits may differ. README.md has:\n  " + "\n  ".join(shown))
PYEOF
fi
