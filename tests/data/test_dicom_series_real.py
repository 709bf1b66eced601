"""Real CT/MR series (``dicom-series/`` in the shared data) against dcm2niix, the reference converter.

For every series folder that dcm2niix converts to exactly one volume, medtl's array and affine
for the DICOM folder must equal those for dcm2niix's NIfTI (arrays within 1 HU, affines within
0.01 mm). dcm2niix runs with ``-z n``: the voxels are those of ``-z y``, without gzip time.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medtl.data.readers import read_image
from medtl.errors import UnreadableFileError

MIXED = "ct_midrc-ricord-1a_419639-000906_sag"
SERIES = ["ct_c4kc-kits_KiTS-00072", "ct_pancreatic-ct-cbct-seg_Pancreas-CT-CB_001",
          "mr_cptac-sar_C3L-02846_ax-scout", MIXED]


def _dcm2niix() -> str:
    exe = shutil.which("dcm2niix")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("dcm2niix is not installed; scripts/test.sh installs it (apt-get install dcm2niix)")
        pytest.skip("dcm2niix is not installed (apt-get install dcm2niix; scripts/test.sh does it as root)")
    return exe


def _series_dir(shared_data: Path, name: str) -> Path:
    folder = shared_data / "dicom-series" / name
    if not folder.is_dir():
        pytest.fail(f"Real DICOM series not found at {folder}; the shared datasets (MEDTL_SHARED_DATA) must hold "
                    "dicom-series/ as its README describes.")
    return folder


@pytest.mark.parametrize("name", SERIES)
def test_series_matches_dcm2niix(name: str, shared_data: Path, tmp_path: Path) -> None:
    folder = _series_dir(shared_data, name)
    subprocess.run([_dcm2niix(), "-z", "n", "-f", "%s_%j", "-o", str(tmp_path), str(folder)], check=True,
                   capture_output=True, timeout=120)
    volumes = sorted(tmp_path.glob("*.nii"))
    if name == MIXED:  # dcm2niix splits the coronal reference image off; medtl refuses the folder
        assert len(volumes) == 2
        with pytest.raises(UnreadableFileError, match=r"mixed orientations in series 605 'SAG 3X3': 19 slices are "
                                                      r"sagittal .* but 1 coronal .*: 1-001\.dcm"):
            read_image(folder)
        return
    assert len(volumes) == 1, f"dcm2niix wrote {len(volumes)} volumes for {name}"
    dicom, nifti = read_image(folder), read_image(volumes[0])
    assert dicom.array.shape == nifti.array.shape and dicom.array.ndim == 4
    assert np.abs(dicom.array - nifti.array).max() <= 1.0
    assert np.abs(dicom.affine - nifti.affine).max() <= 0.01
    assert dicom.spacing == pytest.approx(nifti.spacing, abs=1e-3)


def test_manifest_with_the_mixed_series_still_trains_with_skip(shared_data: Path, tmp_path: Path) -> None:
    from medtl.config import load_config
    from medtl.data.demo import make_demo_dataset
    from medtl.workflows import cross_validate

    manifest = make_demo_dataset(tmp_path / "data", n_patients=8, slices_per_patient=1, size=32)
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    bad = dict(rows[0], path=str(_series_dir(shared_data, MIXED)), patient_id="P-mixed")
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*rows, bad])
    cfg = load_config({"name": "skip", "data": {"path": str(manifest), "on_error": "skip",
                                                "intensity": {"mode": "window", "preset": "lung"}}},
                      ["train.epochs=1", "train.batch_size=8", "data.image_size=[32, 32]", "cv.n_splits=2",
                       "evaluate.n_bootstrap=20", "train.tta=false", "model.pretrained=false",
                       # a linear probe: the skip path (decode, skipped.json, folds of the rest) at a fraction of the cost
                       "train.num_threads=1", "train.strategy.name=linear_probe", "train.strategy.probe_C=[1.0]"])
    metrics = cross_validate(cfg, tmp_path / "run", progress=False)
    assert metrics is not None
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    text = json.dumps(skipped)
    assert "mixed orientations" in text and "coronal" in text
    with (tmp_path / "run" / "predictions.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
