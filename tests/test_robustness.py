"""User mistakes end as one line with exit status 2; files from others never run code."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY_BACKBONE, train_cmd
import util


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint or label map would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cli(*argv, cwd=ROOT):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _in_process(*argv):
    """_cli's answer (returncode, stderr) from the command's main() run in this process through
    util.run_main, as `python SCRIPT` runs it: for mistakes found before any work, where a
    subprocess would spend its time importing torch. One check per test stays a subprocess."""
    import contextlib
    import importlib
    import io
    script, *args = argv
    main = importlib.import_module(os.path.splitext(script)[0]).main
    err, code = io.StringIO(), 0
    old_argv, old_omp = sys.argv, os.environ.get("OMP_NUM_THREADS")
    sys.argv = [script, *args]
    os.environ["OMP_NUM_THREADS"] = "1"  # as _cli: train.py then leaves this process's thread count alone
    try:
        with torch.random.fork_rng(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            util.run_main(lambda: main(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
        if old_omp is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old_omp
    return subprocess.CompletedProcess(argv, code, "", err.getvalue())


def _one_line_error(p, *needles):
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_checkpoint_with_code_is_refused_and_runs_nothing(tmp_path):
    planted = tmp_path / "pwned"
    m = torch.nn.Linear(2, 2)
    torch.save({"model_state_dict": m.state_dict(), "extra": _Payload(str(planted))}, tmp_path / "evil.pth")
    with pytest.raises(util.UserError, match="--trust-checkpoint"):
        util.load_state_dict_file(str(tmp_path / "evil.pth"))
    assert not planted.exists()
    # through the command line: one line, exit 2, still nothing created
    p = _cli("train.py", "--kernel-type", "k", "--train-step", "1", "--image-size", "32", "--enet-type",
             TINY_BACKBONE, "--data-dir", str(tmp_path), "--load-from", str(tmp_path / "evil.pth"))
    assert p.returncode == 2 and not planted.exists()
    # the user may trust a file explicitly
    sd = util.load_state_dict_file(str(tmp_path / "evil.pth"), trust=True)
    assert set(sd) == {"weight", "bias"} and planted.exists()


def test_numpy_scalars_load_without_trust(tmp_path):
    m = torch.nn.Linear(2, 2)
    torch.save({"model_state_dict": m.state_dict(), "epoch": np.int64(3), "gap": np.float64(0.61),
                "best": np.float32(0.5)}, tmp_path / "old.pth")
    ck = util.torch_load(str(tmp_path / "old.pth"))
    assert ck["epoch"] == 3 and ck["gap"] == pytest.approx(0.61)
    torch.testing.assert_close(util.load_state_dict_file(str(tmp_path / "old.pth"))["weight"], m.weight.detach())


def test_truncated_and_missing_checkpoints_are_user_errors(tmp_path):
    m = torch.nn.Linear(4, 4)
    torch.save(m.state_dict(), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    with pytest.raises(util.UserError, match="not a readable checkpoint"):
        util.load_state_dict_file(str(tmp_path / "cut.pth"))
    with pytest.raises(util.UserError, match="no such checkpoint"):
        util.load_state_dict_file(str(tmp_path / "nope.pth"))


def test_label_map_formats_and_planted_pickle(tmp_path):
    planted = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({0: 5, 1: _Payload(str(planted))}, f)
    with pytest.raises(util.UserError, match="not allowed"):
        util.read_label_map(str(tmp_path / "evil.pkl"))
    assert not planted.exists()
    # the original's map: numpy int64 values, read through the restricted unpickler
    with open(tmp_path / "orig.pkl", "wb") as f:
        pickle.dump({i: np.int64(v) for i, v in enumerate([7, 11, 19])}, f)
    m = util.read_label_map(str(tmp_path / "orig.pkl"))
    assert m == {0: 7, 1: 11, 2: 19} and all(type(v) is int for v in m.values())
    # a .json beside the .pkl is preferred
    (tmp_path / "orig.json").write_text(json.dumps({"0": 70, "1": 110, "2": 190}))
    assert util.read_label_map(str(tmp_path / "orig.pkl")) == {0: 70, 1: 110, 2: 190}
    (tmp_path / "gap.json").write_text(json.dumps({"0": 1, "2": 3}))
    with pytest.raises(util.UserError, match="0..1"):
        util.read_label_map(str(tmp_path / "gap.json"))


def test_preprocess_writes_json_label_map_equal_to_pickle(synth):
    with open(os.path.join(synth, "idx2landmark_id.pkl"), "rb") as f:
        want = pickle.load(f)
    assert util.read_label_map(os.path.join(synth, "idx2landmark_id.json")) == want


def _bad_data(tmp_path, synth):
    """A copy of the synthetic train.csv without landmark_id, and one with a text landmark id."""
    d = tmp_path / "d"
    d.mkdir()
    pd.read_csv(os.path.join(synth, "train.csv")).drop(columns=["landmark_id"]).to_csv(d / "train.csv", index=False)
    return str(d)


def test_train_user_mistakes(synth, tmp_path):
    folds = os.path.join(synth, "train_0.csv")
    base = train_cmd(synth, "mistake", 1, "--model-dir", str(tmp_path), "--log-dir", str(tmp_path))

    def with_flag(flag, value):
        argv = list(base)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        return argv

    _one_line_error(_cli(*with_flag("--data-dir", _bad_data(tmp_path, synth))), "train.csv", "landmark_id")
    # the rest in this process: the same main() and run_main, without a torch import each
    _one_line_error(_in_process(*with_flag("--enet-type", "tf_efficientnet_b3_nss")), "--enet-type",
                    "tf_efficientnet_b3")
    _one_line_error(_in_process(*with_flag("--image-size", "0")), "--image-size")
    _one_line_error(_in_process(*with_flag("--fold", "7")), "--fold 7", folds)
    _one_line_error(_in_process(*with_flag("--folds-csv", str(tmp_path / "none.csv"))), "none.csv", "preprocess.py")
    _one_line_error(_in_process(*with_flag("--stop-at-epoch", "0")), "--stop-at-epoch")
    _one_line_error(_in_process(*with_flag("--load-from", str(tmp_path / "missing.pth"))), "missing.pth")
    assert _in_process(*with_flag("--image-size", "0")).returncode == 2 and os.listdir(tmp_path) == ["d"]


def test_load_from_another_architecture_names_the_mismatch(stage1, tmp_path):
    d = stage1["data"]
    w = os.path.join(d, "weights")
    # step 2 is strict: a step-0 checkpoint has another class count
    p = _cli(*train_cmd(d, "bad", 2, "--load-from", os.path.join(w, "ddp0_fold0.pth"), "--model-dir", str(tmp_path)))
    _one_line_error(p, "does not fit", "metric_classify.weight", "(108, 512)", "(72, 512)")


def test_predict_preprocess_evaluate_user_mistakes(synth, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": "nowhere.pth",
                                            "image_size": 32}]}))
    args = ["predict.py", "--data-dir", synth, "--train-csv", os.path.join(synth, "train_competition.csv"),
            "--idx2landmark", os.path.join(synth, "idx2landmark_id.pkl"), "--out", str(tmp_path / "s.csv")]
    _one_line_error(_in_process(*args, "--spec", str(spec)), "nowhere.pth")
    _one_line_error(_in_process(*args, "--spec", str(tmp_path / "nospec.json")), "nospec.json")
    _one_line_error(_in_process("preprocess.py", "--train-csv", str(tmp_path / "nolist.csv")), "nolist.csv")
    (tmp_path / "sub.csv").write_text("id,landmarks\na,12 x\n")
    (tmp_path / "sol.csv").write_text("id,landmarks\na,12\n")
    _one_line_error(_cli("evaluate.py", "--submission", str(tmp_path / "sub.csv"), "--solution",
                         str(tmp_path / "sol.csv")), "sub.csv", "line 2")


def test_cpu_budget_splits_the_cores():
    assert util.cpu_budget(32, cores=2, local_world_size=1) == (2, 1)   # the 2-core case: no oversubscription
    assert util.cpu_budget(0, cores=2, local_world_size=1) == (0, 2)    # no workers: all threads compute
    assert util.cpu_budget(32, cores=16, local_world_size=8) == (2, 1)  # 8 ranks on 16 cores
    assert util.cpu_budget(4, cores=64, local_world_size=2) == (4, 28)
    assert util.cpu_budget(3, cores=1, local_world_size=4) == (1, 1)


def test_demo_script_removes_only_its_own_folder(tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    p = subprocess.run(["bash", "scripts/demo.sh", str(keep)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not made by demo.sh" in p.stderr and (keep / "precious.txt").exists()


def test_predict_checks_every_model_before_reading_images(stage1, tmp_path, monkeypatch):
    import dataset
    import predict
    from models import build_model
    torch.save({"model_state_dict": build_model(TINY_BACKBONE, 7).state_dict()}, tmp_path / "seven.pth")
    d = stage1["data"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": stage1["checkpoint"],
                                            "image_size": 40},
                                           {"enet_type": TINY_BACKBONE, "checkpoint": str(tmp_path / "seven.pth"),
                                            "image_size": 40}]}))
    read, real = [], dataset.read_rgb
    monkeypatch.setattr(dataset, "read_rgb", lambda *a, **k: read.append(a) or real(*a, **k))
    with pytest.raises(util.UserError, match="7 classes but"):
        predict.run(predict.options(data_dir=d, train_csv=os.path.join(d, "train_competition.csv"),
                                    idx2landmark=os.path.join(d, "idx2landmark_id.json"), spec=str(spec),
                                    device="cpu", num_workers=0, cache_dir=None))
    assert read == []  # the second model's mismatch is found before the first model reads an image


@pytest.mark.parametrize("cli, typo, meant", [
    ("predict", "--galery-dir", "--gallery-dir"), ("train", "--kernel-typ", "--kernel-type"),
    ("app", "--indx", "--index"), ("preprocess", "--from-foldr", "--from-folder"),
    ("evaluate", "--submision", "--submission"), ("export", "--spc", "--spec"),
    ("evaluate_retrieval", "--ranks-csv", "--ranks"), ("plot_logs", "--ot", "--out"),
    ("synthetic", "--clases", "--classes"), ("bench", "--photo", "--photos")])
def test_a_mistyped_flag_names_the_closest_one(cli, typo, meant, capsys):
    """Every command line: an unknown flag, even beside missing required ones, ends with one line naming
    this command's closest flag, exit status 2."""
    import importlib
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    mod = importlib.import_module(cli)
    argv = (["transfer"] if cli == "bench" else []) + [typo, "x"]
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"unrecognized arguments: {typo} (did you mean {meant}?)" in err, err


def test_flag_suggestion_leaves_values_alone():
    """A value that looks like flags (bench.py's --train-args "--n-epochs 2") is not a flag; --help and
    --flag=value are known."""
    p = util.ArgumentParser(prog="x")
    p.add_argument("--train-args", default="")
    p.add_argument("--n", type=int)
    a = p.parse_args(["--train-args", "--n-epochs 2 --init-lr 1e-4", "--n=3"])
    assert a.train_args == "--n-epochs 2 --init-lr 1e-4" and a.n == 3


def test_folds_say_which_landmarks_are_rare_in_words(capsys):
    """scikit-learn's raw 'least populated class' warning becomes one note of ours; the folds are
    StratifiedKFold's all the same."""
    import warnings

    from sklearn.model_selection import StratifiedKFold

    import preprocess
    df = pd.DataFrame({"id": [str(i) for i in range(23)], "landmark_id": [0] * 10 + [1] * 10 + [2] * 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = preprocess.assign_folds(df)
    assert not [w for w in caught if "least populated" in str(w.message)]
    assert "note: 1 landmark(s) have fewer than 5 images" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.full(len(df), -1)
        for i, (_, v) in enumerate(StratifiedKFold(5, shuffle=True, random_state=233).split(df, df["landmark_id"])):
            want[v] = i
    assert out["fold"].tolist() == want.tolist()
