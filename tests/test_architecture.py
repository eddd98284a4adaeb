"""The layout docs/architecture.md describes: no import cycle among the top-level modules, predict.py
imported by none of them, retrieval.py loading nothing that reads images, and every module on the map."""
import ast
import os
import re
import subprocess
import sys

from conftest import ROOT

MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports_of(name):
    """The top-level modules `name` imports anywhere in its file (inside functions too: a lazy import is
    still a dependency)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py"), encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return sorted(found & set(MODULES) - {name})


def test_no_import_cycle():
    graph = {m: imports_of(m) for m in MODULES}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in graph[m]:
            assert state.get(n) != "open", "import cycle: " + " -> ".join(path[path.index(n):] + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = "done"
    for m in MODULES:
        if m not in state:
            visit(m, [])
    # the check can fail: a cycle made on purpose is found
    graph["retrieval"] = graph["retrieval"] + ["recognizer"]
    state.clear()
    try:
        for m in MODULES:
            if m not in state:
                visit(m, [])
    except AssertionError as e:
        assert "recognizer" in str(e) and "retrieval" in str(e)
    else:
        raise AssertionError("a cycle through retrieval -> recognizer was not found")


def test_predict_is_the_command_line_only():
    """predict.py is the CLI and the GLDv2 run: the library is ensemble, features, gallery, recognizer."""
    assert [m for m in MODULES if "predict" in imports_of(m)] == []


def test_retrieval_reads_no_images():
    """Arrays in, arrays out: importing retrieval loads neither OpenCV nor albumentations (1.5 s)."""
    code = "import sys, retrieval; print(sorted(m for m in ('cv2', 'albumentations', 'dataset') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not {"dataset", "finetune", "gallery", "features"} & set(imports_of("retrieval"))


def test_every_module_is_on_the_map():
    """docs/architecture.md names every top-level module and script (a line each): the map stays true."""
    text = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    scripts = sorted(f for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith((".py", ".sh")))
    missing = [m + ".py" for m in MODULES if not re.search(rf"`{m}\.py`", text)]
    missing += [s for s in scripts if f"`{s}`" not in text and f"`scripts/{s}`" not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"
