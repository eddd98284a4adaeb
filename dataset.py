"""GLDv2 data frames, the dataset, and the original's augmentations on albumentations 2.x."""
import os

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset


def image_path(data_dir, split, image_id):
    """GLDv2 layout: <data_dir>/<split>/a/b/c/<id>.jpg for an id starting with abc."""
    return os.path.join(data_dir, split, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")


def read_rgb(path):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def sample_seed(*keys):
    """A 32-bit seed from (seed, epoch, rank, index, ...), well mixed."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_transform(transform, seed):
    """Seed every transform of an albumentations Compose for one sample.

    albumentations 2.x ignores the global numpy/random seeds, and
    Compose.set_random_seed gives every transform the *same* seed, which would
    tie e.g. the flip and the affine coin flips together; so each transform
    gets its own stream derived from `seed`.
    """
    ts = getattr(transform, "transforms", None)
    if ts is None:
        transform.set_random_seed(seed)
        return
    states = np.random.SeedSequence(seed).generate_state(len(ts) + 1)
    transform.set_random_seed(int(states[-1]))
    for t, s in zip(ts, states):
        seed_transform(t, int(s))


class LandmarkDataset(Dataset):
    """(image, label) for mode 'train'/'val', image for mode 'test'; images are
    float32 CHW tensors after `transform`, as the original.

    Augmentation randomness is a function of (seed, epoch, rank, index), so a
    resumed run repeats an uninterrupted one: call set_epoch before each epoch.
    """

    def __init__(self, csv, split, mode, transform=None, seed=0, rank=0):
        self.csv = csv.reset_index(drop=True)
        self.split, self.mode, self.transform = split, mode, transform
        self.filepaths = self.csv["filepath"].to_numpy()
        self.labels = self.csv["landmark_id"].to_numpy(np.int64) if mode != "test" else None
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.filepaths)

    def __getitem__(self, index):
        image = read_rgb(self.filepaths[index])
        if self.transform is not None:
            seed_transform(self.transform, sample_seed(self.seed, self.epoch, self.rank, index))
            image = self.transform(image=image)["image"]
        image = torch.from_numpy(np.ascontiguousarray(image.astype(np.float32).transpose(2, 0, 1)))
        if self.mode == "test":
            return image
        return image, torch.tensor(self.labels[index])


class Cutout(A.ImageOnlyTransform):
    """The original's cutout: albumentations 0.4.6 `Cutout(num_holes=1,
    max_h_size=size, max_w_size=size, fill_value=0)`, one square hole of a fixed size.

    Its sampling, which albumentations 2.x's CoarseDropout does not repeat: the
    hole's centre is drawn over the whole image, y in [0, H] and x in [0, W]
    (both ends included), then y1 = clip(y - size//2, 0, H), y2 = clip(y1 +
    size, 0, H), likewise for x. A hole near the bottom or right border is cut
    short, one near the top or left is pushed inside. Per axis a middle pixel
    is covered with probability size/(H+1) and the first or last one with
    (size//2+1)/(H+1); CoarseDropout keeps the hole inside and covers the
    middle far more often (0.42 against 0.16 for the centre pixel at 256 px).
    Randomness comes from the transform's own `py_random`, so `seed_transform`
    seeds it like every other transform.
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        hole_size: int
        fill: float

    def __init__(self, hole_size, fill=0, p=0.5):
        super().__init__(p=p)
        self.hole_size, self.fill = hole_size, fill

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        y = self.py_random.randint(0, h)  # randint includes both ends, as random.randint in 0.4.6
        x = self.py_random.randint(0, w)
        y1 = min(max(y - self.hole_size // 2, 0), h)
        x1 = min(max(x - self.hole_size // 2, 0), w)
        return {"hole": (y1, min(y1 + self.hole_size, h), x1, min(x1 + self.hole_size, w))}

    def apply(self, img, hole, **params):
        y1, y2, x1, x2 = hole
        img = img.copy()
        img[y1:y2, x1:x2] = self.fill
        return img

    def get_transform_init_args_names(self):
        return ("hole_size", "fill")


def get_transforms(image_size):
    """The original's augmentations (albumentations 0.4 names in brackets)."""
    transforms_train = A.Compose([
        A.HorizontalFlip(p=0.5),
        A.ImageCompression(quality_range=(99, 100), p=0.5),
        # [ShiftScaleRotate(shift 0.2, scale 0.2, rotate 10, border_mode=0, p=0.7)]
        A.Affine(translate_percent=(-0.2, 0.2), scale=(0.8, 1.2), rotate=(-10, 10), keep_ratio=True,
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.7),
        A.Resize(image_size, image_size),
        # [Cutout(max_h_size=int(0.4*size), max_w_size=int(0.4*size), num_holes=1, p=0.5)]
        Cutout(int(image_size * 0.4), fill=0, p=0.5),
        A.Normalize(),  # ImageNet mean/std
    ])
    transforms_val = A.Compose([A.Resize(image_size, image_size), A.Normalize()])
    return transforms_train, transforms_val


def get_df(kernel_type, data_dir, train_step, folds_csv="train_0.csv"):
    """The training frame of a stage, with the original's semantics.

    step 0: every image and class of data_dir/train.csv (full GLDv2);
    step >= 1: only the classes of the clean list (folds_csv), with all their
    images from the full set, grouped class by class in the clean list's order
    of first appearance (the original's `.set_index('landmark_id').loc[cls]`).
    Folds come from folds_csv; images not in the clean list have fold NaN and
    are always training images. Labels are re-indexed over the sorted landmark
    ids. Returns (df, out_dim).
    """
    del kernel_type  # part of the original signature, unused there too
    df_folds = pd.read_csv(folds_csv)
    df_full = pd.read_csv(os.path.join(data_dir, "train.csv"))
    df_full = df_full[[c for c in df_full.columns if c != "url"]]
    if train_step > 0:
        cls = pd.unique(df_folds["landmark_id"])
        rank = pd.Series(np.arange(len(cls)), index=cls)
        df_full = df_full[df_full["landmark_id"].isin(cls)]
        order = np.argsort(rank.loc[df_full["landmark_id"]].to_numpy(), kind="stable")
        df_full = df_full.iloc[order].reset_index(drop=True)
    df_full = df_full.assign(filepath=[image_path(data_dir, "train", i) for i in df_full["id"]])
    df = df_full.merge(df_folds[["id", "landmark_id", "fold"]], on=["id", "landmark_id"], how="left")
    landmark_ids = np.sort(pd.unique(df["landmark_id"]))
    df["landmark_id"] = df["landmark_id"].map(pd.Series(np.arange(len(landmark_ids)), index=landmark_ids))
    return df, len(landmark_ids)
