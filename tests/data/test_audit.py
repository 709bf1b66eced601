"""Tests for medtl.data.audit on synthetic DICOM cases and the real ct-contrast-tcga export."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from rich.console import Console

from medtl.data.audit import audit_cases, has_findings, print_audit_summary, write_audit
from medtl.data.manifest import Case
from medtl.data.privacy import Pseudonymizer
from medtl.data.readers import read_dicom_patient_id, read_image
from medtl.errors import ConfigError

SALT = "00"


def smooth_image(seed: int, size: int = 48) -> np.ndarray:
    """A distinct smooth image (sum of random Gaussian blobs) scaled to exactly 0..1000."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    img = np.zeros((size, size))
    for _ in range(6):
        cy, cx, s = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 12)
        img += rng.uniform(-1, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    img = (img - img.min()) / (img.max() - img.min())
    return np.round(img * 1000).astype(np.uint16)


def write_ct(path: Path, pixels: np.ndarray, patient_id: str, manufacturer: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = patient_id, "Doe^Jane", "CT"
    ds.Manufacturer, ds.RescaleSlope, ds.RescaleIntercept = manufacturer, 1, -1024
    ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


@pytest.fixture
def problem_cases(tmp_path: Path) -> list[Case]:
    """12 clean cases plus one case per problem the audit must find."""
    cases = []
    for p in range(6):
        pid, label = f"MRN-100{p}", "0" if p < 3 else "1"
        for k in "ab":
            path = write_ct(tmp_path / f"img_{p}{k}.dcm", smooth_image(10 * p + ord(k)), pid,
                            "ACME" if label == "0" else "Globex")
            cases.append(Case(f"p{p}{k}", path, label, pid))
    # exact duplicate: p0a's file copied and filed under another patient with the other label
    shutil.copy(tmp_path / "img_0a.dcm", tmp_path / "copy.dcm")
    cases.append(Case("dup", str(tmp_path / "copy.dcm"), "1", "MRN-1004"))
    # near duplicate: p1a plus tiny noise
    noisy = smooth_image(10 + ord("a")).astype(float) + np.random.default_rng(5).normal(0, 1.0, (48, 48))
    path = write_ct(tmp_path / "noisy.dcm", np.clip(noisy, 0, 1000).astype(np.uint16), "MRN-1001", "ACME")
    cases.append(Case("p1noisy", path, "0", "MRN-1001"))
    # label conflict: patient MRN-1002 (label 0) also has a label-1 case
    path = write_ct(tmp_path / "conflict.dcm", smooth_image(999), "MRN-1002", "ACME")
    cases.append(Case("p2conflict", path, "1", "MRN-1002"))
    # unreadable: truncated file in a folder named after the patient (a common export layout)
    raw = (tmp_path / "img_5a.dcm").read_bytes()
    cut = tmp_path / "MRN-1005" / "cut.dcm"
    cut.parent.mkdir()
    cut.write_bytes(raw[: len(raw) - 2000])
    cases.append(Case("cut", str(cut), "1", "MRN-1005"))
    # the same path listed twice
    cases.append(Case("p3again", str(tmp_path / "img_3a.dcm"), "1", "MRN-1003"))
    return cases


def test_audit_finds_each_problem(problem_cases: list[Case]) -> None:
    pseudo = Pseudonymizer(salt=SALT)
    report = audit_cases(problem_cases, pseudonymize=pseudo, progress=False)
    assert report["n_cases"] == 17 and report["n_patients"] == 6
    assert report["class_balance"]["0"]["count"] == 7
    assert report["per_patient"]["max"] == 3 and report["per_patient"]["min"] == 2

    (unreadable,) = report["unreadable"]
    assert unreadable["case_id"] == "cut" and "truncated" in unreadable["reason"]
    assert pseudo("MRN-1005") in unreadable["path"]  # folder name redacted

    exact = [g for g in report["exact_duplicates"] if set(g["case_ids"]) == {"p0a", "dup"}]
    assert len(exact) == 1 and exact[0]["cross_patient"] and exact[0]["cross_label"]
    near = [set(g["case_ids"]) for g in report["near_duplicates"]]
    assert near == [{"p1a", "p1noisy"}]
    assert not report["near_duplicates"][0]["cross_patient"]

    (conflict,) = report["label_conflicts"]
    assert conflict == {"patient": pseudo("MRN-1002"), "labels": {"0": 2, "1": 1}}
    (dup_path,) = report["duplicate_paths"]
    assert set(dup_path["case_ids"]) == {"p3a", "p3again"}

    manufacturer = report["metadata_confounders"]["fields"]["Manufacturer"]
    assert manufacturer["flagged"] and manufacturer["table"]["Globex"]["0"] == 0
    assert report["intensity"]["per_label"]["0"]["hu_range"] == [-1024.0, -24.0]

    text = "\n".join(report["findings"])
    for needle in ("1 file unreadable", "identical pixels (across patients, across labels)", "near-duplicate",
                   f"patient {pseudo('MRN-1002')} has labels 0 and 1 (2 and 1 cases)",
                   "listed 2 times", "header field Manufacturer"):
        assert needle in text
    assert has_findings(report) and report["clean"] is False

    dumped = json.dumps(report)
    assert "MRN-100" not in dumped and "Doe^Jane" not in dumped


def test_each_file_is_decoded_once(problem_cases: list[Case]) -> None:
    calls: list[str] = []

    def load(case: Case):
        calls.append(case.path)
        return read_image(case.path)

    audit_cases(problem_cases, load=load, progress=False)
    assert len(calls) == len(set(calls)) == len({c.path for c in problem_cases})


def test_clean_in_memory_set_has_no_findings(tmp_path: Path) -> None:
    cases = [Case(f"c{i}", None, str(i % 2), f"patient-{i % 4}",
                  array=smooth_image(i)[None].astype(np.float32) / 1000 * 255) for i in range(8)]
    report = audit_cases(cases, progress=False)
    assert not has_findings(report) and report["clean"], report["findings"]
    assert report["exact_duplicates"] == [] and report["near_duplicates"] == []
    path = write_audit(report, tmp_path / "out")
    assert path == tmp_path / "out" / "audit.json" and json.loads(path.read_text())["n_cases"] == 8
    console = Console(record=True, width=100)
    print_audit_summary(report, console=console)
    assert "No problems found" in console.export_text()


def test_summary_lists_findings(problem_cases: list[Case]) -> None:
    report = audit_cases(problem_cases, progress=True)
    console = Console(record=True, width=200)
    print_audit_summary(report, console=console)
    out = console.export_text()
    assert "finding(s)" in out and "identical pixels" in out and "MRN-100" not in out


def test_in_memory_nan_and_blank_images_are_reported() -> None:
    nan_img = np.ones((1, 8, 8), np.float32)
    nan_img[0, 0, 0] = np.nan
    cases = [Case("nan", None, "0", "a", array=nan_img), Case("blank", None, "1", "b", array=np.zeros((1, 8, 8))),
             Case("ok", None, "1", "c", array=smooth_image(3)[None].astype(np.float32))]
    report = audit_cases(cases, progress=False)
    assert report["intensity"]["nan_images"] == ["nan"] and report["intensity"]["blank_images"] == ["blank"]
    assert any("NaN" in f for f in report["findings"]) and any("blank" in f for f in report["findings"])


def test_parameter_validation() -> None:
    with pytest.raises(ConfigError, match="The 'near_dup_max_distance' parameter of audit_cases must be an "
                                          r"int >= 0. Got -1 instead."):
        audit_cases([], near_dup_max_distance=-1)


def test_real_ct_contrast_export(shared_data: Path) -> None:
    root = shared_data / "ct-contrast-tcga"
    cases = []
    with open(root / "overview.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            path = root / "dicom" / row["dicom_name"]
            pid = read_dicom_patient_id(path)
            assert pid
            cases.append(Case(f"row{int(row['id']):04d}", str(path), "1" if row["Contrast"] == "True" else "0", pid))
    report = audit_cases(cases, progress=False)
    assert report["n_cases"] == 100 and report["n_patients"] == 54
    assert report["class_balance"]["1"]["count"] == 50 and not report["unreadable"]
    assert len(report["label_conflicts"]) >= 1  # README: some patients have slices in both classes
    assert report["exact_duplicates"] and all(not g["cross_patient"] for g in report["exact_duplicates"])
    assert report["metadata_confounders"]["fields"]["ContrastBolusAgent"]["flagged"]
    assert report["intensity"]["per_label"]["0"]["hu_range"][0] <= -1000
    assert has_findings(report)
    assert "TCGA-" not in json.dumps(report)


# --------------------------------------------------------------------------- hostile inputs
def test_redaction_replaces_whole_values_only(tmp_path: Path) -> None:
    """With patient ids ``1`` and ``3`` a reason ``NumberOfFrames=3`` stays readable; ids as whole path
    components or tokens are still pseudonymised."""
    from medtl.errors import UnreadableFileError

    pseudo = Pseudonymizer(salt=SALT)
    cases = [Case("a", str(tmp_path / "3" / "scan.dcm"), "0", "3"),
             Case("b", str(tmp_path / "MRN-77_ct.dcm"), "1", "MRN-77"),
             Case("c", str(tmp_path / "ok.dcm"), "1", "1")]

    def load(case: Case):
        raise UnreadableFileError(case.path, "invalid header value: NumberOfFrames=3 but 1 frame of 512 x 512 "
                                             f"in {Path(case.path).name}")

    report = audit_cases(cases, load=load, pseudonymize=pseudo, progress=False)
    by_id = {u["case_id"]: u for u in report["unreadable"]}
    assert by_id["a"]["path"] == str(tmp_path / pseudo("3") / "scan.dcm")
    assert by_id["a"]["reason"] == "invalid header value: NumberOfFrames=3 but 1 frame of 512 x 512 in scan.dcm"
    assert by_id["b"]["path"] == str(tmp_path / f"{pseudo('MRN-77')}_ct.dcm")
    assert pseudo("MRN-77") in by_id["b"]["reason"] and "MRN-77" not in json.dumps(report)
    assert "P-" not in by_id["c"]["reason"]


def test_privacy_redactor_contract() -> None:
    from medtl.data.privacy import make_redactor

    redact = make_redactor(["1", "MRN123", "DOE_JOHN"], lambda i: f"<{i}>")
    assert redact("NumberOfFrames=1 of 1 x 1") == "NumberOfFrames=1 of 1 x 1"
    assert redact("1") == "<1>" and redact("/data/1/x.dcm") == "/data/<1>/x.dcm" and redact(None) is None
    assert redact("/d/MRN123_ct.dcm MRN1234 XMRN123") == "/d/<MRN123>_ct.dcm MRN1234 XMRN123"
    assert redact("/d/DOE_JOHN/a.dcm") == "/d/<DOE_JOHN>/a.dcm"
    assert make_redactor(["1"], lambda i: i)("/data/1") == "/data/1"  # reveal_ids: nothing to hide


def test_symlink_loop_and_memory_errors_are_unreadable_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "loop.dcm").symlink_to("loop.dcm")
    cases = [Case("loop", str(tmp_path / "loop.dcm"), "0", "P1"),
             Case("oom", str(tmp_path / "x.dcm"), "1", "P2")]

    def load(case: Case):
        if case.case_id == "oom":
            raise MemoryError
        return read_image(case.path)

    report = audit_cases(cases, load=load, progress=False)
    reasons = {u["case_id"]: u["reason"] for u in report["unreadable"]}
    assert reasons["loop"].startswith("symlink loop: the path is a symbolic link that leads back to itself")
    assert reasons["oom"].startswith("out of memory while decoding this file (MemoryError;")
    assert "2 files unreadable" in report["findings"][0]


def test_audit_memory_budget_refuses_large_declared_images(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "a.dcm", smooth_image(1, size=64), "P1", "ACME")
    report = audit_cases([Case("a", path, "0", "P1")], progress=False, memory_budget=1000)
    assert report["unreadable"][0]["reason"].startswith("image too large to decode: its header declares 64 x 64 "
                                                        "pixels x 1 sample = 16.4 KB as float32")
    with pytest.raises(ConfigError, match="'memory_budget' parameter of audit_cases"):
        audit_cases([], progress=False, memory_budget="lots")


def test_canonicalised_label_spellings_are_noted_once(tmp_path: Path) -> None:
    from medtl.data.manifest import read_manifest

    rows = ["path,label,patient_id"]
    for i, label in enumerate(["0", "1.0", "1", "0.0", "1"]):
        rows.append(f"{write_ct(tmp_path / f'{i}.dcm', smooth_image(i), f'P{i}', 'ACME')},{label},P{i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    report = audit_cases(read_manifest(tmp_path / "m.csv"), progress=False)
    assert report["label_spellings"] == {"0": {"0.0": 1}, "1": {"1.0": 1}}
    assert report["notes"] == ["labels canonicalised: '0.0' -> '0' (1 case), '1.0' -> '1' (1 case)"]
    assert set(report["class_balance"]) == {"0", "1"}
    console = Console(record=True, width=200)
    print_audit_summary(report, console)
    assert "note: labels canonicalised: '0.0' -> '0' (1 case)" in console.export_text()
