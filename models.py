"""The model: backbone -> global pool -> Linear(C, 512) -> Swish -> sub-center ArcFace head.

One class, `Net`, for every backbone. Its parameter names equal the original
repo's (`enet.*`, `feat.*`, `metric_classify.weight`, and inside `enet` the
backbone's own names as the original built it), so checkpoints written by the
original code load with strict=True.
"""
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from util import UserError

EMBED_DIM = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # A.Normalize()'s defaults, which the original used
IMAGENET_STD = (0.229, 0.224, 0.225)
REXNET_ORIGINAL_FILE = "rexnetv1_2.0x.pth"  # where the original read ReXNet's ImageNet weights


# ---------------------------------------------------------------- ReXNet-V1

class _SE(nn.Module):
    def __init__(self, channels, se_ratio=12):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, channels // se_ratio, 1),
            nn.BatchNorm2d(channels // se_ratio),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // se_ratio, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.fc(self.avg_pool(x))


def _conv_bn(in_c, out_c, kernel=1, stride=1, groups=1, act=None):
    layers = [nn.Conv2d(in_c, out_c, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_c)]
    return layers + ([act] if act is not None else [])


class _LinearBottleneck(nn.Module):
    def __init__(self, in_c, out_c, t, stride, use_se, se_ratio=12):
        super().__init__()
        self.use_shortcut = stride == 1 and in_c <= out_c
        self.in_channels = in_c
        dw = in_c * t
        layers = _conv_bn(in_c, dw, act=nn.SiLU(inplace=True)) if t != 1 else []
        layers += _conv_bn(dw, dw, 3, stride, groups=dw)
        if use_se:
            layers.append(_SE(dw, se_ratio))
        layers.append(nn.ReLU6())
        layers += _conv_bn(dw, out_c)
        self.out = nn.Sequential(*layers)

    def forward(self, x):
        out = self.out(x)
        if self.use_shortcut:
            # ReXNet's partial residual: only the first in_c channels get the input
            out = torch.cat([out[:, :self.in_channels] + x, out[:, self.in_channels:]], 1)
        return out


class ReXNetV1(nn.Module):
    """ReXNet-V1 (Han et al., 2020, arXiv 2007.00992) laid out as clovaai's
    reference `ReXNetV1`, whose module names the original checkpoints use
    (`features.N...`, `output.1`). forward returns the pooled (B, C) features:
    the original replaced `output` by Identity and squeezed."""

    def __init__(self, width_mult=2.0, depth_mult=1.0, input_ch=16, final_ch=180, se_ratio=12,
                 num_classes=1000, dropout=0.2):
        super().__init__()
        layers = [math.ceil(n * depth_mult) for n in (1, 2, 2, 3, 3, 5)]
        strides = sum(([s] + [1] * (n - 1) for s, n in zip((1, 2, 2, 2, 1, 2), layers)), [])
        use_ses = sum(([se] * n for se, n in zip((False, False, True, True, True, True), layers)), [])
        ts = [1] * layers[0] + [6] * sum(layers[1:])
        n_blocks = sum(layers)
        stem = 32 / width_mult if width_mult < 1.0 else 32
        inplanes = input_ch / width_mult if width_mult < 1.0 else input_ch
        # every block widens the channels linearly: final_ch spread over the blocks
        in_cs, out_cs = [], []
        for i in range(n_blocks):
            if i == 0:
                in_cs.append(int(round(stem * width_mult)))
            else:
                in_cs.append(int(round(inplanes * width_mult)))
                inplanes += final_ch / n_blocks
            out_cs.append(int(round(inplanes * width_mult)))
        features = _conv_bn(3, int(round(stem * width_mult)), 3, 2, act=nn.SiLU(inplace=True))
        for in_c, out_c, t, s, se in zip(in_cs, out_cs, ts, strides, use_ses):
            features.append(_LinearBottleneck(in_c, out_c, t, s, se, se_ratio))
        self.num_features = int(1280 * width_mult)
        features += _conv_bn(out_cs[-1], self.num_features, act=nn.SiLU(inplace=True))
        features.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*features)
        self.output = nn.Sequential(nn.Dropout(dropout), nn.Conv2d(self.num_features, num_classes, 1))

    def forward(self, x):
        return self.output(self.features(x)).flatten(1)


def rexnet_from_timm_state_dict(timm_sd, model):
    """Map timm's `rexnet_200` weights onto ReXNetV1's names.

    Both hold the same tensors in the same order (stem, 16 blocks, head conv),
    under different names; the classifier is left as it is.
    """
    target = [k for k in model.state_dict() if not k.startswith("output.")]
    source = [k for k in timm_sd if not k.startswith("head.")]
    if len(target) != len(source):
        raise ValueError(f"ReXNet weights: {len(source)} tensors, expected {len(target)}")
    out = {}
    for t, s in zip(target, source):
        if timm_sd[s].shape != model.state_dict()[t].shape:
            raise ValueError(f"ReXNet weights: {s} {tuple(timm_sd[s].shape)} does not fit {t}")
        out[t] = timm_sd[s]
    return out


# ---------------------------------------------------------------- backbones

def _timm_name(enet_type):
    """timm's current name for a backbone name of the original: its noisy-student
    EfficientNets `tf_efficientnet_bN_ns` are `tf_efficientnet_bN.ns_jft_in1k` in
    timm >= 0.9 (the same weights; the old names print a deprecation warning)."""
    name = {"nest101": "resnest101e", "rex20": "rexnet_200"}.get(enet_type, enet_type.replace("-", "_"))
    if name.startswith("tf_efficientnet_") and name.endswith("_ns") and "." not in name:
        name = name[:-3] + ".ns_jft_in1k"
    return name


class MissingWeights(UserError):
    """ImageNet weights that could not be had. The message names --pretrained-path, which every
    command that builds a pretrained backbone takes; train.py adds its own --no-pretrained."""


def _pretrained_error(enet_type, err):
    why = (str(err).splitlines() or [type(err).__name__])[0][:200]
    return MissingWeights(f"could not get ImageNet weights for '{enet_type}' ({why}). Without network access, "
                          f"pass --pretrained-path FILE (timm's weights file) or put it in the torch/Hugging Face "
                          f"cache")


def _weights_reachable(timm_name, timeout=3.0):
    """True when timm can get `timm_name`'s ImageNet weights: they are in the
    Hugging Face or torch hub cache, or the host serving them answers within
    `timeout` seconds. Offline, timm would otherwise retry for a minute and
    print hundreds of lines before failing."""
    import socket
    from urllib.parse import urlparse

    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(timm_name)
    if cfg is None:
        return True  # no known source: let timm say what it says
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str):
                return True
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    elif cfg.url:
        if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))):
            return True
        host = urlparse(cfg.url).hostname
    else:
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_enet_type(enet_type):
    """A UserError unless `enet_type` names a backbone this repo can build
    (nest101, rex20 or any timm model name), suggesting close timm names."""
    import difflib

    import timm
    if enet_type in ("nest101", "rex20") or timm.is_model(_timm_name(enet_type)):
        return
    close = difflib.get_close_matches(enet_type, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"--enet-type {enet_type}: not a known backbone{hint} (nest101, rex20, or a timm name: "
                    f"python -c \"import timm; print(timm.list_models('*efficientnet*'))\")")


ORIGINAL_PREPROCESSING = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bilinear"}


def is_original_backbone(enet_type):
    """The original's backbones: tf_efficientnet_b0..b7_ns, nest101, rex20."""
    return enet_type in ("nest101", "rex20") or re.fullmatch(r"tf_efficientnet_b[0-7]_ns", enet_type) is not None


def _config_beside(pretrained_path):
    """timm's config.json of a weights file (its Hugging Face hub layout): beside the file, or in the folder."""
    if not pretrained_path:
        return None
    folder = pretrained_path if os.path.isdir(pretrained_path) else os.path.dirname(os.path.abspath(pretrained_path))
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    import json
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def preprocessing_for(enet_type, pretrained_path=None):
    """{mean, std, interpolation} the backbone's ImageNet weights expect.

    The original's backbones keep exactly the original's input: ImageNet
    mean/std (A.Normalize) and bilinear resizing (A.Resize), whatever timm's
    configs say. Any other timm model gets its pretrained_cfg's statistics and
    interpolation (e.g. 0.5/0.5 and bicubic for tf_efficientnet_lite* and many
    ViTs, CLIP's own for CLIP weights)."""
    if is_original_backbone(enet_type):
        return dict(ORIGINAL_PREPROCESSING)
    from timm.models import get_pretrained_cfg
    cfg = None
    conf = _config_beside(pretrained_path)  # a --pretrained-path file's own config wins over the name's
    if conf:
        cfg = conf.get("pretrained_cfg") or None
        if cfg is None and conf.get("architecture"):
            c = get_pretrained_cfg(conf["architecture"])
            cfg = c.to_dict() if c is not None else None
    if cfg is None:
        c = get_pretrained_cfg(_timm_name(enet_type))
        cfg = c.to_dict() if c is not None else None
    if cfg is None or "mean" not in cfg or "std" not in cfg:
        return dict(ORIGINAL_PREPROCESSING)
    interp = cfg.get("interpolation")
    interp = interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear"
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]], "interpolation": interp}


class GeM(nn.Module):
    """Generalized-mean pooling (Radenovic, Tolias, Chum, TPAMI 2018): (mean x^p)^(1/p)
    over the spatial positions, p learnt (init 3); p=1 is average pooling, p->inf max.
    Computed in float32: x^3 of bf16 activations loses too much."""

    def __init__(self, p=3.0, eps=1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            x = x.float().clamp(min=self.eps).pow(self.p)
            return x.mean(dim=(2, 3)).pow(1.0 / self.p)


def letterbox_extent(x, fill):
    """(B, 2): the rows and columns of uint8 images x (B, 3, H, W) that hold the picture, when
    dataset.val_transform's letterbox filled the bottom and right with `fill` (uint8 RGB). Read
    from the pixels, so that nothing travels beside the batch: the last row (column) with a pixel
    of another colour ends the picture. A photo whose own last rows are that exact colour across
    its width loses them from the pooling, which changes nothing they could show; an image of the
    fill colour alone keeps its whole extent."""
    _, _, h, w = x.shape
    differs = (x != torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).any(1)
    rows, cols = differs.any(2), differs.any(1)
    # argmax of the flipped mask: how many trailing rows (columns) are fill alone; 0 when none differs
    return torch.stack([h - rows.flip(1).int().argmax(1), w - cols.flip(1).int().argmax(1)], 1)


def pool_within(f, extent, input_hw, p=None):
    """Average (p None) or generalized-mean (p) pooling of feature maps f (B, C, h, w) over the
    cells that see the picture: extent (B, 2) of an input of input_hw (H, W) pixels, as
    letterbox_extent gives it. A cell counts when it starts inside the picture (its receptive
    field's centre may lie in the fill by less than a cell). float32, as GeM."""
    with torch.autocast(f.device.type, enabled=False):
        f = f.float()
        b, _, h, w = f.shape
        cells = torch.stack([torch.ceil(extent[:, 0].float() * h / input_hw[0]),
                             torch.ceil(extent[:, 1].float() * w / input_hw[1])], 1).clamp(min=1)
        mask = ((torch.arange(h, device=f.device).view(1, h, 1) < cells[:, 0].view(b, 1, 1))
                & (torch.arange(w, device=f.device).view(1, 1, w) < cells[:, 1].view(b, 1, 1))).unsqueeze(1)
        n = mask.sum((2, 3)).float()
        if p is None:
            return (f * mask).sum((2, 3)) / n
        return ((f.clamp(min=1e-6).pow(p) * mask).sum((2, 3)) / n).pow(1.0 / p)


def has_feature_map(enet_type):
    """Whether build_backbone(pool='gem') gives this backbone's spatial map (a CNN of timm), which
    pool_within needs: rex20 pools inside its own layout, a transformer its tokens."""
    return enet_type != "rex20" and not _is_transformer(_timm_name(enet_type))


def _rexnet20(pretrained, pretrained_path):
    """ReXNet-V1 2.0x in clovaai's layout and its width; weights from a file of either layout (the
    original's location by default), or timm's rexnet_200 renamed."""
    import timm
    net = ReXNetV1(width_mult=2.0)
    if pretrained_path is None and pretrained and os.path.exists(REXNET_ORIGINAL_FILE):
        pretrained_path = REXNET_ORIGINAL_FILE  # the original's location
    if pretrained_path is not None:
        sd = torch.load(pretrained_path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        if "features.0.weight" not in sd:  # not clovaai's layout: timm's rexnet_200 names
            sd = rexnet_from_timm_state_dict(sd, net) | {k: v for k, v in net.state_dict().items()
                                                       if k.startswith("output.")}
        net.load_state_dict(sd, strict=True)
    elif pretrained:
        if not _weights_reachable("rexnet_200"):
            raise _pretrained_error("rex20", "not in the cache, and the hub is unreachable")
        try:
            t = timm.create_model("rexnet_200", pretrained=True)
        except Exception as e:
            raise _pretrained_error("rex20", e) from e
        net.load_state_dict(rexnet_from_timm_state_dict(t.state_dict(), net), strict=False)
    dim = net.num_features
    net.output = nn.Identity()
    return net, dim


def build_backbone(enet_type, pretrained=False, pretrained_path=None, pool="avg", image_size=None):
    """A backbone whose forward returns pooled (B, C) features, and C.

    - tf_efficientnet_b0_ns..b7_ns (timm; state dicts identical to geffnet's,
      which the original used), and any other timm model name;
    - nest101: ResNeSt-101 (timm's resnest101e: same keys as the `resnest`
      package's resnest101, which the original used);
    - rex20: ReXNet-V1 2.0x in clovaai's layout (the original's key names).

    pool='gem' returns the unpooled (B, C, H, W) map of a CNN (Net pools it);
    a transformer (ViT, Swin, ...) is built for `image_size` when given.
    """
    import timm

    if pool not in ("avg", "gem"):
        raise UserError(f"--pool {pool}: expected avg or gem")
    if enet_type == "rex20":
        if pool != "avg":
            raise UserError("--pool gem: rex20 pools inside its own layout; use --pool avg")
        return _rexnet20(pretrained, pretrained_path)

    name = _timm_name(enet_type)
    kw = {}
    if pretrained_path is not None:
        kw = {"pretrained": True, "pretrained_cfg_overlay": {"file": pretrained_path}}
    elif pretrained:
        if not _weights_reachable(name):
            raise _pretrained_error(enet_type, "not in the cache, and the hub is unreachable")
        kw = {"pretrained": True}
    if pool == "gem":
        if _is_transformer(name):
            raise UserError(f"--pool gem: {enet_type} pools its own tokens (a transformer); use --pool avg")
        kw["global_pool"] = ""
    if image_size is not None and _is_transformer(name):
        kw["img_size"] = image_size  # position embeddings for this size (timm resamples pretrained ones)
    try:
        net = timm.create_model(name, num_classes=0, **kw)
    except Exception as e:
        if "pretrained" in kw:
            raise _pretrained_error(enet_type, e) from e
        raise
    if pool == "gem":
        net.eval()
        with torch.no_grad():
            probe = net(torch.zeros(1, 3, image_size or 64, image_size or 64))
        net.train()
        if probe.ndim != 4:
            raise UserError(f"--pool gem: {enet_type} does not give a spatial feature map; use --pool avg")
        return net, probe.shape[1]
    # the width of forward()'s output: after timm's head conv where a model has one (MobileNetV3)
    return net, getattr(net, "head_hidden_size", None) or net.num_features


def _is_transformer(timm_name):
    """Models whose patch embedding fixes an input size (ViT, DeiT, Swin, BEiT, EVA, ...)."""
    import timm
    try:
        cls = timm.models.get_arch_name(timm_name)
    except Exception:
        return False
    return cls.split("_")[0] in ("vit", "deit", "deit3", "swin", "swinv2", "beit", "beitv2", "eva", "eva02",
                                  "cait", "xcit", "flexivit", "vit5")


# ---------------------------------------------------------------- head

class ArcMarginProductSubcenter(nn.Module):
    """Sub-center ArcFace head (Deng et al., ECCV 2020): k centres per class,
    cosine to a class = max over its centres. Weight (out_dim * k, in)."""

    def __init__(self, in_features, out_features, k=3):
        super().__init__()
        self.out_features, self.k = out_features, k
        self.weight = nn.Parameter(torch.empty(out_features * k, in_features))
        self.weight_is_unit = False  # normalize_weight_() was called: an inference-only head
        self.reset_parameters()

    def reset_parameters(self):
        std = 1.0 / math.sqrt(self.weight.size(1))
        nn.init.uniform_(self.weight, -std, std)

    @torch.no_grad()
    def normalize_weight_(self):
        """For inference only (ensemble.load_model): the sub-centres scaled to unit length in
        place, once, and forward no longer normalises them. Normalising the (C*k, 512) weight
        costs more than the matmul for a few queries (81,313 classes, fp32, 2 CPU cores: 160 ms
        against 46 ms for one image, per model and call); the cosines are the same bits, as
        forward would compute F.normalize of the same weight. Not for training: the weight
        stops being the parameter a checkpoint holds."""
        self.weight.copy_(F.normalize(self.weight.float()).to(self.weight.dtype))
        self.weight_is_unit = True
        return self

    def forward(self, x):
        # float32 even inside torch.autocast, which would run F.linear in bf16/fp16
        # whatever its inputs: after the scale s=80, bf16's rounding of cosines in
        # [0.5, 1) (steps of 2^-8) is +-0.16 in the logits. The original's apex O1 ran
        # this matmul in fp16 (+-0.02); fp32 (TF32 on GPUs where train.py allows it)
        # is at least as fine, and the (out_dim*k, 512) matmul is small next to a backbone.
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight.float()
            cos = F.linear(F.normalize(x.float()), w if self.weight_is_unit else F.normalize(w))
        return cos.view(-1, self.out_features, self.k).amax(dim=2)


class Net(nn.Module):
    def __init__(self, enet_type, out_dim, pretrained=False, pretrained_path=None, k=3, pool="avg",
                 preprocessing=None, image_size=None):
        super().__init__()
        self.enet_type = enet_type
        self.enet, dim = build_backbone(enet_type, pretrained, pretrained_path, pool, image_size)
        # avg: the backbone's own pooling (the original's layout and keys); gem: a learnt p, key `pool.p`
        self.pool = GeM() if pool == "gem" else None
        self.feat = nn.Linear(dim, EMBED_DIM)
        self.swish = nn.SiLU()  # Swish (x * sigmoid x); the original's custom autograd version
        self.metric_classify = ArcMarginProductSubcenter(EMBED_DIM, out_dim, k)
        # The backbone's mean/std on the 0-255 scale, for uint8 input (dataset.get_transforms):
        # normalised on the device, 4x fewer bytes through the loader, pinning and the
        # host-to-device copy. Not persistent: checkpoints keep the original's keys (the values
        # travel in the checkpoint's args["preprocessing"]).
        self.preprocessing = preprocessing or preprocessing_for(enet_type, pretrained_path)
        self.register_buffer("pixel_mean", torch.tensor(self.preprocessing["mean"]).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.preprocessing["std"]).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.backbone_frozen = self.bn_frozen = False  # set_frozen: beyond the original, for small data

    def set_frozen(self, backbone=False, bn=False):
        """backbone=True: the backbone gets no gradient and runs in eval mode
        (batch norm on its loaded statistics) while the neck and head train:
        linear probing before fine-tuning (Kumar et al., ICLR 2022). bn=True:
        the backbone's batch-norm layers keep their loaded statistics and
        affine weights whatever the mode (cnnimageretrieval-pytorch trains so).
        Frozen parameters have requires_grad False, so Adam leaves them as they
        are and DDP (built after this call) neither syncs nor waits for them."""
        self.backbone_frozen, self.bn_frozen = backbone, bn
        for p in self.enet.parameters():
            p.requires_grad_(not backbone)
        if bn and not backbone:
            for m in self.backbone_batchnorms():
                for p in m.parameters():
                    p.requires_grad_(False)
        self.train(self.training)

    def backbone_batchnorms(self):
        return [m for m in self.enet.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode=True):
        super().train(mode)
        if mode and getattr(self, "backbone_frozen", False):
            self.enet.eval()
        elif mode and getattr(self, "bn_frozen", False):
            for m in self.backbone_batchnorms():
                m.eval()
        return self

    @property
    def neck_dim(self):
        return self.feat.out_features

    def normalize_input(self, x):
        """uint8 RGB images -> float32 normalised with the backbone's mean/std (as
        A.Normalize() for the original's backbones); float input (already
        normalised, the original's way) passes through."""
        if x.dtype != torch.uint8:
            return x
        return (x.float() - self.pixel_mean) / self.pixel_std

    def extract(self, x):
        """Pooled backbone features, as the original's `extract`."""
        f = self.enet(self.normalize_input(x))
        return f if self.pool is None else self.pool(f)

    def neck(self, x):
        return self.swish(self.feat(self.extract(x)))

    def embed(self, x):
        """L2-normalised 512-d embedding, the one the original notebook retrieves with."""
        return F.normalize(self.neck(x).float())

    def forward(self, x):
        """(B, out_dim) cosines to the nearest sub-centre of each class."""
        return self.metric_classify(self.neck(x))

    def embed_and_classify(self, x):
        """Both outputs of one backbone pass (inference)."""
        z = self.neck(x)
        return F.normalize(z.float()), self.metric_classify(z)


def build_model(enet_type, out_dim, pretrained=False, pretrained_path=None, pool="avg", preprocessing=None,
                image_size=None):
    return Net(enet_type, out_dim, pretrained=pretrained, pretrained_path=pretrained_path, pool=pool,
               preprocessing=preprocessing, image_size=image_size)
