"""``images``: classify small images with a ResNet (CIFAR-style, for 32x32 inputs).

The data is a folder or an ``.npz`` file (``[task] path``: absolute, or under the
worker's ``--data``):

- a folder of class sub-folders (``cat/0001.png``, ...), read with Pillow and resized
  to ``size`` x ``size``; with ``train/`` and ``test/`` sub-folders of that shape,
  those are the splits, else ``test_fraction`` of the images is held out;
- an ``.npz`` with ``x`` (N x H x W x C or N x C x H x W, uint8 or float in [0, 1])
  and ``y`` (N class indices), and optionally ``x_test`` and ``y_test``.

The model is ``resnet.ResNet``: ``width = 64`` and ``blocks = [2, 2, 2, 2]`` is
ResNet-18 (about 11 M parameters); the default ``width = 16`` is a sixteenth of its size.
``norm = "group"`` swaps BatchNorm for GroupNorm, which federated training on non-IID
data often prefers (no running statistics to average).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from elastic_plugins.tasks import (
    check_fraction,
    check_split,
    client_rows,
    data_file,
    held_out,
    seeded,
)
from elastic_plugins.tasks.resnet import ResNet
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import (
    JobSpecError,
    Shard,
    Task,
    check_params,
    hookimpl,
)

__all__ = ["Images", "ResNet"]

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class Images(Task):
    """Image classification with a ResNet.

    Parameters (``[task]``):
        path: the folder or ``.npz`` (required).
        classes: how many classes (default 10); channels: 3 (RGB) or 1 (default 3).
        size: images are resized to this (folders only; default 32).
        width: the first stage's channels (default 16; 64 is ResNet-18).
        blocks: blocks per stage (default [2, 2, 2, 2]).
        norm: "batch" (default) or "group".
        partition: how the training images are split among clients, any scheme of
            ``elastic.partitions`` but natural (default "iid").
        test_fraction: held out when the data has no test split (default 0.2).
    """

    name = "images"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(
            "task images",
            params,
            {
                "path": str,
                "classes": int,
                "channels": int,
                "size": int,
                "width": int,
                "blocks": list,
                "norm": str,
                "partition": str,
                "test_fraction": float,
            },
        )
        if "path" not in p:
            raise JobSpecError('task images: [task] path is missing; e.g. path = "cifar.npz"')
        self.path = p["path"]
        self.classes = p.get("classes", 10)
        self.channels = p.get("channels", 3)
        self.size = p.get("size", 32)
        self.width = p.get("width", 16)
        self.blocks = tuple(p.get("blocks", [2, 2, 2, 2]))
        self.norm = p.get("norm", "batch")
        self.partition = p.get("partition", "iid")
        self.test_fraction = p.get("test_fraction", 0.2)
        if self.classes < 2 or self.channels not in (1, 3) or self.size < 8 or self.width < 1:
            raise JobSpecError(
                "task images: classes >= 2, channels 1 or 3, size >= 8 and width >= 1, got "
                f"{self.classes}, {self.channels}, {self.size}, {self.width}"
            )
        if not self.blocks or not all(isinstance(b, int) and 1 <= b <= 8 for b in self.blocks):
            raise JobSpecError(
                f"task images: blocks = {list(self.blocks)}; give blocks per stage, e.g. "
                "[2, 2, 2, 2]"
            )
        if self.norm not in ("batch", "group"):
            raise JobSpecError(f'task images: norm = {self.norm!r}; use "batch" or "group"')
        check_split(self.partition, "images")
        if self.partition == "natural":
            raise JobSpecError(
                "task images: its images have no natural key; give each worker its own images "
                'with --data and partition = "iid" with one client a worker, or another scheme'
            )
        check_fraction("images", self.test_fraction)
        super().__init__(p)

    def build_model(self, seed: int) -> nn.Module:
        return seeded(
            seed, lambda: ResNet(self.classes, self.channels, self.width, self.blocks, self.norm)
        )

    def _data(self, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        where = data_file("images", self.path, data_dir)
        x, y, x_test, y_test = _load(str(where), self.size, self.channels, self.test_fraction)
        if x.shape[1] != self.channels:
            raise JobSpecError(
                f"task images: {where} has {x.shape[1]} channels; set [task] channels = "
                f"{x.shape[1]}"
            )
        top = int(max(y.max(initial=0), y_test.max(initial=0)))
        if top >= self.classes:
            raise JobSpecError(
                f"task images: {where} has class {top}; set [task] classes = {top + 1} or more"
            )
        return x, y, x_test, y_test

    def train_dataset(self, shard: Shard, data_dir: Path | None) -> TensorDataset:
        x, y, _, _ = self._data(data_dir)
        idx = client_rows(y, shard, self.partition)
        return TensorDataset(_as_float(x[idx]), torch.from_numpy(y[idx]))

    def test_dataset(self, data_dir: Path | None) -> TensorDataset:
        _, _, x, y = self._data(data_dir)
        return TensorDataset(_as_float(x), torch.from_numpy(y))

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(inputs), targets)

    def metrics(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, float]:
        return {"accuracy": float((model(inputs).argmax(dim=1) == targets).sum())}


def _as_float(x: np.ndarray) -> torch.Tensor:
    """uint8 images as floats centred on zero (about unit variance)."""
    return (torch.from_numpy(x).float() / 255.0 - 0.5) / 0.25


@lru_cache(maxsize=2)
def _load(
    path: str, size: int, channels: int, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, x_test, y_test): uint8 N x C x H x W images and int64 labels."""
    where = Path(path)
    if where.is_dir():
        if (where / "train").is_dir() and (where / "test").is_dir():
            x, y, classes = _read_folder(where / "train", size, channels, None)
            x_test, y_test, _ = _read_folder(where / "test", size, channels, classes)
            return x, y, x_test, y_test
        x, y, _ = _read_folder(where, size, channels, None)
    else:
        try:
            with np.load(where) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise JobSpecError(f"task images: {where} is not a readable .npz: {exc}") from None
        if "x" not in arrays or "y" not in arrays:
            raise JobSpecError(f"task images: {where} needs arrays x and y (has {sorted(arrays)})")
        x, y = _images(arrays["x"], where), _labels(arrays["y"], len(arrays["x"]), where)
        if "x_test" in arrays and "y_test" in arrays:
            x_test = _images(arrays["x_test"], where)
            return x, y, x_test, _labels(arrays["y_test"], len(x_test), where)
    train, test = held_out(len(y), test_fraction)
    return x[train], y[train], x[test], y[test]


def _images(x: np.ndarray, where: Path) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise JobSpecError(f"task images: {where}: x has shape {x.shape}; give N x H x W x C")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # N x H x W x C -> N x C x H x W
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, n: int, where: Path) -> np.ndarray:
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise JobSpecError(f"task images: {where}: y must be {n} class indices >= 0")
    return y.astype(np.int64)


def _read_folder(
    root: Path, size: int, channels: int, classes: list[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images under ``root/<class>/``, read with Pillow; the classes are the sorted
    sub-folder names (a test folder must use the training folder's)."""
    from PIL import Image

    names = classes or sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(names) < 2:
        raise JobSpecError(
            f"task images: {root} needs a sub-folder per class (found {names}); e.g. cat/, dog/"
        )
    images, labels = [], []
    for label, name in enumerate(names):
        for file in sorted((root / name).glob("*")) if (root / name).is_dir() else []:
            if file.suffix.lower() not in SUFFIXES:
                continue
            with Image.open(file) as image:
                image = image.convert("RGB" if channels == 3 else "L").resize((size, size))
                pixels = np.asarray(image, dtype=np.uint8)
            images.append(pixels if pixels.ndim == 3 else pixels[:, :, None])
            labels.append(label)
    if not images:
        raise JobSpecError(f"task images: no images under {root} ({', '.join(sorted(SUFFIXES))})")
    x = np.stack(images).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.array(labels, dtype=np.int64), names


@hookimpl
def elastic_tasks() -> list[type]:
    return [Images]
