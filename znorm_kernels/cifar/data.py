"""Datasets for the training script, held whole on the training device as uint8 and cut into batches there.

``load_data`` returns a ``DeviceData``: train (optionally a seeded subset), an optional validation split taken
from the TRAIN set (for choosing learning rates; never the test set), and test, each a ``Split`` of uint8
images (N, C, H, W) and int64 labels on the device, plus the per-channel mean and std of the training images.
Sources: CIFAR-10/100 through torchvision (its download and md5 checks), Fashion-MNIST from the standard idx
files (gzipped or not; 28x28 zero-padded to 32x32, one channel), and ``fake``, a small learnable synthetic set
(class templates plus noise) for smoke tests.

Every random choice is drawn from a dedicated ``torch.Generator`` seeded by ``derived_seed(purpose, ...)``:
the split and subset from (seed), each epoch's permutation and augmentation from (seed, epoch). Nothing here
touches the global RNG, so all methods see the same data in the same order for a given seed, and a resumed
run needs no saved data-order state.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "DataError",
    "DeviceData",
    "Split",
    "derived_seed",
    "epoch_batches",
    "load_data",
    "normalize",
    "read_idx",
    "write_idx",
]

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "fake")
DEFAULT_DATA_DIRS = {
    "cifar10": "data",
    "cifar100": "data",
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "fake": "",
}
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(Exception):
    """A dataset cannot be found, fetched or read; the message says what to do."""


def derived_seed(purpose: str, *parts: int) -> int:
    """A 63-bit seed for one purpose ("perm", "augment", "split", ...) and its integers (seed, epoch)."""
    digest = hashlib.sha256(":".join([purpose, *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(purpose: str, *parts: int) -> torch.Generator:
    """A CPU generator seeded for ``purpose`` (CPU, so the draws are the same on every device)."""
    g = torch.Generator()
    g.manual_seed(derived_seed(purpose, *parts))
    return g


@dataclass
class Split:
    """Images (N, C, H, W) uint8 and labels (N,) int64, on one device."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, index: Tensor) -> Split:
        index = index.to(self.labels.device)
        return Split(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class DeviceData:
    train: Split
    test: Split
    val: Split | None
    mean: Tensor  # (1, C, 1, 1) float32, on the device, in units of the [0, 1] image
    std: Tensor
    num_classes: int
    in_channels: int
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- idx files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzipped or not (told by its first bytes)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(shape)
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: header says {shape} ({count * dtype.itemsize} bytes of data), file holds "
            f"{len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool = False) -> None:
    """Write a uint8 array as an idx file (for tests and tiny fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if compress else data)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}. Give the folder holding the four idx files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
        "gzipped or not) with --data; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
        "/usr/share/datasets/fashion-mnist."
    )


def _load_fashion(folder: Path) -> tuple[Split, Split]:
    if not folder.is_dir():
        raise DataError(
            f"data folder {folder} does not exist (Fashion-MNIST: give the idx files' folder "
            "with --data, or `apt-get install dataset-fashion-mnist`)"
        )
    splits = []
    for part in ("train", "test"):
        images = read_idx(_find_idx(folder, FASHION_FILES[part][0]))
        labels = read_idx(_find_idx(folder, FASHION_FILES[part][1]))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"Fashion-MNIST {part}: images {images.shape} and labels {labels.shape} do not match"
            )
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
        ph, pw = max(0, 32 - x.shape[2]), max(0, 32 - x.shape[3])
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # 28x28 -> 32x32, zero border
        splits.append(Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def _load_cifar(name: str, folder: Path, download: bool) -> tuple[Split, Split]:
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        raise DataError(f"{name} needs torchvision (pip install torchvision): {err}") from err
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(folder), train=train, download=download)
        except RuntimeError as err:
            raise DataError(
                f"{name} not found (or corrupted) in {folder}: pass --download to fetch it there, or point "
                f"--data at the folder that holds {cls.base_folder}/ ({err})"
            ) from err
        except OSError as err:  # URLError, socket errors, disk errors
            raise DataError(
                f"could not download {name} into {folder}: {err}. Without internet access, "
                f"copy {cls.base_folder}/ there by hand and point --data at it."
            ) from err
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW uint8
        splits.append(Split(x, torch.tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1]


def make_fake(
    seed: int, n_train: int = 2048, n_test: int = 512, size: int = 32, channels: int = 3, classes: int = 10
) -> tuple[Split, Split]:
    """A learnable synthetic set: each class a smooth random template, each image template plus noise."""
    g = generator("fake", seed)
    coarse = torch.rand(classes, channels, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def draw(n: int) -> Split:
        labels = torch.randint(0, classes, (n,), generator=g)
        noise = torch.randn(n, channels, size, size, generator=g) * 0.25
        x = (templates[labels] * 0.6 + 0.2 + noise).clamp(0, 1)
        return Split((x * 255).round().to(torch.uint8), labels)

    return draw(n_train), draw(n_test)


def _count(spec: float, total: int, what: str) -> int:
    """A count given as a number of examples (>= 1) or a fraction of ``total`` (0 < f < 1)."""
    if 0 < spec < 1:
        n = round(spec * total)
    elif spec >= 1 and spec == int(spec):
        n = int(spec)
    else:
        n = -1
    if not 0 < n < total:
        raise DataError(f"{what} must be a count in 1..{total - 1} or a fraction in (0, 1), got {spec}")
    return n


def load_data(
    dataset: str,
    data_dir: str | None,
    device: torch.device,
    *,
    seed: int = 0,
    val_split: float = 0,
    train_subset: int = 0,
    test_subset: int = 0,
    download: bool = False,
    fake_sizes: tuple[int, int, int] = (2048, 512, 32),
) -> DeviceData:
    """Load ``dataset`` onto ``device``: train (minus the validation split, optionally a seeded subset of
    what is left), val (``val_split`` examples or fraction of TRAIN, fixed by ``seed``), test (optionally a
    seeded subset, for quick CPU runs)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    folder = Path(data_dir or DEFAULT_DATA_DIRS[dataset])
    if dataset == "fake":
        train, test = make_fake(seed, *fake_sizes)
        classes = 10
    elif dataset == "fashion-mnist":
        train, test = _load_fashion(folder)
        classes = 10
    else:
        train, test = _load_cifar(dataset, folder, download)
        classes = 10 if dataset == "cifar10" else 100
    info: dict = {"train_total": len(train), "test_total": len(test)}
    val = None
    rest = torch.randperm(len(train), generator=generator("split", seed))
    n_val = _count(val_split, len(train), "--val-split") if val_split else 0
    if n_val:
        val = train.take(rest[:n_val].sort().values)
        rest = rest[n_val:]
    if train_subset:
        if not 0 < train_subset <= len(rest):
            raise DataError(f"--train-subset must be in 1..{len(rest)}, got {train_subset}")
        rest = rest[:train_subset]
    train = train.take(rest.sort().values) if (n_val or train_subset) else train
    if test_subset:
        if not 0 < test_subset <= len(test):
            raise DataError(f"--test-subset must be in 1..{len(test)}, got {test_subset}")
        test = test.take(torch.randperm(len(test), generator=generator("test-subset", seed))[:test_subset])
    info.update(train=len(train), val=len(val) if val is not None else 0, test=len(test))
    mean, std = channel_stats(train.images)
    return DeviceData(
        train=train.to(device),
        test=test.to(device),
        val=val.to(device) if val is not None else None,
        mean=mean.to(device),
        std=std.to(device),
        num_classes=classes,
        in_channels=train.images.shape[1],
        info=info,
    )


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images in [0, 1] units, accumulated in float64 by chunks."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        sq += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float().view(1, c, 1, 1), std.float().view(1, c, 1, 1)


def normalize(images: Tensor, mean: Tensor, std: Tensor, channels_last: bool = False) -> Tensor:
    """uint8 (B, C, H, W) -> float32, standardized per channel."""
    x = images.to(torch.float32).div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment(images: Tensor, g: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with ``pad`` pixels of zero padding and random horizontal flip, on the images' device.
    The offsets and flips are drawn on the CPU from ``g`` (same draws on every device)."""
    b, c, h, w = images.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(images.device)
    flip = (torch.rand(b, generator=g) < 0.5).to(images.device)
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    ci = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def epoch_batches(
    split: Split, batch_size: int, seed: int, epoch: int, *, drop_last: bool = True, do_augment: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """The training batches of one epoch: a permutation drawn from a generator seeded by (seed, epoch),
    cut into ``batch_size`` slices; the last partial one is dropped when ``drop_last`` (each epoch drops
    different examples), kept otherwise. Yields uint8 images and labels on the split's device."""
    n = len(split)
    perm = torch.randperm(n, generator=generator("perm", seed, epoch)).to(split.labels.device)
    aug_g = generator("augment", seed, epoch) if do_augment else None
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = perm[i : i + batch_size]
        x = split.images[idx]
        if aug_g is not None:
            x = augment(x, aug_g)
        yield x, split.labels[idx]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
