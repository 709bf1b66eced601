"""Hostile data and configs (issue 18, classes 1, 2, 5, 7 and the data half of 8), generated from one seed.

Every input is written into a temporary folder and given to the real command line
(``medtl cv`` or ``medtl audit``) in a subprocess under a 4 GiB address-space cap and a
120 s timeout, so the outcome does not depend on the machine's RAM:

* memory bombs: a 4 MB gzip NIfTI that expands to 1024^3 float32, a NIfTI header claiming
  32000^3 voxels, DICOM headers claiming 60000 frames of 65535^2 (RLE and JPEG 2000), a real
  CT slice whose header element length was fuzzed to ~4 GB; and a symlink loop. ``cv``
  exits 2 naming each file with its reason; ``audit`` exits 1 (its contract: findings) and
  lists each case as unreadable with the reason;
* labels: numeric and true/false spellings mixed in one column, a repeated column name, a
  single class, a class with fewer patients than folds: exit 2 saying exactly that;
  canonicalised spellings (``1.0``, `` 1``) are reported once by the audit;
* configs: an infinite learning rate, a billion bootstrap resamples, a 60000^2 image, a
  batch over the memory budget, a YAML alias bomb, a binary file and an oversized file:
  exit 2 naming the setting or the file.

Each run must also print no traceback and no "internal error". The runs go in parallel (a
few at a time); on 2 CPU cores the module takes one to three minutes (each run imports torch),
hence ``slow``. The same behaviours are unit-tested in-process in ``tests/data`` and
``tests/test_config.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from reliability_util import REPO_ROOT, medtl_env, write_ct

SEED = 18
MEMORY_CAP = 4 * 1024**3
TIMEOUT = 120.0
_PRLIMIT = shutil.which("prlimit")

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- generated inputs
def _shared_ct() -> Path:
    """The first real CT slice stored as Implicit VR Little Endian (53 of the 100 are)."""
    env = os.environ.get("MEDTL_SHARED_DATA")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "datasets"
    for path in sorted((root / "ct-contrast-tcga" / "dicom").glob("*.dcm")):
        if pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian:
            return path
    pytest.fail(f"Real CT slices (Implicit VR) not found in {root / 'ct-contrast-tcga' / 'dicom'}. Place the "
                "shared datasets there or set MEDTL_SHARED_DATA to their folder.")


def nifti_gzip_bomb(path: Path, shape: tuple[int, ...] = (1024, 1024, 1024)) -> Path:
    """A real gzip bomb: a NIfTI header for ``shape`` float32, then every voxel, as concatenated gzip
    members of 1 MiB of zeros each (4 MB on disk for 4 GiB of voxels; written in milliseconds)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    member = gzip.compress(b"\0" * (1 << 20), 9)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(hdr.binaryblock + b"\0" * 4))
        fh.writelines(member for _ in range(int(np.prod(shape)) * 4 >> 20))
    return path


def nifti_header_claiming(path: Path, shape: tuple[int, ...] = (32000, 32000, 32000)) -> Path:
    """A NIfTI file whose header claims ``shape`` float32 voxels, followed by a few bytes of data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


def dicom_claiming(path: Path, transfer_syntax: str, frames: int = 60000, side: int = 65535) -> Path:
    """A compressed DICOM whose header claims ``frames`` frames of ``side`` x ``side``, with one tiny fragment."""
    write_ct(path, np.zeros((4, 4)), patient_id="PAT-BOMB")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = frames
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def fuzzed_ct(path: Path, rng: np.random.Generator) -> Path:
    """A real CT slice (Implicit VR: every length field is 4 bytes) with one header element's length
    set to ~4 GB, so that reading it asks for 4 GB before anything can check it."""
    src = _shared_ct()
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    tags = [t for t in list(ds.keys()) if 0x00080000 < t < 0x7FE00000 and getattr(ds.get_item(t), "length", 0) > 0
            and getattr(ds.get_item(t), "value_tell", None)]
    tag = tags[int(rng.integers(len(tags)))]
    tell = ds.get_item(tag).value_tell
    raw = bytearray(src.read_bytes())
    raw[tell - 4:tell] = struct.pack("<I", 0xF0000000)
    path.write_bytes(bytes(raw))
    return path


def _images(folder: Path, rng: np.random.Generator, labels: list[str], patients: list[str]) -> list[str]:
    """Small readable CT slices, one per label; returns their manifest rows."""
    rows = []
    for i, (label, patient) in enumerate(zip(labels, patients)):
        pixels = rng.integers(900, 1300, size=(16, 16))
        write_ct(folder / f"ok{i:02d}.dcm", pixels, patient_id=patient)
        rows.append(f"ok{i:02d}.dcm,{label},{patient}")
    return rows


def _config(folder: Path, manifest: Path, **extra: str) -> Path:
    text = (f"data:\n  path: {manifest}\n  image_size: [16, 16]\n  intensity: {{mode: minmax}}\n"
            "model: {name: resnet18, pretrained: false}\n"
            "train: {epochs: 1, batch_size: 4, device: cpu, tta: false}\n"
            "evaluate: {n_bootstrap: 10}\n" + "".join(f"{k}: {v}\n" for k, v in extra.items()))
    path = folder / f"{manifest.stem}.yaml"
    path.write_text(text)
    return path


#: file -> what its failure reason must say
BOMBS = {
    "bomb_1024cubed.nii.gz": "image too large to decode: its header declares a 3D image of 1024 x 1024 x 1024 voxels",
    "claims_32000cubed.nii": "image too large to decode: its header declares a 3D image of 32000 x 32000 x 32000",
    "claims_rle.dcm": "image too large to decode: its header declares 60000 frames of 65535 x 65535 pixels",
    "claims_j2k.dcm": "image too large to decode: its header declares 60000 frames of 65535 x 65535 pixels",
    "fuzzed_ct.dcm": "truncated file or corrupt element length: data element (",
    "loop.dcm": "symlink loop",
}


def build_inputs(root: Path) -> dict[str, list[str]]:
    """Write every hostile input under ``root``; return the CLI arguments of each run."""
    rng = np.random.default_rng(SEED)
    data = root / "data"
    data.mkdir(parents=True)
    # 1 + 2: memory bombs and a symlink loop among readable files whose labels are spelled several ways
    rows = _images(data, rng, ["0", "1.0", " 1", "0.0", "1", "0"], [f"P{i}" for i in range(6)])
    nifti_gzip_bomb(data / "bomb_1024cubed.nii.gz")
    nifti_header_claiming(data / "claims_32000cubed.nii")
    dicom_claiming(data / "claims_rle.dcm", RLELossless)
    dicom_claiming(data / "claims_j2k.dcm", JPEG2000Lossless)
    fuzzed_ct(data / "fuzzed_ct.dcm", rng)
    os.symlink("loop.dcm", data / "loop.dcm")
    rows += [f"{name},1,PB{i}" for i, name in enumerate(BOMBS)]
    files = data / "files.csv"
    files.write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")

    def manifest(name: str, header: str, rows: list[str]) -> Path:
        path = data / f"{name}.csv"
        path.write_text(header + "\n" + "\n".join(rows) + "\n")
        return path

    mixed = manifest("mixed", "path,label,patient_id", _images(data, rng, ["0", "1", "true", "1"],
                                                                    ["P0", "P1", "P2", "P3"]))
    repeated = manifest("repeated", "path,label,patient_id,label",
                        [r + ",0" for r in _images(data, rng, ["0", "1"], ["P0", "P1"])])
    single = manifest("single", "path,label,patient_id", _images(data, rng, ["1"] * 6, [f"P{i}" for i in range(6)]))
    few = manifest("few", "path,label,patient_id",
                   _images(data, rng, ["0"] * 6 + ["1"] * 2, [f"P{i}" for i in range(8)]))

    cfg_dir = root / "configs"
    cfg_dir.mkdir()
    bounds = cfg_dir / "bounds.yaml"
    bounds.write_text(f"data: {{path: {files}, image_size: [60000, 60000]}}\n"
                      "train: {lr: .inf}\nevaluate: {n_bootstrap: 1000000000}\n")
    budget = cfg_dir / "budget.yaml"
    budget.write_text(f"data: {{path: {files}, image_size: [2048, 2048], memory_budget: 64MB}}\n"
                      "train: {batch_size: 32}\n")
    bomb = cfg_dir / "alias_bomb.yaml"
    laughs = "".join(f"l{i + 1}: &l{i + 1} [{', '.join([f'*l{i}'] * 10)}]\n" for i in range(8))
    bomb.write_text(f"data:\n  path: {files}\nl0: &l0 [lol]\n{laughs}cv:\n  grid: {{train.lr: *l8}}\n")
    binary = cfg_dir / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(2048))
    big = cfg_dir / "oversized.yaml"
    big.write_text(f"data: {{path: {files}}}\nname: run\n" + "# padding\n" * 120_000)

    out = root / "out"
    return {
        "files_cv": ["cv", str(_config(cfg_dir, files)), "--out", str(out / "files"), "-q"],
        "files_audit": ["audit", str(files), "--out", str(out / "audit"), "-q"],
        "labels_mixed": ["cv", str(_config(cfg_dir, mixed)), "--out", str(out / "mixed"), "-q"],
        "labels_repeated_column": ["cv", str(_config(cfg_dir, repeated)), "--out", str(out / "repeated"), "-q"],
        "labels_single_class": ["cv", str(_config(cfg_dir, single)), "--out", str(out / "single"), "-q"],
        "labels_few_patients": ["cv", str(_config(cfg_dir, few, cv="{n_splits: 3}")), "--out", str(out / "few"), "-q"],
        "config_bounds": ["cv", str(bounds), "--out", str(out / "bounds"), "-q"],
        "config_budget": ["cv", str(budget), "--out", str(out / "budget"), "-q"],
        "config_alias_bomb": ["cv", str(bomb), "--out", str(out / "alias"), "-q"],
        "config_binary": ["cv", str(binary), "--out", str(out / "binary"), "-q"],
        "config_oversized": ["cv", str(big), "--out", str(out / "big"), "-q"],
    }


# --------------------------------------------------------------------------- running them, capped
@dataclass
class Run:
    rc: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float

    @property
    def text(self) -> str:
        """stdout and stderr with rich's line wrapping undone."""
        return " ".join((self.stdout + "\n" + self.stderr).split())


def _cap() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_capped(jobs: dict[str, list[str]], logs: Path, workers: int) -> dict[str, Run]:
    """``python -m medtl ARGS`` for every job, ``workers`` at a time, each under the address-space
    cap (``prlimit --as`` when installed, else ``setrlimit`` in the child) and killed at ``TIMEOUT``."""
    logs.mkdir(parents=True, exist_ok=True)
    prefix = [_PRLIMIT, f"--as={MEMORY_CAP}", "--"] if _PRLIMIT else []
    waiting, running, done = list(jobs.items()), {}, {}
    while waiting or running:
        while waiting and len(running) < workers:
            name, args = waiting.pop(0)
            # kept open while the child runs; closed below when it is collected
            out, err = open(logs / f"{name}.out", "w+"), open(logs / f"{name}.err", "w+")  # noqa: SIM115
            proc = subprocess.Popen([*prefix, sys.executable, "-m", "medtl", *args], cwd=REPO_ROOT,
                                    env=medtl_env(), stdout=out, stderr=err, text=True,
                                    preexec_fn=None if prefix else _cap)  # noqa: PLW1509 - no threads here
            running[name] = (proc, out, err, time.monotonic())
        for name, (proc, out, err, t0) in list(running.items()):
            elapsed = time.monotonic() - t0
            if proc.poll() is None and elapsed < TIMEOUT:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.seek(0)
            err.seek(0)
            done[name] = Run(proc.returncode if elapsed < TIMEOUT else None, out.read(), err.read(), elapsed)
            out.close()
            err.close()
            del running[name]
        time.sleep(0.1)
    return done


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    jobs = build_inputs(root)
    workers = max(2, min(4, os.cpu_count() or 2))
    return {"root": root, "runs": run_capped(jobs, root / "logs", workers)}


def _user_error(run: Run, code: int = 2) -> str:
    """The run ended as a user error (``code``), in time, without a traceback or an internal error."""
    assert run.rc is not None, f"not finished within {TIMEOUT:.0f} s under a {MEMORY_CAP >> 30} GiB cap"
    assert run.seconds < TIMEOUT
    assert "Traceback" not in run.text and "internal error" not in run.text and "medtl bug" not in run.text, run.text
    assert run.rc == code, f"exit {run.rc}, expected {code}:\n{run.stdout}\n{run.stderr}"
    return run.text


# --------------------------------------------------------------------------- 1 + 2: files
def test_every_hostile_file_is_named_with_its_reason_by_cv(hostile: dict) -> None:
    text = _user_error(hostile["runs"]["files_cv"])
    assert f"{len(BOMBS)} of {len(BOMBS) + 6} file(s) could not be used" in text
    for name, reason in BOMBS.items():
        assert f"{name}: {reason}" in text, (name, text)
    assert "MemoryError" in text  # the fuzzed length was caught as a memory failure under the cap
    assert "per-image memory limit" in text


def test_the_audit_lists_every_hostile_file_as_unreadable(hostile: dict) -> None:
    text = _user_error(hostile["runs"]["files_audit"], code=1)  # the audit's contract: 1 = findings
    report = json.loads((hostile["root"] / "out" / "audit" / "audit.json").read_text())
    unreadable = {Path(u["path"]).name: u for u in report["unreadable"]}
    assert set(unreadable) == set(BOMBS)
    for name, reason in BOMBS.items():
        entry = unreadable[name]
        assert reason in entry["reason"], (name, entry)
        assert f"unreadable: case {entry['case_id']}: {reason}" in text
    assert f"{len(BOMBS)} files unreadable" in text
    # labels spelled 1.0 / " 1" / 0.0 are one class each, and said so once
    assert report["label_spellings"] == {"0": {"0.0": 1}, "1": {"1.0": 1}}
    assert "note: labels canonicalised: '0.0' -> '0' (1 case), '1.0' -> '1' (1 case)" in text
    assert set(report["class_balance"]) == {"0", "1"}


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize("name,needles", [
    ("labels_mixed", ["mixed.csv' column 'label' mixes numeric labels ('0', '1') and true/false labels ('true')"]),
    ("labels_repeated_column", ["repeated.csv' repeats column name(s) in its header: 'label' in columns 2, 4"]),
    ("labels_single_class", ["Only one class is present: all 6 labelled cases have label '1' (6 patient(s))",
                             "A classifier needs at least two classes"]),
    ("labels_few_patients", ["class '1' occurs in only 2 patient(s); 3-fold stratified CV needs at least 3",
                             "Lower cv.n_splits to 2"]),
])
def test_labels_that_cannot_mean_what_they_say_are_refused(hostile: dict, name: str, needles: list[str]) -> None:
    text = _user_error(hostile["runs"][name])
    for needle in needles:
        assert needle in text, (needle, text)


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name,needles", [
    ("config_bounds", ["'train.lr': Input should be a finite number. Got inf.",
                       "'evaluate.n_bootstrap': Input should be less than or equal to 100000. Got 1000000000.",
                       "'data.image_size': Value error, image_size entries must be <= 4096"]),
    ("config_budget", [("train.batch_size=32 images of 2048x2048 x 1 channel(s) as float32 need 537 MB, more "
                        "than the memory budget (data.memory_budget=64 MB). Lower train.batch_size to 3 or less")]),
    ("config_alias_bomb", ["alias_bomb.yaml' is refused: the document expands to more than 100000 values"]),
    ("config_binary", ["binary.yaml' is not a text file: byte 0x89 at offset 0 is not UTF-8"]),
    ("config_oversized", ["oversized.yaml' is 1.2 MB; a config is at most 1 MiB of YAML"]),
])
def test_config_values_that_cannot_work_are_refused(hostile: dict, name: str, needles: list[str]) -> None:
    text = _user_error(hostile["runs"][name])
    for needle in needles:
        assert needle in text, (needle, text)
    assert hostile["runs"][name].seconds < 60  # refused when the config is read, not after work
