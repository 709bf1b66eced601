"""``medtl curve`` end to end at a tiny size: points with CIs, the fit, few-shot episodes, resume, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.demo import make_demo_dataset
from medtl.data.prepare import prepare
from medtl.errors import ConfigError
from medtl.evaluate.metrics import METRIC_KEYS, compute_metrics
from medtl.workflows import curve
from medtl.workflows.curves import _subsample

TINY = ["data.image_size=[32, 32]", "cv.n_splits=3", "evaluate.n_bootstrap=20", "train.tta=false",
        "train.num_threads=1", "train.strategy.name=linear_probe", "train.strategy.probe_C=[1.0]",
        "curve.sizes=[0.4, 0.7, 1.0]", "curve.repeats=2", "curve.shots=[1, 2]", "curve.episodes=4",
        "curve.target=0.8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDTL_CACHE_DIR", str(root / "cache"))
    manifest = make_demo_dataset(root / "data", n_patients=12, slices_per_patient=2, size=32)
    raw = {"name": "tiny-curve", "data": {"path": str(manifest), "intensity": {"mode": "window", "preset": "lung"}}}
    cfg = load_config(raw, TINY)
    data = prepare(cfg, progress=False)
    out = curve(cfg, root / "run", progress=False, data=data)
    yield root, cfg, data, out
    mp.undo()


def test_curve_json_has_points_with_cis_a_fit_and_the_patients_needed(tiny):
    root, *_ = tiny
    on_disk = json.loads((root / "run" / "curve.json").read_text())
    assert on_disk["task"] == "curve" and on_disk["n_cases"] == 24 and on_disk["resumed_points"] == 0
    assert list(on_disk["strategies"]) == ["linear_probe", "prototype"]  # the config's own strategy + prototype
    for s in on_disk["strategies"].values():
        pts = s["points"]
        assert [p["fraction"] for p in pts] == [0.4, 0.7, 1.0]
        assert [p["n_models"] for p in pts] == [6, 6, 3]  # 3 folds x 2 repeats; the full size once
        patients = [p["patients"] for p in pts]
        assert patients == sorted(patients) and patients[-1] == pytest.approx(8.0)  # 2/3 of 12 patients
        for p in pts:
            for key in METRIC_KEYS:
                m = p["metrics"][key]
                lo, hi = m["ci95"]
                assert set(m) >= {"value", "ci95", "sd_repeats"} and (lo is None or lo <= m["value"] <= hi)
        t = s["fit"]["target"]
        assert t["status"] in ("reached", "extrapolated", "not_reached", "no_fit") and t["statement"]
    assert "patient" in on_disk["ci_method"] and on_disk["compute"]["stages"]["features"]["images"] == 24
    assert {"features", "training", "evaluation", "few_shot"} <= set(on_disk["compute"]["stages"])
    assert len(on_disk["statements"]) == 4  # probe, prototype, their paired comparison, few-shot
    cmp = on_disk["comparison"]["linear_probe"]
    assert [r["fraction"] for r in cmp["sizes"]] == [0.4, 0.7, 1.0] and cmp["statement"].startswith("prototype ")


def test_the_full_size_point_is_what_the_fold_driver_gives_on_the_whole_training_fold(tiny):
    root, _, data, out = tiny
    rec = json.loads((root / "run" / "points" / "prototype" / "f10000_fold0_r0.json").read_text())
    assert rec["info"]["patients"] == 8 and rec["n_train"] + rec["n_val"] == 16  # every training case of fold 0
    proba = np.asarray(rec["proba"])
    assert proba.shape == (8, 2) and np.allclose(proba.sum(1), 1)
    # the full-size AUC of the curve is the pooled out-of-fold AUC of those records
    pooled = np.zeros((24, 2))
    index = {c.case_id: i for i, c in enumerate(data.cases)}
    for f in (root / "run" / "points" / "prototype").glob("f10000_*.json"):
        r = json.loads(f.read_text())
        pooled[[index[i] for i in r["test_ids"]]] = r["proba"]
    full = out["strategies"]["prototype"]["points"][-1]["metrics"]["auc"]["value"]
    assert full == pytest.approx(compute_metrics(data.y, pooled)["auc"])


def test_few_shot_compares_prototype_and_probe_on_the_same_episodes(tiny):
    _, _, _, out = tiny
    few = out["few_shot"]
    assert few["ways"] == 2 and [s["k"] for s in few["shots"]] == [1, 2]
    for s in few["shots"]:
        d = s["difference"]["auc"]
        assert s["episodes"] == 4 and d["n"] == 4
        assert d["mean"] == pytest.approx(s["prototype"]["auc"]["mean"] - s["linear_probe"]["auc"]["mean"])
        assert s["verdict"] in ("prototype better", "probe better", "no clear difference")
    assert few["summary"].startswith("2-way episodes, AUC")


def test_a_killed_run_resumes_its_finished_points_with_the_same_numbers(tiny, tmp_path):
    root, cfg, data, out = tiny
    run = root / "run"
    (run / "points" / "linear_probe" / "f04000_fold1_r1.json").unlink()  # never finished
    (run / "points" / "prototype" / "f07000_fold2_r0.json").write_text("{trunc")  # torn write
    again = curve(cfg, run, progress=False, data=data)
    assert again["resumed_points"] == 2 * (6 + 6 + 3) - 2
    for name in ("linear_probe", "prototype"):
        for a, b in zip(out["strategies"][name]["points"], again["strategies"][name]["points"]):
            assert a["metrics"] == b["metrics"]
    assert again["compute"]["resumed_units"] == again["resumed_points"]


def test_report_is_one_self_contained_page(tiny):
    root, *_ = tiny
    html = (root / "run" / "curve.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "http" not in html.replace("http-equiv", "")
    assert "Few-shot episodes" in html and "Compute bill" in html and "Power law" in html and "Prototype minus" in html
    assert (root / "run" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subsample_keeps_whole_patients_stratified_with_two_per_class_at_least():
    y = np.repeat([0] * 30 + [1] * 10, 2)
    groups = np.repeat(np.arange(40), 2)
    idx = _subsample(y, groups, 0.1, seed=0)
    pats = np.unique(groups[idx])
    assert len(idx) == 2 * len(pats)  # whole patients
    assert np.bincount(y[idx][::2]).tolist() == [3, 2]  # 10% of 30; at least 2 of the 10
    assert not np.array_equal(idx, _subsample(y, groups, 0.1, seed=1))
    assert len(_subsample(y, groups, 1.0, seed=0)) == 80


def test_nested_scheme_is_refused_with_the_fix(tiny):
    _, cfg, data, _ = tiny
    raw = cfg.model_dump(mode="json")
    raw["cv"].update(scheme="nested", grid={"train.lr": [0.001, 0.01]})
    nested = load_config(raw)
    with pytest.raises(ConfigError, match="--set cv.scheme=kfold"):
        curve(nested, "/nonexistent/never-written", progress=False, data=data)
