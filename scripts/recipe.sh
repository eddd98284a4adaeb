#!/usr/bin/env bash
# The 9-model recipe of the GLR 2020 3rd-place solution: the original README's
# stage commands, made for 8 x V100 32 GB, with its slips fixed (see README).
#
#   scripts/recipe.sh [b7 b6 b5 b4 b3 nest101 rex20]     (default: all, in this order)
#
# Environment:
#   data_dir, model_dir   as in the original README (./data, ./weights)
#   NPROC                 processes per node for every stage; unset = the original's per-stage count
#                         (the global batch is processes x nodes x --batch-size: keep it when you change NPROC)
#   LAUNCH_ARGS           extra torchrun arguments, e.g. for 2 nodes:
#                         "--nnodes=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500"
#   PYTHON                interpreter (default: python)
# The outputs are the checkpoints that specs/default.json loads.
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${data_dir:-./data}
model_dir=${model_dir:-./weights}
PYTHON=${PYTHON:-python}

# stage N_PROCS train.py-args...
stage() {
  local n=${NPROC:-$1}; shift
  echo "+ torchrun --nproc_per_node=$n train.py $*" >&2
  # shellcheck disable=SC2086
  $PYTHON -u -m torch.distributed.run --nproc_per_node="$n" ${LAUNCH_ARGS:-} train.py \
      --data-dir "$data_dir" --model-dir "$model_dir" "$@"
}

b7() {
  stage 6 --kernel-type b7ns_DDP_final_256_300w_f0_10ep --train-step 0 --image-size 256 --batch-size 42 \
      --enet-type tf_efficientnet_b7_ns --n-epochs 10 --fold 0
  stage 8 --kernel-type b7ns_DDP_final_512_300w_f0_40ep --train-step 1 --image-size 512 --batch-size 16 \
      --enet-type tf_efficientnet_b7_ns --n-epochs 40 --stop-at-epoch 13 --fold 0 \
      --load-from "$model_dir/b7ns_DDP_final_256_300w_f0_10ep_fold0.pth"
  stage 8 --kernel-type b7ns_final_672_300w_f0_load13_ep20 --train-step 2 --init-lr 5e-5 --image-size 672 \
      --batch-size 10 --enet-type tf_efficientnet_b7_ns --n-epochs 20 --stop-at-epoch 1 --fold 0 \
      --load-from "$model_dir/b7ns_DDP_final_512_300w_f0_40ep_fold0.pth"
  # As in the README we received, at the default --init-lr (1e-4); another published
  # copy of the original README runs this stage with --init-lr 0.00001.
  stage 8 --kernel-type b7ns_final_672_300w_f0_load13_load1_14ep --train-step 3 --image-size 672 \
      --batch-size 10 --enet-type tf_efficientnet_b7_ns --n-epochs 14 --stop-at-epoch 4 --fold 0 \
      --load-from "$model_dir/b7ns_final_672_300w_f0_load13_ep20_fold0.pth" --save-epochs 4
}

b6() {
  stage 4 --kernel-type b6ns_DDP_final_256_300w_f1_10ep --train-step 0 --image-size 256 --batch-size 64 \
      --enet-type tf_efficientnet_b6_ns --n-epochs 10 --fold 1
  # The original trained this stage twice (to epoch 28 for step 2, to 36 for the
  # ensemble); one run with snapshots gives both.
  stage 8 --kernel-type b6ns_DDP_final_512_300w_f1_40ep --train-step 1 --image-size 512 --batch-size 22 \
      --enet-type tf_efficientnet_b6_ns --n-epochs 40 --stop-at-epoch 36 --fold 1 --save-epochs 28,36 \
      --load-from "$model_dir/b6ns_DDP_final_256_300w_f1_10ep_fold1.pth"
  stage 8 --kernel-type b6ns_final_768_300w_f1_load28_5ep_1e-5 --train-step 2 --init-lr 1e-5 --image-size 768 \
      --batch-size 10 --enet-type tf_efficientnet_b6_ns --n-epochs 5 --fold 1 --save-epochs 5 \
      --load-from "$model_dir/b6ns_DDP_final_512_300w_f1_40ep_fold1_ep28.pth"
}

b5() {
  stage 4 --kernel-type b5ns_DDP_final_256_300w_f2_10ep --train-step 0 --image-size 256 --batch-size 64 \
      --enet-type tf_efficientnet_b5_ns --n-epochs 10 --fold 2
  # Trained twice in the original (to epochs 16 and 33): one run, two snapshots.
  stage 8 --kernel-type b5ns_DDP_final_576_300w_f2_40ep --train-step 1 --image-size 576 --batch-size 24 \
      --enet-type tf_efficientnet_b5_ns --n-epochs 40 --stop-at-epoch 33 --fold 2 --save-epochs 16,33 \
      --load-from "$model_dir/b5ns_DDP_final_256_300w_f2_10ep_fold2.pth"
  stage 8 --kernel-type b5ns_final_768_300w_f2_load16_20ep --train-step 2 --init-lr 5e-5 --image-size 768 \
      --batch-size 13 --enet-type tf_efficientnet_b5_ns --n-epochs 20 --stop-at-epoch 1 --fold 2 --save-epochs 1 \
      --load-from "$model_dir/b5ns_DDP_final_576_300w_f2_40ep_fold2_ep16.pth"
  stage 8 --kernel-type b5ns_final_768_300w_f2_load33_5ep_3e-5_32G --train-step 2 --init-lr 3e-5 --image-size 768 \
      --batch-size 13 --enet-type tf_efficientnet_b5_ns --n-epochs 5 --stop-at-epoch 4 --fold 2 --save-epochs 4 \
      --load-from "$model_dir/b5ns_DDP_final_576_300w_f2_40ep_fold2_ep33.pth"
}

b4() {
  stage 2 --kernel-type b4ns_final_256_400w_f0_10ep --train-step 0 --image-size 256 --batch-size 128 \
      --enet-type tf_efficientnet_b4_ns --n-epochs 10 --fold 0
  stage 8 --kernel-type b4ns_DDP_final_704_300w_f0_50ep --train-step 1 --image-size 704 --batch-size 22 \
      --enet-type tf_efficientnet_b4_ns --n-epochs 50 --stop-at-epoch 16 --fold 0 \
      --load-from "$model_dir/b4ns_final_256_400w_f0_10ep_fold0.pth"
  stage 8 --kernel-type b4ns_final_768_300w_f0_load16_20ep --train-step 2 --init-lr 5e-5 --image-size 768 \
      --batch-size 16 --enet-type tf_efficientnet_b4_ns --n-epochs 20 --stop-at-epoch 1 --fold 0 \
      --load-from "$model_dir/b4ns_DDP_final_704_300w_f0_50ep_fold0.pth"
  # The README gave step 3 step 2's kernel name, so step 3 overwrote the file it
  # loads; the public checkpoint's name (…_load1_20ep) tells the intended one.
  stage 8 --kernel-type b4ns_final_768_300w_f0_load16_20ep_load1_20ep --train-step 3 --image-size 768 \
      --batch-size 16 --enet-type tf_efficientnet_b4_ns --n-epochs 20 --stop-at-epoch 4 --fold 0 --save-epochs 4 \
      --load-from "$model_dir/b4ns_final_768_300w_f0_load16_20ep_fold0.pth"
}

b3() {
  stage 2 --kernel-type b3ns_final_256_400w_f1_10ep --train-step 0 --image-size 256 --batch-size 128 \
      --enet-type tf_efficientnet_b3_ns --n-epochs 10 --fold 1
  stage 8 --kernel-type b3ns_DDP_final_544_300w_f1_40ep --train-step 1 --image-size 544 --batch-size 17 \
      --enet-type tf_efficientnet_b3_ns --n-epochs 40 --stop-at-epoch 29 --fold 1 \
      --load-from "$model_dir/b3ns_final_256_400w_f1_10ep_fold1.pth"
  stage 8 --kernel-type b3ns_final_768_300w_f1_load29_5ep --train-step 2 --init-lr 5e-5 --image-size 768 \
      --batch-size 22 --enet-type tf_efficientnet_b3_ns --n-epochs 5 --fold 1 \
      --load-from "$model_dir/b3ns_DDP_final_544_300w_f1_40ep_fold1.pth"
  stage 8 --kernel-type b3ns_final_768_300w_f1_load29_5ep5ep --train-step 3 --init-lr 5e-5 --image-size 768 \
      --batch-size 22 --enet-type tf_efficientnet_b3_ns --n-epochs 5 --fold 1 --save-epochs 5 \
      --load-from "$model_dir/b3ns_final_768_300w_f1_load29_5ep_fold1.pth"
}

nest101() {
  stage 6 --kernel-type nest101_DDP_final_256_300w_f4_10ep_3e-5 --train-step 0 --init-lr 3e-5 --image-size 256 \
      --batch-size 42 --enet-type nest101 --n-epochs 10 --fold 4
  stage 8 --kernel-type nest101_DDP_final_576_300w_f4_40ep --train-step 1 --init-lr 3e-5 --image-size 576 \
      --batch-size 30 --enet-type nest101 --n-epochs 40 --stop-at-epoch 16 --fold 4 \
      --load-from "$model_dir/nest101_DDP_final_256_300w_f4_10ep_3e-5_fold4.pth"
  stage 8 --kernel-type nest101_final_768_300w_f4_load16_ep20 --train-step 2 --init-lr 2e-5 --image-size 768 \
      --batch-size 16 --enet-type nest101 --n-epochs 20 --stop-at-epoch 1 --fold 4 \
      --load-from "$model_dir/nest101_DDP_final_576_300w_f4_40ep_fold4.pth"
  stage 8 --kernel-type nest101_final_768_300w_f4_load16_19ep_load1_16ep --train-step 3 --init-lr 4e-5 \
      --image-size 768 --batch-size 16 --enet-type nest101 --n-epochs 16 --stop-at-epoch 5 --fold 4 --save-epochs 5 \
      --load-from "$model_dir/nest101_final_768_300w_f4_load16_ep20_fold4.pth"
}

rex20() {
  # ImageNet weights: ./rexnetv1_2.0x.pth (clovaai) when present, as the original, else timm's rexnet_200
  stage 4 --kernel-type rex20_final_256_400w_f4_10ep --train-step 0 --image-size 256 --batch-size 64 \
      --enet-type rex20 --n-epochs 10 --fold 4
  # The README's --load-from named this stage's own output; it loads step 0's.
  # (The public notebook's ReXNet, rex20_DDP_final_768_300w_f4_35ep_load20resume_fold4_ep31.pth,
  # came from a longer, resumed run that the README does not give.)
  stage 8 --kernel-type rex20_DDP_final_768_300w_f4_50ep --train-step 1 --image-size 768 --batch-size 19 \
      --enet-type rex20 --n-epochs 50 --stop-at-epoch 38 --fold 4 --save-epochs 38 \
      --load-from "$model_dir/rex20_final_256_400w_f4_10ep_fold4.pth"
}

models=("$@")
[ ${#models[@]} -eq 0 ] && models=(b7 b6 b5 b4 b3 nest101 rex20)
for m in "${models[@]}"; do
  case $m in
    b7|b6|b5|b4|b3|nest101|rex20) "$m" ;;
    *) echo "unknown model '$m' (b7 b6 b5 b4 b3 nest101 rex20)" >&2; exit 2 ;;
  esac
done
