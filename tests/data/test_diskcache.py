"""Data over the memory budget: the on-disk decoded-once cache gives what memory gives.

Tiny NIfTI volumes, prepared once in memory and once on disk: the same pixels, labels,
cases and geometry; a second prepare reuses the finished cache without decoding; a damaged
cache is decoded again; and a whole cross-validation on the disk cache writes the same
metrics as the in-memory run.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medtl._fastpath import DiskArray, batches, resident
from medtl.config import load_config
from medtl.data import readers

prep = importlib.import_module("medtl.data.prepare")  # the package attribute is the function

AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, 1.2, 0, -30.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])


def write_volumes(root: Path, n: int = 10, shape=(18, 16, 12)) -> Path:
    """``n`` NIfTI volumes (half with a bright blob) and their manifest, 2 cases per patient."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,patient_id"]
    for i in range(n):
        vol = rng.normal(0, 50, shape).astype(np.int16)
        label = i % 2
        if label:
            vol[4:9, 5:10, 3:7] += 400
        path = root / f"vol{i:02d}.nii"
        nib.save(nib.Nifti1Image(vol, AFFINE), path)
        rows.append(f"{path},{label},P{i // 2}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def tiny_config(manifest: Path, *extra: str):
    raw = {"name": "disk", "data": {"path": str(manifest), "spatial_dims": 3, "image_size": [8, 32, 32],
                                    "intensity": {"mode": "range", "vmin": -200, "vmax": 600}},
           "model": {"name": "test_resnet", "pretrained": False},
           "train": {"epochs": 1, "batch_size": 4, "tta": False, "num_threads": 1},
           "cv": {"n_splits": 2}, "evaluate": {"n_bootstrap": 20}}
    return load_config(raw, list(extra))


@pytest.fixture
def volumes(tmp_path: Path) -> Path:
    return write_volumes(tmp_path / "vols")


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = readers.read_image

    def counting(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(readers, "read_image", counting)
    return calls


def test_disk_cache_equals_memory_and_is_reused_without_decoding(volumes, tmp_path, monkeypatch):
    cfg = tiny_config(volumes)
    calls = _count_decodes(monkeypatch)
    mem = prep.prepare(cfg, progress=False, store="memory")
    disk = prep.prepare(cfg, progress=False, store="disk", cache_dir=tmp_path / "decoded")
    assert len(calls) == 20  # each file once per prepare
    assert not mem.on_disk and disk.on_disk and isinstance(disk.images, DiskArray)
    assert disk.images.shape == mem.images.shape == (10, 1, 8, 32, 32)
    np.testing.assert_array_equal(np.asarray(disk.images), mem.images)
    np.testing.assert_array_equal(disk.y, mem.y)
    assert [c.case_id for c in disk.cases] == [c.case_id for c in mem.cases]
    for a, b in zip(disk.geometry, mem.geometry):
        np.testing.assert_allclose(a.model_affine, b.model_affine)
    # indexing a view reads only what is asked, with the array's semantics
    idx = np.array([7, 2, 2, 5])
    np.testing.assert_array_equal(disk.images[idx].read(), mem.images[idx])
    np.testing.assert_array_equal(disk.images[3], mem.images[3])
    np.testing.assert_array_equal(disk.images[4, 0], mem.images[4, 0])
    np.testing.assert_array_equal(np.asarray(disk.images[1:9][::2]), mem.images[1:9][::2])
    # the fast path yields the same float32 batches from disk as from memory
    for a, b in zip(batches(disk.images[idx], 3, "cpu"), batches(mem.images[idx], 3, "cpu")):
        assert torch.equal(a, b)
    assert torch.equal(resident(disk.images, "cpu").take(idx), resident(mem.images, "cpu").take(idx))

    # a second prepare (a resumed run) reads the finished cache: nothing is decoded
    calls.clear()
    again = prep.prepare(cfg, progress=False, store="disk", cache_dir=tmp_path / "decoded")
    assert calls == []
    np.testing.assert_array_equal(np.asarray(again.images), mem.images)
    assert [g.as_dict() for g in again.geometry] == [g.as_dict() for g in disk.geometry]

    # a damaged cache file fails its sha256 and is decoded again, never used
    (entry,) = [p for p in (tmp_path / "decoded").iterdir() if p.is_dir()]
    raw = bytearray((entry / "images.f32").read_bytes())
    raw[100] ^= 0xFF
    (entry / "images.f32").write_bytes(bytes(raw))
    fixed = prep.prepare(cfg, progress=False, store="disk", cache_dir=tmp_path / "decoded")
    assert len(calls) == 10
    np.testing.assert_array_equal(np.asarray(fixed.images), mem.images)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["shape"] == [10, 1, 8, 32, 32] and "vol0" not in json.dumps(manifest)  # no file names


def test_changed_settings_or_sources_make_a_new_entry(volumes, tmp_path, monkeypatch):
    cfg = tiny_config(volumes)
    folder = tmp_path / "decoded"
    prep.prepare(cfg, progress=False, store="disk", cache_dir=folder)
    calls = _count_decodes(monkeypatch)
    prep.prepare(tiny_config(volumes, "data.image_size=[8, 8, 8]"), progress=False, store="disk", cache_dir=folder)
    assert len(calls) == 10
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 1  # the run's own folder keeps one entry
    vol = volumes.parent / "vol03.nii"
    nib.save(nib.Nifti1Image(np.zeros((18, 16, 12), np.int16), AFFINE), vol)  # a source file changed
    calls.clear()
    out = prep.prepare(tiny_config(volumes, "data.image_size=[8, 8, 8]"), progress=False, store="disk",
                       cache_dir=folder)
    assert len(calls) == 10 and float(np.asarray(out.images[3]).max()) <= 0.25 + 1e-6


def test_two_runs_writing_one_entry_leave_one_complete_entry(tmp_path):
    from medtl.data._diskcache import CacheWriter, entry_folder, open_entry

    key = "ab" * 32
    entry = entry_folder(tmp_path, key)
    first, second = CacheWriter(entry, key, max_bytes=1 << 10), CacheWriter(entry, key, max_bytes=1 << 10)
    for w in (first, second):
        w.append(np.full((1, 2, 3), 0.5, np.float32), "row00002", None)
    assert not entry.exists()  # nothing is visible before it is complete
    first.finish()
    done = second.finish()  # the same entry finished meanwhile: used, the second copy dropped
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]
    assert done.case_ids == ["row00002"] and np.asarray(done.images).tolist() == [[[[0.5] * 3] * 2]]
    assert open_entry(entry, key) is not None and open_entry(entry, "cd" * 32) is None


def test_unreadable_files_are_skipped_the_same_way_from_the_cache(volumes, tmp_path):
    (volumes.parent / "vol04.nii").write_bytes(b"not a nifti")
    cfg = tiny_config(volumes, "data.on_error=skip")
    first = prep.prepare(cfg, progress=False, store="disk", cache_dir=tmp_path / "decoded")
    again = prep.prepare(cfg, progress=False, store="disk", cache_dir=tmp_path / "decoded")
    assert len(first.cases) == len(again.cases) == 9
    assert [s["case_id"] for s in first.skipped] == [s["case_id"] for s in again.skipped]
    assert again.skipped[0]["path"] == str(volumes.parent / "vol04.nii")
    assert "vol04" not in again.skipped[0]["reason"]


@pytest.mark.filterwarnings("ignore:inner_split")
def test_cross_validation_over_the_budget_runs_from_disk_with_the_same_metrics(volumes, tmp_path, monkeypatch):
    from medtl.workflows import cross_validate

    cfg = tiny_config(volumes)
    in_memory = cross_validate(cfg, tmp_path / "mem", progress=False)
    assert not (tmp_path / "mem" / "decoded").exists()
    monkeypatch.setattr(prep, "memory_budget_bytes", lambda budget=None: 64 << 10)  # 64 KiB: the data do not fit
    calls = _count_decodes(monkeypatch)
    on_disk = cross_validate(cfg, tmp_path / "disk", progress=False)
    assert len(calls) == 10  # decoded once for the whole run
    assert list((tmp_path / "disk" / "decoded").glob("*/images.f32"))
    for key in ("pooled", "folds", "fold_mean", "bootstrap", "threshold", "calibration"):
        assert on_disk[key] == in_memory[key], key
