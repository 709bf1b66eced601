"""Crash safety of written files: atomic writes, sha256-verified checkpoints, a full disk."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from medtl.errors import OutputError
from medtl.models.encoders import create_encoder
from medtl.training.checkpoint import (
    CorruptCheckpointError,
    UnverifiedCheckpointError,
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


def _damage(folder: Path, damage: str) -> None:
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
    elif damage == "garble_meta":
        meta.write_text(meta.read_text()[:40])
    elif damage in ("no_sha", "flip_and_no_sha"):
        if damage == "flip_and_no_sha":
            _damage(folder, "flip")
        m = json.loads(meta.read_text())
        del m["model_sha256"]
        meta.write_text(json.dumps(m))


@pytest.mark.parametrize("damage,needle,unverified", [
    ("truncate", "truncated or replaced", True),  # size differs from model_bytes
    ("flip", "sha256 mismatch", True),             # same size, one byte changed
    ("no_sha", "records no model_sha256", True),
    ("flip_and_no_sha", "records no model_sha256", True),  # the tampering of issue 18: refused all the same
    ("delete_weights", "model.safetensors is missing", False),
    ("delete_meta", "meta.json is missing", False),
    ("garble_meta", "meta.json is not valid JSON", False),
])
def test_damaged_checkpoint_raises_a_specific_error(saved, tmp_path: Path, damage: str, needle: str,
                                                    unverified: bool) -> None:
    import shutil

    folder = Path(shutil.copytree(saved[0], tmp_path / "ckpt"))
    _damage(folder, damage)
    for check in (verify_checkpoint, load_checkpoint):
        with pytest.raises(CorruptCheckpointError) as exc:
            check(folder)
        assert needle in exc.value.reason and "rerun" in str(exc.value) and str(folder) in str(exc.value)
        assert isinstance(exc.value, UnverifiedCheckpointError) == unverified
        assert ("--trust-unverified" in str(exc.value)) == unverified


@pytest.mark.parametrize("damage", ["flip", "no_sha", "flip_and_no_sha"])
def test_trust_unverified_loads_and_says_why(saved, tmp_path: Path, damage: str, caplog) -> None:
    import shutil

    folder = Path(shutil.copytree(saved[0], tmp_path / "ckpt"))
    _damage(folder, damage)
    model, meta = load_checkpoint(folder, trust_unverified=True)
    assert not model.training and meta["unverified"]
    assert "NOT verified" in caplog.text and str(folder) in caplog.text
    assert verify_checkpoint(saved[0], trust_unverified=True).get("unverified") is None  # a sound one is verified


def test_trust_unverified_does_not_load_a_truncated_file(saved, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(saved[0], tmp_path / "ckpt"))
    _damage(folder, "truncate")
    assert "truncated" in verify_checkpoint(folder, trust_unverified=True)["unverified"]
    with pytest.raises(CorruptCheckpointError, match="cannot be read"):
        load_checkpoint(folder, trust_unverified=True)


def test_legacy_checkpoint_without_sha_is_refused_unless_trusted(saved, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(saved[0], tmp_path / "old"))
    meta = json.loads((folder / "meta.json").read_text())
    del meta["model_sha256"], meta["model_bytes"]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UnverifiedCheckpointError, match="records no model_sha256"):
        load_checkpoint(folder)
    model, meta = load_checkpoint(folder, trust_unverified=True)
    assert not model.training and "model_sha256" in meta["unverified"]


# -- a full disk and a read-only folder are the user's errors, and leave nothing behind -------------------------

def _failing_write(code: int):
    real = os.write

    def write(fd, data):
        if len(data) > 4:  # pytest's own output is not written through os.write; be safe anyway
            raise OSError(code, os.strerror(code))
        return real(fd, data)
    return write


@pytest.mark.parametrize("code,needle", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EDQUOT, "disk quota exceeded"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_a_failed_write_is_an_output_error_and_keeps_the_old_file(tmp_path: Path, monkeypatch, code, needle) -> None:
    path = atomic_write_text(tmp_path / "predictions.csv", "id\n1\n")
    monkeypatch.setattr(os, "write", _failing_write(code))
    with pytest.raises(OutputError) as exc:
        atomic_write_text(path, "id\n1\n2\n" * 100)
    monkeypatch.undo()
    msg = str(exc.value)
    assert f"'{tmp_path}'" in msg and needle in msg and "predictions.csv" in msg
    if code in (errno.ENOSPC, errno.EDQUOT):
        assert exc.value.needed == 700 and exc.value.free is not None and "needs 700 bytes" in msg and "free" in msg
    assert path.read_text() == "id\n1\n" and os.listdir(tmp_path) == ["predictions.csv"]


def test_checkpoint_refused_before_writing_when_the_disk_is_too_small(saved, tmp_path: Path, monkeypatch) -> None:
    import medtl._io as io_mod

    monkeypatch.setattr(io_mod, "free_bytes", lambda path: 123_000)
    with pytest.raises(OutputError) as exc:
        save_checkpoint(saved[1], tmp_path / "fold1", {"class_names": ["a", "b"]})
    msg = str(exc.value)
    assert "not enough free space for checkpoint fold1/model.safetensors" in msg
    assert f"'{tmp_path / 'fold1'}'" in msg and "123.0 kB free" in msg and exc.value.needed > 1_000_000
    assert not (tmp_path / "fold1").exists() or not any((tmp_path / "fold1").iterdir())
