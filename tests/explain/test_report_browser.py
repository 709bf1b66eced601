"""The HTML report in a REAL headless browser (Debian's ``chromium``).

Needs: ``apt-get install -y chromium`` and ``pip install playwright`` (the Python package
only: its own driver talks to the system Chromium; ``playwright install`` is NOT needed).
Without Chromium the tests skip locally and fail on CI (``CI`` set). Without playwright the
Playwright test does the same, and the command-line test still runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from medtl.explain._plots import faithfulness_plot, randomization_plot
from medtl.explain.overlay import montage_png, panel_png
from medtl.explain.report import write_report

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TITLE = "Browser check — saliency report"


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
    """A small report: one plot, a 2D and a 3D case (panel + montage), k-fold metrics and the
    trust checks with their two plots (one method flagged)."""
    fig = Figure(figsize=(3, 3), dpi=60)
    fig.subplots().plot([0, 0.3, 1], [0, 0.7, 1])
    fig.savefig(tmp_path / "roc.png", format="png")
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
    steps = [{"randomized": name, "spearman": [r], "ssim": [r], "mean_abs_spearman": r, "mean_ssim": r}
             for name, r in (("classifier", 0.3), ("blocks.6", 0.1))]
    flat = [dict(s, spearman=[0.97], mean_abs_spearman=0.97) for s in steps]
    randomization = {"gradcam": {"threshold": 0.5, "steps": steps, "passed": True, "verdict": "passed"},
                     "ig": {"threshold": 0.5, "steps": flat, "passed": False, "verdict": "FAILED: no change"}}
    curve = {"fractions": [0, 0.5, 1], "deletion": [0.9, 0.3, 0.1], "insertion": [0.2, 0.8, 0.9],
             "random_deletion": [0.9, 0.7, 0.1], "random_insertion": [0.2, 0.4, 0.9]}
    faith = {"gradcam": {"deletion_auc": 0.4, "random_deletion_auc": 0.6, "insertion_auc": 0.7,
                         "random_insertion_auc": 0.5, "deletion_better_than_random": True,
                         "insertion_better_than_random": True, "n_images": 1}}
    local = {"gradcam": {"n_cases": 5, "pointing_hits": 4, "pointing_game": 0.8,
                         "mean_energy_in_mask": 0.3, "mean_mask_fraction": 0.02}}
    check_plots = {"Randomisation test": randomization_plot(randomization, 0.5),
                   "Deletion and insertion curves": faithfulness_plot({"gradcam": [curve]})}
    metrics = {"folds": [{"fold": 0, "auc": 0.9}, {"fold": 1, "auc": 0.8}],
               "pooled": {"auc": {"value": 0.85, "ci95": [0.78, 0.91]}}}
    return write_report(tmp_path / "report.html", title=TITLE,
                        run_info={"config_name": "demo", "model": "tiny"}, metrics=metrics,
                        plots={"ROC curve": tmp_path / "roc.png"}, cases=cases,
                        randomization=randomization, faithfulness=faith, localisation=local,
                        check_plots=check_plots, notes=["offline"])


def test_report_in_playwright(chromium: str, report: Path, tmp_path: Path) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("The playwright Python package (`pip install playwright`; no `playwright "
                 "install`, it drives the system Chromium)")
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
            assert len(images) == 6  # ROC, 2 check plots, 2D panel, 3D panel + montage
            assert all(done and width > 0 for done, width, _ in images), images
            assert page.locator("#metrics-pooled").is_visible()
            assert page.locator("#metrics-folds").is_visible()
            assert "0.780 – 0.910" in page.locator("#metrics-pooled").inner_text()
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
