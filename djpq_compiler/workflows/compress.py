"""``djpq compress``: the demo pipeline for your own model and image folder.

The model is a ``module:function`` (or ``path/to/file.py:function``) that returns an
``nn.Module`` classifier, loading its own weights if it has any (or pass ``weights=`` with a
``state_dict`` file). The data is a folder in torchvision ``ImageFolder`` form::

    DIR/train/<class>/*.png      training images (required)
    DIR/val/<class>/*.png        evaluation images; DIR/test/<class>/* when there is no val/

Class indices are the sorted class-folder names of ``DIR/train`` (``ImageFolder``'s order, which
must be the order of the model's logits); the evaluation folder may lack classes but must not
add any. Every image is resized (not cropped) to the input shape's ``H x W``, converted to
grayscale when the model takes one channel (RGB otherwise), and normalized with ``mean``/``std``
(default: per-channel statistics of up to 512 training images). ``input_shape`` defaults to the
first training image's size and mode (1 channel for grayscale images, else 3)::

    from djpq_compiler.workflows.compress import CompressOptions, run_compress

    outcome = run_compress(CompressOptions(model="my_models:small_cnn", data="data/parts",
                                           input_shape=(1, 3, 32, 32), minutes=5, tvm=False))
    print(outcome.result.integer_acc, outcome.report)

Errors in the model spec, the weights, the data folder or the input shape raise a
:class:`~djpq_compiler.errors.DjpqError` with one line that says what to fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from djpq_compiler.errors import ArtifactError, ConfigError, DataError, DjpqError, require
from djpq_compiler.workflows.demo import RunOptions, RunOutcome, run_pipeline

__all__ = ["CompressOptions", "run_compress", "load_factory", "load_model", "find_splits",
           "image_folders", "image_transform", "channel_stats", "infer_input_shape",
           "check_model", "STATS_IMAGES"]

#: Training images sampled to compute the default normalization statistics.
STATS_IMAGES = 512

_LAYOUT = ("expected DIR/train/<class>/<image> and DIR/val/<class>/<image> (or DIR/test/...), "
           "as torchvision's ImageFolder reads them")


@dataclass(frozen=True, kw_only=True)
class CompressOptions(RunOptions):
    """Options of :func:`run_compress` (see
    :class:`~djpq_compiler.workflows.demo.RunOptions` for the
    budget, subsets and stages).

    Attributes:
        model: ``module:function`` or ``path/to/file.py:function`` returning an ``nn.Module``.
        data: Image folder (see the module docstring for the layout).
        input_shape: ``(N, C, H, W)`` with ``C`` 1 or 3 (``N`` is ignored for training;
            ``None``: from the first training image).
        weights: Optional ``state_dict`` file loaded into the model (``weights_only=True``).
        mean: Per-channel normalization mean (1 or C values; ``None``: computed).
        std: Per-channel normalization std (1 or C values, > 0; ``None``: computed).
        workers: DataLoader worker processes (0: decode in the main process).
    """

    model: str
    data: str | os.PathLike[str]
    input_shape: tuple[int, ...] | None = None
    weights: str | os.PathLike[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    workers: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if ":" not in self.model:
            raise ConfigError(f"model must be 'module:function', got {self.model!r}")
        shape = self.input_shape
        if shape is not None and (len(shape) != 4 or shape[1] not in (1, 3) or min(shape) < 1):
            raise ConfigError(f"input shape must be N,C,H,W with C = 1 or 3, got {shape}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("give both mean and std, or neither (computed from the data)")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ConfigError(f"mean and std need as many values, got {self.mean}, {self.std}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"std values must be > 0, got {self.std}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")


# ---------------------------------------------------------------------------------- the model


def _import(module_part: str, spec: str) -> Any:
    """Import ``pkg.module`` (from ``sys.path``) or a ``.py`` file."""
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise ConfigError(f"cannot load model factory {spec!r}: no file {path}")
        name = "djpq_user_" + re.sub(r"\W", "_", path.stem)
        file_spec = importlib.util.spec_from_file_location(name, path)
        if file_spec is None or file_spec.loader is None:
            raise ConfigError(f"cannot load model factory {spec!r}: {path} is not a Python file")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        file_spec.loader.exec_module(module)
        return module
    return importlib.import_module(module_part)


def load_factory(spec: str) -> nn.Module:
    """Call the ``module:function`` (or ``file.py:function``) factory ``spec``.

    Raises:
        ConfigError: the module cannot be imported, has no such function, the function fails,
            or it returns something other than an ``nn.Module``.
    """
    module_part, _, func_name = spec.rpartition(":")
    if not module_part or not func_name:
        raise ConfigError(f"model factory {spec!r} is not 'module:function'")
    try:
        factory = getattr(_import(module_part, spec), func_name)
    except DjpqError:
        raise
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load model factory {spec!r}: {exc}; use 'module:function' "
                          "with the module importable (on PYTHONPATH)") from exc
    except Exception as exc:  # the user's module failed while importing
        raise ConfigError(f"cannot load model factory {spec!r}: importing it raised "
                          f"{type(exc).__name__}: {exc}") from exc
    try:
        model = factory()
    except DjpqError:
        raise
    except Exception as exc:
        raise ConfigError(f"model factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {spec!r} returned {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


def load_model(spec: str, weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """The factory's model, with ``weights`` (a ``state_dict`` file) loaded, in eval mode.

    Raises:
        ConfigError: see :func:`load_factory`.
        ArtifactError: the weights file is missing, unreadable or does not match the model.
    """
    model = load_factory(spec)
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # missing, truncated, not a torch file
            raise ArtifactError(f"cannot load weights {weights}: {exc}") from exc
        if isinstance(state, dict) and set(state) == {"state_dict"}:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ArtifactError(f"weights {weights} hold a {type(state).__name__}, not a "
                                "state_dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ArtifactError(f"weights {weights} do not match {spec!r}: {first}") from exc
    return model.eval()


def check_model(model: nn.Module, spec: str, shape: tuple[int, ...], classes: list[str]) -> None:
    """Run ``model`` once on zeros of ``shape``; it must return ``(N, len(classes))`` logits.

    Raises:
        ConfigError: the model fails on the shape, or its output does not match the classes.
    """
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(shape))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model {spec!r} fails on input shape {','.join(map(str, shape))} "
                          f"({type(exc).__name__}: {first}); pass --input-shape N,C,H,W "
                          "matching the model") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {spec!r} must return (N, classes) logits, got {got}")
    if out.shape[1] != len(classes):
        raise ConfigError(f"model {spec!r} returns {out.shape[1]} logits but the training folder "
                          f"has {len(classes)} classes ({', '.join(classes[:8])}"
                          f"{', ...' if len(classes) > 8 else ''})")


# ----------------------------------------------------------------------------------- the data


def find_splits(root: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(DIR/train, DIR/val)``, or ``DIR/test`` when there is no ``val`` folder.

    Raises:
        DataError: the folder or its ``train`` / evaluation split is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; {_LAYOUT}")
    if not (root / "train").is_dir():
        raise DataError(f"data folder {root} has no train/ folder; {_LAYOUT}")
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / "train", root / name
    raise DataError(f"data folder {root} has no val/ or test/ folder to evaluate on; {_LAYOUT}")


def infer_input_shape(train: Any) -> tuple[int, int, int, int]:
    """``(1, C, H, W)`` of the first image of an ``ImageFolder`` (C = 1 for grayscale modes,
    else 3)."""
    from PIL import Image

    with Image.open(train.samples[0][0]) as image:
        channels = 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
        return 1, channels, image.height, image.width


def image_folders(train_dir: Path, eval_dir: Path) -> tuple[Any, Any]:
    """``ImageFolder`` s of both splits; evaluation labels use the training class indices.

    Raises:
        DataError: no class folders or images, or evaluation classes unknown to training.
    """
    datasets = require("torchvision.datasets", "vision")
    folders = []
    for directory in (train_dir, eval_dir):
        try:
            folders.append(datasets.ImageFolder(str(directory)))  # type: ignore[attr-defined]
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"cannot read images from {directory}: {exc}; {_LAYOUT}") from exc
    train, held_out = folders
    unknown = sorted(set(held_out.classes) - set(train.classes))
    if unknown:
        raise DataError(f"{eval_dir} has classes that {train_dir} lacks: {', '.join(unknown)}")
    remap = [train.class_to_idx[name] for name in held_out.classes]
    held_out.samples = [(path, remap[target]) for path, target in held_out.samples]
    held_out.imgs = held_out.samples
    held_out.targets = [target for _, target in held_out.samples]
    held_out.classes, held_out.class_to_idx = train.classes, train.class_to_idx
    return train, held_out


def image_transform(shape: tuple[int, ...], mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None) -> Any:
    """Resize to ``shape``'s H x W, grayscale when C == 1, to tensor, normalize if given."""
    transforms: Any = require("torchvision.transforms", "vision")
    steps = [transforms.Resize((shape[2], shape[3]))]
    if shape[1] == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    steps.append(transforms.ToTensor())
    if mean is not None and std is not None:
        steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


def channel_stats(dataset: Dataset, limit: int = STATS_IMAGES,
                  seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of up to ``limit`` random images of ``dataset`` (un-normalized
    tensors in ``[0, 1]``)."""
    n = len(dataset)  # type: ignore[arg-type]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    pixels = torch.stack([dataset[int(i)][0] for i in idx]).transpose(0, 1).flatten(1).double()
    std = pixels.std(dim=1).clamp_min(1e-3)  # a constant channel must not divide by zero
    return tuple(pixels.mean(dim=1).tolist()), tuple(std.tolist())


def _subset(dataset: Any, size: int | None, seed: int) -> Any:
    if size is None or size >= len(dataset):
        return dataset
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, perm[:size].tolist())


def _loaders(options: CompressOptions, train: Any, held_out: Any) -> tuple[DataLoader,
                                                                            DataLoader]:
    train_loader = DataLoader(_subset(train, options.train_subset, options.seed),
                              batch_size=options.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(options.seed),
                              num_workers=options.workers)
    test_loader = DataLoader(_subset(held_out, options.test_subset, options.seed),
                             batch_size=max(options.batch_size, 64), shuffle=False,
                             num_workers=options.workers)
    return train_loader, test_loader


# -------------------------------------------------------------------------------- the pipeline


def run_compress(options: CompressOptions, command: str | None = None) -> RunOutcome:
    """Fine-tune a user model with DJPQ on an image folder, convert, check backends, report.

    Args:
        options: Model, data and budget.
        command: The command line recorded in the report (default: this call, spelled out).

    Raises:
        ConfigError: bad model spec, factory, or input shape.
        ArtifactError: bad weights file.
        DataError: missing or malformed data folder.
    """
    train_dir, eval_dir = find_splits(options.data)
    train, held_out = image_folders(train_dir, eval_dir)
    model = load_model(options.model, options.weights)
    shape = options.input_shape or infer_input_shape(train)
    check_model(model, options.model, shape, train.classes)
    mean, std, how = options.mean, options.std, "given"
    if mean is not None and len(mean) not in (1, shape[1]):
        raise ConfigError(f"mean/std need 1 or {shape[1]} values for input shape "
                          f"{','.join(map(str, shape))}, got {len(mean)}")
    base = image_transform(shape)
    if mean is None or std is None:
        train.transform = base
        mean, std = channel_stats(train, seed=options.seed)
        how = f"computed on {min(STATS_IMAGES, len(train))} training images"
    train.transform = held_out.transform = image_transform(shape, mean, std)
    torch.manual_seed(options.seed)
    train_loader, test_loader = _loaders(options, train, held_out)
    func = options.model.rpartition(":")[2]
    out = Path(options.out or f"runs/compress-{func}")
    settings = {
        "model": options.model,
        "weights": str(options.weights) if options.weights else "as returned by the factory",
        "data": f"{train_dir} ({len(train)} images, {len(train.classes)} classes); evaluated on "
                f"{eval_dir} ({len(held_out)} images)",
        "input shape": ",".join(map(str, shape)),
        "preprocessing": f"resize to {shape[2]}x{shape[3]}"
                         + (", grayscale" if shape[1] == 1 else ", RGB")
                         + f", normalize mean {_fmt(mean)} std {_fmt(std)} ({how})"}
    outcome = run_pipeline(model, train_loader, test_loader, options, name=options.model,
                           out=out, command=command or f"run_compress({options!r})",
                           settings=settings, dataset=f"{eval_dir.parent.name}/{eval_dir.name}",
                           title="djpq compress")
    return outcome


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
