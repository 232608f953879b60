"""Image datasets that need no download: scikit-learn's digits, CIFAR-10 and image folders on disk.

Each loader returns (train, test) datasets of float images (C, H, W) normalised with the
training split's per-channel statistics, and int64 labels: TensorDatasets decoded into memory
up front, or (`lazy`, image folders) `ImageFiles`, which decode one image when the loader
asks for it, in its worker processes, so a folder larger than RAM trains.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset, TensorDataset

from dtrain.checkpoint.safeload import UnsafeFile, load_numpy_pickle
from dtrain.errors import ConfigError
from dtrain.runtime.files import atomic_write

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


class Images(TensorDataset):
    """Images standardised per channel with the training split's `mean` and `std` (C, 1, 1),
    kept so that a prediction standardises new images the same way."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        super().__init__((x - mean) / std, y)
        self.mean, self.std = mean, std


def _to_datasets(xtr: Array, ytr: Array, xte: Array, yte: Array) -> tuple[Images, Images]:
    train = torch.as_tensor(xtr, dtype=torch.float32)
    test = torch.as_tensor(xte, dtype=torch.float32)
    mean = train.mean(dim=(0, 2, 3)).view(-1, 1, 1)
    std = train.std(dim=(0, 2, 3)).clamp(min=1e-6).view(-1, 1, 1)
    return (
        Images(train, torch.as_tensor(ytr, dtype=torch.int64), mean, std),
        Images(test, torch.as_tensor(yte, dtype=torch.int64), mean, std),
    )


def digits(test_fraction: float, normalize: bool = True) -> Pair:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): standardised per channel,
    or (normalize=False) scaled to [-1, 1] as GANs with a tanh output want them."""
    xtr, ytr, xte, yte = _digits_split(test_fraction)
    if normalize:
        return _to_datasets(xtr, ytr, xte, yte)
    return (
        TensorDataset(torch.as_tensor(xtr * 2 - 1), torch.as_tensor(ytr, dtype=torch.int64)),
        TensorDataset(torch.as_tensor(xte * 2 - 1), torch.as_tensor(yte, dtype=torch.int64)),
    )


def _digits_split(test_fraction: float) -> Split:
    """The digits in [0, 1], (N, 1, 8, 8), split by `_split`. Importing scikit-learn (and SciPy)
    costs every rank about 2 s, so the split is kept in the user's cache as a plain .npz (no
    pickles: loading it runs no code), keyed by the fraction and scikit-learn's version."""
    import importlib.metadata

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dtrain"
    path = cache / f"digits-{test_fraction!r}-sklearn-{importlib.metadata.version('scikit-learn')}.npz"
    with contextlib.suppress(OSError, ValueError, KeyError):  # absent or damaged: computed again
        with np.load(path, allow_pickle=False) as f:
            return f["xtr"], f["ytr"], f["xte"], f["yte"]
    from sklearn.datasets import load_digits

    d = load_digits()
    split = _split((d.images / 16.0).astype(np.float32)[:, None], d.target, test_fraction)
    with contextlib.suppress(OSError):  # a read-only home: computed each time, as before
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _save_npz(tmp, split))
    return split


def _save_npz(path: Path, split: Split) -> None:
    with path.open("wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, xtr=split[0], ytr=split[1], xte=split[2], yte=split[3])


def cifar10(folder: Path) -> Pair:
    """CIFAR-10 in its python-pickle layout (data_batch_1..5, test_batch) from a local folder."""

    def read(names: list[str]) -> tuple[Array, Array]:
        xs, ys = [], []
        for n in names:
            try:
                d = load_numpy_pickle(folder / n)  # numpy arrays and plain containers only: no code runs
            except UnsafeFile as e:
                raise ConfigError("data.path", str(folder), str(e)) from None
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"]))
        return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)

    train = [f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").exists()]
    return _to_datasets(*read(train), *read(["test_batch"]))


STATS_IMAGES = 1000  # lazy folders: channel statistics from this many evenly spaced training images


def _decode(path: str, size: int) -> Array:
    from PIL import Image

    with Image.open(path) as img:
        pixels: Array = np.asarray(img.convert("RGB").resize((size, size)), dtype=np.float32)
    chw: Array = pixels.transpose(2, 0, 1) / 255.0
    return chw


class ImageFiles(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """An image folder read lazily: item i decodes file i, resizes it to size x size RGB and
    normalises it with the given per-channel statistics."""

    channels = 3

    def __init__(self, files: list[str], labels: list[int], size: int, mean: Array, std: Array):
        self.files, self.size = files, size
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(_decode(self.files[i], self.size))
        return (x - self.mean) / self.std, self.labels[i]


def channel_stats(files: list[str], size: int, limit: int = STATS_IMAGES) -> tuple[Array, Array]:
    """Per-channel mean and (unbiased) std over up to `limit` evenly spaced images, streamed."""
    picked = files if len(files) <= limit else [files[round(i * (len(files) - 1) / (limit - 1))] for i in range(limit)]
    total = np.zeros(3)
    squares = np.zeros(3)
    n = 0
    for f in picked:
        x = _decode(f, size).astype(np.float64)
        total += x.sum(axis=(1, 2))
        squares += (x * x).sum(axis=(1, 2))
        n += x.shape[1] * x.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(squares - n * mean * mean, 0.0) / (n - 1))
    return mean, np.maximum(std, 1e-6)


def _listing(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = [str(p) for p in sorted((root / cls).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise ConfigError(
                "data.path",
                str(root / cls),
                f"holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}); every class folder needs some",
            )
        files += found
        labels += [label] * len(found)
    return files, labels


def image_folder(
    folder: Path, size: int, test_fraction: float, lazy: bool = False
) -> tuple[Dataset[Any], Dataset[Any]]:
    """`folder/<class>/*.png` (split off `test_fraction`, stratified, fixed) or
    `folder/{train,val}/<class>/*`. In memory: every image decoded once at start (small sets);
    `lazy`: `ImageFiles`, the same samples decoded on demand."""
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        (ftr, ytr), (fte, yte) = _listing(folder / "train", classes), _listing(folder / "val", classes)
    else:
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if len(classes) < 2:
            raise ConfigError("data.path", str(folder), "an image folder needs one sub-folder per class (at least 2)")
        files, labels = _listing(folder, classes)
        a, b, c, d = _split(np.asarray(files), np.asarray(labels), test_fraction)
        ftr, ytr, fte, yte = a.tolist(), b.tolist(), c.tolist(), d.tolist()
    if lazy:
        mean, std = channel_stats(ftr, size)
        return ImageFiles(ftr, ytr, size, mean, std), ImageFiles(fte, yte, size, mean, std)

    def read(files: list[str]) -> Array:
        return np.stack([_decode(f, size) for f in files])

    return _to_datasets(read(ftr), np.asarray(ytr), read(fte), np.asarray(yte))


def load_images(path: str, size: int, test_fraction: float, lazy: bool = False) -> tuple[Dataset[Any], Dataset[Any]]:
    """`data.path` dispatch: empty -> digits; CIFAR-10 pickle folder; image folder."""
    if lazy and (not path or (Path(path) / "test_batch").exists()):
        raise ConfigError(
            "data.decode",
            "lazy",
            "applies to image folders (data.path=a folder of class folders); digits and CIFAR-10 arrays load in memory",
        )
    if not path:
        return digits(test_fraction)
    folder = Path(path)
    if (folder / "test_batch").exists():
        return cifar10(folder)
    if folder.is_dir():
        return image_folder(folder, size, test_fraction, lazy)
    raise ConfigError(
        "data.path",
        path,
        "expected a CIFAR-10 python folder (data_batch_*, test_batch) or an image folder with one sub-folder per class",
    )
