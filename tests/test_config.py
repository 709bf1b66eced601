"""Typed configs: shipped YAMLs validate, overrides apply, bad keys/types are named, and the
rules across keys fail at load time with the key, the valid choice and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import ValidationError

import medtl.config as config_module
import medtl.config._memory as config_memory
import medtl.config._rules as config_rules
from medtl.config import (CT_WINDOWS, CV_SCHEMES, DEVICES, EXPLAIN_METHODS, SELECT_METRICS, WINDOW_PRESETS, Config,
                          ExplainConfig, IntensityConfig, TrainConfig, config_hash, dump_config, load_config)
from medtl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SHIPPED = [*CONFIGS, ROOT / "medtl" / "data" / "demo.yaml"]
BASE = {"data": {"path": "m.csv"}}  # manifest, percentile intensity: valid with every default


def _error(overrides: list[str], base: dict | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(base or BASE, overrides)
    return str(err.value)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name
    assert cfg.data.path


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(CONFIGS[0], ["train.epochs=3", "data.image_size=[64, 64, 64]", "model.pretrained=false"])
    assert cfg.train.epochs == 3 and cfg.data.image_size == [64, 64, 64] and cfg.model.pretrained is False


def test_unknown_key_is_named_with_valid_options_and_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS[0], ["train.epoch=3"])
    msg = str(err.value)
    assert "train.epoch" in msg and "Did you mean 'epochs'" in msg and "batch_size" in msg


@pytest.mark.parametrize("override, valid", [
    ("data.labels.cvs=x", "csv, file_column, label_column, patient_column, site_column"),  # X | None section
    ("data.intensity.windows=[{center: 40, width: 400, widht: 1}]", "center, width"),    # list of X | preset
])
def test_unknown_key_in_optional_or_union_section_lists_its_keys(override, valid):
    msg = _error([override])
    assert f"Valid keys here: {valid}." in msg and "Valid keys here: ." not in msg
    assert "WindowSpec" not in msg and "literal[" not in msg  # union tags are pydantic's, not the user's


def test_unknown_key_in_optional_section_suggests_a_near_match():
    assert "Did you mean 'csv'?" in _error(["data.labels.cvs=x"])


def test_bad_choice_suggests_a_near_match():
    msg = _error(["cv.scheme=nestd"])
    assert "'cv.scheme'" in msg and "Did you mean 'nested'?" in msg


def test_wrong_type_is_named():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS[0], ["train.epochs=many"])
    assert "train.epochs" in str(err.value) and "many" in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(CONFIGS[0], ["train.epochs"])


def test_missing_file_message():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_shared_data_variable_resolves(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTL_SHARED_DATA", str(tmp_path))
    cfg = load_config(ROOT / "configs" / "breastmnist.yaml")
    assert cfg.resolved_data_path() == tmp_path / "medmnist" / "breastmnist.npz"


def test_dump_roundtrip_and_hash(tmp_path):
    cfg = load_config(CONFIGS[0])
    path = dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(yaml.safe_load(path.read_text()))
    assert again.train == cfg.train
    assert config_hash(cfg) != config_hash(load_config(CONFIGS[0], ["train.lr=0.5"]))


def test_yaml_on_off_mean_the_words():
    """YAML 1.1 reads a bare on/off as a bool; train.amp and train.compile take them as the words."""
    cfg = load_config(BASE, ["train.amp=on", "train.compile=off"])
    assert cfg.train.amp == "on" and cfg.train.compile == "off"
    assert load_config(yaml.safe_load("data: {path: m.csv}\ntrain: {amp: off}")).train.amp == "off"


# -- rules across keys: one failing config each; the message names the key, the valid choice, the fix --
RULES = [
    # (overrides, texts the message must hold)
    (["cv.scheme=nested"], ["cv.scheme=nested needs a cv.grid", "cv.grid={", "cv.scheme=kfold"]),
    (["cv.scheme=nested", 'cv.grid={"train.lr": []}'], ["cv.grid['train.lr'] must be a non-empty list", "Got []"]),
    (["cv.scheme=nested", 'cv.grid={"train.lrr": [0.1]}'],
     ["cv.grid key 'train.lrr' is not a config key", "Did you mean 'train.lr'?", "Valid keys under 'train'"]),
    (["cv.scheme=nested", 'cv.grid={"trian.lr": [0.1]}'], ["'trian.lr'", "Did you mean 'train.lr'?"]),
    (["cv.scheme=nested", 'cv.grid={"train.strategy": [1]}'], ["names a section", "'train.strategy.name'"]),
    (["cv.scheme=nested", 'cv.grid={"train.lr.x": [1]}'], ["goes below 'train.lr', which is a value, not a section"]),
    (["cv.scheme=nested", 'cv.grid={"data.image_size": [64]}'], ["cannot be searched", "train, model, adapt"]),
    (["cv.scheme=nested", 'cv.grid={"train.lr": [0.1, -1]}'],
     ["cv.grid['train.lr'] value -1 is not valid", "train.lr", "greater than 0"]),
    (["cv.scheme=nested", 'cv.grid={"train.strategy.name": ["llrd", "lorra"]}'],
     ["cv.grid['train.strategy.name'] value 'lorra'", "'lora'"]),
    (["cv.scheme=nested", 'cv.grid={"train.amp": ["on"]}', "train.device=cpu"],
     ["cv.grid['train.amp'] value 'on' is not valid", "train.amp=on needs a CUDA device"]),
    (['cv.grid={"train.lr": [0.1]}'], ["cv.grid only applies to cv.scheme=nested", "Got cv.scheme=kfold"]),
    (["cv.n_repeats=3"], ["cv.n_repeats=3 only applies to cv.scheme=repeated", "Got cv.scheme=kfold"]),
    (["cv.scheme=repeated"], ["'n_repeats' parameter of cv.scheme=repeated must be an int >= 2", "Got 1 instead"]),
    (["train.amp=on", "train.device=cpu"], ["train.amp=on needs a CUDA device, but train.device=cpu",
                                            "train.amp=auto"]),
    (["evaluate.target_sensitivity=0"], ["evaluate.target_sensitivity", "greater than 0"]),
    (["evaluate.target_sensitivity=1.5"], ["evaluate.target_sensitivity", "less than or equal to 1"]),
    (["data.image_size=[8, 16, 16]"], ["data.spatial_dims=2 but data.image_size=[8, 16, 16] has 3 entries",
                                       "spatial_dims: 3 with image_size [D, H, W]"]),
    (["data.spatial_dims=3"], ["data.spatial_dims=3 but data.image_size=[224, 224] has 2 entries"]),
    (["data.spacing=[1, 1, 1]"], ["data.spacing must give one pixel size (mm) per data.image_size entry (2)",
                                  "Got data.spacing=[1.0, 1.0, 1.0]"]),
    (["data.format=folder"], ["data.format=folder needs a data.labels section", "data.labels.csv"]),
    (["data.intensity.mode=window"], ["data.intensity.mode=window needs a preset (lung, mediastinum",
                                      "Got neither", "data.intensity.preset=lung"]),
    (["data.intensity.mode=window", "data.intensity.center=40"], ["or both center and width", "Got only center"]),
    (["data.intensity.mode=window", "data.intensity.preset=lung", "data.intensity.width=400"],
     ["data.intensity.preset=lung and data.intensity.width are both set"]),
    (["data.intensity.preset=lung"], ["data.intensity.preset only applies to data.intensity.mode=window",
                                      "Got mode=percentile"]),
    (["data.intensity.mode=multiwindow", "data.intensity.windows=[]"],
     ["data.intensity.mode=multiwindow needs at least one window", "Got an empty list"]),
    (["data.intensity.lower=99", "data.intensity.upper=1"], ["data.intensity.lower must be below data.intensity.upper",
                                                             "Got lower=99.0, upper=1.0"]),
    (["data.intensity.mode=range", "data.intensity.vmin=255", "data.intensity.vmax=0"],
     ["data.intensity.vmin must be below data.intensity.vmax", "Got vmin=255.0, vmax=0.0"]),
    (["data.class_names=[a, b, a]"], ["data.class_names", "distinct", "['a']"]),
    (["data.class_names=[a]"], ["data.class_names", "at least 2 items"]),
    (["model.conversion_3d=acs"], ["model.conversion_3d=acs only applies to 3D data (data.spatial_dims=3)",
                                   "Got data.spatial_dims=2"]),
    (["train.strategy.name=linear_probe", "train.strategy.probe_head=mlp", "train.class_weighted=true"],
     ["train.class_weighted=true needs train.strategy.probe_head=logistic", "Got probe_head=mlp"]),
    (["train.strategy.probe_C=[]"], ["train.strategy.probe_C", "at least 1 item"]),
    (["train.strategy.probe_C=[0.1, 0]"], ["train.strategy.probe_C.1", "greater than 0"]),
    (["adapt.method=dann"], ["adapt.method=dann needs a target site", "cv.scheme=leave_one_site_out",
                             "adapt.target_site"]),
    (["adapt.method=mmd", "cv.scheme=leave_one_site_out", "adapt.target_site=b"],
     ["adapt.target_site='b' conflicts with cv.scheme=leave_one_site_out", "Drop adapt.target_site"]),
    (["adapt.method=coral", "adapt.target_site=b", "adapt.use_target_unlabelled=false"],
     ["adapt.method=coral learns from unlabelled target images", "adapt.use_target_unlabelled is false"]),
    (["adapt.method=adabn", "cv.scheme=leave_one_site_out", "train.strategy.name=linear_probe"],
     ["adapt.method=adabn does not apply to train.strategy.name=linear_probe", "adapt.method=none"]),
    (["data.class_names=[a, b, c]", "evaluate.threshold=youden_val"],
     ["evaluate.threshold=youden_val applies to binary tasks only", "3 classes", "evaluate.threshold=fixed"]),
    (["explain.methods=[ig, gradcam, ig]"], ["explain.methods must name each method once", "ig repeated"]),
    (["explain.methods=[]"], ["explain.methods", "at least 1 item"]),
    (["explain.methods=[gradcm]"], ["explain.methods.0", "Did you mean 'gradcam'?"]),
    (["explain.n_correct=0", "explain.n_wrong=0", "explain.localisation=false"],
     ["no case to explain", "explain.n_correct"]),
    (["train.num_threads=0"], ["train.num_threads", "greater than or equal to 1"]),
    (["data.max_cases=0"], ["data.max_cases", "greater than or equal to 1"]),
]


@pytest.mark.parametrize("overrides, texts", RULES, ids=[" ".join(o) for o, _ in RULES])
def test_rule_fails_at_load_naming_key_and_valid_choice(overrides, texts):
    msg = _error(overrides)
    for text in texts:
        assert text in msg, f"{text!r} not in:\n{msg}"


@pytest.mark.parametrize("overrides", [
    ["cv.scheme=nested", 'cv.grid={"train.lr": [0.0003, 0.001], "train.strategy.name": [llrd, partial]}'],
    ["cv.scheme=repeated", "cv.n_repeats=3"],
    ["cv.scheme=leave_one_site_out", "adapt.method=dsbn"],
    ["adapt.method=dann", "adapt.target_site=b"],
    ["adapt.target_site=b"],  # method none: the site is only remembered
    ["train.amp=on", "train.device=cuda"],
    ["evaluate.threshold=sensitivity_val", "evaluate.target_sensitivity=1.0"],
    ["data.spatial_dims=3", "data.image_size=[16, 32, 32]", "data.spacing=[2, 1, 1]", "model.conversion_3d=acs"],
    ["data.intensity.mode=window", "data.intensity.center=40", "data.intensity.width=400"],
    ["train.strategy.name=linear_probe", "train.strategy.probe_head=mlp"],
    # nested selection wraps the probe too (medtl.workflows.trainers.NestedSelection)
    ["train.strategy.name=linear_probe", "cv.scheme=nested", 'cv.grid={"train.class_weighted": [0, 1]}'],
    ["data.class_names=[a, b, c]"],
])
def test_valid_combinations_load(overrides):
    assert isinstance(load_config(BASE, overrides), Config)


def test_grid_values_keep_their_yaml_type():
    cfg = load_config(BASE, ["cv.scheme=nested", 'cv.grid={"train.tta": [false, true], "train.epochs": [1, 2], '
                             '"train.lr": [0.001], "model.name": [resnet18]}'])
    assert cfg.cv.grid == {"train.tta": [False, True], "train.epochs": [1, 2], "train.lr": [0.001],
                           "model.name": ["resnet18"]}
    assert type(cfg.cv.grid["train.tta"][0]) is bool and type(cfg.cv.grid["train.epochs"][0]) is int


def test_every_broken_rule_is_reported_at_once():
    msg = _error(["cv.n_repeats=2", "train.amp=on", "train.device=cpu", "data.image_size=[8, 16, 16]"])
    assert "cv.n_repeats=2" in msg and "train.amp=on" in msg and "data.spatial_dims=2" in msg


def test_rules_hold_for_direct_validation_too():
    with pytest.raises(ValidationError, match="train.amp=on needs a CUDA device"):
        Config.model_validate({**BASE, "train": {"amp": "on", "device": "cpu"}})


def test_sections_built_alone_stay_plain_parameter_records():
    """Rules live on the whole run; a section passed to a function (e.g. medtl.training.fit) is checked there."""
    assert TrainConfig(amp="on", device="cpu").amp == "on"
    assert IntensityConfig(mode="multiwindow", windows=[]).windows == []


def test_folder_format_with_labels_loads():
    cfg = load_config({"data": {"format": "folder", "path": "img", "labels": {"csv": "labels.csv"}}})
    assert cfg.data.labels.csv == "labels.csv"


def test_mlflow_tracking_needs_mlflow_at_load_time(monkeypatch):
    monkeypatch.setattr(config_rules, "_module_available", lambda name: name != "mlflow")
    msg = _error(["tracking=mlflow"])
    assert "tracking=mlflow needs the 'mlflow' package" in msg and "pip install 'medtl[tracking]'" in msg
    assert "tracking=none" in msg
    # reloading a finished run's config only to read it (predict, explain) does not need MLflow
    assert load_config(BASE, ["tracking=mlflow"], check_dependencies=False).tracking == "mlflow"


def test_mlflow_tracking_loads_when_mlflow_is_installed(monkeypatch):
    monkeypatch.setattr(config_rules, "_module_available", lambda name: True)
    assert load_config(BASE, ["tracking=mlflow"]).tracking == "mlflow"


def test_module_available_does_not_import():
    assert config_rules._module_available("json") and not config_rules._module_available("no_such_module_xyz")


# -- enumerations: each set of choices is written once ----------------------------------------------
def test_enumerations_are_the_fields_choices():
    fields = {**TrainConfig.model_fields}
    assert get_args(fields["device"].annotation) == DEVICES == get_args(ExplainConfig.model_fields["device"].annotation)
    assert get_args(fields["select_metric"].annotation) == SELECT_METRICS
    assert get_args(get_args(ExplainConfig.model_fields["methods"].annotation)[0]) == EXPLAIN_METHODS
    assert set(get_args(config_module.CVConfig.model_fields["scheme"].annotation)) == set(CV_SCHEMES)
    preset = IntensityConfig.model_fields["preset"].annotation
    window_item = get_args(IntensityConfig.model_fields["windows"].annotation)[0]
    assert WINDOW_PRESETS in [get_args(a) for a in get_args(preset)]
    assert WINDOW_PRESETS in [get_args(a) for a in get_args(window_item)]
    assert tuple(CT_WINDOWS) == WINDOW_PRESETS


def test_public_names_exist():
    missing = [n for n in config_module.__all__ if not hasattr(config_module, n)]
    assert not missing


# -- bounds that follow from the memory budget; YAML that cannot explode -----------------------------
@pytest.mark.parametrize("override,text", [
    ("train.lr=.inf", "'train.lr': Input should be a finite number. Got inf."),
    ("train.lr=.nan", "'train.lr': Input should be a finite number. Got nan."),
    ("train.weight_decay=-.inf", "'train.weight_decay': Input should be a finite number. Got -inf."),
    ("data.intensity.vmax=.inf", "'data.intensity.vmax': Input should be a finite number. Got inf."),
    ("evaluate.n_bootstrap=1000000000", "'evaluate.n_bootstrap': Input should be less than or equal to 100000."),
    ("data.image_size=[60000, 60000]", "'data.image_size': Value error, image_size entries must be <= 4096"),
    ("train.batch_size=100000", "'train.batch_size': Input should be less than or equal to 65536."),
    ("data.memory_budget=lots", ("'data.memory_budget': Value error, memory_budget must be a number of bytes or "
                                 "a size such as '4GB' or '512MiB'")),
    ("data.memory_budget=1KB", "memory_budget must be at least 16 MiB (got 1 KB)"),
])
def test_values_that_cannot_work_are_refused(override, text):
    assert text in _error([override])


def test_memory_budget_parses_sizes():
    assert load_config(BASE, ["data.memory_budget=4GB"]).data.memory_budget == 4_000_000_000
    assert load_config(BASE, ["data.memory_budget=512 MiB"]).data.memory_budget == 512 << 20
    assert load_config(BASE, ["data.memory_budget=2000000000"]).data.memory_budget == 2_000_000_000
    assert load_config(BASE).data.memory_budget is None
    assert config_module.parse_bytes("1.5GiB") == 3 << 29 and config_module.parse_bytes(".5 kb") == 500
    for bad in ("-1GB", "4 parsecs", "nan", True, None):
        with pytest.raises((ValueError, TypeError)):
            config_module.parse_bytes(bad)
    assert config_module.format_bytes(4_294_967_296) == "4.29 GB"


def test_a_batch_over_the_memory_budget_is_refused():
    msg = _error(["data.memory_budget=64MB", "data.image_size=[2048, 2048]"])
    assert ("train.batch_size=32 images of 2048x2048 x 1 channel(s) as float32 need 537 MB, more than the memory "
            "budget (data.memory_budget=64 MB). Lower train.batch_size to 3 or less") in msg
    assert "explain.batch_size=16 images" in msg
    msg = _error(["data.memory_budget=16MiB", "data.image_size=[2048, 2048, 8]"])
    assert "Lower data.image_size (one image alone does not fit)" in msg
    ok = load_config(BASE, ["data.memory_budget=64MB", "data.image_size=[2048, 2048]", "train.batch_size=2",
                            "explain.batch_size=2"])
    assert ok.train.batch_size == 2


def test_the_default_budget_is_half_the_available_memory(monkeypatch):
    monkeypatch.setattr(config_memory, "available_memory", lambda: 200 << 20)
    msg = _error(["data.image_size=[1024, 1024]"])
    assert "more than the memory budget (105 MB: half of the 210 MB available; set data.memory_budget" in msg
    # reloading a finished run's config only to read it does not depend on this machine
    assert load_config(BASE, ["data.image_size=[1024, 1024]"], check_dependencies=False)


def test_available_memory_respects_the_address_space_limit(monkeypatch):
    import resource

    monkeypatch.setattr(config_memory, "_AVAILABLE", [])
    monkeypatch.setattr(config_memory, "_free_ram", lambda: 64 << 30)
    used = config_memory._proc_value("/proc/self/status", "VmSize") or 0
    cap = used + (300 << 20)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (cap, cap) if which == resource.RLIMIT_AS
                        else (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    available = config_module.available_memory()
    assert 200 << 20 < available <= 300 << 20


def _bomb(depth: int = 8, width: int = 10) -> str:
    laughs = "".join(f"l{i + 1}: &l{i + 1} [{', '.join([f'*l{i}'] * width)}]\n" for i in range(depth))
    return f"l0: &l0 [lol]\n{laughs}"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(f"data:\n  path: m.csv\n{_bomb()}cv:\n  grid: {{train.lr: *l8}}\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - t0 < 2
    assert str(err.value) == (f"Config file '{path}' is refused: the document expands to more than 100000 values "
                              "(through anchors and aliases: a YAML alias bomb?). A config holds at most 100000 "
                              "values; write the values out instead of nesting aliases.")
    with pytest.raises(ConfigError, match="cannot parse value .* alias bomb"):
        load_config(BASE, ["cv.grid={" + _bomb(6).replace("\n", ", ") + "}"])
    # anchors and aliases used as intended still load
    path.write_text("data: {path: m.csv}\ntrain: &t {epochs: 2}\nexplain: {n_correct: 2}\n")
    assert load_config(path).train.epochs == 2


def test_recursive_and_deeply_nested_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: &d\n  path: m.csv\n  x: *d\n")
    with pytest.raises(ConfigError, match="an alias refers to a node that contains it"):
        load_config(path)
    path.write_text("data: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match="the document is nested too deeply"):
        load_config(path)


def test_non_text_and_oversized_config_files_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"Config file '{path}' is not a text file: byte 0x89 at offset 0 is not UTF-8. Give a "
                              "YAML config (UTF-8 text), e.g. configs/breastmnist.yaml.")
    path.write_bytes(b"data: {path: m.csv}\n\x00\x00")
    with pytest.raises(ConfigError, match=r"is not a text file: it holds NUL bytes \(offset 20\)"):
        load_config(path)
    path.write_text("data: {path: m.csv}\n" + "# padding\n" * 110_000)
    with pytest.raises(ConfigError, match=r"c.yaml' is 1.1 MB; a config is at most 1 MiB of YAML"):
        load_config(path)
    path.write_text("\ufeffdata: {path: m.csv}\n", encoding="utf-8")  # a byte-order mark is fine
    assert load_config(path).data.path == "m.csv"
