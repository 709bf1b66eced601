"""Evaluation figures are real PNG files of a sensible size, and inputs are validated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.errors import DataError
from medtl.evaluate.plots import plot_confusion, plot_roc, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, min_px: int = 100) -> tuple[int, int]:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = img.size
        arr = np.asarray(img.convert("L"))
    assert width > min_px and height > min_px
    assert arr.std() > 5  # something was drawn, not a blank canvas
    return width, height


def _binary(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, np.column_stack([1 - p1, p1])


def test_plot_roc_binary_with_folds(tmp_path):
    y, p = _binary()
    out = plot_roc(y, p, ["no contrast", "contrast"], tmp_path / "sub" / "roc.png",
                   fold_ids=np.arange(len(y)) % 5, title="ROC, 5 folds")
    assert out == tmp_path / "sub" / "roc.png"  # parent folder created, path returned
    _assert_png(out)
    # a fold with one class only is skipped, not an error
    folds = np.where(y == 1, 0, 1)
    _assert_png(plot_roc(y, p, ["a", "b"], tmp_path / "roc_onefold.png", fold_ids=folds))


def test_plot_roc_multiclass(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    p = rng.dirichlet([1, 1, 1], 150)
    p[np.arange(150), y] += 0.5
    p /= p.sum(axis=1, keepdims=True)
    _assert_png(plot_roc(y, p, ["benign", "malignant", "normal"], tmp_path / "roc3.png"))


def test_plot_roc_validates(tmp_path):
    y, p = _binary()
    with pytest.raises(DataError, match="3 class_names given but 'proba' has 2 columns"):
        plot_roc(y, p, ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(DataError, match="fold_ids"):
        plot_roc(y, p, ["a", "b"], tmp_path / "x.png", fold_ids=np.zeros(3))
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion(tmp_path, normalize):
    y = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    pred = np.array([0, 1, 1, 1, 2, 0, 2, 3])
    names = ["benign", "malignant", "normal tissue", "other"]
    out = plot_confusion(y, pred, names, tmp_path / f"cm_{normalize}.png", normalize=normalize)
    _assert_png(out)
    with pytest.raises(DataError, match="outside 0..1"):
        plot_confusion(y, pred, ["a", "b"], tmp_path / "bad.png")


def test_plot_training_curves_per_fold(tmp_path):
    history = [
        {"epoch": e, "train_loss": 1 / e + f / 10, "val_loss": 1.2 / e, "val_auc": 0.5 + e / 30,
         "lr": 1e-3, "fold": f}
        for f in range(3) for e in range(1, 9)
    ]
    w_two, _ = _assert_png(plot_training_curves(history, tmp_path / "train.png"))
    # no fold key, losses only: a single, narrower panel
    single = [{"epoch": e, "train_loss": 1 / e} for e in range(1, 5)]
    w_one, _ = _assert_png(plot_training_curves(single, tmp_path / "train1.png"))
    assert w_one < w_two
    with pytest.raises(DataError, match="non-empty list"):
        plot_training_curves([], tmp_path / "empty.png")
    with pytest.raises(DataError, match="no numeric series"):
        plot_training_curves([{"epoch": 1, "fold": 0}], tmp_path / "none.png")


def test_plot_training_curves_many_folds_one_panel_per_quantity(tmp_path):
    """train/val series of one quantity share a panel; bookkeeping keys are not drawn."""
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_auc": 0.5 + e / 30,
                "lr": 1e-3, "fold": f"fold{f}"} for f in range(10) for e in range(1, 13)]
    plain = plot_training_curves(history, tmp_path / "plain.png").read_bytes()
    timed = [dict(h, train_seconds=3.0 + h["epoch"], train_images_per_s=40.0 * h["epoch"]) for h in history]
    assert plot_training_curves(timed, tmp_path / "timed.png").read_bytes() == plain
    width, height = _assert_png(tmp_path / "plain.png")
    assert width >= 1000 and width / height > 2  # two panels (loss, auc) side by side
    three = [dict(h, val_acc=0.5 + h["epoch"] / 40) for h in history]
    w3, h3 = _assert_png(plot_training_curves(three, tmp_path / "three.png"))
    assert w3 == width and h3 > 1.5 * height  # a 2 x 2 grid, the legend in the spare cell


def test_plots_leave_no_open_figures_and_keep_the_backend(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    y, p = _binary()
    for i in range(3):
        plot_roc(y, p, ["a", "b"], tmp_path / f"r{i}.png")
        plot_confusion(y, p.argmax(1), ["a", "b"], tmp_path / f"c{i}.png")
    assert plt.get_fignums() == before  # nothing registered with pyplot, nothing leaked
    assert matplotlib.get_backend() == backend  # a user's (notebook) backend is untouched
    assert len(list(tmp_path.glob("*.png"))) == 6
