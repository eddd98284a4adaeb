"""ONNX export for serving: per model, uint8 RGB images in, the L2-normalised embedding and the class cosines out.

    python export.py --spec specs/default.json --out onnx/            # every model of a predict.py spec
    python export.py --checkpoint W.pth --enet-type tf_efficientnet_b3_ns --image-size 512 --out onnx/

Each file <checkpoint>@<size>.onnx takes `images`, uint8 (B, 3, S, S) RGB (B dynamic), resized to S x S
as predict.py does (the whole image, aspect not kept, with the interpolation named in the metadata), and
returns `embedding` (B, 512) float32, unit norm, and `cosines` (B, classes) float32, each class's best
sub-centre cosine (the ArcFace head without its margin). The model normalises the pixels itself; mean,
std, size, interpolation and layout are in the file's metadata (`preprocessing`, JSON), with the backbone,
the checkpoint's SHA-1 and the number of classes. Class i is idx2landmark_id.json's i.
OUT/models.json lists the files in the spec's order and how predict.py combines their outputs.

On export each file is run with onnxruntime (CPU) on the images of --check-dir (else on seeded random
images) and compared with PyTorch: every embedding's cosine with PyTorch's >= 0.9999 and the same top 5
classes (up to cosines tied within 1e-5); a file that fails is removed and the command exits non-zero.
"""
import glob
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from dataset import BadImage, get_transforms, read_rgb
from ensemble import check_models, load_model, load_spec, resolve_checkpoint
from gallery import list_images
from util import ArgumentParser, UserError, file_digest, run_main

OPSET = 18              # read by onnxruntime >= 1.14; the dynamo exporter's own default
MIN_COSINE = 0.9999     # embedding agreement, onnxruntime against PyTorch
TIE = 1e-5              # class cosines closer than this may swap places in a top 5


class Serving(torch.nn.Module):
    """What the ONNX file computes: one backbone pass, both outputs (Net.embed_and_classify)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        z = self.net.neck(images)
        return F.normalize(z.float(), dim=1), self.net.metric_classify(z).float()


def export_one(net, path, image_size, meta, opset=OPSET):
    """net (a models.Net in eval mode, on the CPU) to path; meta: the metadata, str -> JSON-able."""
    import onnx
    x = torch.zeros((2, 3, image_size, image_size), dtype=torch.uint8)
    prog = torch.onnx.export(Serving(net).eval(), (x,), dynamo=True, opset_version=opset, input_names=["images"],
                             output_names=["embedding", "cosines"],
                             dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, verbose=False)
    prog.optimize()
    model = prog.model_proto
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v))
    onnx.save_model(model, path)


def check_images(check_dir, image_size, interpolation, n_random=4, seed=0):
    """uint8 (N, 3, S, S) RGB: the images of check_dir resized as predict.py resizes them, or
    n_random seeded random images."""
    if check_dir:
        val = get_transforms(image_size, interpolation)[1]
        out, bad = [], []
        for rel in list_images(check_dir)[:16]:
            try:
                out.append(val(image=read_rgb(os.path.join(check_dir, rel)))["image"].transpose(2, 0, 1))
            except BadImage as e:
                bad.append(f"{os.path.join(check_dir, rel)} ({e.reason})")
        if bad:
            print(f"--check-dir: {len(bad)} unreadable image(s) left out: {'; '.join(bad[:3])}"
                  f"{'; ...' if len(bad) > 3 else ''}", flush=True)
        if not out:
            raise UserError(f"--check-dir {check_dir}: no readable image in it")
        return np.ascontiguousarray(np.stack(out))
    return np.random.default_rng(seed).integers(0, 256, (n_random, 3, image_size, image_size), dtype=np.uint8)


def verify(path, net, images):
    """onnxruntime against PyTorch on images: (worst embedding cosine, whether every top 5 agrees)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    emb, cos = sess.run(["embedding", "cosines"], {"images": images})
    with torch.no_grad():
        ref_emb, ref_cos = (t.numpy() for t in Serving(net).eval()(torch.from_numpy(images)))
    worst = float(np.min(np.sum(emb * ref_emb, axis=1) / np.linalg.norm(emb, axis=1)))
    k = min(5, ref_cos.shape[1])
    top = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    ref_top = np.sort(ref_cos, axis=1)[:, ::-1][:, :k]
    # the same top 5: the classes ONNX ranks first have PyTorch's five best cosines, in order (ties aside)
    same = bool(np.all(np.abs(np.take_along_axis(ref_cos, top, 1) - ref_top) <= TIE))
    return worst, same


def onnx_name(checkpoint, image_size):
    """The file a model is written to: <checkpoint's name>@<size>.onnx."""
    return f"{os.path.splitext(os.path.basename(checkpoint))[0]}@{image_size}.onnx"


def models_to_export(a):
    """[(enet_type, checkpoint path, image size)] from --spec or --checkpoint, checked before any export."""
    if a.spec:
        models, base = load_spec(a.spec)
        ckpts, _, _, _ = check_models(models, base, None, None, a.trust_checkpoint)
        todo = [(m["enet_type"], c, int(m["image_size"])) for m, c in zip(models, ckpts)]
        first = {}  # file name -> the model (1-based) written to it
        for i, (_, c, s) in enumerate(todo, 1):
            n = onnx_name(c, s)  # two checkpoints of one basename (other folders) at one size would overwrite
            if n in first:
                raise UserError(f"--spec {a.spec}: models {first[n]} and {i} would both be written "
                                f"as {n}; give their checkpoints different file names")
            first[n] = i
        return todo
    ckpt = resolve_checkpoint(a.checkpoint, os.getcwd())
    check_models([{"enet_type": a.enet_type, "checkpoint": ckpt, "image_size": a.image_size}], os.getcwd(), None,
                 None, a.trust_checkpoint)
    return [(a.enet_type, ckpt, a.image_size)]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--spec", help="predict.py's spec: every model of it")
    p.add_argument("--checkpoint", help="in place of --spec: one checkpoint (with --enet-type, --image-size)")
    p.add_argument("--enet-type", help="with --checkpoint: its backbone")
    p.add_argument("--image-size", type=int, help="with --checkpoint: its input size")
    p.add_argument("--out", required=True, help="folder for the .onnx files")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--check-dir", default=None, help="images to verify the export on (default: random images)")
    p.add_argument("--trust-checkpoint", action="store_true", help="as predict.py (only for files you trust)")
    a = p.parse_args(argv)
    if (a.spec is None) == (a.checkpoint is None):
        p.error("give --spec or --checkpoint (with --enet-type and --image-size)")
    if a.checkpoint and not (a.enet_type and a.image_size):
        p.error("--checkpoint needs --enet-type and --image-size")
    if a.image_size is not None and a.image_size <= 0:
        p.error(f"--image-size {a.image_size}: must be positive")
    if a.check_dir and not os.path.isdir(a.check_dir):
        p.error(f"--check-dir {a.check_dir}: no such folder")
    return a


def main(argv=None):
    a = parse_args(argv)
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            raise UserError(f"export.py needs {mod}: pip install onnx onnxscript onnxruntime") from None
    todo = models_to_export(a)
    os.makedirs(a.out, exist_ok=True)
    written, failed, manifest = [], [], []
    for enet_type, ckpt, size in todo:
        # traced contiguous: from predict's channels-last model the exporter keeps layout ops (9 more nodes for Lite0)
        net = load_model(enet_type, ckpt, "cpu", a.trust_checkpoint, image_size=size).to(
            memory_format=torch.contiguous_format)
        pre = net.preprocessing
        path = os.path.join(a.out, onnx_name(ckpt, size))
        meta = {"preprocessing": {"layout": "NCHW", "dtype": "uint8", "color": "RGB", "image_size": size,
                                  "resize": "the whole image to image_size x image_size (aspect not kept), cv2",
                                  "interpolation": pre["interpolation"], "mean": pre["mean"], "std": pre["std"],
                                  "normalisation": "inside the model: (pixel / 255 - mean) / std"},
                "enet_type": enet_type, "checkpoint_sha1": file_digest(ckpt),
                "classes": int(net.metric_classify.weight.shape[0] // 3), "embedding_dim": int(net.neck_dim),
                "outputs": "embedding (B, D) unit norm; cosines (B, classes), best sub-centre, no margin"}
        export_one(net, path, size, meta, a.opset)
        worst, same = verify(path, net, check_images(a.check_dir, size, pre["interpolation"]))
        ok = worst >= MIN_COSINE and same
        print(f"{path}: onnxruntime vs PyTorch, worst embedding cosine {worst:.6f}, top 5 "
              f"{'the same' if same else 'DIFFERENT'} -> {'ok' if ok else 'FAILED'}", flush=True)
        (written if ok else failed).append(path)
        manifest.append({"file": onnx_name(ckpt, size), "enet_type": enet_type, "image_size": size,
                         "checkpoint_sha1": meta["checkpoint_sha1"]})
        if not ok:
            for f in glob.glob(path + "*"):
                os.remove(f)
    if failed:
        raise SystemExit(f"export.py: {len(failed)} of {len(todo)} exports disagree with PyTorch (removed)")
    # models.json: the files in the spec's order and how predict.py combines them, for a server of the ensemble
    with open(os.path.join(a.out, "models.json"), "w") as f:
        json.dump({"models": manifest,
                   "similarity": "the mean over models of the embeddings' inner products (predict.py's retrieval)",
                   "classes": "the mean over models of the cosines (predict.py's classifier)"}, f, indent=1)
    return written


if __name__ == "__main__":
    run_main(main)
