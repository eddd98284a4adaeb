"""The models that answer: a spec's trained models, or a pretrained backbone without training, one interface.

    ens = ensemble.load(a, device)        # from --spec (trained) or --backbone (no training), checked
    for member in ens.members:            # features.py loads them one at a time
        model = member.load(device)       # .neck(x) -> features, .preprocessing; .metric_classify if trained
    space = ens.fit(gallery_features, gallery_labels)  # how the queries and this gallery are compared

- Trained models (--spec): each a models.Net from a checkpoint of ours or of the original code,
  fed as it was trained. Their features are embeddings, L2-normalised at extraction; their ArcFace
  heads classify, and the re-ranking follows how they were trained (retrieval.resolve_rerank).
- A pretrained backbone (--backbone): its pooled features stand in for the neck output, with no
  head. With a gallery of landmarks they are compared after a whitening learnt from its landmarks
  (retrieval.learn_within_whitening, --whiten auto or learned); without (a retrieval database), after
  a PCA whitening learnt on it, for databases large enough for it (retrieval.whitening_of).

Every check that can fail runs here, before any image is read: an ensemble's extraction takes
hours, a wrong checkpoint path must not surface after them.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from dataset import letterbox_fill
from models import build_model, check_enet_type, has_feature_map, letterbox_extent, pool_within, preprocessing_for
from retrieval import (RERANK, WHITEN_MIN_RATIO, learn_within_whitening, learned_whitened, resolve_rerank, whitened,
                       whitening_of)
from util import UserError, file_digest, load_checkpoint, load_fitting, memory_format, read_label_map


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


def _scales(v):
    try:
        s = tuple(float(x) for x in v.split(",") if x.strip())
    except ValueError:
        s = ()
    if not s or not all(x > 0 for x in s):
        raise argparse.ArgumentTypeError(f"{v!r}: expected positive multiples of the image size, e.g. 0.7,1,1.4")
    return s


# --backbone's defaults (docs/transfer.md, 10 splits of realhard and realdev): the whole picture
# (letterbox) with its longer side at 1, 1.4 and 2x --image-size: realhard 0.875 -> 0.894 GAP of the
# nearest photo against squares at 0.7, 1, 1.4x (which were 0.832 -> 0.875 against one square),
# realdev 0.967 -> 0.968. Squares keep 0.7, 1, 1.4 (a backbone without a spatial map).
BACKBONE_SCALES = {"keep-aspect": (1.0, 1.4, 2.0), "square": (0.7, 1.0, 1.4)}


def resize_of(a):
    """--resize, or its default: keep-aspect with a --backbone that has a spatial map, else square
    (trained models see images as they were trained, the original's squares)."""
    r = getattr(a, "resize", None)
    if r is not None:
        return r
    return "keep-aspect" if getattr(a, "backbone", None) and has_feature_map(a.backbone) else "square"


def scales_of(a):
    """--scales, or its default: BACKBONE_SCALES with --backbone, one scale with --spec (the original's)."""
    s = getattr(a, "scales", None)
    return s if s is not None else (BACKBONE_SCALES[resize_of(a)] if getattr(a, "backbone", None) else (1.0,))


def sizes_of(image_size, scales):
    """The input sizes of a model at these scales (rounded to whole pixels, at least 32)."""
    return [max(32, int(round(image_size * s))) for s in scales]


def add_args(p):
    """The options that choose the models and how they answer, on predict.py's parser and app.py's."""
    p.add_argument("--spec", help='JSON: {"models": [{"enet_type", "checkpoint", "image_size"}]}')
    p.add_argument("--idx2landmark",
                   help="idx2landmark_id.json (or the original's .pkl) from preprocess.py; with folders, optional "
                        "(landmark_names.json beside it names the classes)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the spec's checkpoints in full, objects included (only for files you trust)")
    p.add_argument("--backbone", metavar="NAME",
                   help="with folders, in place of --spec: no training, retrieval on this pretrained backbone's "
                        "pooled features, whitened on the gallery (a timm name, e.g. tf_efficientnet_b3_ns)")
    p.add_argument("--pretrained-path", default=None, help="with --backbone: its ImageNet weights file")
    p.add_argument("--image-size", type=int, default=256, help="with --backbone: the input size (default 256)")
    p.add_argument("--pool", choices=["avg", "gem"], default="avg", help="with --backbone: global pooling")
    p.add_argument("--whiten", choices=["auto", "pca", "off", "learned"], default="auto",
                   help="with --backbone: learned: a whitening learnt from the gallery's landmarks (the ways "
                        "photos of one landmark differ shrunk), compared half with the raw cosine; pca: PCA "
                        "whitening learnt on the gallery; auto (default): learned with a gallery of landmark "
                        f"folders, else pca from {WHITEN_MIN_RATIO} images per feature dimension "
                        "(evaluate_retrieval.py's database)")
    p.add_argument("--resize", choices=["keep-aspect", "square"], default=None,
                   help="with --backbone: keep-aspect sees the whole picture, its longer side at the size, on a "
                        "square of the mean colour, pooled over the picture alone (the default where the backbone "
                        "has a spatial map); square squashes it to the size, as trained models (--spec) see images")
    p.add_argument("--scales", type=_scales, default=None, metavar="S,S,...",
                   help="multi-scale descriptors: each model embeds every image at these multiples of its size "
                        "and averages the unit-length features (default with --backbone: 1,1.4,2 keeping the "
                        "aspect, 0.7,1,1.4 square, chosen on the real photo sets, docs/transfer.md; 1 with --spec, "
                        "the original's)")
    p.add_argument("--gem-p", type=float, default=None, metavar="P",
                   help="with --backbone --pool gem: GeM's exponent (default 3; 1 is average pooling)")
    p.add_argument("--rerank-vote", choices=["auto", "sum", "max"], default="auto",
                   help="re-ranking: a landmark's score sums its neighbours among the top 5 (sum, the original) or "
                        "takes its best (max); auto: max when every model was trained with --recipe finetune")
    p.add_argument("--rerank-cls-power", type=_auto_or_power, default=None, metavar="auto|P",
                   help="re-ranking: the power of the classifier's cosine in sim^9 cls^P; auto: the original's 10, "
                        "3 when every model was trained with --recipe finetune")


# ---------------------------------------------------------------- trained models

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


class TrainedModel:
    """One model of a spec: its checkpoint, loaded when asked (one on the device at a time).
    Its features are embeddings (normalised at extraction) and its head classifies."""
    classifies = True

    def __init__(self, enet_type, checkpoint, image_size, preprocessing, trust=False, compile=False, scales=(1.0,)):
        self.enet_type, self.checkpoint, self.image_size = enet_type, checkpoint, int(image_size)
        self.preprocessing, self.trust, self.compile = preprocessing, trust, compile
        self.name = f"{os.path.basename(checkpoint)}@{self.image_size}"
        self.cache_ident = None  # features.cache_key names it by its checkpoint file's path, size and time
        self.scales, self.sizes = tuple(scales), sizes_of(self.image_size, scales)

    def signature(self):
        """What a saved index's embeddings depend on (gallery.py refuses an index of other models)."""
        sig = {"enet_type": self.enet_type, "image_size": self.image_size,
               "checkpoint_sha1": file_digest(self.checkpoint), "preprocessing": self.preprocessing}
        return sig if self.scales == (1.0,) else sig | {"scales": list(self.scales)}

    def load(self, device="cpu"):
        model = load_model(self.enet_type, self.checkpoint, device, self.trust, image_size=self.image_size)
        if self.compile:  # the backbone and neck; a ragged last batch compiles once more
            model.neck = torch.compile(model.neck)
        return model


# ---------------------------------------------------------------- a pretrained backbone, no training

class PooledFeatures(torch.nn.Module):
    """Recognition without training: a pretrained backbone's pooled features
    stand in for the neck output (predict.py --backbone). keep_aspect: the net
    gives its spatial map (built with pool='gem'), and the letterboxed inputs of
    dataset.val_transform are pooled over the picture's own cells."""

    def __init__(self, net, keep_aspect=False, p=None):
        super().__init__()
        self.net, self.keep_aspect, self.p = net, keep_aspect, p
        self.preprocessing = dict(net.preprocessing, resize="keep-aspect") if keep_aspect else net.preprocessing
        self.fill = letterbox_fill(net.preprocessing)
        self.neck_dim = net.feat.in_features

    def neck(self, x):
        if not self.keep_aspect:
            return self.net.extract(x)
        extent = letterbox_extent(x, self.fill)  # from the uint8 pixels, before normalisation
        return pool_within(self.net.enet(self.net.normalize_input(x)), extent, x.shape[2:], self.p)


class PretrainedBackbone:
    """The backbone with its ImageNet weights (a --pretrained-path file, or timm's download or
    cache), built at once: a missing file or an offline machine fails before any image is read.
    Its features are raw pooled features (whitened on the gallery by Space); no head."""
    classifies = False

    def __init__(self, backbone, pretrained_path=None, pool="avg", image_size=256, device="cpu", scales=(1.0,),
                 gem_p=None, resize="square"):
        check_enet_type(backbone)
        if pretrained_path is not None and not os.path.isfile(pretrained_path):
            raise UserError(f"--pretrained-path {pretrained_path}: no such file")
        if gem_p is not None and (pool != "gem" or not gem_p > 0):
            raise UserError(f"--gem-p {gem_p}: a positive exponent, with --pool gem")
        keep_aspect = resize == "keep-aspect"
        if keep_aspect and not has_feature_map(backbone):
            raise UserError(f"--resize keep-aspect: {backbone} gives no spatial map to pool over the picture "
                            f"alone; use --resize square")
        # keep-aspect pools the map itself (pool_within): the net gives it unpooled, as for GeM
        net = build_model(backbone, 1, pretrained=True, pretrained_path=pretrained_path,
                          pool="gem" if keep_aspect else pool, image_size=image_size)
        if gem_p is not None:
            with torch.no_grad():
                net.pool.p.fill_(gem_p)
        p = (None if pool == "avg" else float(net.pool.p)) if keep_aspect else None
        self.model = PooledFeatures(net, keep_aspect, p).to(device, memory_format=memory_format(torch.device(device)))
        self.model.eval()
        self.image_size, self.name, self.checkpoint = int(image_size), f"{backbone}@{int(image_size)}", None
        self.scales, self.sizes = tuple(scales), sizes_of(self.image_size, scales)
        self._signature = {"enet_type": backbone, "image_size": int(image_size), "pool": pool, "features": "pooled",
                           "weights_sha1": file_digest(pretrained_path) if pretrained_path else f"timm:{backbone}",
                           "preprocessing": net.preprocessing}
        if gem_p is not None:
            self._signature["gem_p"] = float(gem_p)
        if keep_aspect:  # absent for squares: an index built before the flag reads with --resize square
            self._signature["resize"] = resize
        if self.scales != (1.0,):
            self._signature["scales"] = list(self.scales)
        self.cache_ident = json.dumps([self._signature], sort_keys=True)

    def signature(self):
        return self._signature

    def load(self, device="cpu"):
        return self.model


# ---------------------------------------------------------------- the ensemble

class Space:
    """How the queries are compared with one gallery. inputs(zqs): the queries' features as
    retrieval.recognize takes them (it normalises them); embeddings(inputs): the unit vectors it
    compares, for a full ranking (--retrieval-ranks); gallery: the gallery's side; whiten: the
    whitening mode it was learnt with (None for trained models), recorded with a faiss index; refit:
    for a space learnt from the gallery's labels (--whiten learned), keep (bool per gallery row) ->
    the gallery's side in the space learnt from those rows alone, for a calibration whose held-out
    answers the space did not learn from (calibration.held_out_answers)."""

    def __init__(self, gallery, transform=None, whiten=None, refit=None):
        self.gallery, self.transform, self.whiten = gallery, transform, whiten
        self.refit = refit

    def inputs(self, zqs):
        return zqs if self.transform is None else [self.transform(zqs[0])]

    def embeddings(self, inputs):
        if self.transform is None:
            return [F.normalize(torch.as_tensor(np.asarray(z)), dim=1).numpy() for z in inputs]
        return inputs  # whitened() gives unit vectors


class Ensemble:
    """members: TrainedModel or PretrainedBackbone, in the spec's order; classifies: whether they
    have heads (all or none); idx2lid: the heads' class index -> landmark id; known: the names of
    the landmarks the classifier knows (landmark id -> name); rerank_with: (vote, sim power, cls
    power) of retrieval.rerank; description: one line for reports."""

    def __init__(self, members, idx2lid, known, rerank_with, description, whiten="auto"):
        self.members, self.idx2lid, self.known = members, idx2lid, known
        self.rerank_with, self.description, self.whiten = rerank_with, description, whiten
        self.classifies = all(m.classifies for m in members)

    def signature(self):
        return [m.signature() for m in self.members]

    def fit(self, g_emb, labels=None):
        """The Space of this gallery (its features per model, as features.embed_all gives them; its
        landmark ids, which --whiten learned needs): as they are for trained models; for a backbone,
        with its landmarks the whitening of their own scatter (retrieval.learn_within_whitening),
        without them the PCA whitening learnt on them (--whiten auto from WHITEN_MIN_RATIO images
        per dimension)."""
        if self.classifies:
            return Space(g_emb)
        mode = self.whiten
        if mode == "auto" and labels is not None:
            # a gallery of landmark folders: its landmarks teach the whitening. realhard +0.03 GAP, 2 photos
            # a landmark +0.045 (realhard) and +0.014 (realdev); realdev's quarter split -0.004, one photo
            # of a castle taken for another in 2 of 10 splits (10 splits each, docs/transfer.md)
            mode = "learned"
        if mode == "learned":
            if labels is None:
                raise UserError("--whiten learned: needs a gallery whose photos name their landmarks")
            g, lab = g_emb[0], np.asarray(labels)
            w = learn_within_whitening(g, lab)
            return Space([learned_whitened(g, w)], lambda z: learned_whitened(z, w), mode,
                         lambda keep: [learned_whitened(g, learn_within_whitening(g[keep], lab[keep]))])
        w = whitening_of(g_emb[0], mode)
        return Space([whitened(g_emb[0], w)], lambda z: whitened(z, w), mode)


def landmark_names(label_map_path):
    """{landmark id: name} from landmark_names.json beside the label map (preprocess.py
    --from-folder writes both), else {}."""
    if not label_map_path:
        return {}
    path = os.path.join(os.path.dirname(os.path.abspath(label_map_path)), "landmark_names.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {int(k): str(v) for k, v in json.load(f).items()}


def load(a, device="cpu"):
    """The Ensemble of the options of add_args (and a.compile where the caller has it), checked:
    --spec's models (checkpoints, backbones, sizes, classes against --idx2landmark) or --backbone
    built with its weights."""
    idx2lid = read_label_map(a.idx2landmark) if a.idx2landmark else None
    # the classes' names: landmark_names.json beside the label map, else the landmark ids themselves
    # (GLDv2's landmarks have no other name): a gallery folder named so is a class the classifier knows
    known = landmark_names(a.idx2landmark) or ({lid: str(lid) for lid in idx2lid.values()} if idx2lid else {})
    if a.backbone:
        member = PretrainedBackbone(a.backbone, a.pretrained_path, a.pool, a.image_size, device, scales_of(a),
                                    getattr(a, "gem_p", None), resize_of(a))
        return Ensemble([member], idx2lid, known, RERANK["original"], f"backbone {a.backbone} without training",
                        a.whiten)
    if getattr(a, "resize", None) == "keep-aspect":
        raise UserError("--resize keep-aspect goes with --backbone (trained models see squares, as they were trained)")
    models, base = load_spec(a.spec) if isinstance(a.spec, str) else (a.spec, os.getcwd())
    ckpts, n, pres, recipes = check_models(models, base, len(idx2lid) if idx2lid else None, a.idx2landmark,
                                           a.trust_checkpoint)
    if idx2lid is None:  # anonymous classes: the classifier can name no gallery landmark
        idx2lid = {i: -1 - i for i in range(n)}
    if getattr(a, "gem_p", None) is not None:
        raise UserError("--gem-p goes with --backbone (a trained model keeps the GeM exponent it learnt)")
    members = [TrainedModel(m["enet_type"], c, m["image_size"], p, a.trust_checkpoint, getattr(a, "compile", False),
                            scales_of(a)) for m, c, p in zip(models, ckpts, pres)]
    return Ensemble(members, idx2lid, known, resolve_rerank(a.rerank_vote, a.rerank_cls_power, recipes),
                    f"spec {a.spec}")
