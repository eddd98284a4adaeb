"""GLDv2 data frames, the dataset, and the original's augmentations on albumentations 2.x.

The loader is built for throughput with the original's augmentation
distribution: JPEGs are decoded at a reduced DCT scale when they are at least
twice the training size, flip + shift-scale-rotate + resize run as one warp
straight to the output size (the JPEG-quality jitter on the smaller
side of that warp), and samples leave the workers as uint8 CHW
tensors; the model normalises them on the device (models.Net.extract).
`reference_transforms` keeps the original's chain step by step, for tests and
for `scripts/bench.py loader --baseline`.
"""
import itertools
import math
import os

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from util import UserError


def image_path(data_dir, split, image_id):
    """GLDv2 layout: <data_dir>/<split>/a/b/c/<id>.jpg for an id starting with abc."""
    return os.path.join(data_dir, split, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")


_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _next_marker(buf, i):
    """Position of the first marker at or after i in entropy-coded data, where
    0xFF is followed by 0x00 (stuffing) or a restart marker (D0-D7); None if none."""
    ff = np.flatnonzero(buf[i:-1] == 0xFF) + i
    nxt = buf[ff + 1]
    k = np.flatnonzero((nxt != 0) & (nxt != 0xFF) & ((nxt < 0xD0) | (nxt > 0xD7)))
    return int(ff[k[0]]) if len(k) else None


def jpeg_scan(buf):
    """((height, width) or None, complete) of a JPEG from its markers, without
    decoding: `complete` says the end-of-image marker was reached, which a
    truncated download never does (OpenCV would decode it silently, grey at
    the bottom). None when `buf` is not a JPEG."""
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    hw, i = None, 2
    while i + 1 < n:
        if buf[i] != 0xFF:
            return hw, False
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # end of image
            return hw, True
        if i + 3 >= n:
            break
        if marker in _SOF and i + 8 < n:
            hw = (int(buf[i + 5]) << 8 | int(buf[i + 6]), int(buf[i + 7]) << 8 | int(buf[i + 8]))
        i += 2 + (int(buf[i + 2]) << 8 | int(buf[i + 3]))
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            i = _next_marker(buf, i) if i < n else None
            if i is None:
                break
    return hw, False


def jpeg_size(buf):
    """(height, width) from a JPEG's frame header, without decoding; None when
    `buf` is not a JPEG or has no frame header."""
    scan = jpeg_scan(buf)
    return scan[0] if scan else None


class BadImage(Exception):
    """An image file that cannot be used: missing, empty, truncated or not an image."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_rgb(path, min_side=None):
    """RGB uint8 image (EXIF orientation applied, as cv2.imread; grayscale,
    16-bit and alpha images converted to 8-bit RGB). Raises BadImage.

    With min_side, a JPEG is decoded at the coarsest DCT scale (1/2, 1/4, 1/8)
    that keeps both of its sides >= min_side: the decoder skips most of its
    work and the image is never smaller than what it will be resized to.
    """
    try:
        buf = np.fromfile(path, np.uint8)
    except FileNotFoundError:
        raise BadImage(path, "missing") from None
    except OSError as e:
        raise BadImage(path, f"unreadable ({e.strerror or e})") from None
    return decode_rgb(buf, path, min_side)


def decode_rgb(buf, name="image", min_side=None):
    """read_rgb of a file's bytes (uint8 array or bytes) already in memory; `name`
    goes into the BadImage raised."""
    buf, path = np.frombuffer(buf, np.uint8) if isinstance(buf, (bytes, bytearray)) else buf, name
    if len(buf) == 0:
        raise BadImage(path, "empty file")
    flag = cv2.IMREAD_COLOR
    scan = jpeg_scan(buf)
    if scan is not None:
        hw, complete = scan
        if not complete:
            raise BadImage(path, "truncated JPEG")
        if min_side and hw is not None:
            for f in (8, 4, 2):
                if math.ceil(min(hw) / f) >= min_side:  # libjpeg rounds scaled sizes up
                    flag = _REDUCED[f]
                    break
    try:
        img = cv2.imdecode(buf, flag)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise BadImage(path, "not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_min_side(transform):
    """The smallest side an image may be decoded at for `transform`: its fused
    geometric step's output size, or None (decode at full size)."""
    for t in getattr(transform, "transforms", ()):
        if isinstance(t, FlipJpegAffineResize):
            return t.size
    return None


def worker_init(worker_id):
    # one OpenCV thread per loader worker: the workers are the parallelism, and
    # OpenCV's own pool per worker would oversubscribe the cores
    cv2.setNumThreads(1)


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
    CHW tensors of `transform`'s output dtype: uint8 with get_transforms (the
    model normalises), float32 with reference_transforms (as the original).

    Augmentation randomness is a function of (seed, epoch, rank, index), so a
    resumed run repeats an uninterrupted one. The epoch comes with the index
    as (epoch, index) from EpochSampler, which persistent workers need; a
    plain index uses the epoch of set_epoch.

    skip_bad=True: an unreadable file (BadImage) does not stop anything, and
    every item ends with the paths it could not read, joined by newlines ('' if
    none). In 'train'/'val' the sample is replaced by another row drawn from
    (seed, epoch, rank, index, attempt), so a resumed run still repeats an
    uninterrupted one; in 'test' it is a black image, for the caller to leave
    out or mark.
    """

    MAX_REDRAWS = 20

    def __init__(self, csv, split, mode, transform=None, seed=0, rank=0, skip_bad=False):
        self.csv = csv.reset_index(drop=True)
        self.split, self.mode, self.transform, self.skip_bad = split, mode, transform, skip_bad
        self.filepaths = self.csv["filepath"].to_numpy()
        self.labels = self.csv["landmark_id"].to_numpy(np.int64) if mode != "test" else None
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.filepaths)

    def _image(self, image, epoch, index):
        if self.transform is not None:
            seed_transform(self.transform, sample_seed(self.seed, epoch, self.rank, index))
            image = self.transform(image=image)["image"]
        if image.dtype == np.uint8:
            # a CHW view of the HWC array, no copy: `collate` stacks such views into a
            # channels-last batch with plain memory copies (a CHW copy here would be a
            # strided byte shuffle, ~1 ms at 768 px)
            return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # float32: CHW, as the original

    def __getitem__(self, index):
        epoch = self.epoch
        if isinstance(index, tuple):
            epoch, index = index
        min_side, bad = decode_min_side(self.transform), []
        for attempt in range(self.MAX_REDRAWS + 1):
            try:
                image = read_rgb(self.filepaths[index], min_side)
                break
            except BadImage:
                if not self.skip_bad:
                    raise
                bad.append(str(self.filepaths[index]))
                if self.mode == "test":
                    image = np.zeros((8, 8, 3), np.uint8)
                    break
                index = int(np.random.default_rng(sample_seed(self.seed, epoch, self.rank, index, attempt + 1))
                            .integers(len(self)))
        else:
            raise BadImage(self.filepaths[index], f"{self.MAX_REDRAWS + 1} unreadable images in a row: "
                                                  f"is the data set there at all?")
        image = self._image(image, epoch, index)
        item = (image,) if self.mode == "test" else (image, torch.tensor(self.labels[index]))
        if self.skip_bad:
            item += ("\n".join(bad),)
        return item[0] if len(item) == 1 else item


def _stack_images(images):
    x0 = images[0]
    if x0.dtype != torch.uint8 or not all(x.permute(1, 2, 0).is_contiguous() for x in images):
        return torch.stack(images)
    c, h, w = x0.shape
    numel = len(images) * c * h * w
    if torch.utils.data.get_worker_info() is not None:
        # in a worker: allocate in shared memory, so that the batch reaches the main
        # process without another copy (what torch's default_collate does too)
        out = x0.new(x0._typed_storage()._new_shared(numel, device=x0.device)).view(len(images), h, w, c)
    else:
        out = torch.empty((len(images), h, w, c), dtype=torch.uint8)
    for o, x in zip(out, images):
        o.copy_(x.permute(1, 2, 0))
    return out.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory


def collate(batch):
    """torch's default_collate, except that uint8 images (LandmarkDataset's CHW
    views of HWC arrays) are stacked as one (B, H, W, C) block and returned as
    its (B, C, H, W) view: a channels-last batch, which is the memory format
    the model runs in on GPUs, made with contiguous copies only."""
    if isinstance(batch[0], torch.Tensor):
        return _stack_images(batch)
    return (_stack_images([b[0] for b in batch]), *default_collate([tuple(b[1:]) for b in batch]))


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) for each index of `sampler`: the epoch travels with
    the index to the workers, so persistent workers (whose copy of the dataset
    never sees set_epoch) still seed each epoch's augmentations anew."""

    def __init__(self, sampler):
        self.sampler, self.epoch, self.start = sampler, 0, 0

    def set_epoch(self, epoch, start=0):
        """start: samples of this epoch already seen (a run resumed mid-epoch skips them)."""
        self.epoch, self.start = epoch, start
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, int(i)) for i in itertools.islice(self.sampler, self.start, None))

    def __len__(self):
        return max(0, len(self.sampler) - self.start)


def flip_affine_resize_matrix(h, w, size, flip, affine):
    """The 2x3 map from a (h, w) image's pixels to the (size, size) output's:
    flip (x -> w-1-x, HorizontalFlip's array reversal), then albumentations'
    Affine with affine = (tx, ty, scale, degrees), shifts as fractions of the
    width and height (None: no affine), then cv2.resize's pixel-centre
    convention x_out = (x_in + 0.5) * size / w - 0.5."""
    m = np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]]) if flip else np.eye(3)
    if affine is not None:
        tx, ty, s, deg = affine
        a = math.radians(deg)
        cx, cy = w / 2 - 0.5, h / 2 - 0.5  # albumentations' centre of a pixel grid
        c, si = s * math.cos(a), s * math.sin(a)
        # about the centre: scale, rotate, translate (Affine's matrix, shear 0)
        m = np.array([[c, si, cx + tx * w - c * cx - si * cy],
                      [-si, c, cy + ty * h + si * cx - c * cy], [0, 0, 1]]) @ m
    sx, sy = size / w, size / h
    return (np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]]) @ m)[:2]


def jpeg_roundtrip(img, quality):
    """Encode to JPEG at `quality` and decode: albumentations' ImageCompression."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


class FlipJpegAffineResize(A.ImageOnlyTransform):
    """The original's first four training transforms as one step:
    HorizontalFlip(flip_p) -> ImageCompression(jpeg_quality, jpeg_p) ->
    ShiftScaleRotate(affine_p) -> Resize(size, size).

    The original ran them as passes over the full-size image (the affine and
    the resize each interpolating). Here flip, affine and resize are composed
    into one matrix and the source is sampled once, straight at the output
    size (bilinear, black border as border_mode=0); without the affine it is a
    plain resize and flip. The JPEG round trip, whose effect at quality 99-100
    does not depend on where in the chain it runs but whose cost grows with the
    pixels it codes, runs before the warp or after it, whichever image is
    smaller (after it at 256 px, before it for ~800 px sources at 768 px).

    Parameters have the original chain's distributions, as albumentations 2.x
    draws them: flip and JPEG coin flips, quality uniform over the integers of
    jpeg_quality; shift uniform in +-shift of the width and height, one scale
    uniform in [1-scale, 1+scale], angle uniform in +-rotate degrees, about the
    image centre. (Affine truncates the shift to whole source pixels; here it is
    exact, which holds at any decode scale.)
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        size: int
        flip_p: float
        jpeg_p: float
        jpeg_quality: tuple[int, int]
        affine_p: float
        interpolation: int
        shift: float
        scale: float
        rotate: float

    def __init__(self, size, flip_p=0.5, jpeg_p=0.5, jpeg_quality=(99, 100), affine_p=0.7, shift=0.2, scale=0.2,
                 rotate=10.0, interpolation=cv2.INTER_LINEAR, p=1.0):
        super().__init__(p=p)
        self.interpolation = interpolation
        self.size, self.flip_p, self.jpeg_p, self.jpeg_quality = size, flip_p, jpeg_p, tuple(jpeg_quality)
        self.affine_p, self.shift, self.scale, self.rotate = affine_p, shift, scale, rotate

    def get_params_dependent_on_data(self, params, data):
        h, w = params["shape"][:2]
        flip = self.py_random.random() < self.flip_p
        quality = self.py_random.randint(*self.jpeg_quality) if self.py_random.random() < self.jpeg_p else None
        affine = None
        if self.py_random.random() < self.affine_p:
            affine = (self.py_random.uniform(-self.shift, self.shift), self.py_random.uniform(-self.shift, self.shift),
                      self.py_random.uniform(1 - self.scale, 1 + self.scale),
                      self.py_random.uniform(-self.rotate, self.rotate))
        return {"matrix": flip_affine_resize_matrix(h, w, self.size, flip, affine), "flip": flip,
                "affine": affine is not None, "quality": quality}

    def apply(self, img, matrix, flip, affine, quality=None, **params):
        jpeg_first = quality is not None and img.shape[0] * img.shape[1] <= self.size * self.size
        if jpeg_first:
            img = jpeg_roundtrip(img, quality)
        if affine:
            out = cv2.warpAffine(img, matrix, (self.size, self.size), flags=self.interpolation,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        else:  # a plain resize, then the flip (they commute): cheaper than a warp
            out = cv2.resize(img, (self.size, self.size), interpolation=self.interpolation)
            out = cv2.flip(out, 1) if flip else out
        if quality is not None and not jpeg_first:
            out = jpeg_roundtrip(out, quality)
        return out

    def get_transform_init_args_names(self):
        return ("size", "flip_p", "jpeg_p", "jpeg_quality", "affine_p", "shift", "scale", "rotate", "interpolation")


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


INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def get_transforms(image_size, interpolation="bilinear"):
    """(train, val) transforms: the original's augmentations, built for speed.

    uint8 HWC in, uint8 HWC at image_size out; normalisation happens on the
    device (models.Net.extract). Train: HorizontalFlip(0.5),
    ImageCompression(99-100, 0.5), ShiftScaleRotate(0.7) and Resize fused into
    one step (FlipJpegAffineResize, fed a DCT-reduced decode by
    LandmarkDataset), then the original's Cutout on its own. Val: Resize, as
    the original. interpolation: the backbone's (models.preprocessing_for);
    the original's backbones use bilinear, as A.Resize.
    """
    flag = INTERPOLATION[interpolation]
    transforms_train = A.Compose([
        FlipJpegAffineResize(image_size, flip_p=0.5, jpeg_p=0.5, jpeg_quality=(99, 100), affine_p=0.7,
                             shift=0.2, scale=0.2, rotate=10, interpolation=flag),
        Cutout(int(image_size * 0.4), fill=0, p=0.5),
    ])
    transforms_val = A.Compose([A.Resize(image_size, image_size, interpolation=flag)])
    return transforms_train, transforms_val


def val_transform(image_size, preprocessing):
    """How a model sees an image at evaluation, from its `preprocessing` (models.preprocessing_for):
    the original's square resize (get_transforms' val), or with preprocessing["resize"] ==
    "keep-aspect" (predict.py --backbone) the image whole, its longer side at image_size, on a
    square of the backbone's mean colour at the bottom and right (a letterbox). Batches keep one
    shape, and models.pool_within pools only the picture's own cells. A square resize squashes a
    wide view of a site: on realhard the letterbox added 0.02 GAP over 10 splits (docs/transfer.md)."""
    interpolation = preprocessing.get("interpolation", "bilinear")
    if preprocessing.get("resize", "square") == "square":
        return get_transforms(image_size, interpolation)[1]
    fill = tuple(int(v) for v in letterbox_fill(preprocessing))
    return A.Compose([A.LongestMaxSize(max_size=image_size, interpolation=INTERPOLATION[interpolation]),
                      A.PadIfNeeded(image_size, image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                                    fill=fill)])


def letterbox_fill(preprocessing):
    """The letterbox's colour: the backbone's mean, uint8 RGB (normalised to zero)."""
    return np.round(np.asarray(preprocessing["mean"], np.float64) * 255).astype(np.uint8)


def reference_transforms(image_size):
    """The original's augmentations step by step, on float32 normalised output
    (albumentations 0.4 names in brackets): the distribution get_transforms
    must keep, and the baseline of scripts/bench.py loader."""
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


def read_csv_checked(path, columns, hint="", allow_empty=False):
    """A CSV with ids as text and integer landmark ids; a missing file, a
    missing column, no rows or a non-integer landmark id is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file" + (f"; {hint}" if hint else ""))
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except pd.errors.EmptyDataError:
        if allow_empty:
            return pd.DataFrame(columns=columns)
        raise UserError(f"{path}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (has {', '.join(map(str, df.columns))})")
    if df.empty and not allow_empty:
        raise UserError(f"{path}: no rows")
    if "landmark_id" in columns and not pd.api.types.is_integer_dtype(df["landmark_id"]):
        v = pd.to_numeric(df["landmark_id"], errors="coerce")
        bad = df["landmark_id"][v.isna() | (v % 1 != 0)]
        raise UserError(f"{path}: landmark_id must be integers" + (f", found {bad.iloc[0]!r}" if len(bad) else ""))
    return df


def drop_excluded(df, exclude_csv):
    """df without the rows that `exclude_csv` lists (preprocess.py --check-images'
    bad_images.csv: column id and/or path), and how many were dropped."""
    if not exclude_csv:
        return df, 0
    ex = read_csv_checked(exclude_csv, [], allow_empty=True)
    if "id" not in ex.columns and "path" not in ex.columns:
        raise UserError(f"{exclude_csv}: expected a column id or path (as preprocess.py --check-images writes)")
    drop = np.zeros(len(df), bool)
    if "id" in ex.columns and "id" in df.columns:
        drop |= df["id"].astype(str).isin(set(ex["id"].dropna().astype(str))).to_numpy()
    if "path" in ex.columns:
        paths = {os.path.normpath(p) for p in ex["path"].dropna()}
        drop |= np.array([os.path.normpath(p) in paths for p in df["filepath"]], bool)
    return df[~drop], int(drop.sum())


def resolve_paths(df, data_dir, split):
    """Image paths of a frame's rows: its `filepath` column when it has one
    (absolute, or relative to data_dir: preprocess.py --from-folder writes it),
    else the GLDv2 layout data_dir/split/a/b/c/<id>.jpg."""
    if "filepath" in df.columns:
        return [p if os.path.isabs(p) else os.path.join(data_dir, p) for p in df["filepath"].astype(str)]
    return [image_path(data_dir, split, i) for i in df["id"]]


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
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: no such folder (it holds train.csv and train/a/b/c/<id>.jpg)")
    df_folds = read_csv_checked(folds_csv, ["id", "landmark_id", "fold"],
                                hint="make it with `python preprocess.py --out-dir DIR` and pass --folds-csv")
    if df_folds["id"].duplicated().any():
        raise UserError(f"{folds_csv}: id {df_folds['id'][df_folds['id'].duplicated()].iloc[0]} appears more than once")
    df_full = read_csv_checked(os.path.join(data_dir, "train.csv"), ["id", "landmark_id"])
    df_full = df_full[[c for c in df_full.columns if c != "url"]]
    if train_step > 0:
        cls = pd.unique(df_folds["landmark_id"])
        rank = pd.Series(np.arange(len(cls)), index=cls)
        df_full = df_full[df_full["landmark_id"].isin(cls)]
        order = np.argsort(rank.loc[df_full["landmark_id"]].to_numpy(), kind="stable")
        df_full = df_full.iloc[order].reset_index(drop=True)
    df_full = df_full.assign(filepath=resolve_paths(df_full, data_dir, "train"))
    df = df_full.merge(df_folds[["id", "landmark_id", "fold"]], on=["id", "landmark_id"], how="left")
    landmark_ids = np.sort(pd.unique(df["landmark_id"]))
    df["landmark_id"] = df["landmark_id"].map(pd.Series(np.arange(len(landmark_ids)), index=landmark_ids))
    return df, len(landmark_ids)
