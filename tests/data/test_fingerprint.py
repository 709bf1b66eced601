"""The data fingerprint: label facts from every case, image facts from a sample, nothing identifying."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medtl.config import load_config
from medtl.data.fingerprint import Fingerprint, fingerprint_cases, fingerprint_data
from medtl.data.manifest import Case, read_manifest
from medtl.errors import DataError


def _npz(path, n=(20, 6, 8), shape=(16, 16), seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(k, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 3 == 0).astype(np.int64)[:, None]
    np.savez(path, **arrays)
    return path


def test_medmnist_npz_facts(tmp_path):
    path = _npz(tmp_path / "tinymnist.npz")
    fp = fingerprint_data(load_config({"data": {"format": "medmnist", "path": str(path)}}).data)
    assert (fp.source, fp.n_cases, fp.n_patients, fp.max_cases_per_patient) == ("medmnist", 34, 34, 1)
    assert fp.splits == {"test": 8, "train": 20, "val": 6} and fp.has_official_split
    assert fp.class_counts == {"0": 22, "1": 12} and fp.patients_per_class == {"0": 22, "1": 12}
    assert (fp.spatial_dims, fp.shape, fp.channels, fp.is_8bit, fp.is_hu) == (2, (16, 16), 1, True, False)
    assert fp.modality == "unknown" and fp.spacing is None and fp.sites == {}
    assert fp.n_sampled == 34 and fp.seconds_per_image == 0.0  # in memory: every image looked at, no read cost
    assert 0 <= fp.value_range[0] < fp.value_range[1] <= 255
    assert fp.minority_fraction == pytest.approx(12 / 34)
    assert Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp  # fingerprint.json reads back


def test_volumes_are_3d(tmp_path):
    path = _npz(tmp_path / "vol.npz", shape=(12, 10, 10))
    fp = fingerprint_data(load_config({"data": {"format": "medmnist", "path": str(path)}}).data)
    assert (fp.spatial_dims, fp.shape) == (3, (12, 10, 10))


def test_manifest_counts_patients_and_sites_but_never_lists_them(tmp_path):
    rows = ["path,label,patient_id,site"]
    for i in range(12):
        arr = (np.random.default_rng(i).random((20, 24)) * 1000).astype(np.uint16)  # 16-bit, not 8-bit
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png,{'yes' if i % 2 else 'no'},SECRET-PATIENT-{i // 3},{'north' if i < 8 else 'south'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    fp = fingerprint_cases(read_manifest(tmp_path / "m.csv"), source="manifest", sample=5)
    assert (fp.n_cases, fp.n_patients, fp.max_cases_per_patient) == (12, 4, 3)
    assert fp.patients_per_class == {"no": 4, "yes": 4} and fp.sites == {"north": 8, "south": 4}
    assert fp.n_sampled == 5 and fp.n_unreadable == 0 and fp.seconds_per_image > 0
    assert fp.shape == (20, 24) and not fp.is_8bit and fp.value_range[1] > 255
    text = json.dumps(fp.to_dict())
    assert "SECRET" not in text and "img" not in text and str(tmp_path) not in text


def test_unreadable_sampled_files_are_counted(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cases = [Case("r1", str(tmp_path / "ok.png"), "a", "p1"), Case("r2", str(tmp_path / "bad.png"), "b", "p2")]
    fp = fingerprint_cases(cases, source="manifest")
    assert (fp.n_sampled, fp.n_unreadable) == (2, 1)
    with pytest.raises(DataError, match="None of the 1 sampled images"):
        fingerprint_cases(cases[1:], source="manifest")
    with pytest.raises(DataError, match="no labelled case"):
        fingerprint_cases([Case("r1", None, None, "p1", array=np.zeros((1, 4, 4)))], source="manifest")


def test_real_breastmnist(shared_data):
    path = shared_data / "medmnist" / "breastmnist.npz"
    fp = fingerprint_data(load_config({"data": {"format": "medmnist", "path": str(path)}}).data)
    assert (fp.n_cases, fp.shape, fp.modality, fp.is_8bit) == (780, (28, 28), "US", True)
    assert fp.splits == {"test": 156, "train": 546, "val": 78}
    assert fp.class_counts == {"malignant": 210, "normal_or_benign": 570}
