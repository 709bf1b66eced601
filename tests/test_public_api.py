"""The package face: ``import medtl`` gives working workflows, in any order, whatever was imported before."""

from __future__ import annotations

import csv
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import medtl
from medtl.data.demo import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = ("load_config", "train", "cross_validate", "explain_run", "audit", "demo", "predict", "export",
             "compare", "rank", "create_encoder")
TINY = ["train.epochs=1", "data.image_size=[32, 32]", "cv.n_splits=3", "evaluate.n_bootstrap=50",
        "train.tta=false", "explain.n_correct=1", "explain.n_wrong=1", "explain.methods=[gradcam]",
        "explain.cascade_steps=2", "explain.faithfulness_steps=4"]


def test_every_public_name_survives_importing_every_submodule():
    for mod in pkgutil.walk_packages(medtl.__path__, "medtl."):
        if mod.name != "medtl.__main__":
            importlib.import_module(mod.name)
    for name in medtl.__all__:
        assert hasattr(medtl, name), name
    for name in WORKFLOWS:
        obj = getattr(medtl, name)
        assert callable(obj) and not inspect.ismodule(obj), f"medtl.{name} is {obj!r}"
        assert name in medtl.__all__


def test_no_module_shadows_a_workflow_of_the_same_name():
    import medtl.workflows as wf

    for name in wf.__all__:
        assert not inspect.ismodule(getattr(wf, name)), name


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    """Demo DICOM with a split column: 9 patients as train/val/test by patient."""
    root = tmp_path_factory.mktemp("api")
    manifest = make_demo_dataset(root / "data", n_patients=9, slices_per_patient=2, size=32)
    rows = list(csv.DictReader(manifest.open()))
    patients = sorted({r["patient_id"] for r in rows})
    split = {p: ("train", "train", "train", "train", "val", "test")[i % 6] if i < 6 else ("train", "val", "test")[i % 3]
             for i, p in enumerate(patients)}
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, [*rows[0].keys(), "split"])
        w.writeheader()
        w.writerows({**r, "split": split[r["patient_id"]]} for r in rows)
    return manifest


def test_cross_validate_then_train_twice_then_explain(tiny_manifest, tmp_path):
    raw = {"name": "api", "data": {"path": str(tiny_manifest), "intensity": {"mode": "window", "preset": "lung"},
                                   "class_names": ["normal", "lesion"]}}
    cfg = medtl.load_config(raw, TINY)
    cv = medtl.cross_validate(cfg, tmp_path / "cv", progress=False)
    assert cv["task"] == "cv" and len(cv["folds"]) == 3
    first = medtl.train(cfg, tmp_path / "a", progress=False)
    second = medtl.train(cfg, tmp_path / "b", progress=False)
    assert first["task"] == second["task"] == "official"
    assert first["test"]["auc"] == second["test"]["auc"]  # same config, same seeds, same numbers
    report = medtl.explain_run(tmp_path / "cv", progress=False)
    assert report.is_file() and report.name == "report.html"
    text = report.read_text()
    assert "tf_efficientnet_lite0.in1k" in text and ".scratch" not in text  # provenance from the checkpoint
    paired = medtl.compare(tmp_path / "a", tmp_path / "b")
    assert paired["n_common"] == first["n_test"] and paired["delong"]["diff"] == 0.0


@pytest.mark.parametrize("script", sorted((REPO / "tutorials").glob("*.py")), ids=lambda p: p.name)
def test_tutorial_scripts_run_at_a_tiny_size(script, tmp_path, shared_weights):
    """Every tutorial script takes --tiny and runs to the end, so none of them can rot. The shared weights
    folder is the download cache of the encoders the shipped configs name (MEDTL_WEIGHTS_DIR)."""
    res = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(tmp_path / "runs")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
