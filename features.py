"""Images to arrays: every model's features of lists of images, batched, sharded over ranks, resumable.

    emb = features.embed_all(a, ens, [Images("gallery", paths, keep_in=cache_dir), Images("queries", q)], device)
    emb.features["gallery"]   # per model of the ensemble: (N, D) arrays, maybe memory-mapped
    emb.heads                 # per model its ArcFace head, or None (a backbone without training)

A model's features of an image are its neck output z (models.Net.neck): the
queries' z feed both retrieval (normalised) and the classifier (the head
applied to z), so one pass serves both. A gallery's are the embeddings
normalize(z) of trained models, the raw pooled features of a backbone.

With a cache folder a list's rows go into KEY.npy as they are computed and
the rows done into KEY.done (FeatureCache): a run killed after hours resumes
where it stopped, and a second run reads the file. Under torchrun the lists
are cut into the same batches as in one process and shared out; each rank
writes its rows into the one file, and rank 0 answers.
"""
import glob
import hashlib
import json
import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dataset import LandmarkDataset, collate, val_transform, worker_init
from util import UserError, memory_format, print0

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype


def add_args(p):
    """--device and --precision, on predict.py's parser and app.py's."""
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda where there is one")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="backbone arithmetic for feature extraction: fp32 as the original notebook (default), or "
                        "bf16/fp16 autocast (faster on GPUs; the ArcFace head stays fp32)")


# ---------------------------------------------------------------- ranks

def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def check_shared_cache(cache_dir):
    """Under torchrun, that every rank sees the files rank 0 writes under cache_dir: the ranks hand
    their features over through them, so across nodes it must be a file system they all mount.
    Without this check a rank on another node would fail deep in the extraction (no such file) or,
    worse, read a stale cache of its own."""
    rank, world = rank_world()
    if world == 1:
        return
    os.makedirs(cache_dir, exist_ok=True)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    token = torch.tensor([int.from_bytes(os.urandom(7), "little") if rank == 0 else 0], dtype=torch.int64,
                         device=dev)
    dist.broadcast(token, 0)
    probe = os.path.join(cache_dir, f".rank0-{int(token.item()):x}")  # one sync point per run
    if rank == 0:
        open(probe, "w").close()
    barrier()
    seen = os.path.exists(probe)
    barrier()  # every rank has looked before rank 0 removes it
    if rank == 0:
        os.remove(probe)
    if not seen:
        raise UserError(f"--cache-dir {cache_dir}: rank {rank} (on {socket.gethostname()}) does not see the files "
                        f"rank 0 writes there; across nodes it must be a folder every node mounts (NFS, Lustre)")


# ---------------------------------------------------------------- where the rows go

def cache_key(checkpoint, image_size, ids_digest, precision="fp32", ident=None):
    """The cache file name of one model's features of one list of images. ident: what names the
    model when it has no checkpoint file (a pretrained backbone); else the checkpoint's path,
    size and time."""
    if ident is None:
        st = os.stat(checkpoint)
        ident = f"{os.path.abspath(checkpoint)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(f"{ident}|{image_size}|{ids_digest}|{precision}".encode()).hexdigest()[:20]


def paths_digest(kind, paths):
    return hashlib.sha1("\n".join([kind, *map(str, paths)]).encode()).hexdigest()


def _merged(intervals):
    out = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _read_done(path):
    """Rows done as sorted, merged [start, end) intervals: the file holds JSON intervals or,
    written by older versions, the count of rows done from the first."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return []
    v = json.loads(text) if text else []
    return _merged([[0, v]] if isinstance(v, int) else v)


def _write_done(path, intervals):
    with open(path + ".tmp", "w") as f:  # replaced whole: a kill mid-write leaves the previous record
        json.dump(intervals, f)
    os.replace(path + ".tmp", path)


class InMemory:
    """The rows of one list in an array of this process (no cache folder)."""

    def __init__(self, n, dim, dtype):
        self.out, self.done = np.empty((n, dim), dtype), []

    def write(self, r0, z):
        self.out[r0:r0 + len(z)] = z

    def close(self):
        pass

    def finish(self):
        return self.out


class FeatureCache:
    """One model's features of one list in DIR/KEY.npy (N, D) and the rows done, as [start, end)
    intervals, in DIR/KEY.done; under torchrun rank r records its own rows in KEY.done.rank<r>.

    Opening it: rank 0 checks the file (one of another shape or dtype starts afresh) and merges
    the rank records of an earlier, maybe killed and differently sized, run into KEY.done; the
    others wait for it (a barrier). Rows are written with pwrite at their offset, not through a
    shared memory map: ranks on other nodes share the file over a network file system, where pages
    written by two hosts can clash. The record is replaced whole after every batch, so a kill
    loses at most the batch under way. finish() waits for every rank (a barrier) and returns the
    whole array, a read-only memory map."""

    def __init__(self, folder, key, n, dim, dtype):
        self.rank, self.world = rank_world()
        os.makedirs(folder, exist_ok=True)
        self.f_arr, self.f_done = os.path.join(folder, f"{key}.npy"), os.path.join(folder, f"{key}.done")
        if self.rank == 0:  # one process checks, creates and merges; the others wait for it
            ok = os.path.exists(self.f_arr) and os.path.exists(self.f_done)
            if ok:
                arr = np.load(self.f_arr, mmap_mode="r")
                ok = arr.shape == (n, dim) and arr.dtype == dtype
                del arr
            if ok:
                self._consolidate()
            else:  # new, or of another shape: start afresh, the rank records of the old one with it
                np.lib.format.open_memmap(self.f_arr, mode="w+", dtype=dtype, shape=(n, dim)).flush()
                for part in glob.glob(glob.escape(self.f_done) + ".rank*"):
                    os.remove(part)
                _write_done(self.f_done, [])
        barrier()
        self.done = _read_done(self.f_done)
        arr = np.load(self.f_arr, mmap_mode="r")
        self.offset, self.row_bytes = arr.offset, dim * np.dtype(dtype).itemsize
        del arr
        self.fd = None
        self.f_mine = self.f_done if self.world == 1 else f"{self.f_done}.rank{self.rank}"
        self.record = self.done if self.world == 1 else []

    def _consolidate(self):
        """One record of the rows done: the main file's and every rank's, merged into the main
        file; the rank files removed."""
        parts = sorted(glob.glob(glob.escape(self.f_done) + ".rank*"))
        done = _merged(sum((_read_done(p) for p in [self.f_done, *parts]), []))
        if parts:
            _write_done(self.f_done, done)
            for p in parts:
                os.remove(p)
        return done

    def write(self, r0, z):
        if self.fd is None:
            self.fd = os.open(self.f_arr, os.O_RDWR)
        os.pwrite(self.fd, z.tobytes(), self.offset + r0 * self.row_bytes)
        self.record = _merged(self.record + [[r0, r0 + len(z)]])
        _write_done(self.f_mine, self.record)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def finish(self):
        barrier()  # every rank's share is in the file
        if self.rank == 0 and self.world > 1:
            self._consolidate()
        return np.load(self.f_arr, mmap_mode="r")

    @staticmethod
    def remove(folder, key):
        stem = os.path.join(folder, key)
        for f in [f"{stem}.npy", f"{stem}.done", *glob.glob(glob.escape(stem) + ".done.rank*")]:
            if os.path.exists(f):
                os.remove(f)


# ---------------------------------------------------------------- extraction

@torch.no_grad()
def embed_batch(model, x, device, precision="fp32", fmt=None):
    """The neck output z (B, 512), float32, of one batch of images (uint8 from
    the loader: the model normalises them). extract_features stores these;
    scripts/bench.py extract times this very function. fmt: the inputs' memory
    format (default util.memory_format's; bench.py --compare-format sets another)."""
    amp_dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
        return model.neck(x.to(device, non_blocking=True, memory_format=fmt or memory_format(device))).float()


def my_batches(covered, n, batch_size):
    """(the batches not yet done, this rank's contiguous run of them, the number of batches).
    A batch holds the same images whatever the number of ranks: batch b is rows b*B .. b*B+B-1."""
    rank, world = rank_world()
    n_batches = (n + batch_size - 1) // batch_size
    todo = [b for b in range(n_batches) if not covered[b * batch_size:(b + 1) * batch_size].all()]
    mine = [int(b) for b in np.array_split(np.array(todo, np.int64), world)[rank]] if todo else []
    return todo, mine, n_batches


def _covered(done, n):
    c = np.zeros(n + 1, np.int64)
    for a, b in done:
        c[a] += 1
        c[b] -= 1
    return np.cumsum(c[:n]) > 0


@dataclass
class Extraction:
    """How images are embedded: on `device`, in batches of batch_size read by num_workers loader
    processes, the backbone's arithmetic in `precision` (PRECISIONS)."""
    device: torch.device
    batch_size: int = 64
    num_workers: int = 2
    precision: str = "fp32"


@dataclass
class Store:
    """Where one list's rows go: a FeatureCache (folder, key) or, folder None, this process's memory;
    dtype: as stored (float16 halves a large gallery)."""
    folder: str = None
    key: str = None
    dtype: type = np.float32


@torch.no_grad()
def extract_features(model, paths, image_size, how, store=None, normalize=False, desc="extract"):
    """The neck output z (N, 512) of every image, or with normalize=True the
    embedding normalize(z) (`model.embed`). Cosines are the head applied to z,
    so a query's embedding and cosines come from this one pass. how: an
    Extraction; store: a Store (default: in memory, float32).

    how.precision: the backbone and neck run in float32 ('fp32', as the
    original notebook), or under autocast in 'bf16' or 'fp16'; z is returned
    in float32 either way, and the head always runs in float32.

    With a cache folder, the rows go into a FeatureCache as they come: a second
    run reads the file (read-only memory map), an interrupted one does only
    what is left. Under torchrun (a process group of W ranks) the folder is
    required: the batches not yet done are split into W contiguous runs, rank
    r embeds the r-th, and every rank returns the whole array. The features
    are those of one process (bit for bit on CPU with the same thread count).

    An unreadable image (missing, empty, truncated, not an image) gets a row
    of NaN, in the cache too: `retrieval.unreadable_rows` finds them.
    """
    n, dim, device, store = len(paths), model.neck_dim, torch.device(how.device), store or Store()
    rank, world = rank_world()
    if world > 1 and store.folder is None:
        raise ValueError("extract_features under torchrun shares its rows through a cache folder")
    rows_to = (InMemory(n, dim, store.dtype) if store.folder is None
               else FeatureCache(store.folder, store.key, n, dim, store.dtype))
    covered = _covered(rows_to.done, n)
    todo, mine, n_batches = my_batches(covered, n, how.batch_size)
    if todo and len(todo) < n_batches:
        print0(f"{desc}: {int(covered.sum())} of {n} rows already in {rows_to.f_arr}; embedding the rest")
    if mine:
        bs = how.batch_size
        val = val_transform(image_size, model.preprocessing)  # as the model was validated
        ds = LandmarkDataset(pd.DataFrame({"filepath": paths}), "", "test", transform=val, skip_bad=True)
        rows = [r for b in mine for r in range(b * bs, min(n, (b + 1) * bs))]
        # every batch but the last of all is full, and that one comes last: the loader's batches are `mine`
        loader = DataLoader(Subset(ds, rows), batch_size=bs, num_workers=how.num_workers,
                            pin_memory=device.type == "cuda", worker_init_fn=worker_init if how.num_workers else None,
                            collate_fn=collate)
        label = desc if world == 1 else f"{desc} [rank {rank}/{world}]"
        # this rank's batches, after those done before (a resumed cache): the bar ends at its total
        bar = tqdm(loader, desc=label, initial=n_batches - len(todo), total=n_batches - len(todo) + len(mine),
                   mininterval=2.0, disable=rank != 0)
        # the bar first: zip asks it for one more batch, so that it counts the last one and closes at its total
        for (x, bad), b in zip(bar, mine):
            z = embed_batch(model, x, device, how.precision)
            if normalize:
                z = F.normalize(z, dim=1)
            if any(bad):
                z[torch.tensor([bool(v) for v in bad], device=z.device)] = float("nan")
            rows_to.write(b * bs, np.ascontiguousarray(z.cpu().numpy(), store.dtype))
        rows_to.close()
    return rows_to.finish()


@torch.no_grad()
def embed_images(model, images, image_size, device, precision="fp32", batch_size=32):
    """extract_features of RGB uint8 images in memory (app.py): the same resize as
    validation and the same embed_batch. The neck outputs z (N, C), float32."""
    val = val_transform(image_size, model.preprocessing)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(val(image=im)["image"])).permute(2, 0, 1)
                         for im in images[i:i + batch_size]])
        out.append(embed_batch(model, x, torch.device(device), precision).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.neck_dim), np.float32)


# ---------------------------------------------------------------- every model, every list

@dataclass
class Images:
    """A list of images to embed. kind: 'gallery', 'queries', 'non-landmarks', ... (names it in
    the cache and the progress bar); neck: a trained model's neck outputs z (queries: their head's
    cosines come from z too) rather than the embeddings normalize(z); keep_in: a folder where its features
    stay between runs (GLDv2's --cache-dir), else under torchrun they go through --cache-dir as
    scratch; digest: names the list in the cache (default: of its paths); dtype: as stored."""
    kind: str
    paths: list
    keep_in: str = None
    digest: str = None
    dtype: type = np.float32
    neck: bool = False


@dataclass
class Embedded:
    """embed_all's answer: features {kind: per model an (N, D) array}; heads: per model its ArcFace
    head (None for a backbone without training); scratch: the cache keys of this run only."""
    features: dict
    heads: list
    scratch: list


def embed_all(a, ens, lists, device="cpu"):
    """Every model of the ensemble (loaded one at a time: only one is on the device at once) on
    every list of images. a: the options batch_size, num_workers, precision, cache_dir (shared by
    the ranks under torchrun). Trained models' features are embeddings (normalised), or neck
    outputs for a list with neck=True (the queries); a backbone's are its raw pooled features (whitened
    later on the gallery, ensemble.Space). Under torchrun every list goes through files under
    --cache-dir; those not kept between runs are listed in `scratch`, for remove_scratch once the
    answer is written."""
    shared = a.cache_dir if rank_world()[1] > 1 else None
    out, heads, scratch = {im.kind: [] for im in lists}, [], []
    device = torch.device(device)
    how = Extraction(device, a.batch_size, a.num_workers, a.precision)
    for member in ens.members:
        model = member.load(device)
        for im in lists:
            per_size = []
            for size in member.sizes:  # one size, the model's, unless --scales
                key = cache_key(member.checkpoint, size, im.digest or paths_digest(im.kind, im.paths),
                                a.precision, member.cache_ident)
                if shared and not im.keep_in:
                    scratch.append(key)
                desc = f"{im.kind} {member.name}" + (f" at {size}" if size != member.image_size else "")
                per_size.append(extract_features(model, im.paths, size, how, Store(im.keep_in or shared, key, im.dtype),
                                                 normalize=ens.classifies and not im.neck, desc=desc))
            out[im.kind].append(per_size[0] if len(per_size) == 1 else multiscale(per_size))
        heads.append(model.metric_classify if ens.classifies else None)  # the head alone is kept
        del model
    return Embedded(out, heads if ens.classifies else None, scratch)


def multiscale(per_size):
    """Multi-scale descriptors (Radenovic et al., TPAMI 2018): the mean of each scale's unit-length
    features, float32 (a NaN row, an unreadable image, stays NaN)."""
    out = None
    for f in per_size:
        f = np.asarray(f, np.float32)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        out = f if out is None else out + f
    return out / len(per_size)


def embed_member(model, member, images, device, precision="fp32"):
    """embed_images at every size of an ensemble member (its --scales), combined as embed_all does."""
    per_size = [embed_images(model, images, size, device, precision) for size in member.sizes]
    return per_size[0] if len(per_size) == 1 else multiscale(per_size)


def remove_scratch(cache_dir, scratch):
    """The scratch feature files of a torchrun run (embed_all), once its answer is written."""
    for k in scratch:
        FeatureCache.remove(cache_dir, k)
