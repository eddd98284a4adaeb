"""The README's command blocks, run as a reader would run them.

Every ```bash and ```python block of README.md follows a marker: `<!-- readme: run ... -->` or
`<!-- readme: not run (why) -->`. The run blocks are run in order, verbatim, in one folder holding
what the README says the reader has: my_photos/ (one folder per landmark), new_photos/ (photos to
recognise), new_photos_truth.csv (their landmarks, written down) and photo.jpg. `python` is this
interpreter. The ImageNet weights come from a Hugging Face cache made here (timm's own layout, random
weights, HF_HUB_OFFLINE=1), as timm finds downloaded ones. A block marked "serves" is started, asked
for its health and its page on a free port (appended to its command), and stopped.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pandas as pd

from conftest import ROOT, free_port

README = os.path.join(ROOT, "README.md")
MARKED = re.compile(r"<!-- readme: (run|not run)([^>]*)-->\n```(bash|python)\n(.*?)```", re.S)


def marked_blocks():
    """[(run?, why, language, code)] of the README's marked blocks, in order."""
    text = open(README, encoding="utf-8").read()
    return [(kind == "run", why.strip(), lang, code) for kind, why, lang, code in MARKED.findall(text)]


def test_every_command_block_is_marked():
    text = open(README, encoding="utf-8").read()
    fences = re.findall(r"^```(?:bash|python)$", text, re.M)
    blocks = marked_blocks()
    assert len(blocks) == len(fences), "a ```bash or ```python block without <!-- readme: run|not run (why) -->"
    for run, why, _, code in blocks:
        assert run or re.fullmatch(r"\(.{10,}\)", why), f"'not run' needs its reason in brackets: {code[:80]}"
    assert sum(run for run, *_ in blocks) >= 6
    # no indented command blocks left: each command is in a marked fence
    assert not re.search(r"^    (python|make|torchrun) ", text, re.M)


def hf_cache(root, hub_id="timm/tf_efficientnet_lite0.in1k", arch="tf_efficientnet_lite0"):
    """A Hugging Face cache holding `arch`'s weights (random, seed 0) as timm downloads them."""
    import timm
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in timm.create_model(arch, pretrained=False).state_dict().items()}
    repo = os.path.join(root, "hub", "models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    os.makedirs(os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    save_file(sd, os.path.join(repo, "snapshots", commit, "model.safetensors"))


def reader_folder(photos, d, n_landmarks=3, per=4, n_queries=4):
    """What the README's reader has, from the synthetic photos: a few landmarks' folders, photos to
    recognise (of those landmarks, or of none), their truth, and photo.jpg."""
    gallery, queries = photos["gallery"], photos["queries"]
    names = sorted(os.listdir(gallery))[:n_landmarks]
    for n in names:
        os.makedirs(os.path.join(d, "my_photos", n))
        for f in sorted(os.listdir(os.path.join(gallery, n)))[:per]:
            shutil.copy(os.path.join(gallery, n, f), os.path.join(d, "my_photos", n, f))
    sol = pd.read_csv(os.path.join(photos["t"], "gld", "solution.csv"), dtype=str, keep_default_na=False)
    truth = {i: (f"Place {lm.split()[0]}" if lm else "") for i, lm in zip(sol["id"], sol["landmarks"])}
    rows = []
    for sub in sorted(os.listdir(queries)):
        for f in sorted(os.listdir(os.path.join(queries, sub))):
            t = truth[os.path.splitext(f)[0]]
            if len(rows) < n_queries and (t in names or t == ""):
                os.makedirs(os.path.join(d, "new_photos", sub), exist_ok=True)
                shutil.copy(os.path.join(queries, sub, f), os.path.join(d, "new_photos", sub, f))
                rows.append((f"{sub}/{f}", t))
    pd.DataFrame(rows, columns=["path", "landmark"]).to_csv(os.path.join(d, "new_photos_truth.csv"), index=False)
    shutil.copy(os.path.join(d, "new_photos", rows[0][0]), os.path.join(d, "photo.jpg"))
    for f in os.listdir(ROOT):  # the repository's commands, run from the reader's folder
        if f.endswith(".py") or f == "scripts":
            os.symlink(os.path.join(ROOT, f), os.path.join(d, f))
    return rows


def serve(code, d, env):
    """A block that starts a server: started on a free port, its health and page fetched, stopped."""
    cmd = re.sub(r"\s+#.*$", "", code.strip())
    port = free_port()
    # a session of its own: the server is bash's child, and stopping bash alone would leave it serving
    p = subprocess.Popen(["bash", "-c", f'python() {{ "{sys.executable}" "$@"; }}; {cmd} --port {port}'],
                         cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if p.poll() is not None:
                raise AssertionError(f"{cmd} stopped:\n{p.stdout.read()[-3000:]}")
            try:
                health = json.loads(urllib.request.urlopen(url + "/healthz", timeout=2).read())
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"{cmd}: no answer on {url}")
        page = urllib.request.urlopen(url + "/", timeout=10).read().decode()
        return health, page
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)


def test_readme_blocks_run(photos, tmp_path):
    d = str(tmp_path)
    queries = reader_folder(photos, d)
    hf_cache(os.path.join(d, "hf"))
    env = dict(os.environ, HF_HOME=os.path.join(d, "hf"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    ran = []
    for run, why, lang, code in marked_blocks():
        if not run:
            continue
        if "serves" in why:
            health, page = serve(code, d, env)
            assert health["gallery"] > 0 and "gallery: " in page and "model(s): " in page
        elif lang == "bash":
            script = f'set -euo pipefail\npython() {{ "{sys.executable}" "$@"; }}\n{code}'
            p = subprocess.run(["bash", "-c", script], cwd=d, env=env, capture_output=True, text=True, timeout=900)
            assert p.returncode == 0, f"{code}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            if "--solution" in code:  # the scores on the console too
                assert re.search(r"GAP \d\.\d{4}, accuracy \d\.\d{4}", p.stdout), p.stdout[-2000:]
        else:
            with open(os.path.join(d, "snippet.py"), "w") as f:
                f.write(code)
            p = subprocess.run([sys.executable, "snippet.py"], cwd=d, env=env, capture_output=True, text=True,
                               timeout=300)
            assert p.returncode == 0, f"{code}\n{p.stderr[-3000:]}"
            check_onnx_snippet(p.stdout, d, queries[0][0])
        ran.append(code.split("\n")[0][:60])
    assert len(ran) == sum(run for run, *_ in marked_blocks())
    pred = pd.read_csv(os.path.join(d, "predictions.csv"), keep_default_na=False)
    assert len(pred) == len(queries) and set(pred.columns) >= {"path", "landmark", "guess", "confidence"}
    for f in ("report.html", "my_index.npz", "my_trained_index.npz", "weights/mine_fold0_final.pth",
              "onnx/models.json", "more_predictions.csv"):
        assert os.path.isfile(os.path.join(d, f)), f


def check_onnx_snippet(out, d, photo):
    """The snippet names a landmark of the gallery, and its nearest gallery photo is the one predict.py
    found for the same photo (its first neighbour), at the same cosine within ONNX's rounding."""
    names = set(json.load(open(os.path.join(d, "my_data", "landmark_names.json"))).values())
    m = re.search(r"^classifier: (.+) \(cosine (-?\d\.\d{3})\)$", out, re.M)
    assert m and m.group(1) in names, out
    m = re.search(r"^nearest gallery photo: (.+) \(cosine (-?\d\.\d{3})\)$", out, re.M)
    pred = pd.read_csv(os.path.join(d, "more_predictions.csv"), keep_default_na=False).set_index("path")
    first = json.loads(pred.loc[photo, "neighbours"])[0]
    assert m and m.group(1) == first[0] and abs(float(m.group(2)) - first[1]) < 2e-3, (out, first)


def test_demo_figures_block_has_the_demos_lines():
    """The README's demo figures are the lines make demo prints, in its order (the values: make demo
    itself says when README.md's differ from what it printed)."""
    text = open(README, encoding="utf-8").read()
    shown = re.search(r"^```\n(GAP .*?)^```", text, re.S | re.M).group(1).strip().splitlines()
    labels = re.findall(r'^gap \S+ "?([^"\n]+?)"?$', open(os.path.join(ROOT, "scripts", "demo.sh")).read(), re.M)
    assert [re.match(r"GAP (.+): \d\.\d{4}$", line).group(1) for line in shown] == labels
