"""Helpers for the reliability tests: tiny conformant DICOM files and a subprocess runner.

Imported by the test modules of this folder (pytest puts the folder on ``sys.path``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_ct(path: Path, pixels: np.ndarray, *, patient_id: str = "PAT-1",
             position: tuple[float, float, float] | None = None,
             orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), series_uid: str | None = None,
             **extra: object) -> Path:
    """Write a minimal conformant CT image (Explicit VR LE, HU rescale) of ``pixels`` ``(H, W)`` uint16."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient_id, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid or generate_uid()
    ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = [0.7, 0.7], 1, -1024
    if position is not None:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = list(position), list(orientation)
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.set_pixel_data(np.asarray(pixels, dtype=np.uint16), "MONOCHROME2", 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def run_medtl(args: list[str], cwd: Path, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``python -m medtl ARGS`` in a subprocess with this checkout first on ``PYTHONPATH``."""
    return subprocess.run([sys.executable, "-m", "medtl", *args], cwd=cwd, env=medtl_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def medtl_env() -> dict[str, str]:
    """Environment for medtl subprocesses: this checkout importable, few threads, no colour codes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    return env
