"""Nested CV's Optuna search (medtl.workflows.search) on a linear probe over synthetic DICOM:
trials with pruning in SQLite, a killed run resuming to the uninterrupted result, the outer test
cases never reaching the search, the cost report, the config checks and the missing-Optuna hint."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.demo import make_demo_dataset
from medtl.data.prepare import prepare
from medtl.errors import ConfigError
from medtl.workflows import cross_validate
from medtl.workflows.trainers import LinearProbe


N_TRIALS = 6
SPACE = ("cv.search_space=[{key: train.strategy.probe_C, kind: float, low: 1e-4, high: 100, log: true}, "
         "{key: train.class_weighted, kind: categorical, choices: [false, true]}]")
TINY = ["data.image_size=[32, 32]", "cv.n_splits=2", "cv.inner_splits=2", "evaluate.n_bootstrap=20", "train.tta=false",
        "train.strategy.name=linear_probe", "train.select_metric=loss", "cv.scheme=nested", "cv.search=optuna",
        f"cv.n_trials={N_TRIALS}", "cv.n_startup_trials=2", SPACE]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in medtl catches it, so the running trial stays RUNNING."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("optuna")  # the `search` extra (the `test` extra installs it)
    root = tmp_path_factory.mktemp("search")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDTL_CACHE_DIR", str(root / "cache"))
    manifest = make_demo_dataset(root / "data", n_patients=12, slices_per_patient=2, size=32)
    raw = {"name": "tiny-search", "data": {"path": str(manifest), "intensity": {"mode": "window", "preset": "lung"}}}
    cfg = load_config(raw, TINY)
    data = prepare(cfg, progress=False)
    calls: list[tuple[str, np.ndarray]] = []  # (description, every case index the probe trainer received)
    fit = LinearProbe.fit

    def spy(self, cfg, data, trn, val, seeds, *, description, bar):
        calls.append((description, np.concatenate([trn, val])))
        return fit(self, cfg, data, trn, val, seeds, description=description, bar=bar)

    mp.setattr(LinearProbe, "fit", spy)
    metrics = cross_validate(cfg, root / "run", progress=False, data=data)
    mp.undo()
    mp.setenv("MEDTL_CACHE_DIR", str(root / "cache"))
    yield root, cfg, data, metrics, calls
    mp.undo()


def _study(run, fold: str, block: dict | None = None):
    """The fold's Optuna study in ``run`` (named as in ``block``, else as in the run's own fold record)."""
    import optuna

    block = block or json.loads((run / "folds" / f"{fold}.json").read_text())["info"]["search"]
    return optuna.load_study(study_name=block["study"], storage=f"sqlite:///{run / block['storage']}")


def test_trials_run_with_pruning_and_are_stored_in_sqlite(setup):
    root, cfg, _, m, _ = setup
    assert m["trainer"] == "nested(linear_probe)" and m["search"]["method"] == "optuna"
    for fold, block in zip(m["folds"], m["search"]["folds"]):
        assert block["complete"] + block["pruned"] == N_TRIALS and block["stopped_by"] == "n_trials"
        assert block["failed"] == 0 and block["interrupted"] == 0 and block["wall_s"] > 0 and block["images"] > 0
        assert fold["selected"] == block["best_params"]  # the refit used the study's best trial
        c = block["best_params"]["train.strategy.probe_C"]
        assert isinstance(c, list) and len(c) == 1 and 1e-4 <= c[0] <= 100  # list-valued key: a one-value list
        assert (root / "run" / block["storage"]).is_file() and block["storage"].startswith("search/fold_0_")
        study = _study(root / "run", fold["fold"])
        states = [t.state.name for t in study.trials]
        assert len(states) == N_TRIALS and states.count("PRUNED") == block["pruned"]
        assert study.best_trial.number == block["best_trial"] and study.best_value == block["best_value"]
        rec = json.loads((root / "run" / "folds" / f"{fold['fold']}.json").read_text())["info"]
        for t in rec["trials"]:  # a pruned trial stopped after its first inner fold; others ran both
            assert len(t["inner"]) == (1 if t["state"] == "pruned" else cfg.cv.inner_splits)
    assert m["search"]["pruned"] > 0  # the median pruner stopped trials
    assert m["search"]["complete"] + m["search"]["pruned"] == 2 * N_TRIALS
    stage = m["compute"]["stages"]["search"]  # the compute bill covers the search, apart from the final fit
    assert stage["images"] == m["search"]["images"] and "search" in m["compute"]["stages_run_here"]


def test_outer_test_cases_never_reach_the_search(setup):
    root, _, data, m, calls = setup
    index = {c.case_id: i for i, c in enumerate(data.cases)}
    for fold in m["folds"]:
        rec = json.loads((root / "run" / "folds" / f"{fold['fold']}.json").read_text())
        test = {index[i] for i in rec["test_ids"]}
        seen = [idx for desc, idx in calls if desc.startswith(fold["fold"] + " ")]
        inner = [idx for desc, idx in calls if desc.startswith(fold["fold"] + " ") and "trial" in desc]
        assert len(inner) >= N_TRIALS and len(seen) == len(inner) + 1  # the trials' inner fits, then the refit
        assert all(not test & set(idx.tolist()) for idx in seen)


def test_a_killed_search_resumes_to_the_uninterrupted_result(setup, tmp_path, monkeypatch):
    root, cfg, data, m, _ = setup
    fit = LinearProbe.fit

    def dies(self, cfg, data, trn, val, seeds, *, description, bar):
        if description.startswith("fold1 ") and "trial 4/" in description and "inner 2/" in description:
            raise Killed  # mid-search in the second fold, mid-trial: the trial has reported its first inner fold
        return fit(self, cfg, data, trn, val, seeds, description=description, bar=bar)

    monkeypatch.setattr(LinearProbe, "fit", dies)
    with pytest.raises(Killed):
        cross_validate(cfg, tmp_path / "run", progress=False, data=data)
    monkeypatch.setattr(LinearProbe, "fit", fit)
    study = _study(tmp_path / "run", "fold0")  # fold0 finished; fold1's study holds a trial left running
    assert len(study.trials) == N_TRIALS
    block = json.loads((root / "run" / "folds" / "fold1.json").read_text())["info"]["search"]
    left = _study(tmp_path / "run", "fold1", block)
    assert [t.state.name for t in left.trials] == ["COMPLETE"] * 3 + ["RUNNING"]
    assert list(left.trials[3].intermediate_values) == [1]
    resumed = cross_validate(cfg, tmp_path / "run", progress=False, data=data)
    assert resumed["compute"]["resumed_folds"] == ["fold0"] and resumed["search"]["interrupted"] == 1
    for a, b in zip(resumed["search"]["folds"], m["search"]["folds"]):
        assert a["best_params"] == b["best_params"] and a["best_value"] == b["best_value"]
        assert a["complete"] == b["complete"] and a["pruned"] == b["pruned"]
    assert resumed["pooled"] == m["pooled"] and resumed["folds"] == m["folds"]  # per-fold choices and metrics


def test_a_finished_study_is_reused_and_no_resume_starts_it_afresh(setup, tmp_path):
    import shutil

    from medtl._runtime import FoldSeeds
    from medtl.workflows.search import OptunaSelection

    root, cfg, data, m, _ = setup
    shutil.copytree(root / "run" / "search", tmp_path / "search")
    rec = json.loads((root / "run" / "folds" / "fold0.json").read_text())
    test = set(rec["test_ids"])
    tr = np.array([i for i, c in enumerate(data.cases) if c.case_id not in test])
    trn, val, seeds = tr[:-4], tr[-4:], FoldSeeds(cfg.train.seed, 0, 0)  # the fold's training cases, any split
    reused = OptunaSelection(LinearProbe(), tmp_path / "search")
    assert reused.search(cfg, data, trn, val, seeds, description="fold0", bar=None) == 0  # nothing left to run
    fit = reused.fit(cfg, data, trn, val, seeds, description="fold0", bar=None)
    assert fit.info["selected"] == m["folds"][0]["selected"] and fit.info["search"]["trials"] == N_TRIALS
    fresh = OptunaSelection(LinearProbe(), tmp_path / "search", resume=False)
    fit = fresh.fit(cfg, data, trn, val, seeds, description="fold0", bar=None)
    assert fit.info["search"]["trials"] == N_TRIALS and fit.info["search"]["images"] > 0  # run again, not added
    assert fit.info["search"]["study"] == rec["info"]["search"]["study"]
    other = load_config(cfg.model_dump(mode="json"), ["cv.n_startup_trials=3"])  # another config: another study
    from medtl.workflows.search import study_name

    ids = [data.cases[i].case_id for i in tr]
    assert study_name(other, seeds, ids) != study_name(cfg, seeds, ids) != study_name(cfg, seeds, ids[1:])
    assert study_name(load_config(cfg.model_dump(mode="json"), ["cv.n_trials=50"]), seeds, ids) == \
        study_name(cfg, seeds, ids[::-1])  # more trials extend the study; the order of the cases does not matter


def test_grid_search_reports_its_cost_the_same_way(setup, tmp_path):
    _, cfg, data, _, _ = setup
    grid = load_config(cfg.model_dump(mode="json"), ["cv.search=grid", "cv.search_space=[]",
                                                     'cv.grid={"train.strategy.probe_C": [0.01, 1.0]}'])
    m = cross_validate(grid, tmp_path / "grid", progress=False, data=data)
    s = m["search"]
    assert s["method"] == "grid" and s["trials"] == 4 and s["complete"] + s["failed"] == 4 and s["pruned"] == 0
    assert [f["selected"] for f in m["folds"]] == [f["best_params"] for f in s["folds"]]
    assert all(f["selected"]["train.strategy.probe_C"] in ([0.01], [1.0]) for f in m["folds"])  # one value a point
    assert m["compute"]["stages"]["search"]["images"] == s["images"] > 0
    assert not (tmp_path / "grid" / "search").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["cv.search=optuna"], ["cv.search=optuna searches inside the inner folds of nested CV", "cv.search_space"]),
    (["cv.scheme=nested", 'cv.search_space=[{key: train.lr, kind: float, low: 1e-4, high: 1e-2}]'],
     ["cv.search_space only applies to cv.search=optuna", "cv.scheme=nested needs a cv.grid"]),
    (["cv.scheme=nested", "cv.search=optuna", "cv.search_space=[{key: train.lrr, kind: float, low: 1e-4, high: 1}]"],
     ["cv.search_space key 'train.lrr' is not a config key", "Did you mean 'train.lr'?"]),
    (["cv.scheme=nested", "cv.search=optuna", "cv.search_space=[{key: data.image_size, kind: int, low: 32, high: 64}]"],
     ["cannot be searched", "train, model, adapt"]),
    (["cv.scheme=nested", "cv.search=optuna", "cv.search_space=[{key: train.lr, kind: float, low: 0, high: 1, "
      "log: true}]"], ["log: true needs low > 0"]),
    (["cv.scheme=nested", "cv.search=optuna", "cv.search_space=[{key: train.lr, kind: float, low: -1, high: 1}]"],
     ["cv.search_space 'train.lr' value -1 is not valid", "greater than 0"]),
    (["cv.scheme=nested", "cv.search=optuna", "cv.search_space=[{key: train.epochs, kind: int, low: 1.5, high: 3}]"],
     ["low and high must be integers"]),
    (["cv.scheme=nested", "cv.search=optuna", "cv.search_space=[{key: train.tta, kind: categorical}]"],
     ["takes `choices`"]),
    (["cv.scheme=nested", "cv.search=optuna", "cv.search_space=[{key: train.strategy.name, kind: categorical, "
      "choices: [llrd, lorra]}]"], ["value 'lorra' is not valid", "'lora'"]),
    (["cv.scheme=nested", "cv.search=optuna", 'cv.grid={"train.lr": [0.1]}',
      "cv.search_space=[{key: train.lr, kind: float, low: 1e-4, high: 1e-2}]"], ["with cv.search=optuna give"]),
])
def test_search_config_is_checked_on_load(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config({"data": {"path": "m.csv"}}, overrides)
    for text in expected:
        assert text in str(err.value)


def test_missing_optuna_says_how_to_install_it_only_when_used(monkeypatch):
    import medtl.config._rules as rules
    from medtl.workflows.search import _optuna

    real = rules._module_available
    monkeypatch.setattr(rules, "_module_available", lambda name: False if name == "optuna" else real(name))
    space = ["cv.scheme=nested", "cv.search=optuna", "cv.search_space=[{key: train.lr, kind: float, low: 1e-4, "
             "high: 1e-2, log: true}]"]
    with pytest.raises(ConfigError, match=r"pip install 'medtl\[search\]'"):
        load_config({"data": {"path": "m.csv"}}, space)
    load_config({"data": {"path": "m.csv"}}, ["cv.scheme=nested", 'cv.grid={"train.lr": [0.1]}'])  # grid: no Optuna
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now fails, as when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'medtl\[search\]'"):  # what OptunaSelection calls first
        _optuna()


class StandIn:
    """A fold trainer whose validation probabilities depend on ``train.lr`` alone: the true class
    gets ``1 - lr`` (loss ``-log(1 - lr)``), and every probability is NaN for ``lr > 0.1`` (the
    inner score is then undefined and the trial fails)."""

    name = "stand-in"

    def fit(self, cfg, data, trn, val, seeds, *, description, bar):
        from medtl.workflows.trainers import FoldFit

        lr = cfg.train.lr

        def proba(idx):
            p = np.full((len(idx), 2), lr / 1.0)
            p[np.arange(len(idx)), data.y[idx]] = 1.0 - lr
            return p * np.nan if lr > 0.1 else p

        return FoldFit(predict=proba, predict_val=lambda: proba(val), save=None)


def test_failed_trials_do_not_count_and_a_search_where_all_fail_stops(setup):
    from medtl._runtime import FoldSeeds
    from medtl.errors import DataError
    from medtl.workflows.search import OptunaSelection

    _, cfg, data, _, _ = setup
    lr = "cv.search_space=[{key: train.lr, kind: float, low: 1e-4, high: 1, log: true}]"
    c = load_config(cfg.model_dump(mode="json"), [lr, "cv.n_trials=4", "cv.pruner=none"])
    trn, val, seeds = np.arange(0, 18), np.arange(18, 24), FoldSeeds(0, 0, 2)
    fit = OptunaSelection(StandIn()).fit(c, data, trn, val, seeds, description="x", bar=None)  # in memory
    s, trials = fit.info["search"], fit.info["trials"]
    # these seeds propose lr > 0.1 four times before the fourth good trial: the failures stop the search
    assert (s["complete"], s["failed"], s["stopped_by"], s["storage"]) == (3, 4, "failures", None)
    assert all((t["point"]["train.lr"] > 0.1) == (t["state"] == "fail") for t in trials)
    assert len({t["point"]["train.lr"] for t in trials}) == len(trials)  # a failure is not proposed again
    assert fit.info["selected"]["train.lr"] == min(t["point"]["train.lr"] for t in trials if t["state"] == "complete")
    s = OptunaSelection(StandIn()).fit(c, data, trn, val, FoldSeeds(0, 0, 0), description="x", bar=None).info["search"]
    assert (s["complete"], s["failed"], s["stopped_by"]) == (4, 0, "n_trials")
    bad = load_config(c.model_dump(mode="json"), ["cv.search_space=[{key: train.lr, kind: float, low: 0.2, high: 1}]"])
    with pytest.raises(DataError, match="none of the 4 Optuna trial.*stopped by failures.*narrow the searched"):
        OptunaSelection(StandIn()).fit(bad, data, trn, val, seeds, description="x", bar=None)
    quick = load_config(c.model_dump(mode="json"), ["cv.search_timeout=1e-9"])  # stops after the first trial
    s = OptunaSelection(StandIn()).fit(quick, data, trn, val, FoldSeeds(0, 0, 0), description="x",
                                       bar=None).info["search"]
    assert s["trials"] == 1 and s["stopped_by"] == "search_timeout"
