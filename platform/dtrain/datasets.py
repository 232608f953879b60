"""Image datasets that need no download: scikit-learn's digits, CIFAR-10 and image folders on disk.

Each loader returns (train, test) TensorDatasets of float images (N, C, H, W) normalised
with the training split's per-channel statistics, and int64 labels.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import TensorDataset

from dtrain.config import ConfigError

Array = npt.NDArray[Any]
Split = tuple[Array, Array, Array, Array]  # x_train, y_train, x_test, y_test
Pair = tuple[TensorDataset, TensorDataset]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _split(x: Array, y: Array, test_fraction: float) -> Split:
    from sklearn.model_selection import train_test_split

    # A fixed split (random_state=0), stratified: every run and world size is evaluated
    # on the very same held-out images, so their accuracies compare.
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=0, stratify=y)
    return np.asarray(xtr), np.asarray(ytr), np.asarray(xte), np.asarray(yte)


def _to_datasets(xtr: Array, ytr: Array, xte: Array, yte: Array) -> Pair:
    train = torch.as_tensor(xtr, dtype=torch.float32)
    test = torch.as_tensor(xte, dtype=torch.float32)
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    return (TensorDataset((train - mean) / std, torch.as_tensor(ytr, dtype=torch.int64)),
            TensorDataset((test - mean) / std, torch.as_tensor(yte, dtype=torch.int64)))


def digits(test_fraction: float, normalize: bool = True) -> Pair:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): standardised per channel,
    or (normalize=False) scaled to [-1, 1] as GANs with a tanh output want them."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    xtr, ytr, xte, yte = _split(x, d.target, test_fraction)
    if normalize:
        return _to_datasets(xtr, ytr, xte, yte)
    return (TensorDataset(torch.as_tensor(xtr * 2 - 1), torch.as_tensor(ytr, dtype=torch.int64)),
            TensorDataset(torch.as_tensor(xte * 2 - 1), torch.as_tensor(yte, dtype=torch.int64)))


def cifar10(folder: Path) -> Pair:
    """CIFAR-10 in its python-pickle layout (data_batch_1..5, test_batch) from a local folder."""
    def read(names: list[str]) -> tuple[Array, Array]:
        xs, ys = [], []
        for n in names:
            with open(folder / n, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"]))
        return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)

    train = [f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").exists()]
    return _to_datasets(*read(train), *read(["test_batch"]))


def image_folder(folder: Path, size: int, test_fraction: float) -> Pair:
    """`folder/<class>/*.png` (split off `test_fraction`) or `folder/{train,val}/<class>/*`.

    Everything is decoded once into memory, resized to size x size RGB: meant for the
    small datasets this platform's CPU recipes use, not for ImageNet.
    """
    from PIL import Image

    def read(root: Path, classes: list[str]) -> tuple[Array, Array]:
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for p in sorted((root / cls).iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    img = Image.open(p).convert("RGB").resize((size, size))
                    xs.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
                    ys.append(label)
        return np.stack(xs), np.asarray(ys)

    if (folder / "train").is_dir() and (folder / "val").is_dir():
        classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        return _to_datasets(*read(folder / "train", classes), *read(folder / "val", classes))
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ConfigError("data.path", str(folder), "an image folder needs one sub-folder per class (at least 2)")
    return _to_datasets(*_split(*read(folder, classes), test_fraction))


def load_images(path: str, size: int, test_fraction: float) -> Pair:
    """`data.path` dispatch: empty -> digits; CIFAR-10 pickle folder; image folder."""
    if not path:
        return digits(test_fraction)
    folder = Path(path)
    if (folder / "test_batch").exists():
        return cifar10(folder)
    if folder.is_dir():
        return image_folder(folder, size, test_fraction)
    raise ConfigError("data.path", path, "expected a CIFAR-10 python folder (data_batch_*, test_batch) "
                      "or an image folder with one sub-folder per class")
