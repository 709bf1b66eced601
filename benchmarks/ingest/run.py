"""Ingest throughput: medtl's readers against raw pydicom / nibabel decoding of the same files.

    python benchmarks/ingest/run.py            # writes benchmarks/ingest/results.{json,md}

"Raw" is the minimum any pipeline must do: pydicom ``dcmread`` + ``pixel_array`` + rescale
slope/intercept to float32 HU; nibabel ``load`` + ``get_fdata(dtype=float32)``. medtl's
``read_image`` additionally validates the header (pixel data present, syntax decodable, frame
count, spacing, orientation), applies the rescale and returns spacing/metadata without any
identifying tag. Both readers decode exactly the same files; the repeats alternate raw and medtl
(so CPU contention hits both alike) and the best of ``--repeat`` passes is kept for each (file
cache warm for both). Overhead = medtl time / raw time - 1. results.json/md also record the CPU
model and the torch / numpy / pydicom / nibabel versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MEDTL_SHARED_DATA", ROOT.parent / "shared" / "datasets"))


def raw_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32)
    return arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


def raw_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    return nib.load(str(path)).get_fdata(dtype=np.float32)


def medtl_read(path: Path) -> np.ndarray:
    from medtl.data.readers import read_image

    return read_image(path).array


def best_times(fns: list, files: list[Path], repeat: int) -> list[float]:
    """Best wall time of one pass over ``files`` per function, passes interleaved."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for f in files:
                fn(f)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import nibabel
    import pydicom
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "pydicom": pydicom.__version__, "nibabel": nibabel.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    dicom = sorted((DATA / "ct-contrast-tcga" / "dicom").glob("*.dcm"))
    nifti = [p for p in sorted((DATA / "nifti-samples").iterdir()) if p.name in
             ("anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii")]
    if not dicom:
        raise SystemExit(f"CT set not found under {DATA}; set MEDTL_SHARED_DATA")
    for f in dicom[:3] + nifti[:1]:  # warm imports and file cache
        medtl_read(f)
    rows = []
    for name, files, raw in (("CT DICOM (100 slices, 512x512)", dicom, raw_dicom),
                             ("NIfTI samples", nifti, raw_nifti)):
        t_raw, t_med = best_times([raw, medtl_read], files, args.repeat)
        rows.append({"set": name, "files": len(files), "raw_s": t_raw, "medtl_s": t_med,
                     "raw_files_per_s": len(files) / t_raw, "medtl_files_per_s": len(files) / t_med,
                     "overhead_pct": 100 * (t_med / t_raw - 1)})
    device = f"CPU {platform.machine()}, {os.cpu_count()} cores (torch threads 2)"
    cpu, vers = cpu_model(), versions()
    out = Path(__file__).parent
    (out / "results.json").write_text(json.dumps({"device": device, "cpu": cpu, "versions": vers,
                                                  "repeat": args.repeat, "rows": rows}, indent=2))
    md = [f"Device: **{device}**, {cpu}; `python benchmarks/ingest/run.py --repeat {args.repeat}` "
          f"(best of {args.repeat}, raw and medtl passes interleaved).", "",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".", "",
          "| set | files | raw decode (files/s) | medtl read_image (files/s) | overhead |", "|---|---|---|---|---|"]
    md += [f"| {r['set']} | {r['files']} | {r['raw_files_per_s']:.0f} | {r['medtl_files_per_s']:.0f} | "
           f"{r['overhead_pct']:+.1f} % |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
