"""``textlm``: a byte-level GPT-style language model on a text file.

The text (``[task] path``: absolute, or under the worker's ``--data``) is read as
bytes; its last ``test_fraction`` is held out. Training samples are windows of
``context`` + 1 bytes at a stride of ``context``: the model reads the first
``context`` and is scored on predicting each next byte (next-token cross-entropy).
The evaluation reports ``eval_loss`` (nats a byte), ``bits_per_byte`` and
``perplexity`` (e to the loss).

The model is a decoder-only transformer (pre-norm blocks of causal self-attention
and an MLP, learned positions, the output layer tied to the byte embedding):
``layers``, ``width``, ``heads``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from elastic_plugins.tasks import check_fraction, check_split, client_rows, data_file, seeded
from torch import nn
from torch.utils.data import TensorDataset

from elastic.api import (
    JobSpecError,
    Shard,
    Task,
    check_params,
    hookimpl,
)

__all__ = ["TextLM", "ByteGPT"]

VOCAB = 256


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class ByteGPT(nn.Module):
    """Bytes in, the next byte's logits out, at every position."""

    def __init__(self, context: int, layers: int, width: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.norm(self.blocks(x)) @ self.embed.weight.T  # tied output layer


class TextLM(Task):
    """Next-byte prediction on a text file.

    Parameters (``[task]``):
        path: the text file (required).
        context: bytes the model reads (default 64).
        layers, width, heads: the transformer's size (default 2, 64, 4).
        partition: how the training windows are split among clients: "iid"
            (default) or "quantity:SIGMA".
        test_fraction: the end of the text held out (default 0.1).
    """

    name = "textlm"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(
            "task textlm",
            params,
            {
                "path": str,
                "context": int,
                "layers": int,
                "width": int,
                "heads": int,
                "partition": str,
                "test_fraction": float,
            },
        )
        if "path" not in p:
            raise JobSpecError('task textlm: [task] path is missing; e.g. path = "corpus.txt"')
        self.path = p["path"]
        self.context = p.get("context", 64)
        self.layers = p.get("layers", 2)
        self.width = p.get("width", 64)
        self.heads = p.get("heads", 4)
        self.partition = p.get("partition", "iid")
        self.test_fraction = p.get("test_fraction", 0.1)
        if self.context < 2 or self.layers < 1 or self.heads < 1 or self.width % self.heads:
            raise JobSpecError(
                "task textlm: context >= 2, layers >= 1, and width a multiple of heads, got "
                f"context {self.context}, layers {self.layers}, width {self.width}, heads "
                f"{self.heads}"
            )
        check_split(self.partition, "textlm")
        if self.partition.split(":")[0] not in ("iid", "quantity", "local"):
            raise JobSpecError(
                f"task textlm: partition {self.partition!r}: text windows have no labels; use "
                '"iid", "quantity:SIGMA" or "local"'
            )
        check_fraction("textlm", self.test_fraction)
        super().__init__(p)

    def build_model(self, seed: int) -> nn.Module:
        return seeded(seed, lambda: ByteGPT(self.context, self.layers, self.width, self.heads))

    def _windows(self, data_dir: Path | None, test: bool) -> TensorDataset:
        where = data_file("textlm", self.path, data_dir)
        train, held = _split(str(where), self.test_fraction)
        text = held if test else train
        step = self.context
        count = (len(text) - 1) // step
        if count < 1:
            raise JobSpecError(
                f"task textlm: {where} has {len(text)} bytes for the "
                f"{'test' if test else 'training'} part, fewer than one window of {step + 1}; "
                "use a longer text or a shorter context"
            )
        windows = np.lib.stride_tricks.sliding_window_view(text, step + 1)[::step][:count]
        tokens = torch.from_numpy(windows.astype(np.int64))
        return TensorDataset(tokens[:, :-1], tokens[:, 1:])

    def train_dataset(self, shard: Shard, data_dir: Path | None) -> TensorDataset:
        windows = self._windows(data_dir, test=False)
        labels = np.zeros(len(windows), dtype=np.int64)
        idx = client_rows(labels, shard, self.partition)
        inputs, targets = windows.tensors
        return TensorDataset(inputs[idx], targets[idx])

    def test_dataset(self, data_dir: Path | None) -> TensorDataset:
        return self._windows(data_dir, test=True)

    def global_train_dataset(self, data_dir: Path | None) -> TensorDataset:
        windows = self._windows(data_dir, test=False)
        inputs, targets = windows.tensors
        keep = torch.arange(0, len(inputs), max(1, len(inputs) // 256))  # a fixed sample
        return TensorDataset(inputs[keep], targets[keep])

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def metrics(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, float]:
        logits = model(inputs).reshape(-1, VOCAB)
        per_window = nn.functional.cross_entropy(logits, targets.reshape(-1), reduction="none")
        nats = per_window.view(len(inputs), -1).mean(dim=1)
        return {"bits_per_byte": float(nats.sum()) / math.log(2)}

    def derived_metrics(self, figures: Mapping[str, float]) -> dict[str, float]:
        return {"perplexity": math.exp(min(figures["eval_loss"], 50.0))}


@lru_cache(maxsize=2)
def _split(path: str, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    text = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
    cut = len(text) - int(len(text) * test_fraction)
    return text[:cut], text[cut:]


@hookimpl
def elastic_tasks() -> list[type]:
    return [TextLM]
