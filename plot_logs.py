"""Curves of one or more training runs from train.py's logs.

    python plot_logs.py logs/*.txt -o curves.png

Reads the original's log line per epoch (`Fold f, Epoch e, lr: ..., train loss:
..., valid loss: ..., acc_m: ..., gap_m: ...`) and draws train and valid loss,
accuracy and GAP per epoch, one line per log file (matplotlib, no display needed).
"""
import os
import re

import numpy as np

from util import ArgumentParser, UserError, run_main

LINE = re.compile(r"Epoch (\d+), lr: ([\d.e+-]+), train loss: ([\w.+-]+), valid loss: ([\w.+-]+), "
                  r"acc_m: ([\w.+-]+), gap_m: ([\w.+-]+)\.")
FIELDS = ("epoch", "lr", "train_loss", "valid_loss", "acc", "gap")


def read_log(path):
    """[{epoch, lr, train_loss, valid_loss, acc, gap}] of a train.py log, in file
    order; a resumed run's repeated epochs keep their last line."""
    rows = {}
    with open(path) as f:
        for line in f:
            m = LINE.search(line)
            if m:
                v = [float(x) for x in m.groups()]
                rows[int(v[0])] = dict(zip(FIELDS, [int(v[0])] + v[1:]))
    return [rows[e] for e in sorted(rows)]


def read_logs(paths, flag=""):
    """{path: read_log(path)} of train.py logs; a missing file or one without epoch
    lines is a UserError naming it (and the flag it came from)."""
    logs = {}
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{flag + ' ' if flag else ''}{path}: no such log")
        rows = read_log(path)
        if not rows:
            raise UserError(f"{flag + ' ' if flag else ''}{path}: no epoch lines of train.py in it")
        logs[path] = rows
    return logs


def measured(logs, key):
    """Whether any epoch of any log has a value of `key` (not NaN: --valid-stride 0 validates nothing)."""
    return any(np.isfinite(r[key]) for rows in logs.values() for r in rows)


def plot(logs, out):
    """The curves of the logs: the loss, and accuracy and GAP where something was validated (a chart
    only for what was measured)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("loss", None)] + [(t, k) for t, k in (("accuracy (%)", "acc"), ("GAP", "gap")) if measured(logs, k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    valid = measured(logs, "valid_loss")
    for path, rows in logs.items():
        name = os.path.splitext(os.path.basename(path))[0]
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["train_loss"] for r in rows], label=f"{name} train")
        if valid:
            axes[0].plot(ep, [r["valid_loss"] for r in rows], "--", label=f"{name} valid")
        for ax, (_, key) in zip(axes[1:], panels[1:]):
            ax.plot(ep, [r[key] for r in rows], label=name)
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [t for t, _ in panels]


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("logs", nargs="+", help="train.py logs: {log_dir}/{kernel_type}.txt")
    p.add_argument("-o", "--out", default="curves.png")
    a = p.parse_args(argv)
    logs = read_logs(a.logs)
    plot(logs, a.out)
    print(f"{a.out}: {len(logs)} run(s), {sum(len(r) for r in logs.values())} epochs")
    return logs


if __name__ == "__main__":
    run_main(main)
