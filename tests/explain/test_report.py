"""Overlays (PNG bytes) and the self-contained HTML report."""

from __future__ import annotations

import base64
import functools
import io
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from medtl.errors import DataError, UnreadableFileError
from medtl.explain.overlay import display_map, montage_png, overlay_png, panel_png
from medtl.explain.report import write_report

KFOLD_METRICS = {
    "folds": [
        {"fold": 0, "auc": 0.9011, "accuracy": 0.85, "n_test": 40, "confusion": [[1, 2], [3, 4]]},
        {"fold": 1, "auc": 0.8822, "accuracy": 0.8, "n_test": 41, "confusion": [[1, 2], [3, 4]]},
    ],
    "pooled": {
        "auc": {"value": 0.9123, "ci95": [0.8712, 0.9481]},
        "balanced_accuracy": {"value": 0.8244, "ci95": [0.7701, 0.8713]},
        "brier": {"value": 0.1101, "ci95": None},
    },
}


def _steps(rhos: list[float], ssims: list[float]) -> list[dict]:
    names = ["classifier", "conv_head", "blocks.6"]
    return [{"randomized": n, "spearman": [r], "ssim": [s], "mean_abs_spearman": r, "mean_ssim": s}
            for n, r, s in zip(names, rhos, ssims)]


RANDOMIZATION = {
    "gradcam": {"threshold": 0.5, "steps": _steps([0.12, 0.08, 0.05], [0.3, 0.2, 0.1]),
                "passed": True, "verdict": "passed: the maps change", "n_images": 1},
    "ig": {"threshold": 0.5, "steps": _steps([0.95, 0.93, 0.91], [0.9, 0.88, 0.85]), "passed": False,
           "verdict": "FAILED: the maps barely change", "n_images": 1},
}


def _blob(shape: tuple[int, ...], centre: tuple[int, ...], width: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * width**2))


def _png_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return im.size


def _plot_file(path: Path) -> Path:
    fig = Figure(figsize=(3, 3), dpi=60)
    ax = fig.subplots()
    ax.plot([0, 0.2, 1], [0, 0.8, 1])
    ax.set_title("ROC")
    fig.savefig(path, format="png")
    return path


@functools.lru_cache(maxsize=1)
def _panels() -> tuple[bytes, bytes, bytes]:
    """Case panels (2D with mask, 2D, 3D with mask), drawn once per test session."""
    img = 0.2 + 0.6 * _blob((48, 48), (20, 28), 6)
    cam = _blob((48, 48), (22, 26), 9)
    ig = np.random.default_rng(0).standard_normal((48, 48)) * _blob((48, 48), (20, 28), 6)
    vol = 0.2 + 0.6 * _blob((6, 32, 32), (4, 16, 16), 4)
    vcam = _blob((6, 32, 32), (4, 14, 16), 5)
    return (panel_png(img, {"gradcam": cam, "ig": ig}, title="C-0001", mask=img > 0.6),
            panel_png(img, {"gradcam": cam}, title="C-0002"),
            panel_png(vol, {"gradcam": vcam, "ig": vcam * 0.5}, title="V-0003", mask=vol > 0.6))


def _cases() -> list[dict]:
    p2d_mask, p2d, p3d = _panels()
    return [
        {"case_id": "C-0001", "label": "contrast", "pred": "contrast", "prob": 0.93, "correct": True,
         "fold": 0, "panel_png": p2d_mask,
         "group": "correct, most confident", "ig_delta": 0.0123,
         "mask_agreement": {"energy_in_mask": 0.61, "pointing_hit": True, "mask_fraction": 0.08}},
        {"case_id": "C-0002", "label": "contrast", "pred": "no_contrast", "prob": 0.31,
         "correct": False, "fold": 1, "panel_png": p2d, "mask_agreement": None},
        {"case_id": "V-0003", "label": "no_contrast", "pred": "no_contrast", "prob": 0.88,
         "correct": True, "fold": None, "panel_png": p3d},
    ]


def _write(tmp_path: Path, **overrides: object) -> str:
    kwargs: dict = {
        "title": "CT contrast — saliency",
        "run_info": {"config_name": "ct_contrast", "model": "resnet18", "weights": "imagenet",
                     "n_cases": 3, "n_patients": 3, "created": "2025-01-01T00:00:00",
                     "medtl_version": "0.1.0"},
        "metrics": KFOLD_METRICS,
        "plots": {"ROC curve": _plot_file(tmp_path / "roc.png")},
        "cases": _cases(),
        "randomization": RANDOMIZATION,
        "faithfulness": {"gradcam": {"deletion_auc": 0.21, "random_deletion_auc": 0.4,
                                     "insertion_auc": 0.7, "random_insertion_auc": 0.5,
                                     "deletion_better_than_random": True,
                                     "insertion_better_than_random": True, "n_images": 3}},
        "localisation": {"gradcam": {"n_cases": 40, "pointing_hits": 33, "pointing_game": 0.825,
                                     "mean_energy_in_mask": 0.31, "mean_mask_fraction": 0.015}},
        "notes": ["Maps explain the predicted class."],
    }
    kwargs.update(overrides)
    out = write_report(tmp_path / "out" / "report.html", **kwargs)
    assert out == tmp_path / "out" / "report.html" and out.is_file()
    return out.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- overlays
def test_overlay_and_panel_return_png(tmp_path: Path) -> None:
    img, cam = _blob((40, 50), (20, 20), 5), _blob((40, 50), (18, 22), 8)
    one = overlay_png(img, cam, title="case-1")
    three = panel_png(img, {"gradcam": cam, "ig": -cam}, title="case-1")
    w1, h1 = _png_size(one)
    w3, h3 = _png_size(three)
    assert w3 > 2 * w1 and h1 > 100 and h3 > 100
    # the mask contour is drawn; a channel axis of size 1 is accepted
    assert overlay_png(img, cam, mask=img > 0.5) != overlay_png(img, cam)
    assert overlay_png(img[None], cam[None], title="case-1") == one


def test_3d_overlay_shows_the_slice_with_most_attribution() -> None:
    vol = np.random.rand(10, 24, 24)
    cam = np.zeros((10, 24, 24))
    cam[7] = _blob((24, 24), (12, 12), 4)
    png = overlay_png(vol, cam, title="vol")
    # identical to drawing slice 8 (1-based) by hand with the title that names it
    assert png == overlay_png(vol[7], cam[7], title="vol — slice 8 of 10 (most attribution)")
    assert panel_png(vol[None], {"gradcam": cam[None]}, title="vol") == panel_png(
        vol[7], {"gradcam": cam[7]}, title="vol — slice 8 of 10 (most attribution)")


def test_3d_montage_three_planes_and_mip() -> None:
    vol = np.random.default_rng(0).random((12, 20, 24))
    cam = _blob((12, 20, 24), (6, 10, 12), 3)
    png = montage_png(vol, cam, title="V-1", mask=cam > 0.5, n_slices=4)
    w, h = _png_size(png)
    assert w > h > 300  # 3 plane rows x (4 slices + MIP) columns
    assert montage_png(vol, cam, n_slices=2) != montage_png(vol, np.roll(cam, 5, axis=2), n_slices=2)
    with pytest.raises(DataError, match=r"montage_png needs a \(D, H, W\) volume"):
        montage_png(vol[0], cam[0])


def test_display_map_is_magnitude_normalised() -> None:
    m = display_map(np.array([[0.0, -2.0], [1.0, 2.0]]))
    assert m.dtype == np.float32 and m.min() >= 0.0 and m.max() == 1.0
    assert m[0, 1] == m[1, 1] == 1.0 and m[1, 0] == pytest.approx(0.5, abs=0.01)
    assert not display_map(np.zeros((3, 3))).any()


def test_overlay_shape_errors() -> None:
    with pytest.raises(DataError, match=r"image is \(8, 8\) but the map 'gradcam' is \(8, 9\)"):
        panel_png(np.zeros((8, 8)), {"gradcam": np.zeros((8, 9))})
    with pytest.raises(DataError, match="mask"):
        overlay_png(np.zeros((8, 8)), np.zeros((8, 8)), mask=np.zeros((4, 4)))
    with pytest.raises(DataError, match="Got shape"):
        overlay_png(np.zeros(8), np.zeros(8))


# ----------------------------------------------------------------------------- report
def test_report_is_self_contained(tmp_path: Path) -> None:
    html = _write(tmp_path)
    assert not re.search(r'(src|href)\s*=\s*"http', html, re.I)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    # every src/href is a data: URI or an in-page anchor
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', html):
        assert value.startswith("data:image/png;base64," if attr == "src" else "#"), value
    imgs = re.findall(r"<img\b[^>]*>", html)
    assert len(imgs) == 4  # 1 plot + 3 cases
    for tag in imgs:
        uri = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert uri, tag[:80]
        _png_size(base64.b64decode(uri.group(1)))
    assert "default-src 'none'" in html  # the CSP blocks any network load


def test_report_metrics_and_cases(tmp_path: Path) -> None:
    html = _write(tmp_path)
    assert "<title>CT contrast — saliency</title>" in html
    assert "Pooled over all folds" in html
    for text in ("auc", "0.912", "0.871 – 0.948", "balanced_accuracy", "0.824", "0.770 – 0.871"):
        assert text in html, text
    brier_row = re.search(r"<th scope=\"row\">brier</th>(.*?)</tr>", html).group(1)
    assert "0.110" in brier_row and "—" in brier_row  # no CI stored
    folds = html[html.index('id="metrics-folds"'):]
    folds = folds[: folds.index("</table>")]
    assert "0.901" in folds and "0.882" in folds and ">40<" in folds
    assert "confusion" not in folds  # non-scalar entries are left out
    for key in ("config_name", "ct_contrast", "resnet18", "medtl_version"):
        assert key in html
    for case_id in ("C-0001", "C-0002", "V-0003"):
        assert case_id in html
    correct, wrong = html.index("Correct predictions (2)"), html.index("Wrong predictions (1)")
    assert correct < html.index("V-0003") < wrong < html.index("C-0002")
    assert "correct, most confident" in html and "0.012" in html  # group badge, IG delta
    verdicts = html[html.index('id="randomization-verdicts"'):]
    verdicts = verdicts[: verdicts.index("</table>")]
    assert "Grad-CAM" in verdicts and "passed" in verdicts
    assert "Integrated Gradients" in verdicts and "FLAGGED" in verdicts and "maps barely change" in verdicts
    assert "flagged: Integrated Gradients" in html
    steps = html[html.index('id="randomization-steps"'):]
    assert "1. classifier" in steps and "0.120 / 0.300" in steps and "0.910 / 0.850" in steps
    assert "82%" in html and "33 / 40" in html  # localisation over all correct mask cases
    faith = html[html.index('id="faithfulness"'):]
    assert "0.210" in faith and "better" in faith
    assert "How to read this" in html and "not proof of causality" in html
    assert "Maps explain the predicted class." in html


def test_report_official_split_metrics(tmp_path: Path) -> None:
    metrics = {"test": {"auc": {"value": 0.77, "ci95": [0.7, 0.83]}, "accuracy": 0.7}}
    html = _write(tmp_path, metrics=metrics, plots={}, cases=[], randomization=None,
                  faithfulness=None, localisation=None, notes=None)
    assert "Official test split" in html and "0.770" in html and "0.700 – 0.830" in html
    assert 'id="metrics-folds"' not in html and "<img" not in html
    assert "Correct predictions (0)" in html


def test_report_withholds_paths_and_identifiers(tmp_path: Path) -> None:
    run_info = {"model": "resnet18", "path": "/data/DOE^JOHN/ct.dcm", "patient_name": "DOE^JOHN",
                "PatientID": "MRN-99812", "data_dir": "relative/DOE_JANE", "manifest":
                Path("manifest.csv"), "source": "/srv/hospital/SMITH", "InstitutionName": "StX",
                "inputs": ["/in/DOE.dcm"], "n_files": 7}
    case = dict(_cases()[1], path="/scans/DOE^JOHN.dcm", patient_id="MRN-99812",
                mask_agreement={"gradcam": {"lift": 0.2, "file": "/x/DOE.nii"}})
    html = _write(tmp_path, run_info=run_info, cases=[case])
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)  # only the markup
    for secret in ("DOE", "MRN-99812", "/srv/", "manifest.csv", "StX", "/scans", "/x/", "/in/"):
        assert secret not in text, secret
    assert "resnet18" in html and "0.200" in html and "n_files" in html and ">7<" in html
    footer = html[html.index("<footer>"):]
    for key in ("path", "patient_name", "PatientID", "data_dir", "manifest", "file", "inputs"):
        assert key in footer, key


def test_report_escapes_html(tmp_path: Path) -> None:
    case = dict(_cases()[0], case_id="<script>alert(1)</script>", label="a&b")
    html = _write(tmp_path, title="<b>T</b>", cases=[case], notes=["<i>x</i>"])
    assert "<script>" not in html and "<b>T</b>" not in html and "<i>x</i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a&amp;b" in html


def test_report_input_errors(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match="could not be read"):
        _write(tmp_path, plots={"ROC": tmp_path / "missing.png"})
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(UnreadableFileError, match="not a PNG"):
        _write(tmp_path, plots={"ROC": tmp_path / "fake.png"})
    with pytest.raises(ValueError, match=r"cases\[0\] \(C-0001\) needs 'panel_png' as PNG bytes"):
        _write(tmp_path, cases=[dict(_cases()[0], panel_png=b"GIF89a")])
    with pytest.raises(ValueError, match="non-empty string 'case_id'"):
        _write(tmp_path, cases=[dict(_cases()[0], case_id=None)])
    assert not (tmp_path / "out" / "report.html").exists()  # nothing half-written


def test_template_ships_as_package_data() -> None:
    template = resources.files("medtl.explain").joinpath("templates/report.html.j2")
    text = template.read_text(encoding="utf-8")
    assert "Content-Security-Policy" in text
    expressions = re.findall(r"\{\{(.*?)\}\}", text, re.S)
    assert expressions and not any(re.search(r"\|\s*safe\b", e) for e in expressions)


def test_fold_table_fits_the_page(tmp_path: Path) -> None:
    """Never-set and same-in-every-fold columns leave the per-fold table (the latter are named
    under it); a mean and an sd row summarise the fractional columns, with 3 decimals."""
    folds = [{"fold": f"fold{f}", "repeat": 0, "site": None, "temperature": float("nan"),
              "n_test": 20 + f, "threshold": 0.5, "auc": 0.8 + 0.05 * f, "confusion": [[1]]}
             for f in range(3)]
    html = _write(tmp_path, metrics={"folds": folds, "pooled": KFOLD_METRICS["pooled"]})
    table = html[html.index('id="metrics-folds"'):]
    table = table[: table.index("</table>")]
    for gone in ("repeat", "site", "temperature", "threshold", "confusion"):
        assert gone not in table, gone
    assert "n_<wbr>test" in table and ">fold2<" in table and ">0.900<" in table
    foot = table[table.index("<tfoot>"):]
    assert ">mean<" in foot and ">0.850<" in foot and ">sd<" in foot and ">0.050<" in foot
    constant = html[html.index('id="metrics-folds-constant"'):]
    assert "repeat 0, threshold 0.500." in constant[: constant.index("</p>")]


def test_wide_plots_get_a_row_of_their_own(tmp_path: Path) -> None:
    wide = Figure(figsize=(10, 3), dpi=100)
    wide.subplots().plot([0, 1], [0, 1])
    wide.savefig(tmp_path / "wide.png", format="png")
    html = _write(tmp_path, plots={"ROC": _plot_file(tmp_path / "roc.png"), "Training": tmp_path / "wide.png"})
    assert re.search(r'<figure class="wide"><img src="data:image/png;base64,[^"]+" alt="Training">', html)
    assert re.search(r'<figure><img src="data:image/png;base64,[^"]+" alt="ROC">', html)
