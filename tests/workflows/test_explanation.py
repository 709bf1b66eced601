"""``explain_run`` end to end on a tiny run folder (demo DICOM, two untrained fold models),
and the case gallery selection (the NIfTI export of 3D maps: tests/explain/test_nifti_geometry.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medtl.data.demo import demo_identifying_strings, find_identifying_strings, make_demo_dataset
from medtl.workflows.explanation import explain_run, select_cases

CLASSES = ["normal", "lesion"]


def _row(i: int, label: str, pred: str, p_lesion: float) -> dict:
    return {"id": f"r{i}", "label": label, "pred": pred, "fold": "0",
            "prob_lesion": str(p_lesion), "prob_normal": str(1 - p_lesion)}


def test_gallery_has_most_and_least_confident_correct_and_wrong() -> None:
    rows = [_row(0, "lesion", "lesion", 0.99), _row(1, "lesion", "lesion", 0.55),
            _row(2, "normal", "normal", 0.01), _row(3, "normal", "normal", 0.45),
            _row(4, "lesion", "normal", 0.02), _row(5, "normal", "lesion", 0.6),
            _row(6, "lesion", "normal", 0.4)]
    picked = select_cases(rows, CLASSES, n_correct=4, n_wrong=2)
    groups = {r["id"]: r["group"] for r in picked}
    assert groups["r0"] == groups["r2"] == "correct, most confident"
    assert groups["r1"] == groups["r3"] == "correct, least confident"
    # classes alternate, class_names order first: the normal case leads the wrong ones
    assert groups["r5"] == "wrong, most confident" and groups["r6"] == "wrong, least confident"
    assert "r4" not in groups  # the most confident wrong lesion case is neither part's pick
    assert len(picked) == len(groups) == 6  # no case twice
    assert all(r["correct"] == (r["label"] == r["pred"]) for r in picked)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished-looking 2-fold run: demo DICOM at 48 px, untrained lite0 fold models."""
    from medtl.models import create_encoder
    from medtl.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("explain_run")
    manifest = make_demo_dataset(root / "data", n_patients=4, slices_per_patient=2, size=48)
    run = root / "run"
    raw = {"name": "tiny", "data": {"format": "manifest", "path": str(manifest), "image_size": [48, 48],
                                    "class_names": CLASSES,
                                    "intensity": {"mode": "window", "preset": "lung"}},
           "model": {"name": "tf_efficientnet_lite0", "pretrained": False},
           "explain": {"methods": ["gradcam", "ig", "smoothgrad"], "ig_steps": 8, "n_samples": 4,
                       "n_correct": 2, "n_wrong": 2, "cascade_steps": 3, "faithfulness_steps": 4}}
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    (run / "metrics.json").write_text(json.dumps({
        "task": "cv", "class_names": CLASSES, "pooled": {"auc": {"value": 0.5, "ci95": [0.3, 0.7]}}}))
    with manifest.open() as fh:
        labels = [r["label"] for r in csv.DictReader(fh)]
    rows = []
    torch.manual_seed(0)
    for fold in (0, 1):
        model = create_encoder("tf_efficientnet_lite0", pretrained=False, num_classes=2, in_chans=1)
        save_checkpoint(model, run / "checkpoints" / f"fold{fold}", {"class_names": CLASSES})
    for i, label in enumerate(labels):
        p = 0.9 if i % 3 else 0.2  # some right, some wrong, varied confidence
        pred = label if i % 3 else ("normal" if label == "lesion" else "lesion")
        p_lesion = p if pred == "lesion" else 1 - p
        rows.append({"id": f"row{i + 2:05d}", "patient_id": "P-x", "site": "", "fold": str(i % 2),
                     "label": label, "prob_normal": f"{1 - p_lesion:.3f}", "prob_lesion": f"{p_lesion:.3f}",
                     "pred": pred})
    with (run / "predictions.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return run


@pytest.mark.filterwarnings("ignore::medtl.explain.attribution.ConvergenceWarning")  # 8 IG steps
def test_explain_run_writes_checked_private_report(tiny_run: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    report = explain_run(tiny_run, tmp_path / "out", progress=False)
    html = report.read_text()
    summary = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert summary["methods"] == ["gradcam", "ig", "smoothgrad"]
    assert set(summary["randomization"]) == {"gradcam", "ig", "smoothgrad"}
    for res in summary["randomization"].values():
        assert len(res["steps"]) == 3 and isinstance(res["passed"], bool)
        assert res["steps"][0]["randomized"] == "net.classifier"
    assert set(summary["faithfulness"]) == {"gradcam", "ig", "smoothgrad"}
    assert summary["ig_delta"] and all(np.isfinite(v) for v in summary["ig_delta"].values())
    # localisation counts every correctly classified case with a lesion mask
    with (tiny_run / "predictions.csv").open() as fh:
        preds = {r["id"]: r for r in csv.DictReader(fh)}
    masks = {f"row{i + 2:05d}": bool(r["mask"]) for i, r in
             enumerate(csv.DictReader((tiny_run.parent / "data" / "manifest.csv").open()))}
    expected = sum(1 for cid, r in preds.items() if r["label"] == r["pred"] and masks[cid])
    if expected:
        assert summary["localisation"]["gradcam"]["n_cases"] == expected
    assert 'id="randomization-verdicts"' in html and 'id="faithfulness"' in html
    assert html.count("<img") >= 2 + len(summary["gallery"])
    assert "most confident" in html and "least confident" in html
    secrets = demo_identifying_strings(tiny_run.parent / "data")
    assert not find_identifying_strings(html, secrets)
    assert not find_identifying_strings(json.dumps(summary), secrets)
