from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from elastic.coordinator.checkpoints import CheckpointStore, atomic_write, write_safetensors


def test_save_keeps_the_newest_k_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "job", keep=2)
    for r in range(1, 5):
        store.save(r, {"round": r, "w": torch.full((3,), float(r))})
    assert [r for r, _ in store.paths()] == [3, 4]
    assert sorted(p.name for p in store.dir.iterdir()) == ["ckpt-00000003.pt", "ckpt-00000004.pt"]
    assert store.latest()["round"] == 4


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "job", keep=3)
    store.save(1, {"round": 1})
    path = store.save(2, {"round": 2})
    path.write_bytes(path.read_bytes()[:20])  # torn by something outside our control
    assert store.latest()["round"] == 1


def test_no_checkpoint(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path, "job").latest() is None


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int8,
        torch.uint8,
        torch.bool,
    ],
)
def test_safetensors_written_from_tensor_memory_load_with_the_safetensors_library(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": (torch.randn(3, 5, generator=g) * 10).to(dtype),
        "a.bias": (torch.randn(7, generator=g) * 10).to(dtype),
        "scalar": torch.tensor(3).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
        "strided": (torch.randn(4, 6, generator=g) * 10).to(dtype).t(),  # not contiguous
    }
    path = tmp_path / "m.safetensors"
    atomic_write(path, lambda f: write_safetensors(f, tensors, {"job": "j", "round": "4"}))
    loaded = safetensors.torch.load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], t), name
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"job": "j", "round": "4"}
