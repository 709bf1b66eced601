"""Planted identifiers never reach any output, log or file name; patient grouping still works.

Copies of 12 patients' real chest CT slices (ct-contrast-tcga) get distinctive identifying
values planted in every identifying tag medtl could meet (names, IDs, dates, institution,
accession, UIDs, ...), and are stored in folders and files named after their patients, as
hospital exports are (``Wexford00_Philippa_19441122/scan_Wexford00_0.dcm``). Every workflow
runs on them as a subprocess: `audit`, `cv`, `explain`, `predict` (on the patient-named
folders), `export`, `compare`, `train` (a manifest with a split column) and `rank`. Every
byte of every output file (checkpoints' meta.json, PNG metadata, the HTML report and the PNGs
embedded in it as base64 included), every output file name and the captured stdout/stderr
are searched for every planted value, every path component and their common reformattings:
zero hits. Grouping by the pseudonymised PatientID still keeps each patient's slices
together in one fold.
"""

from __future__ import annotations

import base64
import csv
import re
import time
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
import yaml
from reliability_util import REPO_ROOT, run_medtl

pytestmark = pytest.mark.slow

N_PER_CLASS = 6
COMMON = {  # the same for every planted patient
    "PatientBirthDate": "19320917", "InstitutionName": "Stillwater Quarry Infirmary",
    "InstitutionAddress": "17 Larkspur Lane, Qwerton", "ReferringPhysicianName": "Vandermolen^Octavia",
    "PerformingPhysicianName": "Abernathy^Cornelius", "OperatorsName": "Lindqvist^Torsten",
    "StationName": "QUARRYCT01", "DeviceSerialNumber": "SN99Z14471", "StudyDate": "20010914",
    "SeriesDate": "20010915", "AcquisitionDate": "20010916", "ContentDate": "20010917",
    "StudyTime": "134217", "PatientAddress": "9 Gorsefield Row, Qwerton", "PatientTelephoneNumbers": "+44 1632 960713",
}


def _planted(n: int, k: int) -> dict[str, str]:
    """Identifying values for patient ``n``, slice ``k``."""
    return {**COMMON, "PatientName": f"Quaxley{n:02d}^Bernadette", "PatientID": f"MRN-7Q{n:04d}X",
            "OtherPatientIDs": f"OTHERID-55{n:03d}", "AccessionNumber": f"ACCX4491{n:03d}",
            "StudyID": f"STUDYQ88{n:02d}", "StudyInstanceUID": f"1.2.826.0.1.3680043.9.7777.{n}.1",
            "SeriesInstanceUID": f"1.2.826.0.1.3680043.9.7778.{n}.1",
            "SOPInstanceUID": f"1.2.826.0.1.3680043.9.7779.{n}.{k}",
            "FrameOfReferenceUID": f"1.2.826.0.1.3680043.9.7780.{n}.1"}


def _folder(n: int) -> str:
    """The patient-named folder of patient ``n`` (a name and birth date found only in paths)."""
    return f"Wexford{n:02d}_Philippa_19441122"


def _file(n: int, k: int) -> str:
    return f"{_folder(n)}/scan_Wexford{n:02d}_{k}.dcm"


def _needles(n_patients: int) -> set[str]:
    """Every planted value, path component, their parts and common reformattings (lower case)."""
    out: set[str] = set()
    for n in range(n_patients):
        for k in range(2):
            for value in _planted(n, k).values():
                out.add(value)
                out.update(p for p in re.split(r"[\^,]\s*", value) if len(p) >= 5)
            out.update({_file(n, k), _folder(n), Path(_file(n, k)).name, Path(_file(n, k)).stem})
    out.update({"Wexford", "Philippa", "scan_Wexford"})
    for d in ("19320917", "20010914", "20010915", "20010916", "20010917", "19441122"):
        out.update({f"{d[:4]}-{d[4:6]}-{d[6:]}", f"{d[6:]}.{d[4:6]}.{d[:4]}", f"{d[4:6]}/{d[6:]}/{d[:4]}"})
    out.update({"1.2.826.0.1.3680043.9.777", "1.2.826.0.1.3680043.9.778", "MRN-7Q", "Quaxley", "OTHERID-55", "ACCX4491"})
    return {s.lower() for s in out}


def _plant_dataset(shared: Path, out: Path) -> tuple[Path, dict[str, str]]:
    """Copy slices of 6 contrast and 6 non-contrast patients with planted identifiers, in
    patient-named folders.

    Returns the label CSV and ``{file path in images/: planted PatientID}``; also writes
    ``manifest.csv`` (path, label, patient_id, split) for official-split training.
    """
    src = shared / "ct-contrast-tcga"
    with (src / "overview.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    by_patient: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in rows:
        pid = str(pydicom.dcmread(src / "dicom" / r["dicom_name"], stop_before_pixels=True,
                                  specific_tags=["PatientID"]).PatientID)
        by_patient[pid].append((r["dicom_name"], r["Contrast"]))
    chosen = {"True": [], "False": []}
    for pid in sorted(by_patient):
        labels = {lab for _, lab in by_patient[pid]}
        if len(labels) == 1 and len(chosen[labels.pop()]) < N_PER_CLASS:
            chosen[by_patient[pid][0][1]].append(pid)
    images = out / "images"
    images.mkdir(parents=True)
    lines, owner = ["file,label"], {}
    manifest = ["path,label,patient_id,split"]
    for n, pid in enumerate(chosen["True"] + chosen["False"]):
        for k, (name, label) in enumerate(by_patient[pid][:2]):
            ds = pydicom.dcmread(src / "dicom" / name)
            values = _planted(n, k)
            for key, value in values.items():
                setattr(ds, key, value)
            ds.file_meta.MediaStorageSOPInstanceUID = values["SOPInstanceUID"]
            fname = _file(n, k)
            (images / fname).parent.mkdir(exist_ok=True)
            ds.save_as(images / fname)
            lines.append(f"{fname},{label}")
            owner[fname] = values["PatientID"]
            split = ("train", "train", "train", "val", "test", "test")[n % N_PER_CLASS]  # per class
            manifest.append(f"images/{fname},{label},{values['PatientID']},{split}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    (out / "manifest.csv").write_text("\n".join(manifest) + "\n")
    return out / "labels.csv", owner


def _embedded_pngs(html: bytes) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rb"data:image/png;base64,([A-Za-z0-9+/=]+)", html)]


def _hits(outputs: list[Path], needles: set[str], logs: dict[str, str]) -> list[tuple[str, str]]:
    """(where, value) for every planted value found in the output folders' files, their names or the logs."""
    blobs: dict[str, bytes] = {k: v.encode() for k, v in logs.items()}
    files = [(folder, p) for folder in outputs for p in folder.rglob("*") if p.is_file()]
    for folder, path in files:
        rel = f"{folder.name}/{path.relative_to(folder)}"
        raw = path.read_bytes()
        blobs[rel] = raw
        blobs[f"name of {rel}"] = rel.encode()
        if path.suffix == ".html":
            for i, png in enumerate(_embedded_pngs(raw)):
                blobs[f"{rel} embedded png {i}"] = png
    assert any(k.endswith(".png") for k in blobs) and any(k.endswith("meta.json") for k in blobs)
    hits = [(where, needle) for where, blob in blobs.items() for needle in needles if needle.encode() in blob.lower()]
    print(f"\nplanted-PHI scan: {len(needles)} values x {len(blobs)} outputs ({len(files)} files, "
          f"{sum(1 for k in blobs if 'embedded png' in k)} embedded PNGs, names, logs): {len(hits)} hits")
    return hits


def test_planted_identifiers_never_reach_outputs(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path / "cache"))  # rank's feature cache is an output too
    labels, owner = _plant_dataset(shared_data, tmp_path / "data")
    images = labels.parent / "images"
    planted = (images / _file(0, 0)).read_bytes().lower()
    assert b"mrn-7q0000x" in planted and b"stillwater quarry infirmary" in planted  # the scan can find them
    cfg = {"name": "phi", "data": {"format": "folder", "path": str(images),
                                   "labels": {"csv": str(labels), "file_column": "file", "label_column": "label"},
                                   "class_names": ["False", "True"], "image_size": [32, 32],
                                   "intensity": {"mode": "window", "preset": "mediastinum"}},
           "model": {"name": "tf_efficientnet_lite0", "pretrained": True},
           "train": {"epochs": 1, "batch_size": 8, "tta": False}, "cv": {"n_splits": 2},
           "evaluate": {"n_bootstrap": 50},
           "explain": {"n_correct": 1, "n_wrong": 1, "ig_steps": 4, "cascade_steps": 2, "faithfulness_steps": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    official = {**cfg, "data": {**{k: v for k, v in cfg["data"].items() if k != "labels"}, "format": "manifest",
                                "path": str(labels.parent / "manifest.csv")}}
    (tmp_path / "official.yaml").write_text(yaml.safe_dump(official))
    needles = _needles(len(set(owner.values())))
    logs: dict[str, str] = {}

    def medtl(*args, ok: tuple[int, ...] = (0,)) -> None:
        t0 = time.perf_counter()
        res = run_medtl([str(a) for a in args], cwd=REPO_ROOT)
        print(f"medtl {args[0]}: exit {res.returncode} in {time.perf_counter() - t0:.0f} s")
        assert res.returncode in ok, res.stderr[-3000:]
        assert "Traceback" not in res.stdout + res.stderr
        logs[f"{args[0]} stdout+stderr"] = res.stdout + res.stderr

    run, out = tmp_path / "run", {name: tmp_path / name for name in ("audit", "predict", "export", "compare",
                                                                       "train", "rank")}
    medtl("audit", tmp_path / "cfg.yaml", "--out", out["audit"], "-q", ok=(0, 1))  # 1: findings, still a report
    medtl("cv", tmp_path / "cfg.yaml", "--out", run)
    assert _hits([run], needles, logs) == []

    # grouping still works, on pseudonyms: one pseudonym per planted patient, one fold per pseudonym
    with (run / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    files_in_order = list(owner)  # label CSV order: case ids row00002, row00003, ...
    assert len(rows) == len(files_in_order)
    pseudo_of, folds_of = {}, defaultdict(set)
    for r in rows:
        planted = owner[files_in_order[int(r["id"].removeprefix("row")) - 2]]
        assert r["patient_id"].startswith("P-") and pseudo_of.setdefault(planted, r["patient_id"]) == r["patient_id"]
        folds_of[r["patient_id"]].add(r["fold"])
    assert len(set(pseudo_of.values())) == len(pseudo_of) == 2 * N_PER_CLASS
    assert all(len(f) == 1 for f in folds_of.values())

    # every other workflow, reusing the one CV run where it reads a run
    medtl("explain", run)
    assert (run / "report.html").is_file() and (run / "predictions.csv").is_file()
    medtl("predict", run, "--data", images, "--out", out["predict"], "-q")  # the patient-named folders themselves
    assert (out["predict"] / "predictions.csv").read_text().count("scan-") == len(owner)
    medtl("export", run, "--format", "torchscript", "--out", out["export"])
    medtl("compare", run, run, "--out", out["compare"])
    medtl("train", tmp_path / "official.yaml", "--out", out["train"], "-q")
    medtl("rank", tmp_path / "cfg.yaml", "--candidates", "tf_efficientnet_lite0", "--out", out["rank"], "-q")
    written = [run, *out.values(), tmp_path / "cache"]
    assert all(p.is_dir() and any(p.iterdir()) for p in written)
    assert _hits(written, needles, logs) == []
