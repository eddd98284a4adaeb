"""export.py: ONNX files that onnxruntime runs as PyTorch does (embeddings, class cosines, a dynamic
batch), the preprocessing in their metadata, and the README's snippet runs as written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_BACKBONE

ort = pytest.importorskip("onnxruntime", reason="export.py's dependencies: onnx, onnxscript, onnxruntime "
                                                "(requirements-test.txt)")
pytest.importorskip("onnxscript", reason="torch.onnx.export's dynamo exporter needs onnxscript")
import export  # noqa: E402
import ensemble  # noqa: E402
from dataset import get_transforms, read_rgb  # noqa: E402


@pytest.fixture(scope="module")
def exported(stage1, tmp_path_factory):
    t = tmp_path_factory.mktemp("onnx")
    spec = t / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": stage1["checkpoint"],
                                            "image_size": 40}]}))
    test_dir = os.path.join(stage1["data"], "test")
    written = export.main(["--spec", str(spec), "--out", str(t / "out"), "--check-dir", test_dir])
    return {"path": written[0], "checkpoint": stage1["checkpoint"], "test": test_dir, "t": t}


def test_onnx_agrees_with_pytorch_on_any_batch(exported, stage1):
    path = exported["path"]
    assert os.path.basename(path) == "s1_fold0_final@40.onnx"
    manifest = json.load(open(os.path.join(os.path.dirname(path), "models.json")))
    from util import file_digest
    assert manifest["models"] == [{"file": "s1_fold0_final@40.onnx", "enet_type": TINY_BACKBONE, "image_size": 40,
                                   "checkpoint_sha1": file_digest(stage1["checkpoint"])}]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    net = ensemble.load_model(TINY_BACKBONE, stage1["checkpoint"], image_size=40)
    pre = json.loads(meta["preprocessing"])
    assert pre["image_size"] == 40 and pre["mean"] == net.preprocessing["mean"] and pre["layout"] == "NCHW"
    assert int(meta["classes"]) == net.metric_classify.weight.shape[0] // 3 and int(meta["embedding_dim"]) == 512
    [inp] = sess.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and not isinstance(inp.shape[0], int)
    # the test images resized as predict.py resizes them, batches of 1 and 7
    val = get_transforms(40, pre["interpolation"])[1]
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(exported["test"]) for f in fs)[:7]
    x = np.stack([val(image=read_rgb(f))["image"].transpose(2, 0, 1) for f in files])
    with torch.no_grad():
        ref_z = net.neck(torch.from_numpy(x))
        ref_emb, ref_cos = torch.nn.functional.normalize(ref_z, dim=1).numpy(), net.metric_classify(ref_z).numpy()
    for batch in (x[:1], x):
        emb, cos = sess.run(["embedding", "cosines"], {"images": batch})
        n = len(batch)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
        assert (np.sum(emb * ref_emb[:n], axis=1) >= 0.9999).all()
        np.testing.assert_allclose(cos, ref_cos[:n], atol=1e-4)
        assert (np.argsort(-cos, 1)[:, :5] == np.argsort(-ref_cos[:n], 1)[:, :5]).all()
    # the export's own check fails on a file of other weights
    other = ensemble.load_model(TINY_BACKBONE, stage1["checkpoint"], image_size=40)
    with torch.no_grad():
        other.feat.weight.mul_(-1)
    worst, same = export.verify(path, other, x)
    assert worst < 0.9999 and not same


def test_export_mistakes_are_one_line(tmp_path):
    p = subprocess.run([sys.executable, "export.py", "--checkpoint", str(tmp_path / "none.pth"), "--enet-type",
                        TINY_BACKBONE, "--image-size", "40", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "none.pth not found" in p.stderr and "Traceback" not in p.stderr


def test_two_checkpoints_of_one_name_are_refused_before_any_export(stage1, tmp_path):
    import shutil

    from util import UserError
    models = []
    for d in ("a", "b"):
        os.makedirs(tmp_path / d)
        shutil.copy(stage1["checkpoint"], tmp_path / d / "final.pth")
        models.append({"enet_type": TINY_BACKBONE, "checkpoint": str(tmp_path / d / "final.pth"), "image_size": 40})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": models}))
    with pytest.raises(UserError, match=r"models 1 and 2 would both be written as final@40.onnx"):
        export.main(["--spec", str(spec), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    models[1]["image_size"] = 48  # another size: another file name, no clash
    spec.write_text(json.dumps({"models": models}))
    assert [os.path.basename(p) for _, p, _ in export.models_to_export(export.parse_args(
        ["--spec", str(spec), "--out", str(tmp_path / "out")]))] == ["final.pth", "final.pth"]


def test_check_dir_names_its_unreadable_images(tmp_path, capsys):
    import cv2
    cv2.imwrite(str(tmp_path / "good.jpg"), np.full((20, 30, 3), 90, np.uint8))
    (tmp_path / "bad.jpg").write_text("not an image")
    x = export.check_images(str(tmp_path), 32, "bilinear")
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.uint8
    assert f"1 unreadable image(s) left out: {tmp_path / 'bad.jpg'} (" in capsys.readouterr().out
