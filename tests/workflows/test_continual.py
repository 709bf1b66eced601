"""``medtl continual``: transfer scores on known matrices, and a tiny two-site run that resumes."""

from __future__ import annotations

import csv
import importlib
import json

import numpy as np
import pydicom
import pytest
import torch

import medtl
from medtl.data.demo import demo_identifying_strings, find_identifying_strings, make_demo_dataset
from medtl.data.shift import ScannerShift, scanner_shift
from medtl.errors import ConfigError, MedtlError
from medtl.workflows.continual import transfer_scores

continual_module = importlib.import_module("medtl.workflows.continual")


def _proba(p1: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - p1, p1])


def test_transfer_scores_follow_lopez_paz_and_pair_the_bootstrap():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    groups = np.repeat(np.arange(20), 2)  # two cases per patient
    test = {"a": np.arange(20), "b": np.arange(20, 40)}
    good = _proba(np.where(y == 1, 0.9, 0.1) * 1.0)
    noisy = _proba(rng.random(40))
    half = _proba(np.where(y == 1, 0.6, 0.4) * (rng.random(40) > 0.3) + 0.2 * (rng.random(40) > 0.5))

    def rows(r0, r1):
        return {"after a": {s: r0[i].tolist() for s, i in test.items()},
                "after b": {s: r1[i].tolist() for s, i in test.items()}}

    probs = {"init": [{"init": {s: noisy[i].tolist() for s, i in test.items()}}],
             "naive": [rows(good, noisy)],          # forgets site a completely
             "ewc": [rows(good, half)],             # forgets part of it
             "joint": [{"joint": {s: good[i].tolist() for s, i in test.items()}}]}
    res = transfer_scores(y, groups, test, ["a", "b"], probs, n_boot=200, seed=0)
    naive, ewc = res["methods"]["naive"], res["methods"]["ewc"]
    R = np.array(naive["matrix"]["auc"]["value"])
    assert R.shape == (2, 2) and R[0, 0] == 1.0
    assert naive["bwt"]["auc"]["value"] == pytest.approx(R[1, 0] - R[0, 0])
    base = res["baseline"]["auc"][1]["value"]
    assert naive["fwt"]["auc"]["value"] == pytest.approx(R[0, 1] - base)
    assert naive["final_mean"]["auc"]["value"] == pytest.approx(R[1].mean())
    for m in ("auc", "acc"):
        lo, hi = naive["bwt"][m]["ci95"]
        assert lo <= naive["bwt"][m]["value"] <= hi
    assert ewc["bwt"]["auc"]["value"] > naive["bwt"]["auc"]["value"]
    diff = ewc["vs_naive"]["bwt_difference"]["auc"]
    assert diff["value"] == pytest.approx(ewc["bwt"]["auc"]["value"] - naive["bwt"]["auc"]["value"])
    assert ewc["vs_naive"]["separates"]["auc"] == (diff["ci95"][0] > 0)
    assert np.array(res["methods"]["joint"]["matrix"]["auc"]["value"]).shape == (1, 2)
    assert "bwt" not in res["methods"]["joint"]
    assert res["primary_metric"] == "auc" and res["ci"]["n_boot"] == 200


def test_the_demo_site_shift_soft_tissue_window_and_low_dose_screening(tmp_path):
    # ct_soft_tissue re-windows lung-window values (W 1500, L -600 HU) to -160..150 HU
    hu = np.array([-860.0, -160.0, 45.0, 150.0, 700.0])
    x = np.clip((hu + 1350) / 1500, 0, 1).astype(np.float32).reshape(1, 1, 1, -1)
    y = scanner_shift("ct_soft_tissue")(x)[0, 0, 0]
    np.testing.assert_allclose(y, np.clip((hu + 160) / 310, 0, 1), atol=1e-5)
    with pytest.raises(ConfigError, match="window_low < window_high"):
        ScannerShift(window_low=0.6, window_high=0.4)
    # screening_site: that site's normal patients get the low-dose protocol; everything else is unchanged
    plain = make_demo_dataset(tmp_path / "plain", n_patients=8, slices_per_patient=1, size=32)
    scr = make_demo_dataset(tmp_path / "scr", n_patients=8, slices_per_patient=1, size=32, screening_site="site_b")
    rows = list(csv.DictReader(plain.open()))
    assert rows == list(csv.DictReader(scr.open()))
    for r in rows:
        a, b = pydicom.dcmread(plain.parent / r["path"]), pydicom.dcmread(scr.parent / r["path"])
        low_dose = r["site"] == "site_b" and r["label"] == "normal"
        assert (b.ConvolutionKernel == "LOWDOSE") == low_dose
        assert (a.PixelData == b.PixelData) != low_dose
        if low_dose:  # more noise in the air around the body (the image corners)
            def air(d):
                return np.concatenate([d.pixel_array[r, c].ravel().astype(float)
                                       for r in (slice(0, 6), slice(-6, None)) for c in (slice(0, 6), slice(-6, None))])
            assert air(b).std() > 1.4 * air(a).std()
    with pytest.raises(ConfigError, match="'screening_site' parameter .* Got 'site_c'"):
        make_demo_dataset(tmp_path / "bad", n_patients=8, screening_site="site_c")


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    manifest = make_demo_dataset(root / "data", n_patients=24, slices_per_patient=1, size=32, screening_site="site_b")
    raw = {"name": "cont", "data": {"path": str(manifest), "class_names": ["normal", "lesion"], "image_size": [32, 32],
                                    "intensity": {"mode": "window", "preset": "lung"}},
           "model": {"name": "tf_efficientnet_lite0", "pretrained": False},
           "train": {"epochs": 1, "batch_size": 4, "tta": False, "device": "cpu", "num_threads": 1,
                     "augment": {"affine": False, "intensity": False}},
           "cv": {"val_fraction": 0.25}, "evaluate": {"n_bootstrap": 50},
           "continual": {"replay_size": 4, "ewc_samples": 4, "site_shift": {"site_b": "ct_soft_tissue"}}}
    return root, raw


def test_continual_runs_every_method_writes_the_report_and_resumes(demo_config, monkeypatch):
    root, raw = demo_config
    before = torch.get_num_threads()
    cfg = medtl.load_config(raw)
    out = root / "run"
    res = medtl.continual(cfg, out, progress=False)
    assert res["sites"] == ["site_a", "site_b"] and set(res["methods"]) == {"naive", "ewc", "replay", "joint"}
    for m in ("naive", "ewc", "replay"):
        R = np.array(res["methods"][m]["matrix"]["auc"]["value"], dtype=float)
        assert R.shape == (2, 2)
        assert res["methods"][m]["bwt"]["auc"]["value"] == pytest.approx(R[1, 0] - R[0, 0], nan_ok=True)
    # the three sequences share their first stage: the same row after site_a
    assert res["methods"]["naive"]["matrix"]["auc"]["value"][0] == res["methods"]["ewc"]["matrix"]["auc"]["value"][0]
    saved = json.loads((out / "continual.json").read_text())
    assert saved["compute"]["stages"]["training"]["images"] > 0 and saved["compute"]["energy_method"]
    assert saved["patients"]["site_a"]["test"] >= 2 and saved["site_shift"] == {"site_b": "ct_soft_tissue"}
    stages = json.loads((out / "stages" / "r0_replay_s1.json").read_text())
    assert stages["buffer"]["size"] == 4 and len(stages["buffer"]["indices"]) == 4
    assert (out / "stages" / "r0_ewc_s1.ewc.safetensors").is_file()
    html = (out / "continual.html").read_text()
    assert "data:image/png;base64," in html and "BWT" in html and "Compute bill" in html
    assert "src=\"http" not in html and not find_identifying_strings(html, demo_identifying_strings(root / "data"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(continual_module, "train_stage", no_training)
    again = medtl.continual(cfg, out, progress=False)  # every stage is reused
    assert again["methods"]["ewc"]["bwt"] == res["methods"]["ewc"]["bwt"]
    with pytest.raises(MedtlError, match="different config"):
        medtl.continual(medtl.load_config(raw, ["train.lr=0.01"]), out, progress=False)
    torch.set_num_threads(before)


@pytest.mark.parametrize("override, match", [
    ("continual.sites=[site_a, site_c]", "unknown: \\['site_c'\\]"),
    ("continual.site_shift={site_c: xray_b}", "site_shift names site\\(s\\) \\['site_c'\\]"),
    ("continual.site_shift={site_b: xray}", "Unknown scanner shift preset 'xray'"),
    ("train.strategy.name=linear_probe", "linear_probe fits a scikit-learn head once"),
])
def test_continual_refuses_configs_it_cannot_run(demo_config, tmp_path, override, match):
    _, raw = demo_config
    with pytest.raises(ConfigError, match=match):
        medtl.continual(medtl.load_config(raw, [override]), tmp_path / "x", progress=False)
