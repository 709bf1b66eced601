"""The HTML report in a REAL headless browser (Debian's ``chromium``).

Needs: ``apt-get install -y chromium`` and ``pip install playwright`` (the Python package
only: its own driver talks to the system Chromium; ``playwright install`` is NOT needed).
Without Chromium the tests skip locally and fail on CI (``CI`` set). Without playwright the
Playwright tests do the same, and the command-line test still runs.

The layout test takes a full-page screenshot at a laptop width (1280 px) and a narrow one
(800 px) and checks that no table or figure runs off the page; set ``MEDTL_SCREENSHOT_DIR``
to keep copies of the screenshots for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.evaluate.plots import plot_roc, plot_training_curves
from medtl.explain._plots import faithfulness_plot, randomization_plot
from medtl.explain.overlay import montage_png, panel_png
from medtl.explain.report import write_report

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TITLE = "Browser check — saliency report"
VIEWPORTS = {"laptop": 1280, "narrow": 800}
# Elements whose box ends right of the page, and the page's own horizontal overflow.
OVERFLOW_JS = """() => {
  const doc = document.documentElement, width = doc.clientWidth, out = [];
  for (const el of document.querySelectorAll('table, img, figure, pre')) {
    const box = el.getBoundingClientRect();
    if (box.width > 0 && (box.right > width + 0.5 || box.left < -0.5)) {
      const name = el.id || el.getAttribute('alt') || el.className || '';
      out.push(`${el.tagName.toLowerCase()} '${name.slice(0, 60)}': ${Math.round(box.left)}..${Math.round(box.right)} px`);
    }
  }
  return {clientWidth: width, scrollWidth: doc.scrollWidth, cutOff: out};
}"""


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("The playwright Python package (`pip install playwright`; no `playwright "
                 "install`, it drives the system Chromium)")
    return sync_playwright


def _missing(what: str) -> None:
    """Fail on CI, skip elsewhere."""
    message = f"{what} is needed for the browser tests."
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in (os.environ.get("MEDTL_CHROMIUM"), "chromium", "chromium-browser"):
        found = shutil.which(name) if name else None
        if found:
            return found
    _missing("Chromium (install it with `apt-get update && apt-get install -y chromium`)")
    raise AssertionError("unreachable")


@pytest.fixture
def report(tmp_path: Path) -> Path:
    """A small report shaped like a 5-fold ``medtl cv`` run's: its ROC and training-curve
    plots, the per-fold metrics with every key the run writes, a 2D and a 3D case (panel +
    montage) and the trust checks with their two plots (one method flagged)."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    p1 = np.clip(0.3 * y + 0.7 * rng.random(60), 0, 1)
    plot_roc(y, np.column_stack([1 - p1, p1]), ["normal", "lesion"], tmp_path / "roc.png",
             fold_ids=np.arange(60) % 5)
    history = [{"epoch": e, "train_loss": 0.7 / e + 0.02 * f, "val_loss": 0.8 / e ** 0.5,
                "val_auc": 0.5 + 0.035 * e, "val_acc": 0.5 + 0.03 * e, "lr": 1e-3,
                "train_seconds": 2.5, "train_images_per_s": 40.0, "fold": f"fold{f}"}
               for f in range(5) for e in range(1, 13)]
    plot_training_curves(history, tmp_path / "training.png", title="Training curves")
    yy, xx = np.mgrid[:40, :40]
    img = 0.2 + 0.6 * np.exp(-((yy - 18) ** 2 + (xx - 22) ** 2) / 60)
    cam = np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / 120)
    vol = np.stack([img * (k + 1) / 5 for k in range(5)])
    vcam = np.stack([cam * (1.0 if k == 3 else 0.2) for k in range(5)])  # slice 4 of 5 shown
    cases = [
        {"case_id": "C-0001", "label": "pos", "pred": "pos", "prob": 0.9, "correct": True,
         "fold": 0, "panel_png": panel_png(img, {"gradcam": cam, "ig": cam}, title="C-0001",
                                           mask=img > 0.6),
         "group": "correct, most confident", "ig_delta": 0.01, "mask_agreement": None},
        {"case_id": "V-0002", "label": "pos", "pred": "neg", "prob": 0.4, "correct": False,
         "fold": 1, "panel_png": panel_png(vol, {"gradcam": vcam}, title="V-0002"),
         "extra_pngs": [("gradcam: three planes + MIP", montage_png(vol, vcam, n_slices=3))]},
    ]
    # five cascade steps with the module names of a real run: the widest table of the page
    steps = [{"randomized": name, "spearman": [r], "ssim": [r], "mean_abs_spearman": r, "mean_ssim": r}
             for name, r in (("net.classifier", 0.351), ("net.conv_head", 0.168), ("net.blocks.6", 0.269),
                             ("net.blocks.5", 0.18), ("all (10 stages)", 0.1))]
    flat = [dict(s, spearman=[0.97], mean_abs_spearman=0.97) for s in steps]
    randomization = {"gradcam": {"threshold": 0.5, "steps": steps, "passed": True, "verdict": "passed"},
                     "ig": {"threshold": 0.5, "steps": flat, "passed": False, "verdict": "FAILED: no change"},
                     "smoothgrad": {"threshold": 0.5, "steps": steps, "passed": True, "verdict": "passed"}}
    curve = {"fractions": [0, 0.5, 1], "deletion": [0.9, 0.3, 0.1], "insertion": [0.2, 0.8, 0.9],
             "random_deletion": [0.9, 0.7, 0.1], "random_insertion": [0.2, 0.4, 0.9]}
    faith = {"gradcam": {"deletion_auc": 0.4, "random_deletion_auc": 0.6, "insertion_auc": 0.7,
                         "random_insertion_auc": 0.5, "deletion_better_than_random": True,
                         "insertion_better_than_random": True, "n_images": 1}}
    local = {"gradcam": {"n_cases": 5, "pointing_hits": 4, "pointing_game": 0.8,
                         "mean_energy_in_mask": 0.3, "mean_mask_fraction": 0.02}}
    check_plots = {"Randomisation test": randomization_plot(randomization, 0.5),
                   "Deletion and insertion curves": faithfulness_plot({"gradcam": [curve]})}
    folds = [{"fold": f"fold{f}", "repeat": 0, "site": None, "n_test": 12, "n_test_patients": 12,
              "best_epoch": 8 + f, "threshold": 0.5, "temperature": None, "selected": None,
              "auc": 0.9 - 0.0123 * f, "acc": 0.8 + 0.01 * f, "balanced_acc": 0.81 + 0.005 * f,
              "sensitivity": 0.7 + 0.03 * f, "specificity": 0.9 - 0.02 * f, "f1": 0.78 - 0.004 * f,
              "ece": 0.05 + 0.01 * f} for f in range(5)]
    metrics = {"folds": folds, "pooled": {"auc": {"value": 0.85, "ci95": [0.78, 0.91]}}}
    run_info = {"config_name": "demo", "model": "tiny", "config_hash": "0123456789abcdef" * 4,
                "gradcam_layer": "encoder.blocks.5.0.conv_pwl (6x6 map)"}
    return write_report(tmp_path / "report.html", title=TITLE, run_info=run_info, metrics=metrics,
                        plots={"ROC curve": tmp_path / "roc.png",
                               "Training curves": tmp_path / "training.png"}, cases=cases,
                        randomization=randomization, faithfulness=faith, localisation=local,
                        check_plots=check_plots, notes=["offline"])


def test_report_in_playwright(chromium: str, report: Path, tmp_path: Path) -> None:
    sync_playwright = _playwright()
    errors: list[str] = []
    remote: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:"))
                    else remote.append(r.url))
            page.goto(report.as_uri(), wait_until="load")
            assert page.title() == TITLE
            images = page.eval_on_selector_all(
                "img", "els => els.map(i => [i.complete, i.naturalWidth, i.alt])")
            assert len(images) == 7  # ROC, training, 2 check plots, 2D panel, 3D panel + montage
            assert all(done and width > 0 for done, width, _ in images), images
            assert page.locator("#metrics-pooled").is_visible()
            assert page.locator("#metrics-folds").is_visible()
            assert "0.780 – 0.910" in page.locator("#metrics-pooled").inner_text()
            folds = page.locator("#metrics-folds").inner_text()
            assert "fold4" in folds and "0.851" in folds and "mean" in folds  # 3 decimals
            assert "temperature" not in folds and "repeat" not in folds  # never set / constant
            assert "threshold 0.500" in page.locator("#metrics-folds-constant").inner_text()
            assert page.get_by_text("V-0002", exact=True).is_visible()
            assert page.locator("#randomization-verdicts").is_visible()
            assert "FLAGGED" in page.locator("#randomization-verdicts").inner_text()
            assert "80%" in page.locator("#localisation").inner_text()
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert not remote, remote
    with Image.open(shot) as im:
        assert im.size[0] == 1280 and im.size[1] > 900
        grey = np.asarray(im.convert("L"), dtype=np.float32)
        assert grey.std() > 20  # not blank: text, tables and images


def test_report_in_chromium_cli(chromium: str, report: Path, tmp_path: Path) -> None:
    """The same page through plain ``chromium --headless`` (no Python driver involved)."""
    dom = subprocess.run([chromium, *CHROMIUM_ARGS, "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"<title>{TITLE}</title>" in dom
    assert 'id="metrics-pooled"' in dom and "C-0001" in dom and "V-0002" in dom
    shot = tmp_path / "cli.png"
    subprocess.run([chromium, *CHROMIUM_ARGS, f"--screenshot={shot}", "--window-size=1200,900",
                    report.as_uri()], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as im:
        assert im.size == (1200, 900)
        # a rendered page, not a blank one: the dark header band and a light body
        grey = np.asarray(im.convert("L"))
        assert grey[:40].mean() < 100 and grey[200:].mean() > 150


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_report_fits_the_page(chromium: str, report: Path, tmp_path: Path, viewport: str) -> None:
    """No table or figure is cut off: every one ends inside the page, which does not scroll
    sideways, at a laptop width and a narrow one; the wide training figure is shown large."""
    sync_playwright = _playwright()
    width = VIEWPORTS[viewport]
    shot = tmp_path / f"report-{width}px.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(report.as_uri(), wait_until="load")
            layout = page.evaluate(OVERFLOW_JS)
            training = page.eval_on_selector(
                'img[alt="Training curves"]', "i => [i.getBoundingClientRect().width, i.naturalWidth]")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    keep = os.environ.get("MEDTL_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(keep) / shot.name)
    assert layout["cutOff"] == [], layout
    assert layout["scrollWidth"] <= layout["clientWidth"], layout
    shown, natural = training
    assert shown >= min(natural, 0.8 * layout["clientWidth"]), training  # a row of its own
    with Image.open(shot) as im:
        assert im.size[0] == width and im.size[1] > 900  # the full page, not wider than the view
