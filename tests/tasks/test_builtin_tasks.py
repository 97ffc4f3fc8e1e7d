"""The built-in tasks on data the tests make: each reaches its stated bar in a short
federated run (in one process, ``elastic.simulation``), reads its data the ways the
docs say, and refuses bad parameters with the fix."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from elastic.api import Shard
from elastic.errors import JobSpecError
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.simulation import simulate

pytestmark = pytest.mark.slow


def run(tmp_path: Path, task: str, params: dict, rounds: int, **train) -> list[dict]:
    spec = parse_job_spec(
        {
            "job": {"id": task, "task": task, "rule": "fedavg", "rounds": rounds, "min_workers": 2},
            "task": params,
            "train": {"local_epochs": 1, "batch_size": 32, **train},
            "checkpoint": {"every": rounds},
        }
    )
    return simulate(spec, 2, Plugins(), tmp_path / "state").history


def separable_images(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """32x32 RGB images: class k is a patch of its own colour, anywhere, over noise."""
    rng = np.random.default_rng(seed)
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 100, (n, 32, 32, 3)).astype(np.uint8)
    for i, k in enumerate(y):
        row, col = rng.integers(0, 22, 2)
        x[i, row : row + 10, col : col + 10] = colours[k]
    return x, y


def test_images_from_an_npz_reach_090(tmp_path: Path) -> None:
    x, y = separable_images(480, 4)
    np.savez(tmp_path / "shapes.npz", x=x, y=y)
    params = {"path": str(tmp_path / "shapes.npz"), "classes": 4, "width": 8, "blocks": [1, 1]}
    history = run(tmp_path, "images", params, rounds=4, lr=0.05, momentum=0.9)
    assert history[-1]["accuracy"] >= 0.9, [h["accuracy"] for h in history]


def test_images_from_class_folders_with_pillow(tmp_path: Path) -> None:
    from elastic_plugins.tasks.images import Images
    from PIL import Image

    x, y = separable_images(24, 2)
    for split in ("train", "test"):
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            folder = tmp_path / "pics" / split / ("cat", "dog")[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).resize((40, 40)).save(folder / f"{i}.png")
    (tmp_path / "pics" / "train" / "cat" / "notes.txt").write_text("not an image")
    task = Images({"path": "pics", "classes": 2, "size": 32})
    data = task.train_dataset(Shard(0, 1), tmp_path)  # relative to the worker's --data
    inputs, labels = data.tensors
    assert inputs.shape == (24, 3, 32, 32) and sorted(labels.tolist()) == sorted(y.tolist())
    assert len(task.test_dataset(tmp_path)) == 24
    gray = Images({"path": str(tmp_path / "pics"), "classes": 2, "channels": 1})
    assert gray.test_dataset(None).tensors[0].shape == (24, 1, 32, 32)
    assert gray.build_model(0)(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


def test_resnet18_size() -> None:
    from elastic_plugins.tasks.images import Images

    model = Images({"path": "x.npz", "width": 64}).build_model(0)
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


def test_textlm_perplexity_falls_below_2_on_repetitive_text(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta"]
    text = " ".join(words[i] for i in rng.integers(0, 4, 6000))  # 4 words: little entropy
    (tmp_path / "corpus.txt").write_text(text)
    params = {"path": str(tmp_path / "corpus.txt"), "context": 32, "width": 64, "layers": 2}
    history = run(tmp_path, "textlm", params, rounds=6, optimizer="adam", lr=0.003)
    perplexity = [h["perplexity"] for h in history]
    assert perplexity[0] > perplexity[-1] and perplexity[-1] < 2.0, perplexity
    last = history[-1]
    assert last["bits_per_byte"] == pytest.approx(last["eval_loss"] / np.log(2), rel=1e-3)
    assert last["global_train_loss"] < 1.0


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def regression_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        a, b = rng.normal(size=2)
        color = ("red", "green", "blue")[i % 3]
        value = 3 * a - 2 * b + {"red": 1.0, "green": 0.0, "blue": -1.0}[color]
        rows.append(
            {
                "site": f"s{i % 6}",
                "a": f"{a:.4f}" if i % 50 else "",  # a few missing values
                "b": f"{b:.4f}",
                "color": color,
                "value": f"{value + rng.normal() * 0.05:.4f}",
            }
        )
    return rows


def test_tabular_regression_within_02_rmse(tmp_path: Path) -> None:
    write_csv(tmp_path / "sites.csv", regression_rows(1200))
    params = {
        "path": str(tmp_path / "sites.csv"),
        "target": "value",
        "partition": "natural",
        "natural_key": "site",
        "hidden": [32],
    }
    history = run(tmp_path, "tabular", params, rounds=15, optimizer="adam", lr=0.01, local_epochs=2)
    rmse = [h["rmse"] for h in history]
    assert rmse[-1] < 0.2 * 3.7, rmse  # the target's spread is about 3.7: a fifth of it at most


def test_tabular_classification_and_its_natural_split(tmp_path: Path) -> None:
    from elastic_plugins.tasks.tabular import Tabular

    rows = regression_rows(300)
    for r in rows:
        r["label"] = "high" if float(r["value"]) > 0 else "low"
    write_csv(tmp_path / "t.csv", rows)
    task = Tabular(
        {
            "path": "t.csv",
            "target": "label",
            "exclude": ["value"],
            "partition": "natural",
            "natural_key": "site",
        }
    )
    parts = [task.train_dataset(Shard(i, 3, 0), tmp_path) for i in range(3)]
    assert sum(len(p) for p in parts) == len(task.global_train_dataset(tmp_path))
    assert task.build_model(0)(parts[0].tensors[0]).shape[1] == 2  # two classes
    assert parts[0].tensors[0].shape[1] == 2 + 3  # a, b; color one-hot (site, label, value not)


@pytest.mark.parametrize(
    "task, params, words",
    [
        ("images", {}, ["[task] path is missing"]),
        ("images", {"path": "x", "norm": "layer"}, ['"batch" or "group"']),
        ("images", {"path": "x", "partition": "natural"}, ["no natural key"]),
        ("textlm", {"path": "x", "width": 10, "heads": 4}, ["multiple of heads"]),
        ("textlm", {"path": "x", "partition": "dirichlet:0.5"}, ['"quantity:SIGMA" or "local"']),
        ("tabular", {"path": "x"}, ["[task] target is missing"]),
        ("tabular", {"path": "x", "target": "y", "partition": "natural"}, ["natural_key"]),
        ("tabular", {"path": "x", "target": "y", "kind": "ranking"}, ['"regression"']),
    ],
)
def test_bad_parameters_are_refused_with_the_fix(task: str, params: dict, words: list) -> None:
    with pytest.raises(JobSpecError) as err:
        Plugins().task(task)(params)
    for w in words:
        assert w in str(err.value)


def test_missing_data_names_where_it_looked(tmp_path: Path) -> None:
    task = Plugins().task("tabular")({"path": "nowhere.csv", "target": "y"})
    with pytest.raises(JobSpecError, match=f"under {tmp_path}: {tmp_path}/nowhere.csv"):
        task.test_dataset(tmp_path)
    write_csv(
        tmp_path / "t.csv", [{"a": "1", "b": "2"}, {"a": "2", "b": "3"}, {"a": "3", "b": "1"}]
    )
    with pytest.raises(JobSpecError, match="no column 'y' \\(its columns: a, b\\)"):
        Plugins().task("tabular")({"path": "t.csv", "target": "y"}).test_dataset(tmp_path)


def test_local_data_is_all_the_clients_own(tmp_path: Path) -> None:
    """Each worker's --data holds its site's rows: partition = "local" trains all of them."""
    from elastic_plugins.tasks.tabular import Tabular

    for site, n in (("a", 40), ("b", 70)):
        (tmp_path / site).mkdir()
        write_csv(tmp_path / site / "rows.csv", regression_rows(n))
    task = Tabular({"path": "rows.csv", "target": "value", "partition": "local"})
    sizes = [len(task.train_dataset(Shard(i, 2, 0), tmp_path / s)) for i, s in enumerate("ab")]
    assert sizes == [32, 56]  # all of each site's training rows (a fifth held out)
