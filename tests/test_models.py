import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_BACKBONE
from models import ReXNetV1, build_model, rexnet_from_timm_state_dict
from util import load_state_dict_file, save_checkpoint
import ensemble  # noqa: E402


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def test_names_head_shape_and_outputs_against_direct_computation():
    torch.manual_seed(0)
    m = build_model(TINY_BACKBONE, out_dim=10).eval()
    keys = list(m.state_dict())
    assert all(k.startswith("enet.") for k in keys if k not in ("feat.weight", "feat.bias", "metric_classify.weight"))
    assert m.metric_classify.weight.shape == (30, 512) and m.feat.out_features == 512
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = m.extract(x)
        z = f @ m.feat.weight.T + m.feat.bias
        z = z * torch.sigmoid(z)  # Swish
        cos = F.normalize(z) @ F.normalize(m.metric_classify.weight).T
        want = cos.view(3, 10, 3).max(dim=2).values
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
        emb = m.embed(x)
        torch.testing.assert_close(emb, F.normalize(z))
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
        e2, c2 = m.embed_and_classify(x)
        torch.testing.assert_close(c2, want, rtol=1e-5, atol=1e-5)
    assert f.shape == (3, m.feat.in_features)


def test_efficientnet_keys_and_outputs_equal_geffnet():
    geffnet = pytest.importorskip("geffnet")
    torch.manual_seed(0)
    g = _randomise_bn(geffnet.create_model("tf_efficientnet_b0_ns", pretrained=False)).eval()
    sd = {k: v for k, v in g.state_dict().items() if not k.startswith("classifier.")}
    m = build_model("tf_efficientnet_b0_ns", out_dim=5).eval()
    assert list(m.enet.state_dict()) == list(sd)
    m.enet.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        g.classifier = torch.nn.Identity()
        torch.testing.assert_close(m.extract(x), g(x), rtol=1e-4, atol=1e-5)


def test_resnest101_keys_and_outputs_equal_resnest_package():
    resnest = pytest.importorskip("resnest.torch")
    torch.manual_seed(0)
    r = _randomise_bn(resnest.resnest101(pretrained=False)).eval()
    r.fc = torch.nn.Identity()
    m = build_model("nest101", out_dim=5).eval()
    assert list(m.enet.state_dict()) == list(r.state_dict())
    m.enet.load_state_dict(r.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.extract(x), r(x), rtol=1e-4, atol=1e-5)


def test_rexnet_matches_timm_rexnet_200_and_loads_original_file(tmp_path, monkeypatch):
    import timm
    torch.manual_seed(0)
    t = _randomise_bn(timm.create_model("rexnet_200", pretrained=False, num_classes=0)).eval()
    ref = ReXNetV1(width_mult=2.0)
    ref.load_state_dict(rexnet_from_timm_state_dict(t.state_dict(), ref) |
                        {k: v for k, v in ref.state_dict().items() if k.startswith("output.")})
    # the original's weights file: ReXNetV1's state dict, classifier included
    torch.save(ref.state_dict(), tmp_path / "rexnetv1_2.0x.pth")
    m = build_model("rex20", out_dim=4, pretrained_path=str(tmp_path / "rexnetv1_2.0x.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.extract(x), t(x), rtol=1e-4, atol=1e-5)
    # the original's names: features.N / out.N / fc.N inside enet, no classifier
    assert "enet.features.8.out.5.fc.0.weight" in m.state_dict()
    assert not any(k.startswith("enet.output") for k in m.state_dict())
    # a file of timm's rexnet_200 names is mapped onto the original's
    torch.save(t.state_dict(), tmp_path / "timm_rexnet_200.pth")
    m3 = build_model("rex20", out_dim=4, pretrained_path=str(tmp_path / "timm_rexnet_200.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(m3.extract(x), t(x), rtol=1e-4, atol=1e-5)
    # as the original: ./rexnetv1_2.0x.pth is picked up when pretrained
    monkeypatch.chdir(tmp_path)
    m2 = build_model("rex20", out_dim=4, pretrained=True).eval()
    torch.testing.assert_close(m2.enet.features[0].weight, ref.features[0].weight)


def test_original_checkpoint_format_loads_strict(tmp_path):
    torch.manual_seed(0)
    m = _randomise_bn(build_model(TINY_BACKBONE, out_dim=6)).eval()
    original = {"epoch": 3, "model_state_dict": {"module." + k: v for k, v in m.state_dict().items()},
                "optimizer_state_dict": {}}
    torch.save(original, tmp_path / "orig.pth")
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    x = torch.randn(2, 3, 32, 32)
    for f in ("orig.pth", "bare.pth"):
        m2 = build_model(TINY_BACKBONE, out_dim=6).eval()
        m2.load_state_dict(load_state_dict_file(str(tmp_path / f)), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(m2(x), m(x))


def test_checkpoint_round_trip_atomic(tmp_path):
    m = build_model(TINY_BACKBONE, out_dim=3)
    obj = {"epoch": 2, "model_state_dict": m.state_dict(), "args": {"a": 1, "b": "x", "c": [1, 2]}, "out_dim": 3}
    save_checkpoint(obj, str(tmp_path / "sub" / "c.pth"))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["c.pth"]  # no temp file left behind
    back = torch.load(tmp_path / "sub" / "c.pth", weights_only=True)
    assert back["epoch"] == 2 and back["args"] == obj["args"]
    for k, v in m.state_dict().items():
        assert torch.equal(back["model_state_dict"][k], v)


def test_missing_pretrained_weights_error_names_the_flags(tmp_path, monkeypatch):
    """Missing ImageNet weights: one line naming --pretrained-path (every command that builds a pretrained
    backbone has it); train.py's adds --no-pretrained, which only it has. Offline, the hub is probed once
    (timm would retry for a minute)."""
    import socket

    import train
    from util import UserError
    with pytest.raises(UserError, match="--pretrained-path") as e:
        build_model(TINY_BACKBONE, out_dim=3, pretrained_path=str(tmp_path / "nope.pth"))
    assert "--no-pretrained" not in str(e.value)
    # weights not in the (empty) caches and the hub unreachable: one probe, one line
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    probes = []

    def unreachable(*a, **k):
        probes.append(a)
        raise OSError("no route")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    for name in ("resnet10t", "rex20"):
        with pytest.raises(UserError, match="unreachable.*--pretrained-path"):
            build_model(name, out_dim=3, pretrained=True)
    assert len(probes) == 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: no probe at all
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    with pytest.raises(UserError, match="unreachable"):
        build_model(TINY_BACKBONE, out_dim=3, pretrained=True)
    # train.py: its own flag too
    args = train.parse_args(["--kernel-type", "k", "--train-step", "0", "--image-size", "32", "--enet-type",
                             TINY_BACKBONE, "--data-dir", str(tmp_path), "--model-dir", str(tmp_path)])
    args.preprocessing = None  # set_up's, from the backbone's pretrained config
    with pytest.raises(UserError, match=r"--pretrained-path.*, or train from scratch with --no-pretrained$"):
        train.build_model_and_inits(args, None, __import__("types").SimpleNamespace(out_dim=3))


def test_sync_batchnorm_conversion_keeps_fused_activations():
    from train import convert_sync_batchnorm
    torch.manual_seed(0)
    m = _randomise_bn(build_model(TINY_BACKBONE, out_dim=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = m(x)
        conv = convert_sync_batchnorm(copy.deepcopy(m)).eval()
        assert any(isinstance(mod, torch.nn.SyncBatchNorm) for mod in conv.modules())
        assert not any(type(mod) is torch.nn.BatchNorm2d for mod in conv.modules())
        torch.testing.assert_close(conv(x), want)
        # torch's own converter drops the activation inside timm's BatchNormAct2d
        plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m)).eval()
        assert not torch.allclose(plain(x), want, atol=1e-3)
    assert list(conv.state_dict()) == list(m.state_dict())


def test_head_and_loss_run_in_float32_under_autocast():
    """Under bf16 autocast the backbone and neck run in bf16 but the ArcFace head
    does not: autocast would run its F.linear in bf16 (cosines in steps of 2^-8,
    +-0.16 after s=80). The output is float32 and equals the float32 head applied
    to the neck's output."""
    from losses import ArcFaceLossAdaptiveMargin
    torch.manual_seed(0)
    m = build_model(TINY_BACKBONE, out_dim=50).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        z = m.neck(x)
        _, cls = m.embed_and_classify(x)
    assert z.dtype == torch.bfloat16 and out.dtype == torch.float32 and cls.dtype == torch.float32
    with torch.no_grad():
        w = F.normalize(m.metric_classify.weight.double())
        want = (F.normalize(z.double()) @ w.T).view(4, 50, 3).amax(2)
        bf16 = (F.normalize(z.float()).bfloat16() @ w.float().bfloat16().T).float().view(4, 50, 3).amax(2)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(cls, out)
    assert (bf16.double() - want).abs().max() > 1e-4  # what a bf16 head would have given: the test can fail
    crit = ArcFaceLossAdaptiveMargin(torch.linspace(0.05, 0.5, 50))
    y = torch.tensor([0, 7, 49, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = crit(out, y, reduction="none")
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, crit(out, y, reduction="none"), rtol=0, atol=0)


def test_original_ns_names_build_timms_current_models_without_warnings():
    import warnings

    from models import _timm_name
    assert _timm_name("tf_efficientnet_b5_ns") == "tf_efficientnet_b5.ns_jft_in1k"
    assert _timm_name("tf_efficientnet_b5") == "tf_efficientnet_b5" and _timm_name("nest101") == "resnest101e"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm's deprecation warning for *_ns would fail this
        m = build_model("tf_efficientnet_b0_ns", out_dim=3)
    assert m.feat.in_features == 1280


def test_original_backbones_keep_the_original_input():
    import cv2

    import dataset
    from models import preprocessing_for
    for name in ("tf_efficientnet_b0_ns", "tf_efficientnet_b7_ns", "nest101", "rex20"):
        p = preprocessing_for(name)
        assert p == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
    tt, tv = dataset.get_transforms(64, preprocessing_for("tf_efficientnet_b3_ns")["interpolation"])
    assert tt.transforms[0].interpolation == cv2.INTER_LINEAR and tv.transforms[0].interpolation == cv2.INTER_LINEAR
    # another timm model gets its own statistics and interpolation
    lite = preprocessing_for("tf_efficientnet_lite0")
    assert lite == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
    m = build_model("tf_efficientnet_lite0", 3)
    x = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    torch.testing.assert_close(m.normalize_input(x), torch.ones(1, 3, 4, 4))  # (1 - 0.5) / 0.5
    assert dataset.get_transforms(64, "bicubic")[1].transforms[0].interpolation == cv2.INTER_CUBIC


def test_gem_pooling_closed_form_and_learnt_p():
    from models import GeM
    g = GeM()
    x = torch.rand(2, 5, 3, 4) + 0.1
    torch.testing.assert_close(g(x), x.pow(3).mean((2, 3)).pow(1 / 3))
    torch.testing.assert_close(g(torch.full((1, 2, 3, 3), 0.7)), torch.full((1, 2), 0.7))
    g.p.data.fill_(1.0)
    torch.testing.assert_close(g(x), x.mean((2, 3)))
    m = build_model(TINY_BACKBONE, 4, pool="gem")
    assert "pool.p" in m.state_dict() and m.pool.p.item() == 3.0
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert m.pool.p.grad is not None and m.pool.p.grad.abs().item() > 0
    assert "pool.p" not in build_model(TINY_BACKBONE, 4).state_dict()  # avg keeps the original's keys


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_transformer_and_convnext_backbones_train_a_step(name):
    from losses import ArcFaceLossAdaptiveMargin
    torch.manual_seed(0)
    m = build_model(name, 6, image_size=32)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([1, 4])
    crit = ArcFaceLossAdaptiveMargin(torch.linspace(0.05, 0.5, 6))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    before = m.metric_classify.weight.detach().clone()
    loss = crit(m(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, m.metric_classify.weight)
    assert m.embed(x).shape == (2, 512)


def test_gem_refused_for_token_pooling_backbones():
    from util import UserError
    with pytest.raises(UserError, match="--pool gem"):
        build_model("vit_tiny_patch16_224", 3, pool="gem", image_size=32)


def test_predict_feeds_a_model_as_it_was_trained(tmp_path):
    torch.manual_seed(0)
    pre = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bicubic"}
    m = build_model(TINY_BACKBONE, 5, pool="gem", preprocessing=pre)
    torch.save({"model_state_dict": m.state_dict(), "args": {"pool": "gem", "preprocessing": pre}}, tmp_path / "c.pth")
    got = ensemble.load_model(TINY_BACKBONE, str(tmp_path / "c.pth"))
    assert got.preprocessing == pre and got.pool is not None
    torch.testing.assert_close(got.pixel_mean.flatten(), torch.tensor(pre["mean"]) * 255)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(got.embed(x), m.eval().embed(x))
    # weights alone (the original's format): pooling from the keys, preprocessing from the backbone
    torch.save({"model_state_dict": m.state_dict()}, tmp_path / "bare.pth")
    assert ensemble.load_model(TINY_BACKBONE, str(tmp_path / "bare.pth")).pool is not None


def test_preprocessing_from_a_pretrained_files_config(tmp_path):
    import json

    from models import preprocessing_for
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_224",
        "pretrained_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic"}}))
    w = tmp_path / "open_clip_pytorch_model.bin"
    w.write_bytes(b"")
    p = preprocessing_for("vit_base_patch16_224", str(w))
    assert p["mean"][0] == pytest.approx(0.48145466) and p["interpolation"] == "bicubic"
    assert preprocessing_for("vit_base_patch16_224")["mean"] == [0.5, 0.5, 0.5]  # the name's own config
    assert preprocessing_for("tf_efficientnet_b3_ns", str(w))["mean"] == [0.485, 0.456, 0.406]  # the original's stay


def test_inference_head_normalised_once_gives_the_same_bits(tmp_path):
    """ensemble.load_model normalises the sub-centres once (normalize_weight_) and forward then
    skips it: the same cosines bit for bit as the training head, and the skip is real."""
    from models import ArcMarginProductSubcenter
    torch.manual_seed(0)
    head = ArcMarginProductSubcenter(512, 2000)
    x = torch.randn(6, 512)
    with torch.no_grad():
        want = head(x)
        once = copy.deepcopy(head).normalize_weight_()
        assert torch.equal(once(x), want)
        torch.testing.assert_close(once.weight.norm(dim=1), torch.ones(6000))
        once.weight.mul_(2)  # a head that still normalised would not see this
        assert torch.equal(once(x), 2 * want)
    # the model predict.py loads: its head is the checkpoint's, normalised, the cosines unchanged
    m = build_model(TINY_BACKBONE, 40).eval()
    torch.save({"model_state_dict": m.state_dict()}, tmp_path / "c.pth")
    got = ensemble.load_model(TINY_BACKBONE, str(tmp_path / "c.pth"))
    assert got.metric_classify.weight_is_unit and not m.metric_classify.weight_is_unit
    xi = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        z = m.neck(xi)
        assert torch.equal(got.metric_classify(z), m.metric_classify(z))
