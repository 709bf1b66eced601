"""Write a large synthetic DICOM folder for the load benchmark: N small CT slices + a label CSV.

Each file is a 64x64 16-bit CT slice (Explicit VR LE, HU rescale) of one of ``--n-patients``
patients (PatientID in the header; the label CSV has no patient column, so medtl reads it
from each file as it would from a hospital export). Class ``lesion`` slices carry a
soft-tissue blob; ``normal`` ones do not. Patients have a single class. Deterministic.

    python benchmarks/load/make_dataset.py --out /tmp/medtl-load/data --n-files 5000 --n-patients 1250
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def _slice(rng: np.random.Generator, size: int, lesion: bool) -> np.ndarray:
    """A (size, size) uint16 slice, stored values = HU + 1024."""
    yy, xx = np.mgrid[:size, :size] / size
    body = ((yy - 0.5) ** 2 / 0.16 + (xx - 0.5) ** 2 / 0.2) < 1
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, (size, size))
    lungs = body & (np.abs(xx - 0.5) > 0.08) & (((yy - 0.5) ** 2 / 0.08 + (np.abs(xx - 0.5) - 0.22) ** 2 / 0.02) < 1)
    hu[lungs] = -850 + rng.normal(0, 30, int(lungs.sum()))
    if lesion:
        cy, cx, r = rng.uniform(0.35, 0.65), rng.choice([0.3, 0.7]), rng.uniform(0.04, 0.08)
        hu[((yy - cy) ** 2 + (xx - cx) ** 2) < r * r] = 50 + rng.normal(0, 10)
    return np.clip(hu + 1024, 0, 4095).astype(np.uint16)


def write_dataset(out: Path, n_files: int, n_patients: int, size: int = 64, seed: int = 0) -> Path:
    """Write ``out/images/*.dcm`` and ``out/labels.csv`` (columns file,label); returns the CSV path."""
    rng = np.random.default_rng(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["file,label"]
    for i in range(n_files):
        patient = i % n_patients
        lesion = patient % 2 == 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.Modality = f"LOAD-{patient:05d}", "CT"
        ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
        ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = [0.7, 0.7], 1, -1024
        ds.set_pixel_data(_slice(rng, size, lesion), "MONOCHROME2", 16)
        name = f"ct_{i:06d}.dcm"
        ds.save_as(images / name, enforce_file_format=True)
        lines.append(f"{name},{'lesion' if lesion else 'normal'}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return out / "labels.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-files", type=int, default=5000)
    ap.add_argument("--n-patients", type=int, default=1250)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    t0 = time.time()
    csv_path = write_dataset(args.out, args.n_files, args.n_patients, args.size)
    mb = sum(p.stat().st_size for p in (args.out / "images").iterdir()) / 2**20
    print(f"wrote {args.n_files} DICOM files ({mb:.0f} MiB), {args.n_patients} patients, {csv_path} "
          f"in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
