"""Ensemble inference with retrieval re-ranking, the original's Kaggle notebook as a module and CLI.

For every model of the spec: the L2-normalised 512-d embeddings of the gallery
(the clean train list) and of the queries (sample_submission's ids), and the
queries' sub-center cosines. Embeddings of the models are concatenated and
normalised, cosines averaged. Each query's 5 nearest gallery images are
re-ranked with the classifier: score(l) = sum sim^9 * cls(l)^10.

    python predict.py --data-dir D --train-csv CLEAN_LIST --idx2landmark idx2landmark_id.json \
        --spec specs/default.json --out submission.csv [--device cpu|cuda] [--batch-size N] [--precision fp32|bf16|fp16]

Your own photos (gallery.py): --gallery-dir G (one folder per landmark) or --index I, and --query-dir Q,
write predictions.csv (path, landmark, confidence, neighbours); --save-index / --add-to-index keep the
gallery's embeddings.
"""
import argparse
import glob
import hashlib
import json
import os
import socket
from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dataset import (LandmarkDataset, collate, drop_excluded, get_transforms, image_path, read_csv_checked,
                     resolve_paths, worker_init)
from finetune import WHITEN_MIN_RATIO
from models import build_model, check_enet_type, preprocessing_for
from preprocess import read_clean_list
from retrieval import (FAISS_EF_SEARCH, FAISS_NPROBE, FAISS_RERANK, RERANK, Search, faiss_index, import_faiss, recognize,
                       resolve_rerank, topk_cosine, unreadable_rows, whitened, whitening_of)
from util import (UserError, cleanup_distributed, cpu_budget, is_main, load_checkpoint, load_fitting, memory_format, print0,
                  read_label_map, run_main, setup_distributed)


# ---------------------------------------------------------------- models

def load_spec(path):
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read the spec ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from e
    models = spec.get("models") if isinstance(spec, dict) else spec
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise UserError(f'{path}: expected {{"models": [{{"enet_type", "checkpoint", "image_size"}}, ...]}}')
    base = os.path.dirname(os.path.abspath(path))
    for m in models:
        missing = {"enet_type", "checkpoint", "image_size"} - set(m)
        if missing:
            raise UserError(f"{path}: model entry {m} lacks {sorted(missing)}")
    return models, base


def resolve_checkpoint(path, base):
    """A relative checkpoint path is looked up next to the spec file, then in the
    working directory (where Kaggle's ../input/... paths live)."""
    for p in ([path] if os.path.isabs(path) else [os.path.join(base, path), path]):
        if os.path.exists(p):
            return p
    raise UserError(f"checkpoint {path} not found (looked in {base} and {os.getcwd()})")


def load_model(enet_type, checkpoint, device="cpu", trust=False, image_size=None):
    """A model from a checkpoint of ours or of the original code (strict), fed
    as it was trained: the pooling and preprocessing recorded in our
    checkpoints' args, else the original's (avg, or GeM where the weights hold
    `pool.p`; the backbone's mean/std). For inference only: channels-last, in
    eval mode, the head's sub-centres normalised once (normalize_weight_)."""
    # mapped: only the weights are read, not the optimizer state a training checkpoint also holds (2x them)
    sd, trained = load_checkpoint(checkpoint, trust=trust, mmap=True)
    if "metric_classify.weight" not in sd:
        raise UserError(f"{checkpoint}: no 'metric_classify.weight': not a checkpoint of this model")
    pool = trained.get("pool") or ("gem" if "pool.p" in sd else "avg")
    model = build_model(enet_type, sd["metric_classify.weight"].shape[0] // 3, pretrained=False, pool=pool,
                        preprocessing=trained.get("preprocessing"), image_size=image_size)
    load_fitting(model, sd, checkpoint)
    model.metric_classify.normalize_weight_()  # inference only: the head's sub-centres normalised once
    return model.to(device, memory_format=memory_format(torch.device(device))).eval()


def check_models(models, base, n_classes, label_map, trust=False):
    """Every model of the spec, checked before any image is read (an ensemble's
    extraction takes hours): its checkpoint exists and loads, its backbone name
    is known, its image size is a positive integer, its head has one class per
    entry of the label map (n_classes None, no label map: the models agree among
    themselves). Each checkpoint is mapped, not read: the shapes and args come
    from its index, the weights stay on disk (9 checkpoints of GBs). Returns (the resolved
    checkpoint paths, the number of classes, each model's preprocessing, each
    model's train.py --recipe or None)."""
    paths, pres, recipes = [], [], []
    for m in models:
        ckpt = resolve_checkpoint(m["checkpoint"], base)
        check_enet_type(m["enet_type"])
        if not str(m["image_size"]).isdigit() or int(m["image_size"]) <= 0:
            raise UserError(f"{ckpt}: image_size {m['image_size']!r} is not a positive integer")
        sd, trained = load_checkpoint(ckpt, trust=trust, mmap=True)
        if "metric_classify.weight" not in sd:
            raise UserError(f"{ckpt}: no 'metric_classify.weight': not a checkpoint of this model")
        n = sd["metric_classify.weight"].shape[0] // 3
        if n_classes is None:
            n_classes, label_map = n, paths[0] if paths else ckpt
        if n != n_classes:
            raise UserError(f"{ckpt}: the model has {n} classes but {label_map} maps {n_classes}")
        paths.append(ckpt)
        pres.append(trained.get("preprocessing") or preprocessing_for(m["enet_type"]))
        recipes.append(trained.get("recipe"))
        del sd
    return paths, n_classes, pres, recipes


class PooledFeatures(torch.nn.Module):
    """Recognition without training: a pretrained backbone's pooled features
    stand in for the neck output (predict.py --backbone)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.preprocessing = net, net.preprocessing
        self.neck_dim = net.feat.in_features

    def neck(self, x):
        return self.net.extract(x)


def zero_training_model(backbone, pretrained_path=None, pool="avg", image_size=256, device="cpu"):
    """The backbone with its ImageNet weights (a --pretrained-path file, or timm's
    download/cache) as a PooledFeatures, and its signature for a saved index."""
    from gallery import file_digest
    check_enet_type(backbone)
    if pretrained_path is not None and not os.path.isfile(pretrained_path):
        raise UserError(f"--pretrained-path {pretrained_path}: no such file")
    net = build_model(backbone, 1, pretrained=True, pretrained_path=pretrained_path, pool=pool, image_size=image_size)
    model = PooledFeatures(net).to(device, memory_format=memory_format(torch.device(device))).eval()
    signature = [{"enet_type": backbone, "image_size": int(image_size), "pool": pool, "features": "pooled",
                  "weights_sha1": file_digest(pretrained_path) if pretrained_path else f"timm:{backbone}",
                  "preprocessing": net.preprocessing}]
    return model, signature


# ---------------------------------------------------------------- features

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype


def _cache_key(checkpoint, image_size, ids_digest, precision="fp32", ident=None):
    """The cache file name of one model's features of one list of images. ident: what names the
    model when it has no checkpoint file (a pretrained backbone); else the checkpoint's path,
    size and time."""
    if ident is None:
        st = os.stat(checkpoint)
        ident = f"{os.path.abspath(checkpoint)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(f"{ident}|{image_size}|{ids_digest}|{precision}".encode()).hexdigest()[:20]


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def check_shared_cache(cache_dir):
    """Under torchrun, that every rank sees the files rank 0 writes under cache_dir: the ranks hand
    their features over through them, so across nodes it must be a file system they all mount.
    Without this check a rank on another node would fail deep in the extraction (no such file) or,
    worse, read a stale cache of its own."""
    rank, world = _rank_world()
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
    _barrier()
    seen = os.path.exists(probe)
    _barrier()  # every rank has looked before rank 0 removes it
    if rank == 0:
        os.remove(probe)
    if not seen:
        raise UserError(f"--cache-dir {cache_dir}: rank {rank} (on {socket.gethostname()}) does not see the files "
                        f"rank 0 writes there; across nodes it must be a folder every node mounts (NFS, Lustre)")


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


def _merged(intervals):
    out = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _write_done(path, intervals):
    with open(path + ".tmp", "w") as f:  # replaced whole: a kill mid-write leaves the previous record
        json.dump(intervals, f)
    os.replace(path + ".tmp", path)


def _consolidate(f_done):
    """One record of the rows done: the main file's and every rank's of an earlier (killed,
    maybe differently sized) run, merged into the main file; the rank files removed."""
    parts = sorted(glob.glob(glob.escape(f_done) + ".rank*"))
    done = _merged(sum((_read_done(p) for p in [f_done, *parts]), []))
    if parts:
        _write_done(f_done, done)
        for p in parts:
            os.remove(p)
    return done


@torch.no_grad()
def embed_batch(model, x, device, precision="fp32"):
    """The neck output z (B, 512), float32, of one batch of images (uint8 from
    the loader: the model normalises them). extract_features stores these;
    scripts/bench.py extract times this very function."""
    amp_dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
        return model.neck(x.to(device, non_blocking=True, memory_format=memory_format(device))).float()


@torch.no_grad()
def extract_features(model, paths, image_size, device, batch_size=64, num_workers=2, cache_dir=None,
                     key=None, dtype=np.float32, normalize=False, desc="extract", precision="fp32"):
    """The neck output z (N, 512) of every image, or with normalize=True the
    embedding normalize(z) (`model.embed`). Cosines are the head applied to z,
    so a query's embedding and cosines come from this one pass.

    precision: the backbone and neck run in float32 ('fp32', as the original
    notebook), or under autocast in 'bf16' or 'fp16'; z is returned in float32
    either way, and the head always runs in float32.

    With cache_dir, rows go into a .npy file as they come, and the rows done
    are recorded after each batch: a second run reads the file (read-only
    memory map), an interrupted one does only what is left.

    Under torchrun (a process group of W ranks), cache_dir is required: the
    images are cut into batches of batch_size (batch b: rows b*B .. b*B+B-1),
    the batches not yet done are split into W contiguous runs, and rank r
    embeds the r-th into the one shared file, recording its progress in
    KEY.done.rank<r>. Every rank then waits for all (a barrier) and returns
    the whole array. A batch holds the same images whatever W is, so the
    features are those of one process (bit for bit on CPU with the same
    thread count). A killed run resumes with any W: its rank records are
    merged first.

    An unreadable image (missing, empty, truncated, not an image) gets a row
    of NaN, in the cache too: `unreadable_rows` finds them.
    """
    n, dim = len(paths), model.neck_dim
    rank, world = _rank_world()
    if world > 1 and cache_dir is None:
        raise ValueError("extract_features under torchrun shares its rows through cache_dir")
    fd = None
    if cache_dir is None:
        out, done = np.empty((n, dim), dtype), []
    else:
        os.makedirs(cache_dir, exist_ok=True)
        f_arr, f_done = os.path.join(cache_dir, f"{key}.npy"), os.path.join(cache_dir, f"{key}.done")
        if rank == 0:  # one process checks, creates and merges; the others wait for it
            ok = os.path.exists(f_arr) and os.path.exists(f_done)
            if ok:
                arr = np.load(f_arr, mmap_mode="r")
                ok = arr.shape == (n, dim) and arr.dtype == dtype
                del arr
            if ok:
                _consolidate(f_done)
            else:  # new, or of another shape: start afresh, the rank records of the old one with it
                np.lib.format.open_memmap(f_arr, mode="w+", dtype=dtype, shape=(n, dim)).flush()
                for part in glob.glob(glob.escape(f_done) + ".rank*"):
                    os.remove(part)
                _write_done(f_done, [])
        _barrier()
        done = _read_done(f_done)
        out = np.load(f_arr, mmap_mode="r")
    covered = np.zeros(n + 1, np.int64)
    for a, b in done:
        covered[a] += 1
        covered[b] -= 1
    covered = np.cumsum(covered[:n]) > 0
    n_batches = (n + batch_size - 1) // batch_size
    todo = [b for b in range(n_batches) if not covered[b * batch_size:(b + 1) * batch_size].all()]
    mine = [int(b) for b in np.array_split(np.array(todo, np.int64), world)[rank]] if todo else []
    if todo and len(todo) < n_batches:
        print0(f"{desc}: {int(covered.sum())} of {n} rows already in {f_arr}; embedding the rest")
    if mine:
        val = get_transforms(image_size, model.preprocessing["interpolation"])[1]  # as the model was validated
        ds = LandmarkDataset(pd.DataFrame({"filepath": paths}), "", "test", transform=val, skip_bad=True)
        rows = [r for b in mine for r in range(b * batch_size, min(n, (b + 1) * batch_size))]
        # every batch but the last of all is full, and that one comes last: the loader's batches are `mine`
        loader = DataLoader(Subset(ds, rows), batch_size=batch_size, num_workers=num_workers,
                            pin_memory=device.type == "cuda", worker_init_fn=worker_init if num_workers else None,
                            collate_fn=collate)
        if cache_dir is not None:
            # rows are written with pwrite at their offset, not through a shared memory map: ranks on other
            # nodes share the file over a network file system, where pages written by two hosts can clash
            fd = os.open(f_arr, os.O_RDWR)
            offset, row_bytes = out.offset, dim * np.dtype(dtype).itemsize
            f_mine = f_done if world == 1 else f"{f_done}.rank{rank}"
            record = done if world == 1 else []
        label = desc if world == 1 else f"{desc} [rank {rank}/{world}]"
        for b, (x, bad) in zip(mine, tqdm(loader, desc=label, initial=n_batches - len(todo), total=n_batches,
                                          mininterval=2.0, disable=rank != 0)):
            z = embed_batch(model, x, device, precision)
            if normalize:
                z = F.normalize(z, dim=1)
            if any(bad):
                z[torch.tensor([bool(v) for v in bad], device=z.device)] = float("nan")
            z = np.ascontiguousarray(z.cpu().numpy(), dtype)
            r0 = b * batch_size
            if fd is None:
                out[r0:r0 + len(z)] = z
            else:
                os.pwrite(fd, z.tobytes(), offset + r0 * row_bytes)
                record = _merged(record + [[r0, r0 + len(z)]])
                _write_done(f_mine, record)
    if fd is not None:
        os.close(fd)
    if cache_dir is not None:
        _barrier()  # every rank's share is in the file
        if rank == 0 and world > 1:
            _consolidate(f_done)
        out = np.load(f_arr, mmap_mode="r")
    return out


@torch.no_grad()
def embed_images(model, images, image_size, device, precision="fp32", batch_size=32):
    """extract_features of RGB uint8 images in memory (app.py): the same resize as
    validation and the same embed_batch. The neck outputs z (N, C), float32."""
    val = get_transforms(image_size, model.preprocessing["interpolation"])[1]
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(val(image=im)["image"])).permute(2, 0, 1)
                         for im in images[i:i + batch_size]])
        out.append(embed_batch(model, x, torch.device(device), precision).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.neck_dim), np.float32)


def format_submission(ids, landmarks, confidences):
    """id,landmarks with "<landmark_id> <confidence>", confidence at full precision (repr)."""
    rows = [f"{int(l)} {float(c)!r}" if l is not None and l == l else "" for l, c in zip(landmarks, confidences)]
    return pd.DataFrame({"id": list(ids), "landmarks": rows})


# ---------------------------------------------------------------- pipeline

def _device(a):
    """--device, or CUDA where there is one; under torchrun the GPU of this rank (LOCAL_RANK)."""
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _paths_digest(kind, paths):
    return hashlib.sha1("\n".join([kind, *map(str, paths)]).encode()).hexdigest()


def search_of(a):
    """--knn exact|faiss, --faiss-index, --faiss-nprobe, --faiss-ef, --faiss-rerank as a retrieval.Search."""
    if a.knn == "faiss":
        import_faiss()  # missing: one line now, not after hours of extraction
    return Search(a.knn, a.faiss_index, a.faiss_nprobe, a.faiss_rerank, ef_search=a.faiss_ef)


def load_setup(a, device="cpu"):
    """What recognition needs before any image is read: the spec's models checked (or,
    with --backbone, the pretrained backbone built), the re-ranking, the label map and
    the names of the classes it knows. A namespace: zero (the --backbone options or
    None), known, idx2lid, rerank_with; models, ckpts, pres (spec) or zmodel, size,
    signature (--backbone)."""
    from gallery import landmark_names
    idx2lid = read_label_map(a.idx2landmark) if a.idx2landmark else None
    # the classes' names: landmark_names.json beside the label map, else the landmark ids themselves
    # (GLDv2's landmarks have no other name): a gallery folder named so is a class the classifier knows
    known = landmark_names(a.idx2landmark) or ({lid: str(lid) for lid in idx2lid.values()} if idx2lid else {})
    zero = ({"enet_type": a.backbone, "pretrained_path": a.pretrained_path, "image_size": a.image_size,
             "pool": a.pool, "whiten": a.whiten} if a.backbone else None)
    setup = argparse.Namespace(zero=zero, known=known, idx2lid=idx2lid, rerank_with=RERANK["original"])
    if zero is None:
        models, base = load_spec(a.spec) if isinstance(a.spec, str) else (a.spec, os.getcwd())
        n_known = len(idx2lid) if idx2lid else None
        ckpts, n, pres, recipes = check_models(models, base, n_known, a.idx2landmark, a.trust_checkpoint)
        setup.rerank_with = resolve_rerank(a.rerank_vote, a.rerank_cls_power, recipes)
        if idx2lid is None:  # anonymous classes: the classifier can name no gallery landmark
            setup.idx2lid = {i: -1 - i for i in range(n)}
        setup.models, setup.ckpts, setup.pres = models, ckpts, pres
    else:
        setup.size = int(a.image_size)
        setup.zmodel, setup.signature = zero_training_model(a.backbone, a.pretrained_path, a.pool, setup.size,
                                                            device)
    return setup


def _each_model(a, setup, device):
    """(model, image size, checkpoint or None, cache identity or None) of each model, loaded
    one at a time: only one is on the device at once."""
    if setup.zero is not None:
        yield setup.zmodel, setup.size, None, json.dumps(setup.signature, sort_keys=True)
        return
    for m, ckpt in zip(setup.models, setup.ckpts):
        size = int(m["image_size"])
        model = load_model(m["enet_type"], ckpt, device, a.trust_checkpoint, image_size=size)
        if a.compile:  # the backbone and neck; a ragged last batch compiles once more
            model.neck = torch.compile(model.neck)
        yield model, size, ckpt, None


def embed_all(a, setup, g_paths, q_paths, nl_paths=None, device="cpu", gallery_dtype=np.float32,
              gallery_cache=None, gallery_digest=None):
    """Per model: the gallery's features (None: no gallery to embed), the queries' neck
    outputs (Q, 512), its ArcFace head (None without training), and the non-landmark set's
    features. Trained models' gallery and non-landmark features are embeddings (normalised);
    a pretrained backbone's are its raw pooled features (whitened later on the gallery).

    gallery_cache: the folder where the gallery's features stay between runs (GLDv2's
    --cache-dir), or None. Under torchrun every list goes through files under --cache-dir,
    which the ranks share: those not kept between runs are listed in `scratch`, for
    remove_scratch once the answer is written. Returns (g_emb, zqs, heads, nl_emb, scratch)."""
    shared = a.cache_dir if _rank_world()[1] > 1 else None
    g_emb, zqs, heads, nl_emb, scratch = [], [], [], [], []
    kw = dict(device=torch.device(device), batch_size=a.batch_size, num_workers=a.num_workers, precision=a.precision)
    trained = setup.zero is None
    for model, size, ckpt, ident in _each_model(a, setup, device):
        name = f"{os.path.basename(ckpt)}@{size}" if ckpt else f"{setup.zero['enet_type']}@{size}"

        def key(kind, paths, digest=None):
            k = _cache_key(ckpt, size, digest or _paths_digest(kind, paths), a.precision, ident)
            if shared and not (kind == "gallery" and gallery_cache):
                scratch.append(k)
            return k
        if g_paths is not None:
            g_emb.append(extract_features(model, g_paths, size, cache_dir=gallery_cache or shared, normalize=trained,
                                          key=key("gallery", g_paths, gallery_digest), dtype=gallery_dtype,
                                          desc=f"gallery {name}", **kw))
        zqs.append(extract_features(model, q_paths, size, cache_dir=shared, key=key("queries", q_paths),
                                    desc=f"queries {name}", **kw))
        heads.append(model.metric_classify if trained else None)  # the head alone is kept: (out_dim * 3, 512)
        if nl_paths is not None:
            nl_emb.append(extract_features(model, nl_paths, size, cache_dir=shared, normalize=trained,
                                           key=key("non-landmarks", nl_paths), desc=f"non-landmarks {name}", **kw))
        del model
    return (g_emb if g_paths is not None else None), zqs, (heads if trained else None), nl_emb, scratch


def remove_scratch(a, scratch):
    """The scratch feature files of a torchrun run (embed_all), once its answer is written."""
    for k in scratch:
        stem = os.path.join(a.cache_dir, k)
        for f in [f"{stem}.npy", f"{stem}.done", *glob.glob(glob.escape(stem) + ".done.rank*")]:
            if os.path.exists(f):
                os.remove(f)


def run(a):
    """The whole inference on the GLDv2 layout, from predict.py's options (parse_args or
    options()). On rank 0 (or alone) returns {'ids', 'classifier', 'retrieval',
    'ensemble', ...} where each part is (landmarks, confidences); with a.non_landmark
    ('auto': mined from the queries, or a CSV of known non-landmark images, column
    `id` under DATA_DIR/non_landmark/ or column `filepath`) also 'ensemble_nl',
    'nl_flags' and 'nl_similarity' (each query's mean cosine to its nearest
    non-landmarks). Under torchrun the other ranks return None once their share
    of the images is embedded."""
    device = _device(a)
    search = search_of(a)
    idx2lid = read_label_map(a.idx2landmark)
    gallery = read_clean_list(a.train_csv)  # id,landmark_id or GLDv2's landmark_id,images; ids as text
    sub = read_csv_checked(a.sample_submission or os.path.join(a.data_dir, "sample_submission.csv"), ["id"])
    gallery = gallery.assign(filepath=resolve_paths(gallery, a.data_dir, "train"))
    queries = sub.assign(filepath=resolve_paths(sub, a.data_dir, "test"))
    if a.exclude:  # listed images are not read: out of the gallery, and empty predictions for queries
        gallery, n_gallery_out = drop_excluded(gallery, a.exclude)
        kept, n_query_out = drop_excluded(queries, a.exclude)
        queries.loc[~queries.index.isin(kept.index), "filepath"] = f"(excluded by {a.exclude})"  # never read
        print0(f"{a.exclude}: left out {n_gallery_out} gallery images and {n_query_out} queries")
    g_paths, q_paths = list(gallery["filepath"]), list(queries["filepath"])
    nl_paths = _non_landmark_paths(a.non_landmark, a.data_dir)
    gallery_digest = hashlib.sha1("\n".join(gallery["id"]).encode()).hexdigest()  # once, not per model

    setup = load_setup(a, device)  # every model checked before any image is read
    g_emb, zqs, heads, nl_emb, scratch = embed_all(
        a, setup, g_paths, q_paths, nl_paths, device, np.float16 if a.fp16_cache else np.float32,
        gallery_cache=a.cache_dir or None, gallery_digest=gallery_digest)
    if not is_main():
        return None
    if search.kind == "faiss" and a.cache_dir:
        search.index = _cached_faiss(a, setup, g_emb, gallery_digest)
    res = recognize(zqs, g_emb, heads, gallery["landmark_id"].to_numpy(), idx2lid, device=device,
                    non_landmark=a.non_landmark, nl_emb=nl_emb, rerank_with=setup.rerank_with, search=search)
    res |= {"ids": list(sub["id"]), "query_paths": q_paths, "gallery_paths": g_paths,
            "gallery_labels": gallery["landmark_id"].to_numpy(), "scratch": scratch}
    return res


def _cached_faiss(a, setup, g_emb, gallery_digest):
    """--knn faiss on the GLDv2 layout: the gallery's faiss index, kept in --cache-dir beside the
    features it indexes (training an IVF on 1.58 M images is not to be repeated per run). Its
    name follows from the factory and from each model's features file, its name, size and
    modification time: features embedded again give a new index."""
    from retrieval import FaissGallery
    ident = [a.faiss_index]
    for m, ckpt in zip(setup.models, setup.ckpts):
        f = os.path.join(a.cache_dir, _cache_key(ckpt, int(m["image_size"]), gallery_digest, a.precision) + ".npy")
        st = os.stat(f)
        ident.append(f"{os.path.basename(f)}|{st.st_size}|{st.st_mtime_ns}")
    path = os.path.join(a.cache_dir, "faiss-" + hashlib.sha1("\n".join(ident).encode()).hexdigest()[:20])
    if os.path.exists(path + ".faiss") and os.path.exists(path + ".faiss.rows.npy"):
        print(f"faiss index {a.faiss_index!r}: read from {path}.faiss", flush=True)
        return FaissGallery.load(path + ".faiss", a.faiss_index)
    bad = unreadable_rows(*g_emb)
    fg = faiss_index(g_emb, a.faiss_index, exclude=bad if bad.any() else None)
    tmp = f"{path}.part{os.getpid()}"
    fg.save(tmp)  # then renamed: a run killed while writing leaves no index that looks whole
    os.replace(tmp + ".rows.npy", path + ".faiss.rows.npy")
    os.replace(tmp, path + ".faiss")
    print(f"faiss index {a.faiss_index!r}: {len(fg)} gallery images, kept in {path}.faiss", flush=True)
    return fg


def folder_answer(setup, zqs, g_emb, heads, g_labels, device="cpu", non_landmark=None, nl_emb=None,
                  whitening=None, search=None):
    """recognize() of load_setup's setup: with trained models as it is; without
    training (setup.zero), by retrieval on the features whitened on the gallery
    (whitening: (w, whitened gallery) when already learnt, as app.py keeps it).
    Returns (result, the queries' and the gallery's embeddings as compared)."""
    if setup.zero is None:
        res = recognize(zqs, g_emb, heads, g_labels, setup.idx2lid, device=device, non_landmark=non_landmark,
                        nl_emb=nl_emb, rerank_with=setup.rerank_with, search=search)
        return res, [F.normalize(torch.as_tensor(np.asarray(z)), dim=1).numpy() for z in zqs], g_emb
    if whitening is None:
        whitening = gallery_whitening(setup, g_emb)
    w, g_w = whitening
    q_w = whitened(zqs[0], w)
    nl_w = [whitened(nl_emb[0], w)] if nl_emb else None
    res = recognize([q_w], [g_w], None, g_labels, None, device=device, non_landmark=non_landmark, nl_emb=nl_w,
                    search=search)
    return res, [q_w], [g_w]


def gallery_whitening(setup, g_emb):
    """Without training: (the whitening learnt on the gallery's pooled features, the whitened gallery)."""
    w = whitening_of(g_emb[0], setup.zero.get("whiten", "auto"))
    return w, whitened(g_emb[0], w)


def run_folders(a):
    """Recognition on your own photos (see gallery.py), from predict.py's options: a
    gallery from folders (--gallery-dir) or a saved index (--index), queries from a
    folder (--query-dir). With --retrieval-ranks, also a CSV of each query's gallery
    images by decreasing similarity (the first a.ranks_k), for evaluate_retrieval.py
    --ranks. --backbone in place of --spec: recognition without training, by
    retrieval on the pretrained backbone's pooled features, PCA-whitened on the
    gallery (an index holds the raw features; the whitening is learnt again from the
    whole gallery at each answer). --knn faiss: a saved index keeps its faiss index
    beside it (PATH.faiss), used again while the gallery and the factory are the same.
    Returns (predictions frame or None, the recognize() result or None); under
    torchrun, (None, None) on ranks other than 0."""
    from gallery import (folder_gallery, ids_for_names, list_images, load_index, model_signature,
                         predictions_frame, save_index as write_index)
    device = _device(a)
    search = search_of(a)
    if a.index is None and a.gallery_dir is None:
        raise UserError("give --gallery-dir (one folder per landmark) or --index (a saved one)")
    if a.add_to_index and (a.index is None or a.gallery_dir is None):
        raise UserError("--add-to-index needs --index (the one to grow) and --gallery-dir (where the new files are)")
    if a.query_dir is not None and not os.path.isdir(a.query_dir):
        raise UserError(f"--query-dir {a.query_dir}: no such folder")
    q_rel = list_images(a.query_dir) if a.query_dir else []
    if a.query_dir and not q_rel:
        raise UserError(f"--query-dir {a.query_dir}: no images in it")
    setup = load_setup(a, device)
    signature = setup.signature if setup.zero else model_signature(setup.models, setup.ckpts, setup.pres)

    g_rel, g_labels, g_emb, names, idx = [], np.zeros(0, np.int64), None, dict(setup.known), None
    g_root = a.gallery_dir
    if a.index is not None:
        idx = load_index(a.index, signature)
        g_rel, g_labels, g_emb, names = idx["paths"], idx["labels"], idx["emb"], setup.known | idx["names"]
        g_root = a.gallery_dir or idx["gallery_dir"]
    todo = []
    if a.gallery_dir is not None:
        have = set(g_rel)
        todo = [(p, n) for p, n in folder_gallery(a.gallery_dir) if p not in have]
        if a.index is not None and not a.add_to_index:
            todo = []  # an index answers the queries; --add-to-index grows it
    q_paths = [os.path.join(a.query_dir, p) for p in q_rel]
    new_paths = [os.path.join(a.gallery_dir, p) for p, _ in todo]
    nl_paths = _non_landmark_paths(a.non_landmark)
    new_emb, zqs, heads, nl_emb, scratch = embed_all(a, setup, new_paths, q_paths, nl_paths, device)
    if not is_main():
        return None, None
    if todo:
        new_ids, by_id = ids_for_names([n for _, n in todo], {i: v for i, v in names.items()})
        names |= by_id
        good = ~unreadable_rows(*new_emb)
        if not good.all():
            print(f"unreadable gallery images: {int((~good).sum())} of {len(good)} (not indexed)", flush=True)
        keep = [p for (p, _), g in zip(todo, good) if g]
        g_rel = list(g_rel) + keep
        g_labels = np.concatenate([g_labels, new_ids[good]])
        g_emb = [np.asarray(e[good], np.float16) if g_emb is None else
                 np.concatenate([g_emb[i], np.asarray(e[good], np.float16)]) for i, e in enumerate(new_emb)]
        print(f"embedded {len(keep)} gallery images ({len(g_rel)} in all, {len(set(g_labels.tolist()))} landmarks)",
              flush=True)
    if g_emb is None or not len(g_rel):
        raise UserError("the gallery is empty: nothing to retrieve from")
    whitening = gallery_whitening(setup, g_emb) if setup.zero else None
    if search.kind == "faiss":  # the searched vectors: the embeddings, or the whitened pooled features
        search.index = folder_faiss(a, idx, len(g_rel), [whitening[1]] if whitening else g_emb)
    if a.save_index or a.add_to_index:
        stem = write_index(a.save_index or a.index, g_emb, g_labels, g_rel, names, signature, g_root,
                           faiss=search.index, whiten=a.whiten if setup.zero else None)
        print(f"index: {stem}.npz, {stem}.json ({len(g_rel)} images)", flush=True)
    if not q_paths:
        remove_scratch(a, scratch)
        return None, None
    res, q_emb, g_emb = folder_answer(setup, zqs, g_emb, heads, g_labels, device, a.non_landmark, nl_emb,
                                      whitening=whitening, search=search)
    final = "ensemble_nl" if a.non_landmark is not None else "ensemble"
    if a.retrieval_ranks:
        g_bad = res["unreadable"][1]
        _, order = topk_cosine(q_emb, g_emb, min(a.ranks_k, len(g_rel)), device=device,
                               exclude=g_bad if g_bad.any() else None)
        pd.DataFrame({"path": q_rel, "ranked": [" ".join(g_rel[j] for j in row if not g_bad[j]) for row in order]}
                     ).to_csv(a.retrieval_ranks, index=False)
        print(f"wrote {a.retrieval_ranks} (the first {order.shape[1]} gallery images of each query)", flush=True)
    sims, nn = res["neighbours"]
    res["frames"] = {part: predictions_frame(q_rel, *res[part], sims, nn, g_rel, names)
                     for part in ("classifier", "retrieval", "ensemble", "ensemble_nl") if part in res}
    res |= {"ids": q_rel, "query_paths": q_paths, "gallery_labels": np.asarray(g_labels), "names": names,
            "gallery_paths": [os.path.join(g_root, p) if g_root else p for p in g_rel], "scratch": scratch}
    return res["frames"][final], res


def folder_faiss(a, idx, n, vectors):
    """The faiss index of a folder gallery: the saved index's own when it was built with this
    factory (and whitening) on this very gallery, else built now."""
    from gallery import saved_faiss
    fg = saved_faiss(idx, a.faiss_index, n, a.whiten if a.backbone else None) if idx else None
    if fg is None:
        fg = faiss_index(vectors, a.faiss_index)
        print(f"faiss index {a.faiss_index!r}: {len(fg)} gallery images", flush=True)
    return fg


def _non_landmark_paths(non_landmark, data_dir=""):
    """Paths of a known non-landmark set (a CSV: column filepath, or id under
    DATA_DIR/non_landmark/), None for 'auto' or no set."""
    if non_landmark in (None, "auto"):
        return None
    nl = read_csv_checked(non_landmark, [])
    if "filepath" not in nl.columns and "id" not in nl.columns:
        raise UserError(f"--non-landmark {non_landmark}: expected a column id or filepath")
    return (list(nl["filepath"]) if "filepath" in nl.columns
            else [image_path(data_dir, "non_landmark", i) for i in nl["id"]])


def _auto_or_power(v):
    if v == "auto":
        return None
    try:
        f = float(v)
    except ValueError:
        f = -1.0
    if not f >= 0:
        raise argparse.ArgumentTypeError(f"{v!r} is neither 'auto' nor a power >= 0")
    return f


def add_search_args(p):
    """--knn and the faiss flags, on predict.py's parser and app.py's (search_of reads them)."""
    p.add_argument("--knn", choices=["exact", "faiss"], default="exact",
                   help="nearest-neighbour search: exact (the original's, in bounded memory) or faiss (pip install "
                        "faiss-cpu, or faiss-gpu) with the index of --faiss-index")
    p.add_argument("--faiss-index", default="Flat", metavar="FACTORY",
                   help="with --knn faiss: a faiss index_factory string, by inner product; Flat is exact, e.g. "
                        "IVF65536,PQ64 answers from 64-byte codes, trained on a sample of the gallery (default Flat)")
    p.add_argument("--faiss-nprobe", type=int, default=FAISS_NPROBE, metavar="N",
                   help=f"with an IVF index: inverted lists visited per query (default {FAISS_NPROBE})")
    p.add_argument("--faiss-ef", type=int, default=FAISS_EF_SEARCH, metavar="N",
                   help="with an HNSW index (e.g. HNSW32): search depth, efSearch; more finds more of the exact "
                        f"neighbours, slower (default {FAISS_EF_SEARCH}; faiss' own is 16)")
    p.add_argument("--faiss-rerank", type=int, default=FAISS_RERANK, metavar="N",
                   help="with --knn faiss: the index's N best candidates are scored again by their exact cosines "
                        "(read for those rows alone from the features) and give the top 5; 0: the codes' own "
                        f"similarities (default {FAISS_RERANK})")


def build_parser():
    """predict.py's options, the one place they are defined: parse_args (the CLI) and
    options() (other callers) both start from here."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data-dir", help="GLDv2 layout: holds train/, test/ and sample_submission.csv")
    p.add_argument("--train-csv", help="GLDv2 layout: the gallery, the clean train list (id,landmark_id)")
    p.add_argument("--idx2landmark",
                   help="idx2landmark_id.json (or the original's .pkl) from preprocess.py; with folders, optional "
                        "(landmark_names.json beside it names the classes)")
    p.add_argument("--gallery-dir", help="your photos: one folder per landmark, GALLERY_DIR/<name>/*.jpg")
    p.add_argument("--query-dir", help="your photos: the images to recognise (recursive)")
    p.add_argument("--index", help="a saved gallery index (PATH.npz + PATH.json) to answer from")
    p.add_argument("--save-index", help="save the gallery's embeddings as an index at PATH")
    p.add_argument("--retrieval-ranks", default=None, metavar="CSV",
                   help="with folders: also write each query's gallery images by decreasing similarity "
                        "(path,ranked), for evaluate_retrieval.py --ranks")
    p.add_argument("--add-to-index", action="store_true",
                   help="with --index and --gallery-dir: embed only the gallery files the index lacks, and save it")
    p.add_argument("--spec", help='JSON: {"models": [{"enet_type", "checkpoint", "image_size"}]}')
    p.add_argument("--backbone", metavar="NAME",
                   help="with folders, in place of --spec: no training, retrieval on this pretrained backbone's "
                        "pooled features, PCA-whitened on the gallery (a timm name, e.g. tf_efficientnet_b3_ns)")
    p.add_argument("--pretrained-path", default=None, help="with --backbone: its ImageNet weights file")
    p.add_argument("--image-size", type=int, default=256, help="with --backbone: the input size (default 256)")
    p.add_argument("--pool", choices=["avg", "gem"], default="avg", help="with --backbone: global pooling")
    p.add_argument("--whiten", choices=["auto", "pca", "off"], default="auto",
                   help="with --backbone: PCA whitening learnt on the gallery (auto: when the gallery has at least "
                        f"{WHITEN_MIN_RATIO} images per feature dimension)")
    p.add_argument("--out", default=None, help="default submission.csv (GLDv2), predictions.csv (folders)")
    p.add_argument("--sample-submission", default=None, help="query ids (default DATA_DIR/sample_submission.csv)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cache-dir", default="./cache", help="gallery features; '' disables the cache")
    p.add_argument("--fp16-cache", action="store_true", help="store gallery features in float16 (half the memory)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="backbone arithmetic for feature extraction: fp32 as the original notebook (default), or "
                        "bf16/fp16 autocast (faster on GPUs; the ArcFace head stays fp32)")
    p.add_argument("--exclude", default=None,
                   help="CSV of images not to read (column id or path, as preprocess.py --check-images writes)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the spec's checkpoints in full, objects included (only for files you trust)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model's backbone (worth it on GPUs for large galleries)")
    p.add_argument("--non-landmark", default=None, metavar="auto|CSV",
                   help="sink queries that look like non-landmarks (beyond the original): 'auto' mines them from "
                        "the queries, or a CSV of known non-landmark images (id under DATA_DIR/non_landmark/, or filepath)")
    p.add_argument("--rerank-vote", choices=["auto", "sum", "max"], default="auto",
                   help="re-ranking: a landmark's score sums its neighbours among the top 5 (sum, the original) or "
                        "takes its best (max); auto: max when every model was trained with --recipe finetune")
    p.add_argument("--rerank-cls-power", type=_auto_or_power, default=None, metavar="auto|P",
                   help="re-ranking: the power of the classifier's cosine in sim^9 cls^P; auto: the original's 10, "
                        "3 when every model was trained with --recipe finetune")
    p.add_argument("--report", default=None, metavar="HTML",
                   help="also write a visual report: per query its thumbnail, prediction and 5 nearest gallery "
                        "images, with the scores and a confidence histogram (one self-contained file, report.py)")
    p.add_argument("--report-rows", type=int, default=200, metavar="N",
                   help="queries in the report: the most confident wrong ones first (with --solution), then a "
                        "sample of the rest; all of them when N >= the number of queries (default 200)")
    p.add_argument("--solution", default=None, metavar="CSV",
                   help="with --report, the truth: GLDv2 layout, the competition's id,landmarks[,Usage]; folders, "
                        "path,landmark (the query's path under --query-dir, its gallery folder name; empty for none)")
    p.add_argument("--logs", nargs="+", default=None, metavar="LOG",
                   help="with --report, train.py logs whose curves go into it")
    p.add_argument("--write-parts", action="store_true",
                   help="also write OUT's classifier-only, retrieval-only (and, with --non-landmark, plain "
                        "re-ranked) submissions or predictions: *_classifier.csv, *_retrieval.csv, *_ensemble.csv")
    add_search_args(p)
    p.add_argument("--dist-timeout", type=float, default=60,
                   help="under torchrun: minutes a rank waits for the others (their share of the images) before "
                        "the run fails (default 60)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # torch.distributed.launch passes it; torchrun sets LOCAL_RANK
    p.set_defaults(ranks_k=10000)  # --retrieval-ranks: how many gallery images per query
    return p


def check_options(a):
    """The options' consistency, and the derived a.folders and a.out; a UserError names what is wrong."""
    a.folders = any(v is not None for v in (a.gallery_dir, a.query_dir, a.index))
    if (a.spec is None) == (a.backbone is None):
        raise UserError("give --spec (trained models) or --backbone (no training, with folders), not both")
    if a.backbone and not a.folders:
        raise UserError("--backbone works with folders (--gallery-dir/--index and --query-dir)")
    if a.image_size <= 0:
        raise UserError(f"--image-size {a.image_size}: must be positive")
    if not a.folders and not (a.data_dir and a.train_csv and a.idx2landmark):
        raise UserError("give --data-dir, --train-csv and --idx2landmark (GLDv2 layout), or --gallery-dir/--index "
                        "and --query-dir (your photos)")
    a.out = a.out or ("predictions.csv" if a.folders else "submission.csv")
    if a.report_rows < 1:
        raise UserError(f"--report-rows {a.report_rows}: must be at least 1")
    if not a.report and (a.solution or a.logs):
        raise UserError("--solution and --logs go with --report")
    if a.faiss_nprobe < 1:
        raise UserError(f"--faiss-nprobe {a.faiss_nprobe}: must be at least 1")
    if a.faiss_ef < 1:
        raise UserError(f"--faiss-ef {a.faiss_ef}: must be at least 1")
    if a.faiss_rerank < 0:
        raise UserError(f"--faiss-rerank {a.faiss_rerank}: must be 0 or more")
    return a


def parse_args(argv=None):
    return check_options(build_parser().parse_args(argv))


def options(base=None, **overrides):
    """predict.py's options for a caller other than its command line (app.py, the notebook,
    tests): the parser's defaults, then the attributes of namespace `base` that predict.py
    knows, then `overrides` (by attribute name: data_dir=..., spec=...), checked as the CLI
    checks them."""
    a = build_parser().parse_args([])
    known = set(vars(a))
    for k, v in (vars(base) if base is not None else {}).items():
        if k in known:
            setattr(a, k, v)
    for k, v in overrides.items():
        if k not in known:
            raise TypeError(f"predict.py has no option {k!r}")
        setattr(a, k, v)
    return check_options(a)


def check_report_inputs(a):
    """--solution and --logs read before any image: a wrong file ends the run at once.
    Returns the GLDv2 truth (folders: read once the gallery's names are known)."""
    import plot_logs
    from evaluate import read_solution
    plot_logs.read_logs(a.logs or (), "--logs")
    if a.solution and a.folders:
        read_csv_checked(a.solution, ["path", "landmark"])
    return read_solution(a.solution) if a.solution and not a.folders else None


def write_report(a, res, names, truth=None):
    """predict.py --report: report.report_from_result with the truth of --solution."""
    import report
    from gallery import read_folder_solution
    if a.solution and a.folders:
        truth = read_folder_solution(a.solution, names)
    notes = [f"spec {a.spec}" if a.spec else f"backbone {a.backbone} without training",
             f"answer: {'ensemble with non-landmarks sunk (' + a.non_landmark + ')' if a.non_landmark else 'ensemble'}"
             f"; truth: {a.solution or 'not given'}"]
    report.report_from_result(a.report, res, names, truth, bool(a.non_landmark), a.logs, a.report_rows,
                              notes=notes)


def main(argv=None):
    a = parse_args(argv)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and int(os.environ["WORLD_SIZE"]) > 1 and not a.cache_dir:
        raise UserError("--cache-dir '': under torchrun the ranks hand their features over through --cache-dir; "
                        "give a folder every rank can read and write")
    if launched:
        setup_distributed(a.local_rank, a.dist_timeout)
        # the node's cores shared by its ranks: loader workers and intra-op threads (as train.py)
        a.num_workers, threads = cpu_budget(a.num_workers)
        torch.set_num_threads(threads)
    try:
        check_shared_cache(a.cache_dir)
        return _main(a)
    finally:
        cleanup_distributed()


def _main(a):
    truth = check_report_inputs(a) if a.report else None
    if a.folders:
        frame, res = run_folders(a)
        if frame is not None:
            frame.to_csv(a.out, index=False)
            if a.report:
                write_report(a, res, res["names"])
            print(f"wrote {a.out} ({len(frame)} rows, {int((frame['landmark'] != '').sum())} with a landmark)")
            if a.write_parts:
                stem = os.path.splitext(a.out)[0]
                for part in ("classifier", "retrieval") + (("ensemble",) if a.non_landmark else ()):
                    if part in res["frames"]:  # --backbone: no classifier
                        res["frames"][part].to_csv(f"{stem}_{part}.csv", index=False)
            remove_scratch(a, res["scratch"])
        return res
    res = run(a)
    if res is None:  # torchrun, rank > 0: its share is embedded; rank 0 answers
        return None
    final = "ensemble_nl" if a.non_landmark else "ensemble"
    format_submission(res["ids"], *res[final]).to_csv(a.out, index=False)
    if a.write_parts:
        stem = os.path.splitext(a.out)[0]
        for part in ("classifier", "retrieval") + (("ensemble",) if a.non_landmark else ()):
            format_submission(res["ids"], *res[part]).to_csv(f"{stem}_{part}.csv", index=False)
    if a.non_landmark:
        print(f"non-landmark handling ({a.non_landmark}): {int(res['nl_flags'].sum())} of {len(res['ids'])} "
              f"queries sunk")
    print(f"wrote {a.out} ({len(res['ids'])} rows)")
    if a.report:
        from gallery import landmark_names
        write_report(a, res, landmark_names(a.idx2landmark), truth)
    remove_scratch(a, res["scratch"])
    return res


if __name__ == "__main__":
    run_main(main)
