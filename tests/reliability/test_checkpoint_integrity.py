"""Crash safety of written files: atomic writes and sha256-verified checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from medtl.models.encoders import create_encoder
from medtl.training.checkpoint import (
    CorruptCheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
    verify_checkpoint,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = create_encoder("resnet10t", pretrained=False, num_classes=2, in_chans=1)
    folder = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "fold0", {"class_names": ["a", "b"]})
    return folder, model


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "sub" / "metrics.json", '{"auc": 0.5}')
    assert path.read_text() == '{"auc": 0.5}'
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["metrics.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch) -> None:
    path = atomic_write_text(tmp_path / "predictions.csv", "id\n1\n")

    def boom(*args):  # the process dies between writing the temp file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "id\n1\n2\n")
    assert path.read_text() == "id\n1\n" and os.listdir(tmp_path) == ["predictions.csv"]


def test_checkpoint_records_and_verifies_its_sha256(saved) -> None:
    folder, model = saved
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["model_sha256"] == sha256_file(folder / "model.safetensors")
    assert meta["model_bytes"] == (folder / "model.safetensors").stat().st_size
    assert verify_checkpoint(folder)["class_names"] == ["a", "b"]
    loaded, _ = load_checkpoint(folder)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors"]


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "truncated or replaced"),  # size differs from model_bytes
    ("flip", "sha256 mismatch"),         # same size, one byte changed
    ("delete_weights", "model.safetensors is missing"),
    ("delete_meta", "meta.json is missing"),
    ("garble_meta", "meta.json is not valid JSON"),
])
def test_damaged_checkpoint_raises_a_specific_error(saved, tmp_path: Path, damage: str, needle: str) -> None:
    import shutil

    folder = Path(shutil.copytree(saved[0], tmp_path / "ckpt"))
    weights, meta = folder / "model.safetensors", folder / "meta.json"
    raw = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        weights.write_bytes(raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:])
    elif damage == "delete_weights":
        weights.unlink()
    elif damage == "delete_meta":
        meta.unlink()
    else:
        meta.write_text(meta.read_text()[:40])
    for check in (verify_checkpoint, load_checkpoint):
        with pytest.raises(CorruptCheckpointError) as exc:
            check(folder)
        assert needle in exc.value.reason and "rerun" in str(exc.value)


def test_legacy_checkpoint_without_sha_still_loads(saved, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(saved[0], tmp_path / "old"))
    meta = json.loads((folder / "meta.json").read_text())
    del meta["model_sha256"], meta["model_bytes"]
    (folder / "meta.json").write_text(json.dumps(meta))
    model, _ = load_checkpoint(folder)
    assert not model.training
