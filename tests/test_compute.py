"""The compute bill: stages add up, images/s, energy method, metrics.json block, resume, compare."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from medtl._compute import DEFAULT_CPU_WATTS_PER_CORE, ComputeBill, bill_rows, cpu_model_name, sum_bills


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_stages_add_up_and_images_per_second():
    bill = ComputeBill("cpu")
    with bill.stage("decode"):
        _busy(0.03)
        bill.add_images("decode", 30)
    with bill.stage("training"):
        _busy(0.05)
    with bill.stage("training"), bill.stage("training"):  # re-entering adds; the nested opening counts once
        _busy(0.05)
    bill.add_images("training", 50)
    d = bill.as_dict()
    st = d["stages"]
    assert list(st) == ["decode", "training"]
    assert st["training"]["wall_s"] >= 0.1 and st["decode"]["wall_s"] >= 0.03
    assert st["training"]["wall_s"] < 0.1 + 0.05  # the nested opening did not count twice
    assert sum(s["wall_s"] for s in st.values()) <= d["wall_s"] + 1e-3  # stages add up to at most the total
    assert st["training"]["images"] == 50
    assert st["training"]["images_per_s"] == pytest.approx(50 / st["training"]["wall_s"], rel=0.02)
    assert d["stages_run_here"] == ["decode", "training"] and d["resumed_units"] == 0
    json.dumps(d, allow_nan=False)  # plain strict JSON


def test_energy_estimate_states_its_method_and_scales_with_cpu_time(monkeypatch):
    import medtl._compute as compute

    monkeypatch.setattr(compute, "_rapl_domains", list)  # no readable RAPL counter: the estimate, whatever this machine offers
    bill = ComputeBill("cpu", cpu_watts_per_core=10.0)
    with bill.stage("training"):
        _busy(0.1)
    d = bill.as_dict()
    assert "estimated" in d["energy_method"] and "10 W per busy core" in d["energy_method"]
    assert d["energy_wh"] == pytest.approx(d["cpu_s"] * 10.0 / 3600, rel=0.05, abs=1e-6)
    assert d["energy_wh"] > 0 and d["device"] == "cpu" and cpu_model_name() in d["device_name"]
    assert d["peak_rss_bytes"] > 10 * 2**20 and d["peak_gpu_bytes"] is None
    assert ComputeBill("cpu").cpu_watts_per_core == DEFAULT_CPU_WATTS_PER_CORE


def test_rapl_counters_are_measured_when_readable(tmp_path, monkeypatch):
    import medtl._compute as compute

    pkg = tmp_path / "intel-rapl:0"
    (pkg / "intel-rapl:0:0").mkdir(parents=True)  # a sub-domain: not added twice
    (pkg / "energy_uj").write_text("1000000\n")
    (pkg / "intel-rapl:0:0" / "energy_uj").write_text("5\n")
    monkeypatch.setattr(compute, "_RAPL_ROOT", tmp_path)
    bill = ComputeBill("cpu")
    (pkg / "energy_uj").write_text(str(1_000_000 + 3_600_000) + "\n")  # +3.6 J = 1 mWh
    d = bill.as_dict()
    assert d["energy_wh"] == pytest.approx(0.001)
    assert "RAPL" in d["energy_method"] and "measured" in d["energy_method"]


def test_merge_in_process_adds_stages_only_and_earlier_adds_totals():
    run = ComputeBill("cpu")
    fold = {"wall_s": 100.0, "cpu_s": 150.0, "energy_wh": 2.0, "peak_rss_bytes": 1, "peak_gpu_bytes": None,
            "stages": {"training": {"wall_s": 90.0, "cpu_s": 140.0, "images": 900},
                       "evaluation": {"wall_s": 10.0, "cpu_s": 10.0, "images": 100}}}
    run.merge(fold)  # ran inside the run's clock: its time is already in the run's totals
    d = run.as_dict()
    assert d["stages"]["training"]["wall_s"] == 90.0 and d["stages"]["training"]["images_per_s"] == 10.0
    assert d["wall_s"] < 100.0 and d["energy_wh"] < 2.0
    resumed = ComputeBill("cpu")
    resumed.merge(fold, earlier=True)  # a fold finished by an earlier process (resume)
    d = resumed.as_dict()
    assert d["wall_s"] >= 100.0 and d["cpu_s"] >= 150.0 and d["energy_wh"] >= 2.0
    assert d["stages_run_here"] == [] and d["resumed_units"] == 1 and "earlier process" in d["energy_method"]
    total = sum_bills([fold, fold])
    assert total["wall_s"] == 200.0 and total["stages"]["training"]["images"] == 1800
    assert bill_rows(total)[-1][0] == "total"


def test_end_without_begin_says_what_to_do():
    with pytest.raises(ValueError, match="begin"):
        ComputeBill("cpu").end("training")


# ---------------------------------------------------------------- workflows, with a stub trainer (seconds, not minutes)
class _Stub(torch.nn.Linear):
    weights_record = SimpleNamespace(to_dict=lambda: {"name": "stub"})
    channel_mapping, in_chans, num_classes = "repeat", 1, 2


class _StubTrainer:
    """A fold trainer that 'trains' instantly: probabilities from the image mean, one history row."""

    name = "stub"

    def fit(self, cfg, data, trn, val, seeds, *, description, bar):
        from medtl.training.checkpoint import save_checkpoint
        from medtl.workflows.trainers import FoldFit

        _busy(0.02)  # a measurable training step
        def predict(idx):
            m = data.images[idx].reshape(len(idx), -1).mean(1)
            p = 1 / (1 + np.exp(-(m - m.mean()) * 10))
            return np.stack([1 - p, p], 1)

        return FoldFit(predict=predict, predict_val=lambda: predict(val),
                       save=lambda folder, meta: save_checkpoint(_Stub(1, 2), folder, meta),
                       info={"best_epoch": 0, "history": [{"epoch": 0, "train_loss": 0.5, "val_loss": 0.5}]})


@pytest.fixture(scope="module")
def stub_runs(tmp_path_factory):
    from medtl.config import load_config
    from medtl.data.demo import make_demo_dataset
    from medtl.workflows import crossval

    root = tmp_path_factory.mktemp("bill")
    manifest = make_demo_dataset(root / "data", n_patients=9, slices_per_patient=2, size=32)
    raw = {"name": "bill", "data": {"path": str(manifest), "image_size": [32, 32]}}
    cfg = load_config(raw, ["cv.n_splits=3", "evaluate.n_bootstrap=20", "train.device=cpu"])
    mp = pytest.MonkeyPatch()
    mp.setattr(crossval, "make_trainer", lambda cfg, *args, **kwargs: _StubTrainer())
    try:
        metrics = crossval.cross_validate(cfg, root / "a", progress=False)
        shutil.copytree(root / "a", root / "b")
        again = crossval.cross_validate(cfg, root / "b", progress=False)  # every fold resumed
    finally:
        mp.undo()
    return root, metrics, again


def test_cv_metrics_json_holds_the_bill(stub_runs):
    root, metrics, _ = stub_runs
    bill = json.loads((root / "a" / "metrics.json").read_text())["compute"]
    assert bill == json.loads(json.dumps(metrics["compute"]))
    assert {"decode", "training", "evaluation"} <= set(bill["stages"])
    assert bill["stages"]["decode"]["images"] == 18
    assert bill["stages"]["training"]["images"] > 0 and bill["stages"]["training"]["images_per_s"] > 0
    assert sum(s["wall_s"] for s in bill["stages"].values()) <= bill["wall_s"] + 0.01
    assert bill["energy_method"] and bill["energy_wh"] > 0 and bill["resumed_folds"] == []
    fold = json.loads((root / "a" / "folds" / "fold0.json").read_text())
    assert fold["info"]["compute"]["stages"]["training"]["wall_s"] >= 0  # each fold keeps its own cost


def test_resumed_run_keeps_the_earlier_folds_costs(stub_runs):
    _, metrics, again = stub_runs
    bill = again["compute"]
    assert bill["resumed_folds"] == ["fold0", "fold1", "fold2"] and bill["resumed_units"] == 3
    assert "training" not in bill["stages_run_here"] and "evaluation" in bill["stages_run_here"]
    first = metrics["compute"]["stages"]["training"]
    assert bill["stages"]["training"]["wall_s"] == pytest.approx(first["wall_s"], abs=0.01)
    assert bill["stages"]["training"]["images"] == first["images"]
    assert bill["wall_s"] >= bill["stages"]["training"]["wall_s"]


def test_compare_shows_the_bill_beside_the_metrics(stub_runs, tmp_path):
    from medtl.workflows.comparison import compare, print_comparison

    root, _, _ = stub_runs
    res = compare(root / "a", root / "a", out=tmp_path)
    assert res["compute"]["a"]["wall_s"] > 0 and res["compute"]["ratio_a_to_b"]["wall_s"] == 1.0
    assert json.loads((tmp_path / "compare.json").read_text())["compute"]["b"]["energy_wh"] > 0
    console = Console(record=True, width=160)
    print_comparison(res, console)
    text = console.export_text()
    for word in ("AUC", "Compute bill", "wall time", "training images/s", "peak memory", "energy", "Wh"):
        assert word in text


def test_report_shows_a_compute_table(tmp_path):
    from medtl.explain.report import write_report

    bill = ComputeBill("cpu")
    with bill.stage("explanation"):
        bill.add_images("explanation", 4)
    html = write_report(tmp_path / "r.html", title="t", run_info={}, metrics={}, plots={}, cases=[],
                        compute={"this report (explain)": bill.as_dict(), "the run (cv)": None}).read_text()
    assert 'id="compute-table"' in html and "explanation" in html and "this report (explain)" in html
    assert "the run (cv)" not in html
    assert "Wh" in html and ("estimated" in html or "measured" in html)


def test_no_bill_means_no_compute_section(tmp_path):
    from medtl.explain.report import write_report

    html = write_report(Path(tmp_path) / "r.html", title="t", run_info={}, metrics={}, plots={}, cases=[]).read_text()
    assert 'id="compute-table"' not in html
