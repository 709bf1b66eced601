"""The 3D path end to end on a real CT series: train, predict, explain, export, reload over the scan.

The real Siemens CT series ``ct_c4kc-kits_KiTS-00072`` (18 slices, 512 x 512) and byte-for-byte
copies of it (a second class needs a second case; the copies stand for other patients) make
an official-split manifest. A tiny 3D model (timm ``test_resnet`` inflated to 3D, random
init) trains for one epoch through the normal run directory on coarse voxels (``data.spacing``),
predicts the real series, and ``medtl explain`` writes its Grad-CAM map as NIfTI. Reloaded with nibabel, the map has the
series' affine (as medtl reads the DICOM folder) and its voxel grid.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.readers import read_image
from medtl.workflows import predict
from medtl.workflows import train as train_official
from medtl.workflows.explanation import explain_run

SERIES = "ct_c4kc-kits_KiTS-00072"


@pytest.fixture
def series(shared_data: Path) -> Path:
    folder = shared_data / "dicom-series" / SERIES
    if not folder.is_dir():
        pytest.fail(f"The real CT series is missing: expected {folder} (see ../shared/datasets/README.md).")
    return folder


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_real_series_trains_predicts_and_its_map_reloads_over_the_scan(series: Path, tmp_path: Path) -> None:
    copies = []
    for name in ("copy_a", "copy_b", "copy_c"):
        shutil.copytree(series, tmp_path / name)
        copies.append(tmp_path / name)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,patient_id,split\n"
                        f"{series},kidney,P1,test\n{copies[0]},other,P2,train\n"
                        f"{copies[1]},kidney,P3,train\n{copies[2]},other,P4,val\n")
    # data.spacing: resampled to coarse voxels (MONAI Zoom), then padded to image_size; a plain anti-aliased
    # resize of a 512 x 512 series costs seconds per case on a CPU
    cfg = load_config({"name": "series3d", "data": {"path": str(manifest), "spatial_dims": 3,
                                                    "image_size": [16, 32, 32], "spacing": [22.0, 11.0, 1.5],
                                                    "intensity": {"mode": "window", "preset": "abdomen"}},
                       "model": {"name": "test_resnet", "pretrained": False},
                       "train": {"epochs": 1, "batch_size": 2, "tta": False, "num_threads": 2},
                       "evaluate": {"n_bootstrap": 20},
                       "explain": {"methods": ["gradcam"], "n_correct": 1, "n_wrong": 1, "sanity_check": False,
                                   "faithfulness_steps": 0, "localisation": False, "batch_size": 1}})
    run = tmp_path / "run"
    metrics = train_official(cfg, run, progress=False)
    assert metrics["n_test"] == 1 and (run / "checkpoints" / "final" / "model.safetensors").is_file()

    one = tmp_path / "predict.csv"  # a series folder is one case when a manifest row names it
    one.write_text(f"path,label,patient_id\n{series},kidney,P1\n")
    pred = predict(run, one, out_dir=tmp_path / "pred", progress=False)
    assert pred["n_cases"] == 1 and pred["n_skipped"] == 0
    with (tmp_path / "pred" / "predictions.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert abs(float(row["prob_kidney"]) + float(row["prob_other"]) - 1) < 1e-4

    explain_run(run, tmp_path / "report", progress=False)
    (exported,) = (tmp_path / "report" / "saliency").glob("*_gradcam.nii.gz")
    scan = read_image(series)
    cam = nib.load(exported)
    assert cam.shape == scan.array.shape[1:] == (512, 512, 18)
    np.testing.assert_allclose(cam.affine, scan.affine, atol=1e-4)
    values = np.asarray(cam.dataobj)
    assert np.isfinite(values).all() and values.min() >= 0  # Grad-CAM is ReLU'd (an untrained model's may be 0)
