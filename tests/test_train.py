import os
import re
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_BACKBONE, run, train_cmd

LOG_RE = re.compile(r"Fold 0, Epoch (\d+), lr: ([\d.]+), train loss: ([\d.]+), valid loss: ([\d.]+), "
                    r"acc_m: ([\d.]+), gap_m: ([\d.]+)\.$")


def test_ddp_two_process_run_writes_log_and_checkpoints(ddp_run):
    d, k = ddp_run["data"], ddp_run["kernel"]
    lines = open(os.path.join(d, "logs", f"{k}.txt")).read().strip().splitlines()
    assert len(lines) == 1 and LOG_RE.search(lines[0]), lines
    assert float(LOG_RE.search(lines[0]).group(2)) == pytest.approx(1e-4)
    assert "world size 2" in ddp_run["stdout"]
    assert os.path.exists(os.path.join(d, "logs", f"{k}_args.json"))
    for name in (f"{k}_fold0.pth", f"{k}_fold0_final.pth"):
        ckpt = torch.load(os.path.join(d, "weights", name), weights_only=True)
        assert ckpt["epoch"] == 1 and ckpt["out_dim"] == 36 and ckpt["args"]["enet_type"] == TINY_BACKBONE
        assert {"model_state_dict", "optimizer_state_dict", "scaler_state_dict"} <= set(ckpt)
        assert not any(key.startswith("module.") for key in ckpt["model_state_dict"])
    assert not [f for f in os.listdir(os.path.join(d, "weights")) if f.startswith(".tmp")]


def test_ddp_validation_scores_each_row_once(ddp_run):
    """The gathered metrics of the 2-rank run equal a single-process evaluation
    of the same weights on the original's rows (every 15th of the fold)."""
    from dataset import LandmarkDataset, get_df, get_transforms
    from losses import ArcFaceLossAdaptiveMargin, dynamic_margins
    from models import build_model
    from evaluate import global_average_precision_score
    d, k = ddp_run["data"], ddp_run["kernel"]
    df, out_dim = get_df(k, d, 0, os.path.join(d, "train_0.csv"))
    rows = df[df.fold == 0].reset_index(drop=True)
    rows = rows[rows.index % 15 == 0]
    ckpt = torch.load(os.path.join(d, "weights", f"{k}_fold0_final.pth"), weights_only=True)
    # the input recorded with the weights: the backbone's mean/std and interpolation (timm's config here)
    assert ckpt["args"]["preprocessing"]["interpolation"] == "bicubic" and ckpt["args"]["pool"] == "avg"
    ds = LandmarkDataset(rows, "train", "val", get_transforms(32, "bicubic")[1])
    m = build_model(TINY_BACKBONE, out_dim)
    m.load_state_dict(torch.load(os.path.join(d, "weights", f"{k}_fold0_final.pth"), weights_only=True)
                      ["model_state_dict"])
    m.eval()
    crit = ArcFaceLossAdaptiveMargin(dynamic_margins(np.bincount(df.landmark_id, minlength=out_dim)), 80.0)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(rows.landmark_id.to_numpy())
    with torch.no_grad():
        logits = m(x)
    conf, pred = logits.max(1)
    loss = crit(logits, y).item()
    acc = (pred == y).float().mean().item() * 100
    gap = global_average_precision_score(y.tolist(), list(zip(pred.tolist(), conf.tolist())))
    got = [float(v) for v in LOG_RE.search(open(os.path.join(d, "logs", f"{k}.txt")).read()).groups()[3:]]
    assert len(rows) >= 2
    assert got == pytest.approx([round(loss, 5), round(acc, 6), round(gap, 6)], abs=2e-5)


def test_stage_chain_step1_new_head_then_step2_strict(stage1):
    d = stage1["data"]
    w = os.path.join(d, "weights")
    src = torch.load(os.path.join(w, "ddp0_fold0.pth"), weights_only=True)["model_state_dict"]
    s1 = torch.load(os.path.join(w, "s1_fold0_ep1.pth"), weights_only=True)
    assert s1["out_dim"] == 24 and s1["model_state_dict"]["metric_classify.weight"].shape == (72, 512)
    assert src["metric_classify.weight"].shape == (108, 512)
    run([sys.executable, *train_cmd(d, "s2", 2, "--load-from", os.path.join(w, "s1_fold0_final.pth"),
                                    "--init-lr", "5e-5", size=40)], cwd=ROOT)
    assert os.path.exists(os.path.join(w, "s2_fold0_final.pth"))
    # step 2 from a checkpoint of another class count must fail: the load is strict
    with pytest.raises(AssertionError, match="does not fit"):
        run([sys.executable, *train_cmd(d, "bad", 2, "--load-from", os.path.join(w, "ddp0_fold0.pth"))], cwd=ROOT)


def test_resume_repeats_uninterrupted_run(synth):
    """2 epochs in one go == 1 epoch, stop, --resume: same weights bit for bit
    (sampler order and augmentations are functions of seed and epoch)."""
    d = synth
    w = os.path.join(d, "weights")
    run([sys.executable, *train_cmd(d, "full", 1, "--DEBUG", epochs=2)], cwd=ROOT)
    run([sys.executable, *train_cmd(d, "half", 1, "--DEBUG", "--stop-at-epoch", "1", epochs=2)], cwd=ROOT)
    run([sys.executable, *train_cmd(d, "half", 1, "--DEBUG", "--resume", os.path.join(w, "half_fold0.pth"),
                                    epochs=2)], cwd=ROOT)
    a = torch.load(os.path.join(w, "full_fold0_final.pth"), weights_only=True)
    b = torch.load(os.path.join(w, "half_fold0_final.pth"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][key]), key
    log = open(os.path.join(d, "logs", "half.txt")).read().splitlines()
    assert [LOG_RE.search(line).group(1) for line in log] == ["1", "2"]


def test_cli_flags():
    from train import parse_args
    base = ["--kernel-type", "k", "--train-step", "0", "--image-size", "256", "--enet-type", "tf_efficientnet_b7_ns"]
    a = parse_args(base)
    assert (a.data_dir, a.batch_size, a.num_workers, a.init_lr, a.n_epochs, a.start_from_epoch, a.stop_at_epoch,
            a.model_dir, a.log_dir, a.fold, a.load_from, a.amp, a.pretrained) == \
        ("/raid/GLD2", 64, 32, 1e-4, 15, 1, 999, "./weights", "./logs", 0, "", "auto", True)
    assert parse_args(base + ["--local-rank=3"]).local_rank == 3
    assert parse_args(base + ["--local_rank", "2"]).local_rank == 2
    with pytest.warns(UserWarning, match="OFF"):
        assert parse_args(base + ["--use-amp"]).amp == "off"
    assert parse_args(base + ["--save-epochs", "36,28"]).save_epochs == [28, 36]
    assert parse_args(base + ["--no-pretrained"]).pretrained is False
    with pytest.raises(SystemExit):
        parse_args(base + ["--n-epoch", "3"])  # a typo is an error, not silently dropped
    # a command of the original README, as written
    a = parse_args("--kernel-type b7ns_DDP_final_512_300w_f0_40ep --train-step 1 --data-dir ./data --image-size 512 "
                   "--batch-size 16 --enet-type tf_efficientnet_b7_ns --n-epochs 40 --stop-at-epoch 13 --fold 0 "
                   "--load-from ./weights/b7ns_DDP_final_256_300w_f0_10ep_fold0.pth "
                   "--CUDA_VISIBLE_DEVICES 0,1,2,3,4,5".split())
    assert (a.train_step, a.stop_at_epoch, a.CUDA_VISIBLE_DEVICES) == (1, 13, "0,1,2,3,4,5")


def test_compiled_training_step_does_not_recompile(synth, tmp_path, monkeypatch):
    """--compile: the training step is traced once and reused every epoch (aot_eager:
    the same capture without C++ code generation); validation stays eager; the
    checkpoint holds plain keys that load into an uncompiled model."""
    import torch._dynamo
    import train
    from models import build_model
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    argv = train_cmd(synth, "comp", 0, "--compile", "aot_eager", "--model-dir", str(tmp_path), epochs=3)[1:]
    train.main(argv)
    ckpt = torch.load(tmp_path / "comp_fold0_final.pth", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["args"]["compile"] == "aot_eager"
    sd = ckpt["model_state_dict"]
    assert not any(k.startswith("_orig_mod.") for k in sd)
    build_model(TINY_BACKBONE, ckpt["out_dim"]).load_state_dict(sd, strict=True)
    torch._dynamo.reset()


def _launch(d, kernel, *extra, epochs=3, nproc=2):
    from conftest import free_port
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *train_cmd(d, kernel, 0, "--seed", "5", *extra, epochs=epochs)]


def _weights(path):
    return torch.load(path, weights_only=True)["model_state_dict"]


def test_sigkilled_ddp_run_resumes_to_the_uninterrupted_weights(synth):
    """2 gloo ranks: a rank SIGKILLed mid-run makes the launcher exit non-zero
    within seconds; the same command with --resume auto then ends with the
    weights of a run that was never interrupted, exactly."""
    import signal
    import subprocess
    import time
    w = os.path.join(synth, "weights")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    run(_launch(synth, "straight"), cwd=ROOT)
    ckpt = os.path.join(w, "killed_fold0.pth")
    p = subprocess.Popen(_launch(synth, "killed", "--resume", "auto", "--dist-timeout", "1"), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not os.path.exists(ckpt) and p.poll() is None and time.time() - t0 < 240:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    ranks = subprocess.run(["pgrep", "-f", "--", "--kernel-type killed"], capture_output=True, text=True).stdout.split()
    ranks = [int(r) for r in ranks if int(r) != p.pid]
    assert len(ranks) >= 2, ranks
    os.kill(max(ranks), signal.SIGKILL)  # one rank only
    t_kill = time.time()
    rc = p.wait(timeout=120)
    assert rc != 0 and time.time() - t_kill < 60
    assert torch.load(ckpt, weights_only=True)["epoch"] < 3
    run(_launch(synth, "killed", "--resume", "auto"), cwd=ROOT)
    a, b = _weights(os.path.join(w, "straight_fold0_final.pth")), _weights(os.path.join(w, "killed_fold0_final.pth"))
    for key, v in a.items():
        assert torch.equal(v, b[key]), key


def test_resume_auto_starts_fresh_then_continues(synth, tmp_path):
    out = run([sys.executable, *train_cmd(synth, "auto", 0, "--resume", "auto", "--DEBUG", "--stop-at-epoch", "1",
                                          "--model-dir", str(tmp_path), epochs=2)], cwd=ROOT).stdout
    assert "no checkpoint yet" in out
    out = run([sys.executable, *train_cmd(synth, "auto", 0, "--resume", "auto", "--DEBUG", "--model-dir",
                                          str(tmp_path), epochs=2)], cwd=ROOT).stdout
    assert "continuing from" in out and "Epoch: 2" in out and "Epoch: 1" not in out
    assert torch.load(tmp_path / "auto_fold0_final.pth", weights_only=True)["epoch"] == 2


def test_nonfinite_weights_stop_the_run_and_keep_the_last_checkpoint(synth, tmp_path):
    import subprocess
    from models import build_model
    m = build_model(TINY_BACKBONE, 36)
    sd = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    torch.save({"model_state_dict": sd}, tmp_path / "nan.pth")
    run([sys.executable, *train_cmd(synth, "nanrun", 0, "--DEBUG", "--model-dir", str(tmp_path), epochs=1)], cwd=ROOT)
    good = tmp_path / "nanrun_fold0.pth"
    before = good.read_bytes()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *train_cmd(synth, "nanrun", 0, "--DEBUG", "--load-from", str(tmp_path / "nan.pth"),
                                                   "--model-dir", str(tmp_path), "--overwrite", epochs=1)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "stopped in epoch 1" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert good.read_bytes() == before


def test_reused_kernel_type_is_refused_without_overwrite(synth, tmp_path):
    import subprocess
    cmd = [sys.executable, *train_cmd(synth, "again", 0, "--DEBUG", "--model-dir", str(tmp_path), "--log-dir",
                                      str(tmp_path), epochs=1)]
    run(cmd, cwd=ROOT)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    run(cmd + ["--overwrite"], cwd=ROOT)
    assert len(open(tmp_path / "again.txt").read().splitlines()) == 1  # a new log, not appended


def test_stage_summary_and_curves(ddp_run, tmp_path):
    import plot_logs
    synth = ddp_run["data"]
    out = run([sys.executable, *train_cmd(synth, "summ", 0, "--DEBUG", "--model-dir", str(tmp_path), "--log-dir",
                                          str(tmp_path), epochs=2)], cwd=ROOT).stdout
    rows = plot_logs.read_log(str(tmp_path / "summ.txt"))
    assert [r["epoch"] for r in rows] == [1, 2]
    best = max(rows, key=lambda r: r["gap"])
    assert f"best gap_m {best['gap']:.6f} at epoch {best['epoch']}" in out
    assert str(tmp_path / "summ_fold0_final.pth") in out and "images/s" in out and "wall time" in out
    plot_logs.main([str(tmp_path / "summ.txt"), os.path.join(synth, "logs", "ddp0.txt"), "-o", str(tmp_path / "c.png")])
    assert plot_logs.plot(plot_logs.read_logs([os.path.join(synth, "logs", "ddp0.txt")]), tmp_path / "d.png") == \
        ["loss", "accuracy (%)", "GAP"]
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_mid_epoch_checkpoint_resumes_to_the_uninterrupted_weights(synth, tmp_path):
    """--checkpoint-every-steps: a run SIGKILLed mid-epoch continues, with --resume auto, from its
    last saved step and ends with exactly the weights (and the log) of an uninterrupted run."""
    import signal
    import subprocess
    import time
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")

    def cmd(kernel, *extra):
        return [sys.executable, *train_cmd(synth, kernel, 0, "--seed", "3", "--checkpoint-every-steps", "4",
                                           "--model-dir", str(tmp_path), "--log-dir", str(tmp_path), *extra,
                                           epochs=2)]
    run(cmd("whole"), cwd=ROOT)
    assert not (tmp_path / "whole_fold0_step.pth").exists()  # removed once its epoch is complete
    step_ckpt = tmp_path / "cut_fold0_step.pth"
    p = subprocess.Popen(cmd("cut", "--resume", "auto"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not step_ckpt.exists() and p.poll() is None and time.time() - t0 < 240:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    ck = torch.load(step_ckpt, weights_only=True)
    assert ck["step"] % 4 == 0 and ck["epoch"] == 0  # inside epoch 1
    out = run(cmd("cut", "--resume", "auto"), cwd=ROOT).stdout
    assert f"at epoch 1, step {ck['step'] + 1}" in out
    a = torch.load(tmp_path / "whole_fold0_final.pth", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "cut_fold0_final.pth", weights_only=True)["model_state_dict"]
    for key, v in a.items():
        assert torch.equal(v, b[key]), key
    strip = [line.split(" ", 5)[-1] for line in (tmp_path / "whole.txt").read_text().splitlines()]
    assert strip == [line.split(" ", 5)[-1] for line in (tmp_path / "cut.txt").read_text().splitlines()]


def test_latest_checkpoint_compares_epochs_from_memory_mapped_files(tmp_path, monkeypatch):
    """--resume auto's choice: the mid-epoch file when it is at least as far, else the epoch's;
    the epochs are read memory-mapped (the weights and Adam's state stay on disk)."""
    import train
    import util
    stem = str(tmp_path / "k_fold0")
    assert train.latest_checkpoint(stem) == ""
    seen = []
    real = util.torch_load
    monkeypatch.setattr(train, "torch_load", lambda p, **kw: seen.append(kw.get("mmap")) or real(p, **kw))
    for done, mid, want in ((3, 4, "_step.pth"), (3, 3, "_step.pth"), (4, 3, ".pth")):
        torch.save({"epoch": done, "w": torch.zeros(4)}, stem + ".pth")
        torch.save({"epoch": mid, "w": torch.zeros(4)}, stem + "_step.pth")
        assert train.latest_checkpoint(stem) == stem + want
    assert seen and all(seen)
    os.remove(stem + ".pth")
    assert train.latest_checkpoint(stem) == stem + "_step.pth"
