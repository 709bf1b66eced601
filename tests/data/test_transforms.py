"""Intensity (multi-window CT), 3D geometry and 3D augmentation; the 3D data path end to end."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from medtl.config import AugmentConfig, IntensityConfig, load_config
from medtl.data.prepare import prepare
from medtl.data.transforms import (
    CT_WINDOWS,
    MultiWindow,
    augment_transform,
    intensity_transform,
    preprocess_transform,
    window_list,
)
from medtl.errors import ConfigError


def test_window_list_reads_presets_and_custom_windows():
    cfg = IntensityConfig(mode="multiwindow", windows=["lung", {"center": 40, "width": 400}, "bone"])
    assert window_list(cfg) == [(-1350.0, 150.0), (-160.0, 240.0), (-500.0, 1300.0)]
    assert IntensityConfig(mode="multiwindow").windows == ["lung", "mediastinum", "bone"]  # default: RGB-like
    with pytest.raises(ConfigError, match="at least one window"):
        window_list(IntensityConfig(mode="multiwindow", windows=[]))


def test_multiwindow_turns_one_ct_channel_into_one_channel_per_window():
    hu = np.array([[[-1000.0, -600.0, 40.0, 400.0, 3000.0]]], dtype=np.float32)  # (1, H, W)
    out = intensity_transform(IntensityConfig(mode="multiwindow"))(hu)
    assert out.shape == (3, 1, 5) and out.dtype == np.float32
    for ch, name in enumerate(["lung", "mediastinum", "bone"]):
        c, w = CT_WINDOWS[name]
        np.testing.assert_allclose(out[ch, 0], np.clip((hu[0, 0] - (c - w / 2)) / w, 0, 1), atol=1e-6)
    assert out[0, 0, 1] == pytest.approx(0.5)  # -600 HU: the middle of the lung window
    with pytest.raises(ValueError, match="one grey channel"):
        MultiWindow([(0, 1)])(np.zeros((2, 4, 4)))


def test_preprocess_multiwindow_volume_is_resized_per_channel():
    rng = np.random.default_rng(0)
    vol = rng.uniform(-1000, 1000, size=(1, 20, 30, 30)).astype(np.float32)
    run = preprocess_transform(IntensityConfig(mode="multiwindow", windows=["lung", "brain"]), [8, 16, 16])
    out = run(vol)
    assert out.shape == (2, 8, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_preprocess_3d_resamples_to_spacing_then_crops_or_pads():
    vol = np.ones((1, 10, 20, 20), dtype=np.float32)
    run = preprocess_transform(IntensityConfig(mode="range", vmin=0, vmax=1), [16, 16, 16], spacing=[2.0, 1.0, 1.0])
    out = run(vol, (4.0, 0.5, 0.5))  # 40 x 10 x 10 mm -> 20 x 10 x 10 voxels -> crop/pad to 16^3
    assert out.shape == (1, 16, 16, 16)
    assert out[:, :, 8, 8].min() == pytest.approx(1.0)  # depth 20 cropped: filled
    assert out[0, 8, 0, 0] == 0 and out[0, 8, 8, 8] == pytest.approx(1.0)  # 10 px in-plane padded to 16


def test_3d_augmentation_keeps_shape_and_replays_with_the_same_seed():
    x = np.random.default_rng(0).random((1, 12, 16, 16)).astype(np.float32)
    aug = augment_transform(AugmentConfig(), [12, 16, 16])
    outs = []
    for _ in range(2):
        aug.set_random_state(seed=3)
        outs.append([np.asarray(aug(x)) for _ in range(4)])
    assert all(o.shape == x.shape for o in outs[0])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(o, x) for o in outs[0])


def test_3d_flip_is_left_right_on_the_last_axis():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    aug = augment_transform(AugmentConfig(affine=False, intensity=False), [2, 3, 4])
    seen = set()
    for s in range(8):
        aug.set_random_state(seed=s)
        y = np.asarray(aug(x))
        assert np.array_equal(y, x) or np.array_equal(y, x[..., ::-1])
        seen.add(np.array_equal(y, x))
    assert seen == {True, False}


def _nifti_manifest(tmp_path, n: int = 4) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        vol = rng.normal(0, 300, size=(24, 20, 12)).astype(np.int16)  # x, y, z (NIfTI order), HU
        img = nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0]))
        path = tmp_path / f"vol{i}.nii.gz"
        nib.save(img, str(path))
        rows.append({"path": path.name, "label": "ab"[i % 2], "patient_id": f"p{i}"})
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    return str(manifest)


def test_nifti_volumes_prepare_to_multiwindow_channel_first_batches(tmp_path):
    cfg = load_config({"data": {"path": _nifti_manifest(tmp_path), "spatial_dims": 3, "image_size": [8, 16, 16],
                                "intensity": {"mode": "multiwindow"}}})
    data = prepare(cfg, progress=False)
    assert data.images.shape == (4, 3, 8, 16, 16) and data.images.dtype == np.float32
    assert 0 <= data.images.min() and data.images.max() <= 1
    assert data.y.tolist() == [0, 1, 0, 1]
    # channel 0 (lung, wide) sees soft tissue as mid-grey; channel 2 (bone) mostly black
    assert data.images[:, 0].mean() > data.images[:, 2].mean()


def test_nifti_volumes_with_spacing(tmp_path):
    cfg = load_config({"data": {"path": _nifti_manifest(tmp_path, 2), "spatial_dims": 3, "image_size": [16, 16, 16],
                                "spacing": [2.5, 1.6, 1.6], "intensity": {"mode": "window", "preset": "abdomen"}}})
    data = prepare(cfg, progress=False, require_all_classes=False)
    assert data.images.shape == (2, 1, 16, 16, 16)


def test_spatial_dims_must_match_image_size(tmp_path):
    """Refused when the config is loaded, before any scan is decoded."""
    with pytest.raises(ConfigError, match="spatial_dims=2 .* 3 entries"):
        load_config({"data": {"path": _nifti_manifest(tmp_path, 2), "image_size": [8, 16, 16]}})


def test_adrenalmnist3d_prepares_as_official_split_volumes(shared_data):
    cfg = load_config({"data": {"format": "medmnist", "path": str(shared_data / "medmnist" / "adrenalmnist3d.npz"),
                                "spatial_dims": 3, "image_size": [32, 32, 32], "max_cases": 40,
                                "intensity": {"mode": "range", "vmin": 0, "vmax": 255}}})
    data = prepare(cfg, progress=False)
    assert data.images.shape == (40, 1, 32, 32, 32)
    assert data.images.min() >= 0 and data.images.max() == pytest.approx(1.0, abs=1e-3)
    assert set(data.class_names) == set(np.unique([c.label for c in data.cases]))
    assert {c.split for c in data.cases} <= {"train", "val", "test"} and len(data.subset("train")) > 20
