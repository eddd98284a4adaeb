"""Small helpers: GAP metric, learning-rate schedule, checkpoints, distributed set-up."""
import math
import os
import pickle
import tempfile
import warnings

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------- metric

def global_average_precision_score(y_true, y_pred):
    """Global Average Precision (micro AP), the GLDv2 / Kaggle 2020 metric.

    y_true: {query: landmark or None} (None = non-landmark query), or a sequence.
    y_pred: {query: (landmark, confidence)}, or a sequence; queries without a
            prediction may be left out.

    GAP = 1/M * sum_i P(i) rel(i) over all predictions sorted by decreasing
    confidence, M = number of queries that have a landmark. A prediction on a
    non-landmark query is never relevant but still occupies its rank; a
    landmark query without prediction still counts in M. Ties keep y_pred's
    order (a stable sort, as the competition's reference implementation).
    """
    if not isinstance(y_true, dict):
        y_true = dict(enumerate(y_true))
    if not isinstance(y_pred, dict):
        y_pred = dict(enumerate(y_pred))
    m = sum(v is not None for v in y_true.values())
    if m == 0 or not y_pred:
        return 0.0
    keys = list(y_pred.keys())
    conf = np.array([float(y_pred[k][1]) for k in keys], dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    rel = np.array([y_true.get(keys[i]) is not None and y_true[keys[i]] == y_pred[keys[i]][0]
                    for i in order], dtype=np.float64)
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / m)


# ---------------------------------------------------------------- schedule

def get_lr(epoch, init_lr, n_epochs, warmup_factor=10.0):
    """Learning rate of 1-based `epoch`, a pure function of the epoch number.

    Reproduces the original's GradualWarmupSchedulerV2(multiplier=10,
    total_epoch=1) wrapped around CosineAnnealingWarmRestarts(T_0=n_epochs-1),
    stepped with `epoch - 1` once per epoch: epoch 1 runs at init_lr, epochs 2
    and 3 both at 10*init_lr (the warm-up hands over one epoch late), then
    cosine decay 10*lr*(1+cos(pi*(e-2)/(n-1)))/2.
    """
    if n_epochs <= 1 or epoch <= 1:
        return init_lr
    peak = init_lr * warmup_factor
    if epoch <= 3:
        return peak
    t = (epoch - 2) % (n_epochs - 1)  # warm restart period n-1, as T_0 above
    return peak * (1 + math.cos(math.pi * t / (n_epochs - 1))) / 2


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(obj, path):
    """torch.save to a temp file in the same folder, then an atomic rename, so a
    crash mid-write never leaves a truncated checkpoint under the final name."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".pth")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_state_dict_file(path, map_location="cpu"):
    """Model weights from any checkpoint this project meets.

    Accepts ours ({'model_state_dict': ...}), the original repo's (the same key
    but saved under the apex/DDP wrapper, so every key starts with 'module.'),
    and a bare state dict. Tries weights_only=True first; the original's files
    hold only tensors and ints, so they load that way too.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # holds objects beyond tensors and plain containers (e.g. numpy scalars): a full
        # unpickle runs code from the file, so say so
        warnings.warn(f"{path} is not a weights-only checkpoint; loading it as a full pickle "
                      f"(do this only with files you trust)")
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    sd = ckpt.get("model_state_dict", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else ckpt
    return strip_prefix(sd)


def strip_prefix(state_dict, prefixes=("module.", "_orig_mod.")):
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def memory_format(device):
    """channels-last on GPUs (faster convolutions under AMP); CPU kernels prefer contiguous."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


# ---------------------------------------------------------------- distributed

def setup_distributed(local_rank_arg=None):
    """Initialise DDP from the launcher's environment, or run as one process.

    torchrun and torch.distributed.launch both export RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python train.py` has none
    of them and runs single-process. Returns (rank, local_rank, world_size, device).
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # a launcher started us, even with 1 process
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if launched and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kw)
    return rank, local_rank, world_size, device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **kw):
    if is_main():
        print(*a, **kw, flush=True)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()
