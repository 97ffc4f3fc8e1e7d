from pathlib import Path

import torch

from elastic.coordinator.checkpoints import CheckpointStore


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
