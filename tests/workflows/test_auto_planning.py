"""`medtl auto`'s planning rules, each on its own: they choose as docs/auto.md says under different
data sizes and budgets (fake timings, no network is built)."""

from __future__ import annotations

import pytest
import yaml

from medtl.config import config_hash, load_config
from medtl.data.fingerprint import Fingerprint
from medtl.errors import DataError
from medtl.workflows import planning as P
from medtl.workflows.planning import Timing


def _fp(n=780, splits=True, shape=(28, 28), dims=2, minority=0.27, patients=None, **kw) -> Fingerprint:
    small = int(n * minority)
    counts = {"a": small, "b": n - small}
    return Fingerprint(
        source="medmnist" if splits else "manifest", n_cases=n, n_patients=patients or n, max_cases_per_patient=1,
        class_counts=counts, patients_per_class=kw.pop("patients_per_class", dict(counts)),
        splits={"train": int(n * 0.7), "val": int(n * 0.1), "test": n - int(n * 0.7) - int(n * 0.1)} if splits else {},
        spatial_dims=dims, shape=shape, shape_min=shape, shape_max=shape, **kw)


def _timing(step_at_128=1.0):
    """Cost growing with the pixels: ``step_at_128`` s per training step at 128 px."""
    def t(encoder, side):
        scale = (side / 128) ** 2
        return Timing(encoder, side, 32, step_at_128 * scale, 0.5 * step_at_128 * scale)
    return t


def test_evaluation_official_split_or_grouped_cv():
    assert P.choose_evaluation(_fp())[:2] == ("train", 1)
    wf, k, why = P.choose_evaluation(_fp(n=100, splits=False, patients=50))
    assert (wf, k) == ("cv", 5) and "patient-grouped" in why
    wf, k, why = P.choose_evaluation(_fp(n=100, splits=False, patients_per_class={"a": 3, "b": 40}))
    assert k == 3 and "smallest class has 3 patients" in why
    with pytest.raises(DataError, match="at least 2 patients per class"):
        P.choose_evaluation(_fp(n=100, splits=False, patients_per_class={"a": 1, "b": 40}))


def test_intensity_from_the_values():
    assert P.choose_intensity(_fp(is_8bit=True, value_range=(0.0, 250.0)))[0] == {"mode": "range", "vmin": 0,
                                                                                 "vmax": 255}
    ct, why = P.choose_intensity(_fp(is_hu=True, modality="CT", value_range=(-1000.0, 1500.0)))
    assert ct["mode"] == "multiwindow" and "Hounsfield" in why
    assert P.choose_intensity(_fp(modality="MR", value_range=(0.0, 4000.0)))[0]["mode"] == "percentile"


def test_preferred_side_and_ladder():
    assert P.preferred_side(_fp(shape=(28, 28)))[0] == 128            # small images upsampled
    assert P.preferred_side(_fp(shape=(512, 512)))[0] == 224          # large ones resized down
    assert P.preferred_side(_fp(shape=(150, 180)))[0] == 180
    assert P.preferred_side(_fp(shape=(28, 28, 28), dims=3))[0] == 28  # volumes keep their side ...
    assert P.preferred_side(_fp(shape=(100, 200, 200), dims=3))[0] == 64  # ... up to 64
    assert P.side_ladder(128, 2) == [128, 96, 64] and P.side_ladder(28, 3) == [28, 24, 16]


def test_encoder_best_probe_auc_ties_go_to_the_cheaper_step():
    rows = [{"encoder": "a", "probe_auc": 0.80, "logme": 0.0}, {"encoder": "b", "probe_auc": 0.86, "logme": -1.0},
            {"encoder": "c", "probe_auc": 0.855, "logme": -2.0}]
    slow_b = {"a": Timing("a", 128, 32, 1.0, 0.5), "b": Timing("b", 128, 32, 3.0, 1), "c": Timing("c", 128, 32, 1.0, 1)}
    assert P.choose_encoder(rows, slow_b)[0] == "c"                 # b and c tie: c is cheaper
    enc, why = P.choose_encoder(rows, {**slow_b, "b": Timing("b", 128, 32, 0.5, 1)})
    assert enc == "b" and "linear-probe AUC" in why and "0.860" in why
    assert P.choose_encoder([{"encoder": "x", "probe_auc": None, "logme": 1.0},
                             {"encoder": "y", "probe_auc": None, "logme": 2.0}], {})[0] == "y"  # LogME fallback


def test_batch_size_and_tiny_data():
    assert P.choose_batch_size(546)[0] == 32 and P.choose_batch_size(200)[0] == 16 and P.choose_batch_size(30)[0] == 8
    assert P.is_tiny(_fp(), 546) is None
    assert "training cases" in P.is_tiny(_fp(), 60)
    assert "patients in the smallest class" in P.is_tiny(_fp(n=400, patients_per_class={"a": 10, "b": 300}), 300)


@pytest.mark.parametrize("budget_min, expect", [
    (60, ("finetune", 128, 20)),   # everything fits: the target epochs at the preferred size
    (2.9, ("finetune", 128, 12)),  # fewer epochs, still >= 60 % of the target, at 128 px
    (2.0, ("finetune", 96, 13)),   # 60 % of the target no longer fits at 128 px: a smaller size
    (0.8, ("finetune", 64, 5)),    # only the minimum epochs fit, at the smallest size
    (0.2, ("probe", 128, 0)),      # not even 5 epochs: the linear probe
])
def test_fit_budget_official_split(budget_min, expect):
    fp = _fp()
    t = _timing(0.5)
    mode, side, epochs, folds, why = P.fit_budget(fp, workflow="train", folds=1, sides=P.side_ladder(128, 2),
                                                  target_epochs=20, batch_size=32, tta=True,
                                                  available_s=budget_min * 60, timing=lambda s: t("m", s))
    assert (mode, side, epochs) == expect and folds == 1 and why
    if mode == "finetune":  # what was chosen fits the budget, as estimated
        est = P.estimate_seconds(fp, mode=mode, workflow="train", folds=1, timing=t("m", side), epochs=epochs,
                                 batch_size=32, tta=True)
        assert est["total"] <= budget_min * 60


def test_fit_budget_cv_drops_to_three_folds_before_the_probe():
    fp = _fp(n=600, splits=False)
    t = _timing(0.5)
    kw = dict(workflow="cv", folds=5, sides=[64], target_epochs=20, batch_size=32, tta=True,
              timing=lambda s: t("m", s))
    five = P.estimate_seconds(fp, mode="finetune", workflow="cv", folds=5, timing=t("m", 64), epochs=5,
                              batch_size=32, tta=True)["total"]
    mode, side, epochs, folds, _ = P.fit_budget(fp, available_s=five * 0.9, **kw)
    assert (mode, folds) == ("finetune", 3) and epochs >= 5
    assert P.fit_budget(fp, available_s=five * 1.01, **kw)[3] == 5


def _base(tmp_path):
    return {"name": "tiny", "data": {"format": "medmnist", "path": str(tmp_path / "x.npz"), "split": "official"}}


def test_plan_run_fine_tunes_with_reasons_and_a_loadable_yaml(tmp_path):
    fp = _fp(is_8bit=True, value_range=(0.0, 255.0))
    rows = [{"encoder": "tf_efficientnet_lite0", "probe_auc": 0.80, "logme": -0.5},
            {"encoder": "mobilenetv2_100.tv_in1k", "probe_auc": 0.85, "logme": -0.6}]
    plan = P.plan_run(fp, _base(tmp_path), budget_s=20 * 60, spent_s=60, candidates=[r["encoder"] for r in rows],
                      rows=rows, timing=_timing(0.5))
    c = plan.config
    assert (plan.workflow, plan.mode) == ("train", "finetune")
    assert c["model"]["name"] == "mobilenetv2_100.tv_in1k" and c["data"]["image_size"] == [128, 128]
    assert c["data"]["intensity"]["mode"] == "range" and c["train"]["epochs"] == 20 and c["train"]["batch_size"] == 32
    assert {"model.name", "data.image_size", "train.epochs", "data.intensity", "data.split"} <= set(plan.reasons)
    assert plan.estimate["total"] <= 19 * 60 and not plan.notes
    text = P.plan_yaml(plan.config, plan.reasons, ["header line"])
    assert text.startswith("# header line\n") and "# best linear-probe AUC" in text
    (tmp_path / "plan.yaml").write_text(text)
    assert yaml.safe_load(text) == plan.config
    assert config_hash(load_config(tmp_path / "plan.yaml")) == config_hash(load_config(plan.config))


def test_plan_run_probes_tiny_data_and_tiny_budgets(tmp_path):
    tiny = _fp(n=80, is_8bit=True)
    plan = P.plan_run(tiny, _base(tmp_path), budget_s=600, spent_s=10, candidates=["tf_efficientnet_lite0"],
                      rows=None, timing=_timing(0.5))
    assert plan.mode == "probe" and plan.config["train"]["strategy"]["name"] == "linear_probe"
    assert "tiny data" in plan.reasons["train.strategy.name"] and plan.config["train"]["tta"] is False
    load_config(plan.config)
    broke = P.plan_run(_fp(is_8bit=True), _base(tmp_path), budget_s=30, spent_s=10,
                       candidates=["tf_efficientnet_lite0"], rows=None, timing=_timing(0.5))
    assert broke.mode == "probe" and "does not fit" in broke.reasons["train.strategy.name"]


def test_plan_run_keeps_the_users_keys_and_applies_a_recipe(tmp_path):
    base = {**_base(tmp_path), "train": {"lr": 0.01, "epochs": 7}}
    recipe = {"train.lr": 3e-4, "train.scheduler": "onecycle", "train.epochs": 30}
    plan = P.plan_run(_fp(is_8bit=True), base, budget_s=3600, spent_s=0, candidates=["m"], rows=None,
                      timing=_timing(0.2), recipe=lambda name: (recipe, "AUC 0.9 on X"),
                      user_keys={"train", "train.lr", "train.epochs"})
    t = plan.config["train"]
    assert t["lr"] == 0.01 and t["epochs"] == 7                     # the user's values stay
    assert t["scheduler"] == "onecycle" and "scheduler: the recipe of m" in plan.reasons["train.scheduler"]
    assert "measured: AUC 0.9 on X" in plan.reasons["train.scheduler"]
    assert "train.lr" not in plan.reasons and "train.epochs" not in plan.reasons


def test_recipe_overrides_accepts_nested_dotted_and_bare_keys():
    class Rec:
        recipe = {"train": {"lr": 3e-4, "augment": {"flip": True}}, "data.image_size": [128, 128], "epochs": 20}

    assert P.recipe_overrides(Rec()) == {"train.lr": 3e-4, "train.augment.flip": True,
                                         "data.image_size": [128, 128], "train.epochs": 20}
    assert P.recipe_overrides(object()) == {}
    from medtl.models._registry import Recipe

    class Record:
        recipe = Recipe({"train.lr": 3e-4, "train.scheduler": "onecycle"}, evidence="measured")

    assert P.recipe_overrides(Record()) == {"train.lr": 3e-4, "train.scheduler": "onecycle"}


def test_plan_yaml_quotes_what_yaml_needs_and_reads_back():
    cfg = {"name": "x", "data": {"path": "a: b.csv", "labels": None},
           "continual": {"site_shift": {"site A: 1": "xray_b", "2": "ct_soft_tissue"}},
           "cv": {"grid": {"train.lr": [0.0003, 1e-05]}}, "train": {"augment": {"flip": True}}}
    text = P.plan_yaml(cfg, {"data.path": "why " * 40, "continual.site_shift": "because"}, ["a header"])
    assert yaml.safe_load(text) == cfg
    assert "  # because\n  site_shift: {'site A: 1': xray_b, '2': ct_soft_tissue}\n" in text
    assert all(len(line) <= 100 for line in text.splitlines() if line.lstrip().startswith("#"))


def test_seed_members_counts_the_fine_tunes_a_budget_holds():
    est = {"decode": 10.0, "features": 0.0, "training": 100.0, "evaluation": 20.0, "overhead": 30.0, "total": 160.0}
    assert P.seed_members(est, 150)[0] == 1                       # not even one more
    n, why = P.seed_members(est, 40 + 3 * 120 + 5)
    assert n == 3 and "3 fine-tunes" in why
    assert P.seed_members(est, 10_000)[0] == P.MAX_SEED_MEMBERS
    assert P._times_members(est, 3) == {**est, "training": 300.0, "evaluation": 60.0, "total": 400.0}


def test_plan_run_spends_a_spare_budget_on_a_seed_ensemble(tmp_path):
    fp = _fp(is_8bit=True, value_range=(0.0, 255.0))
    args = dict(candidates=["m"], rows=None, timing=_timing(0.2))
    one = P.plan_run(fp, _base(tmp_path), budget_s=10_000, spent_s=0, **args)
    n = one.config["train"]["ensemble_seeds"]
    assert n == P.MAX_SEED_MEMBERS and "fine-tunes" in one.reasons["train.ensemble_seeds"]
    single = P.estimate_seconds(fp, mode="finetune", workflow="train", folds=1, timing=_timing(0.2)("m", 128),
                                epochs=one.config["train"]["epochs"], batch_size=32, tta=True)
    assert one.estimate["total"] > 3 * (single["training"] + single["evaluation"])
    assert load_config(one.config).train.ensemble_seeds == n
    # a budget that holds one full run but not two: no ensemble
    tight = P.plan_run(fp, _base(tmp_path), budget_s=single["total"] * 1.5, spent_s=0, **args)
    assert "ensemble_seeds" not in tight.config["train"] and tight.config["train"]["epochs"] == 20
    # fewer epochs than the target: the budget goes to epochs, not members
    short = P.plan_run(fp, _base(tmp_path), budget_s=single["total"] * 0.8, spent_s=0, **args)
    assert short.config["train"]["epochs"] < 20 and "ensemble_seeds" not in short.config["train"]
    # the user's value stays, and the estimate counts its members
    base = {**_base(tmp_path), "train": {"ensemble_seeds": 2}}
    mine = P.plan_run(fp, base, budget_s=10_000, spent_s=0, user_keys={"train", "train.ensemble_seeds"}, **args)
    assert mine.config["train"]["ensemble_seeds"] == 2 and "train.ensemble_seeds" not in mine.reasons
    assert mine.estimate["training"] == 2 * single["training"]
