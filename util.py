"""Small helpers: user errors, learning-rate schedule, checkpoints, distributed set-up (the metrics: evaluate.py)."""
import argparse
import difflib
import hashlib
import json
import math
from datetime import timedelta
import os
import pickle
import sys
import tempfile
import zipfile

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------- user errors

class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file's contents): the
    command line reports it as one line and exits with status 2, no traceback.
    Programming errors are other exceptions and keep their traceback."""


def _flags(parser):
    """The long flags of a parser and of its subcommands' parsers."""
    out = []
    for a in parser._actions:
        out += [o for o in a.option_strings if o.startswith("--")]
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out += [f for f in _flags(sub) if f not in out]
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser that names, for a flag it does not know, this command's closest one (difflib;
    Python 3.14's suggest_on_error does this, 3.11 does not), before it says what else is missing."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        flags = [f for f in _flags(self) if f != "--help"]
        # a token with a space is a value (bench.py's --train-args "--n-epochs 2"), not a flag
        unknown = [t for t in argv if isinstance(t, str) and t.startswith("--") and t != "--" and " " not in t
                   and t.split("=", 1)[0] not in flags + ["--help"]]
        if unknown:
            hints = []
            for tok in unknown:
                close = difflib.get_close_matches(tok.split("=", 1)[0], flags, n=1, cutoff=0.7)
                hints.append(f"{tok} (did you mean {close[0]}?)" if close else tok)
            self.error("unrecognized arguments: " + ", ".join(hints))
        return super().parse_known_args(args, namespace)


def run_main(main):
    """Entry point of a command: main(), with UserError as one line on stderr and exit status 2."""
    try:
        return main()
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


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


def _numpy_scalar_globals():
    """The globals a pickled numpy scalar needs (old checkpoints hold e.g. a numpy
    float as a metric): scalar() rebuilds it from raw bytes and a dtype, which
    runs no code. numpy 1.x wrote `numpy.core.multiarray.scalar`, 2.x
    `numpy._core.multiarray.scalar`; dtype classes appear since numpy 1.25."""
    scalar = np._core.multiarray.scalar
    dtype_classes = [type(np.dtype(t)) for t in ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8",
                                                  "f2", "f4", "f8")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtype_classes]


def torch_load(path, map_location="cpu", trust=False, mmap=False):
    """torch.load that never runs code from the file: weights_only=True, with
    numpy scalars allowed and nothing else. A file that needs more is refused
    (UserError naming --trust-checkpoint); with trust=True (the user's
    --trust-checkpoint) it is unpickled in full. Missing or unreadable files
    are UserErrors too. mmap=True: tensors stay on disk until touched, to read
    a checkpoint's epoch or shapes without its gigabytes; a file in torch's
    legacy (pre-1.6, non-zip) format cannot be mapped and is read in full."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    mmap = mmap and zipfile.is_zipfile(path)
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            names = []
        what = f" ({', '.join(names[:3])})" if names else ""
        raise UserError(f"{path}: refused: it holds Python objects beyond tensors and numbers{what}, and "
                        f"loading them could run code from the file. If you trust it, pass --trust-checkpoint") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable checkpoint (truncated or not a torch file: "
                        f"{str(e).splitlines()[0][:120]})") from e


def load_checkpoint(path, map_location="cpu", trust=False, mmap=False):
    """(state dict, the training args recorded with it or {}): load_state_dict_file plus
    what train.py wrote beside the weights (pool, preprocessing, ...). mmap: as torch_load."""
    ckpt = torch_load(path, map_location, trust, mmap=mmap)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    return _state_dict_of(ckpt, path), (args if isinstance(args, dict) else {})


def load_state_dict_file(path, map_location="cpu", trust=False):
    """Model weights from any checkpoint this project meets.

    Accepts ours ({'model_state_dict': ...}), the original repo's (the same key
    but saved under the apex/DDP wrapper, so every key starts with 'module.'),
    and a bare state dict. Loaded by torch_load: never runs code from the file
    unless trust is set.
    """
    return _state_dict_of(torch_load(path, map_location, trust), path)


def _state_dict_of(ckpt, path):
    sd = ckpt.get("model_state_dict", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else ckpt
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: holds no model weights (expected a state dict of tensors)")
    return strip_prefix(sd)


def _latin1_bytes(text, encoding="latin1"):
    """What Python 3's pickle protocols 0-2 call to rebuild bytes (`_codecs.encode(str,
    'latin1')`, e.g. a numpy array's data), and nothing more: any other codec is refused."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only to rebuild bytes from latin-1 text")
    return text.encode("latin1")


def _bytes(*args):
    """`bytes()`, which protocols 0-2 call for empty bytes (an empty array's data); a
    copy of bytes too, nothing that allocates from a number."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise pickle.UnpicklingError("bytes() is allowed only empty or from bytes in a data file")


def _frombuffer(buf, dtype, shape, order):
    """numpy's own protocol-5 array rebuild (numpy._core.numeric._frombuffer), with the
    dtype checked: an object array cannot come from raw bytes."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("an object array is not allowed in a data file")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


class DataUnpickler(pickle.Unpickler):
    """Unpickles plain data and nothing else: dicts, lists, strings, numbers, and
    numpy scalars and arrays (the original's label map held numpy.int64 values, the
    revisited Oxford/Paris ground truth numpy arrays), at every pickle protocol
    (0-5) and from Python 2 or 3. Any other global is refused, so a planted
    payload cannot run. The globals numpy's own pickles need: multiarray's
    _reconstruct and scalar, ndarray, dtype (protocols 0-4), numeric's
    _frombuffer (protocol 5), and, at protocols 0-2 from Python 3, _codecs.encode
    and bytes() to rebuild the raw bytes (latin-1 text or empty only)."""

    ALLOWED = {("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy", "dtype"), ("numpy", "ndarray")}
    SAFE = {("numpy._core.numeric", "_frombuffer"): _frombuffer, ("numpy.core.numeric", "_frombuffer"): _frombuffer,
            ("_codecs", "encode"): _latin1_bytes, ("__builtin__", "bytes"): _bytes, ("builtins", "bytes"): _bytes}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return getattr(np._core.multiarray, name) if module.endswith("multiarray") else getattr(np, name)
        if (module, name) in self.SAFE:
            return self.SAFE[module, name]
        if module == "numpy.dtypes" and name.endswith("DType"):
            return getattr(np.dtypes, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")


def load_data_file(path):
    """JSON (path ending in .json) or a pickle of plain data read by DataUnpickler."""
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    with open(path, "rb") as f:
        return DataUnpickler(f, encoding="latin1").load()  # latin1: pickles written by Python 2 too


def file_digest(path, chunk=1 << 20):
    """The SHA-1 of a file's bytes (a checkpoint or weights file: what a saved index was built with)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_label_map(path):
    """{class index: landmark id} from preprocess.py's idx2landmark_id.json, or
    from a .pkl (the original's format) through a restricted unpickler; a .pkl
    with a .json of the same name beside it is read from the .json."""
    json_path = os.path.splitext(path)[0] + ".json"
    if os.path.isfile(json_path):
        path = json_path
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such label map (idx2landmark_id.json or .pkl from preprocess.py)")
    try:
        raw = load_data_file(path)
        if not isinstance(raw, dict):
            raise ValueError(f"a {type(raw).__name__}, not a dict")
        m = {int(k): int(v) for k, v in raw.items()}
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a label map of class index -> landmark id ({e})") from e
    if sorted(m) != list(range(len(m))):
        raise UserError(f"{path}: class indices must be 0..{len(m) - 1}")
    return m


def load_fitting(model, sd, path, skip=()):
    """model.load_state_dict(sd) strictly, except the keys in `skip` (left as
    initialised); a state dict of another architecture is a UserError naming
    the first keys and shapes that differ."""
    want = {k: v.shape for k, v in model.state_dict().items() if k not in skip}
    got = {k: v.shape for k, v in sd.items() if k not in skip}
    problems = [f"missing {k}" for k in want if k not in got][:3]
    problems += [f"unexpected {k}" for k in got if k not in want][:3]
    problems += [f"{k}: {tuple(got[k])} in the file, {tuple(want[k])} in the model"
                 for k in want if k in got and got[k] != want[k]][:3]
    if problems:
        name = getattr(model, "enet_type", type(model).__name__)
        raise UserError(f"{path}: does not fit {name}: " + "; ".join(problems[:4]))
    model.load_state_dict({k: v for k, v in sd.items() if k not in skip}, strict=not skip)


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
    """channels-last on every device: cuDNN's fast convolutions under AMP on GPUs, and oneDNN's on
    CPUs too (torch 2.14, 2 cores, `bench.py extract|train --compare-format`: embedding 1.46-1.71x
    for EfficientNets and ReXNet, a training step 1.33-1.51x; docs/performance.md).
    dataset.collate's batches are channels-last already: no copy on the way in."""
    return torch.channels_last


# ---------------------------------------------------------------- distributed

def setup_distributed(local_rank_arg=None, timeout_min=30):
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
        # a collective that waits longer than this (a rank died or hangs) fails instead of blocking forever
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(minutes=timeout_min), **kw)
    return rank, local_rank, world_size, device


def cpu_budget(num_workers, cores=None, local_world_size=None):
    """(loader workers, torch threads) for one process: the machine's cores
    (those this process may use) are split between the processes of this node;
    workers are capped at a process's share, and the main process's intra-op
    threads get what the workers leave (at least 1), so that neither
    oversubscribes the cores (on a 2-core CPU, 32 workers and 2 threads made an
    epoch 5x slower)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, cores // max(1, local_world_size))
    workers = min(num_workers, share)
    return workers, max(1, share - workers)


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a, **kw):
    if is_main():
        print(*a, **kw, flush=True)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()
