#!/usr/bin/env bash
# CUDA smoke run: train.py as one process (bf16 and fp16 AMP), then under torchrun
# with NCCL (SyncBatchNorm, DDP), a step-1 stage, predict.py on the GPU, evaluate.py.
# Usage: scripts/gpu_smoke.sh [OUT_DIR]; results are appended to OUT_DIR/smoke.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_smoke}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
D=$(mktemp -d)
log() { echo "$*" | tee -a "$OUT/smoke.log"; }
log "== $(date) $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')"
$PY synthetic.py --out "$D" >/dev/null
$PY preprocess.py --train-csv "$D/train_competition.csv" --out-dir "$D" >/dev/null
C=(--data-dir "$D" --folds-csv "$D/train_0.csv" --model-dir "$D/w" --log-dir "$D/l" --no-pretrained
   --num-workers 4 --batch-size 32 --enet-type tf_efficientnet_b0_ns)
t=$(date +%s)
$PY train.py --kernel-type one_bf16 --train-step 0 --image-size 128 --n-epochs 2 "${C[@]}" 2>>"$OUT/err.log" | grep -E "Fold|out_dim" | tee -a "$OUT/smoke.log"
$PY train.py --kernel-type one_fp16 --train-step 0 --image-size 128 --n-epochs 1 --amp fp16 "${C[@]}" 2>>"$OUT/err.log" | grep Fold | tee -a "$OUT/smoke.log"
log "single-process runs: $(( $(date +%s) - t )) s"
t=$(date +%s)
$PY -m torch.distributed.run --nproc_per_node=1 train.py --kernel-type ddp0 --train-step 0 --image-size 128 --n-epochs 2 "${C[@]}" 2>>"$OUT/err.log" | grep -E "Fold|world" | tee -a "$OUT/smoke.log"
$PY -m torch.distributed.run --nproc_per_node=1 train.py --kernel-type ddp1 --train-step 1 --image-size 160 --n-epochs 2 \
    --load-from "$D/w/ddp0_fold0_final.pth" --save-epochs 2 "${C[@]}" 2>>"$OUT/err.log" | grep Fold | tee -a "$OUT/smoke.log"
log "torchrun (NCCL) runs: $(( $(date +%s) - t )) s"
$PY -c "
import torch; c = torch.load('$D/w/ddp1_fold0_final.pth', weights_only=True)
print('checkpoint', c['epoch'], c['out_dim'], c['args']['amp'], sum(k.startswith('module.') for k in c['model_state_dict']))" | tee -a "$OUT/smoke.log"
echo '{"models": [{"enet_type": "tf_efficientnet_b0_ns", "checkpoint": "'"$D"'/w/ddp1_fold0_ep2.pth", "image_size": 160}]}' > "$D/spec.json"
t=$(date +%s)
$PY predict.py --data-dir "$D" --train-csv "$D/train_competition.csv" --idx2landmark "$D/idx2landmark_id.json" \
    --spec "$D/spec.json" --out "$D/sub.csv" --device cuda --cache-dir "$D/cache" --write-parts --fp16-cache 2>>"$OUT/err.log" | tee -a "$OUT/smoke.log"
log "predict: $(( $(date +%s) - t )) s"
for p in sub_classifier sub_retrieval sub; do $PY evaluate.py --submission "$D/$p.csv" --solution "$D/solution.csv" --label $p | tee -a "$OUT/smoke.log"; done
log "== smoke OK"
