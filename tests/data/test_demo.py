"""The synthetic demo dataset: valid CT DICOM, plausible HU, aligned masks, privacy bait."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage

from medtl.data.demo import (
    IDENTIFIERS_FILE,
    demo_identifying_strings,
    find_identifying_strings,
    make_demo_dataset,
)
from medtl.data.privacy import IDENTIFYING_TAGS
from medtl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, float]:
    """The default demo dataset (what ``medtl demo`` writes) and its CPU seconds."""
    start = time.process_time()
    manifest = make_demo_dataset(tmp_path_factory.mktemp("demo"))
    return manifest, time.process_time() - start


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _regions(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Air (dark, touching the border), lungs (dark, enclosed) and the number of big lungs."""
    lab, n = ndimage.label(hu < -600)
    border = set(np.unique(np.r_[lab[0], lab[-1], lab[:, 0], lab[:, -1]])) - {0}
    air = np.isin(lab, sorted(border))
    lungs = (lab > 0) & ~air
    sizes = ndimage.sum(lungs, lab, range(1, n + 1))
    return air, lungs, int((sizes > 50).sum())


def test_manifest_columns_paths_and_patient_ids(demo):
    manifest, _ = demo
    with manifest.open(newline="") as fh:
        assert next(csv.reader(fh)) == ["path", "label", "patient_id", "site", "mask"]
    rows = _rows(manifest)
    assert len(rows) == 24 * 4
    for row in rows:
        assert not Path(row["path"]).is_absolute()
        dcm = manifest.parent / row["path"]
        assert dcm.is_file()
        ds = pydicom.dcmread(dcm, stop_before_pixels=True)
        assert row["patient_id"] == ds.PatientID  # as a hospital export would hold it
        assert row["site"] == Path(row["path"]).parts[1]
        assert row["label"] in {"lesion", "normal"}
        if row["mask"]:
            assert (manifest.parent / row["mask"]).is_file()


def test_files_are_valid_ct_dicom_with_geometry(demo):
    manifest, _ = demo
    by_patient: dict[str, list[pydicom.Dataset]] = {}
    for row in _rows(manifest):
        ds = pydicom.dcmread(manifest.parent / row["path"])
        assert ds.preamble == b"\0" * 128
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT" and ds.RescaleType == "HU"
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
        assert ds.pixel_array.shape == (96, 96) and ds.pixel_array.dtype == np.uint16
        assert 0.7 <= float(ds.PixelSpacing[0]) == float(ds.PixelSpacing[1]) <= 0.9
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.WindowCenter is not None and ds.WindowWidth is not None
        assert ds.Manufacturer == {"site_a": "Acme Imaging", "site_b": "Borealis Medical"}[row["site"]]
        assert ds.InstitutionName == {"site_a": "Demo Hospital A", "site_b": "Demo Hospital B"}[row["site"]]
        by_patient.setdefault(row["patient_id"], []).append(ds)
    sops = [ds.SOPInstanceUID for series in by_patient.values() for ds in series]
    assert len(set(sops)) == len(sops)
    for series in by_patient.values():
        assert len({ds.SeriesInstanceUID for ds in series}) == 1
        series.sort(key=lambda ds: int(ds.InstanceNumber))
        assert [int(ds.InstanceNumber) for ds in series] == [1, 2, 3, 4]
        z = [float(ds.ImagePositionPatient[2]) for ds in series]
        assert np.allclose(np.diff(z), float(series[0].SliceThickness))


def test_hu_ranges_are_ct_like(demo):
    manifest, _ = demo
    for row in _rows(manifest):
        hu = _hu(manifest.parent / row["path"])
        air, lungs, n_lungs = _regions(hu)
        assert abs(hu[air].mean() + 1000) < 50
        assert n_lungs >= 2  # a large nodule may split one lung in two
        assert hu[lungs].mean() < -750
        body = ~air & ~ndimage.binary_dilation(lungs, iterations=2)
        soft = body & (hu > -20) & (hu < 120)
        assert soft.sum() > 0.35 * body.sum()  # mostly soft tissue ...
        assert 25 < hu[soft].mean() < 65  # ... at ~ +40 HU
        assert np.sum(body & (hu > -150) & (hu < -60)) > 50  # subcutaneous fat ~ -100 HU
        assert hu.max() > 600  # spine and ribs


def test_masks_align_with_nodules(demo):
    manifest, _ = demo
    rows = _rows(manifest)
    for row in rows:
        if row["label"] == "normal":
            assert row["mask"] == ""
        if not row["mask"]:
            continue
        hu = _hu(manifest.parent / row["path"])
        mask = np.load(manifest.parent / row["mask"])
        assert mask.shape == hu.shape and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        _, lungs, _ = _regions(hu)
        assert hu[mask == 1].mean() > hu[lungs].mean() + 500
        assert -100 < np.median(hu[mask == 1]) < 150  # soft-tissue nodule
        ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1)
        assert lungs[ring].mean() > 0.5  # surrounded by lung
    for patient in {r["patient_id"] for r in rows if r["label"] == "lesion"}:
        shown = [bool(r["mask"]) for r in rows if r["patient_id"] == patient]
        assert sum(shown) >= len(shown) / 2  # nodule visible on most slices


def test_labels_per_patient_and_sites_hold_both_classes(demo):
    rows = _rows(demo[0])
    label_of: dict[str, set[str]] = {}
    site_of: dict[str, set[str]] = {}
    for r in rows:
        label_of.setdefault(r["patient_id"], set()).add(r["label"])
        site_of.setdefault(r["patient_id"], set()).add(r["site"])
    assert all(len(v) == 1 for v in label_of.values()) and all(len(v) == 1 for v in site_of.values())
    label = {p: v.pop() for p, v in label_of.items()}
    site = {p: v.pop() for p, v in site_of.items()}
    assert list(label.values()).count("lesion") == 12
    for name in ("site_a", "site_b"):
        labels = [label[p] for p in label if site[p] == name]
        assert 0.3 <= labels.count("lesion") / len(labels) <= 0.7  # the site does not give the label away


def test_sites_differ_like_two_scanners(demo):
    manifest, _ = demo
    noise: dict[str, list[float]] = {"site_a": [], "site_b": []}
    for row in _rows(manifest):
        hu = _hu(manifest.parent / row["path"])
        noise[row["site"]].append(hu[2:14, 2:14].std())  # corner air
    assert np.mean(noise["site_b"]) > 1.2 * np.mean(noise["site_a"])
    ds_b = pydicom.dcmread(next((manifest.parent / "dicom" / "site_b").rglob("*.dcm")))
    assert len(ds_b.WindowCenter) == 2  # multi-valued window, as some scanners write


def test_deterministic_given_seed(tmp_path):
    kw = dict(n_patients=4, slices_per_patient=2, size=48)
    a = make_demo_dataset(tmp_path / "a", seed=3, **kw).parent
    b = make_demo_dataset(tmp_path / "b", seed=3, **kw).parent
    c = make_demo_dataset(tmp_path / "c", seed=4, **kw).parent
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    dcm = [rel for rel in files_a if rel.suffix == ".dcm"]
    assert all(np.array_equal(pydicom.dcmread(a / r).pixel_array, pydicom.dcmread(b / r).pixel_array) for r in dcm)
    pix = lambda root: b"".join(pydicom.dcmread(p).PixelData for p in sorted(root.rglob("*.dcm")))  # noqa: E731
    assert pix(a) != pix(c)


def test_rerun_replaces_previous_demo_only(tmp_path):
    make_demo_dataset(tmp_path, n_patients=8, slices_per_patient=1, size=48)
    manifest = make_demo_dataset(tmp_path, n_patients=4, slices_per_patient=1, size=48)
    assert len(list(tmp_path.rglob("*.dcm"))) == len(_rows(manifest)) == 4
    other = tmp_path / "not_a_demo"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to write"):
        make_demo_dataset(other)
    assert (other / "notes.txt").read_text() == "mine"


def test_identifiers_cover_headers_and_never_reach_names(demo):
    manifest, _ = demo
    root = manifest.parent
    strings = demo_identifying_strings(root)
    assert {"Demo Hospital A", "Demo Hospital B", "DEMO^PATIENT^07"} <= set(strings)
    for dcm in root.rglob("*.dcm"):
        ds = pydicom.dcmread(dcm, stop_before_pixels=True)
        for tag in IDENTIFYING_TAGS:
            value = str(ds.get(tag, "") or "")
            assert value == "" or value in strings, (tag, value)
    names = [part for p in root.rglob("*") for part in p.relative_to(root).parts]
    assert names and not find_identifying_strings("\n".join(names), strings)
    assert not find_identifying_strings((root / "manifest.csv").read_text().replace("DEMO-MRN-", ""),
                                        [s for s in strings if not s.startswith("DEMO-MRN-")])
    assert json.loads((root / IDENTIFIERS_FILE).read_text())["by_tag"]["PatientID"]


def test_find_identifying_strings_matches_digits_as_whole_numbers():
    text = "patient DEMO-MRN-123456; auc=0.1957031245; born 19570312."
    assert find_identifying_strings(text, ["DEMO-MRN-123456", "19570312", "Demo Hospital A"]) == [
        "DEMO-MRN-123456", "19570312"]
    assert find_identifying_strings("auc=0.1957031245", ["19570312"]) == []


def test_identifiers_of_a_non_demo_folder_raise(tmp_path):
    with pytest.raises(DataError, match="make_demo_dataset"):
        demo_identifying_strings(tmp_path)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_patients": 1}, "'n_patients' parameter of make_demo_dataset must be an int >= 4. Got 1 instead"),
    ({"n_patients": True}, "'n_patients'"),
    ({"size": "96"}, "'size' parameter of make_demo_dataset must be an int in \\[32, 1024\\]"),
    ({"slices_per_patient": 0}, "'slices_per_patient'"),
    ({"lesion_fraction": 1.5}, "'lesion_fraction' parameter of make_demo_dataset must be a float in \\(0, 1\\)"),
    ({"n_patients": 4, "lesion_fraction": 0.8}, "each class needs at least 2 patients"),
])
def test_invalid_parameters_raise_config_error(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_demo_dataset(tmp_path, **kwargs)


def test_default_demo_is_fast(demo):
    _, cpu_seconds = demo
    assert cpu_seconds < 5.0  # 96 slices at 96x96; CPU time, so other jobs on the machine do not count
