"""`scripts/bench.py loader`: the training loader (dataset.LandmarkDataset with get_transforms and
train.loader_kwargs) against the original's: full-size decode, the augmentations at full size step by
step, then resize and normalise to float32 CHW (dataset.reference_transforms)."""
import glob
import shutil
import tempfile
import types
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import dataset  # noqa: E402
import train  # noqa: E402
from benchkit import PeakMemory, emit, interleaved, warmup  # noqa: E402


def add_parser(sub, common, default_device):
    q = sub.add_parser("loader", help="the training loader's images/s")
    common(q)
    q.set_defaults(run=cmd_loader)
    q.add_argument("--image-size", type=int, required=True)
    q.add_argument("--data-dir", default=None, help="GLDv2 layout (train.csv + train/a/b/c/) or any folder of .jpg")
    q.add_argument("--make", type=int, default=0, metavar="N", help="write N GLDv2-sized JPEGs first (synthetic.py)")
    q.add_argument("--workers", type=int, default=0, help="0: in this process, i.e. one core")
    q.add_argument("--images", type=int, default=256, help="images per timed round")
    q.add_argument("--batch-size", type=int, default=32)


class OriginalLandmarkDataset(torch.utils.data.Dataset):
    """The original's dataset item as it ran: cv2.imread at full size, a reversed
    channel view, the albumentations chain, .astype(float32) (a copy: Normalize
    already returns float32), a transposed view and torch.tensor (a strided
    copy). No per-sample seeding (albumentations 0.4 drew from the global RNG)."""

    def __init__(self, filepaths, transform):
        self.filepaths, self.transform = list(filepaths), transform

    def __len__(self):
        return len(self.filepaths)

    def __getitem__(self, index):
        image = cv2.imread(self.filepaths[index])[:, :, ::-1]
        image = self.transform(image=image)["image"].astype(np.float32)
        return torch.tensor(image.transpose(2, 0, 1)), torch.tensor(0)


def make_jpegs(out_dir, n, seed=0, min_size=600, max_size=1024):
    """n GLDv2-sized JPEGs (long side 600-1024 px, quality 85-95) of synthetic.py's scenes."""
    import synthetic
    rng = np.random.default_rng(seed)
    scenes = [synthetic.make_scene(rng) for _ in range(8)]
    paths = []
    for i in range(n):
        img = synthetic.make_view(scenes[i % len(scenes)], rng, min_size, max_size)
        p = os.path.join(out_dir, f"{i:06d}.jpg")
        if not cv2.imwrite(p, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))]):
            raise OSError(f"could not write {p}")
        paths.append(p)
    return paths


def _image_paths(data_dir):
    csv = os.path.join(data_dir, "train.csv")
    if os.path.exists(csv):
        ids = pd.read_csv(csv, dtype={"id": str})["id"]
        return [dataset.image_path(data_dir, "train", i) for i in ids]
    return sorted(glob.glob(os.path.join(data_dir, "**", "*.jpg"), recursive=True))


def cmd_loader(a):
    tmp = None
    if a.make:
        tmp = tempfile.mkdtemp(prefix="bench_jpegs_")
        paths = make_jpegs(tmp, a.make)
    elif a.data_dir:
        paths = _image_paths(a.data_dir)
    else:
        sys.exit("bench.py loader: give --data-dir D or --make N")
    try:
        paths = paths[:a.images]
        if not paths:
            sys.exit(f"bench.py loader: no images under {a.data_dir}")
        if a.workers == 0:
            cv2.setNumThreads(1)  # one core: the workers' setting (dataset.worker_init)
        targs = types.SimpleNamespace(batch_size=a.batch_size, num_workers=a.workers)
        kw = train.loader_kwargs(targs, torch.device("cpu"))
        df = pd.DataFrame({"filepath": paths, "landmark_id": np.zeros(len(paths), np.int64)})

        def loader_for(ds, sampler, **kw):
            loader = torch.utils.data.DataLoader(ds, sampler=sampler, **kw)
            epoch = [0]

            def run():
                epoch[0] += 1
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch[0])
                for _ in loader:
                    pass
            return run

        cpu = torch.device("cpu")
        ours = dataset.LandmarkDataset(df, "train", "train", dataset.get_transforms(a.image_size)[0])
        cases = {"ours": loader_for(ours, dataset.EpochSampler(torch.utils.data.SequentialSampler(ours)), **kw)}
        with PeakMemory(cpu) as mem:  # this process only: with workers, their memory is their own
            warm = {"ours": warmup(cases["ours"], cpu, calls=1)}
        if a.baseline:
            # the original's DataLoader: default collate (float32), the same workers and batch
            base = OriginalLandmarkDataset(paths, dataset.reference_transforms(a.image_size)[0])
            base_kw = {k: v for k, v in kw.items() if k != "collate_fn"}
            cases["baseline"] = loader_for(base, torch.utils.data.SequentialSampler(base), **base_kw)
            warm["baseline"] = warmup(cases["baseline"], cpu, calls=1)
        t = interleaved(cases, cpu, a.rounds)
        n, cores = len(paths), max(a.workers, 1)
        out = dict(what="loader", image_size=a.image_size, images=n, workers=a.workers,
                   source="make" if a.make else a.data_dir, img_s=round(n / t["ours"], 2),
                   img_s_per_core=round(n / t["ours"] / cores, 2), peak_mib=round(mem.peak_mib, 1), warmup_s=round(warm["ours"], 2))
        if a.baseline:
            out |= dict(baseline_img_s=round(n / t["baseline"], 2), ratio=round(t["baseline"] / t["ours"], 3))
        emit(**out)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
