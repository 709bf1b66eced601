"""Print ``docs/benchmarks.md``: every benchmark figure that has a result file, quoted from it.

    python benchmarks/summary.py > docs/benchmarks.md

Reads the files the benchmark scripts write and the repository holds:

* ``benchmarks/medmnist.json`` (one row per run) with the command and device lines of
  ``benchmarks/medmnist.md``, which the same ``benchmarks/medmnist/run.py`` call writes;
* ``benchmarks/throughput/results/*.json`` (``benchmarks/throughput/bench.py``);
* ``benchmarks/cv_walltime/results/*.json`` (``benchmarks/cv_walltime/bench.py``);
* ``benchmarks/ingest/results.json`` (``benchmarks/ingest/run.py``).

Each table names the command that produced it and the device recorded with it. Figures that
no script writes to a file (the demo, the CT set, BreastMNIST official split, linear probe,
domain adaptation, rank, load, saliency, AdrenalMNIST3D) stay in their own README, listed at
the end. Standard library only; ``tests/test_docs.py`` checks that ``docs/benchmarks.md``
equals this script's output.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LINK = "../"  # links are written for docs/benchmarks.md

# Benchmarks whose figures live in their README (no result file in the repository).
README_ONLY = [
    ("benchmarks/README.md", "offline demo (`bash benchmarks/run_demo.sh`) and CT contrast 5-fold CV "
                             "(`bash benchmarks/run_ct_contrast.sh`), `medtl explain` on that run"),
    ("benchmarks/breastmnist/README.md", "BreastMNIST official split, ImageNet vs random init, 12 and 20 epochs; MobileNetV2 with its recipe"),
    ("benchmarks/adrenalmnist3d/README.md", "AdrenalMNIST3D official split: inflated vs ACS vs random-init 3D encoders"),
    ("benchmarks/linear_probe/README.md", "linear probe on frozen features, BreastMNIST 5-fold CV, cold and warm cache"),
    ("benchmarks/domain_adaptation/README.md", "BreastMNIST with a simulated new scanner: source-only vs AdaBN, "
                                               "DSBN, DANN, MMD, CORAL"),
    ("benchmarks/rank/README.md", "`medtl rank` scores vs fine-tuned test AUC over five encoders"),
    ("benchmarks/load/README.md", "5,000 DICOM files of 1,250 patients through `medtl cv`: wall time, peak RSS"),
    ("benchmarks/saliency/README.md", "saliency maps per second, batched vs one Captum call per image"),
    ("benchmarks/ensemble/README.md", "BreastMNIST official split: one model vs 3- and 5-member fold ensembles"),
    ("benchmarks/search/README.md", "nested CV's inner search: grid vs Optuna (with and without pruning)"),
    ("benchmarks/auto/README.md", "`medtl auto` on BreastMNIST: the plan, its time budget and test AUC"),
]
# What the sections below are read from; each folder's README describes the method.
METHOD_READMES = {
    "medmnist": "benchmarks/medmnist/README.md",
    "throughput": "benchmarks/throughput/README.md",
    "cv_walltime": "benchmarks/cv_walltime/README.md",
}


def link(path: str, text: str | None = None) -> str:
    if not (ROOT / path).exists():
        raise SystemExit(f"summary.py links to {path}, which does not exist")
    return f"[{text or '`' + path + '`'}]({LINK}{path})"


def mean_sd(values: list[float]) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    return f"{values[0]:.3f}"


def ci(lo_hi) -> str:
    lo, hi = lo_hi
    return f"[{lo:.3f}, {hi:.3f}]"


def _find(pattern: str, text: str, what: str, flags: int = 0) -> re.Match:
    m = re.search(pattern, text, flags)
    if m is None:
        raise SystemExit(f"summary.py: {what} not found in benchmarks/medmnist.md")
    return m


# --------------------------------------------------------------------------- MedMNIST
def medmnist() -> list[str]:
    runs = json.loads((BENCH / "medmnist.json").read_text())
    md = (BENCH / "medmnist.md").read_text()
    command = _find(r"Produced by `([^`]+)`", md, "the command").group(1)
    train_dev = _find(r"training device as recorded by the runs: ([^\n]+?)\.\n", md, "the runs' device").group(1)
    device = _find(r"^Device: \*\*(.+?)\*\*;? ?(.*)$", md, "the device line", re.M)
    out = ["## MedMNIST official splits", "",
           f"Read from {link('benchmarks/medmnist.json')}; command and device from "
           f"{link('benchmarks/medmnist.md')}, written by the same call. Method and reading: "
           f"{link(METHOD_READMES['medmnist'])}.", "",
           f"- Command: `{command}`",
           f"- Device: {device.group(1)}" + (f"; {device.group(2).rstrip('.')}" if device.group(2) else ""),
           f"- Training device recorded by each run's `metrics.json`: {train_dev}", "",
           "Each run is one `medtl train CONFIG --set train.seed=S` (random init: `--set model.pretrained=false`) "
           "on the official split: best epoch by validation AUC, flip TTA, threshold 0.5, test split scored once. "
           "Test AUC and ACC are mean ± sd over seeds; the CI is the run's 95 % bootstrap interval.", "",
           "| dataset | config | init | seeds | test AUC | test ACC | per seed: test AUC [95 % CI] | best epoch | "
           "wall s / run |",
           "|---|---|---|---|---|---|---|---|---|"]
    for ds, by_init in runs.items():
        cfg = _find(rf"^## {re.escape(ds)}\n\n(`configs/[^\n]+)$", md, f"the config line of {ds}", re.M).group(1)
        for init, rs in by_init.items():
            aucs, accs = [r["auc"] for r in rs], [r["acc"] for r in rs]
            per = "; ".join(f"{r['seed']}: {r['auc']:.3f} {ci(r['auc_ci95'])}" for r in rs)
            epochs = ", ".join(str(r["best_epoch"]) for r in rs)
            wall = statistics.mean(r["seconds"] for r in rs)
            out.append(f"| {ds} | {cfg} | {'ImageNet' if init == 'imagenet' else 'random'} | {len(rs)} | "
                       f"{mean_sd(aucs)} | {mean_sd(accs)} | {per} | {epochs} | {wall:.0f} |")
    return out + [""]


# --------------------------------------------------------------------------- throughput
def _env_line(env: dict) -> str:
    return (f"{env['device']}; torch {env['torch']}, timm {env['timm']}, monai {env['monai']}, python "
            f"{env['python']}; 1-min load {env.get('load1_start')} at start, {env.get('load1_end')} at end")


def _loop_rows(d: dict) -> list[tuple[str, str, dict, str, str]]:
    """``(key, loop, result, batch, workers)`` in the order bench.py runs them."""
    gpu = d["env"].get("device_type") == "cuda"
    res = d["results"]
    rows = []
    for w in d["workers"]:
        if f"ref:{w}" in res:
            rows.append((f"ref:{w}", f"reference: MONAI-tutorial loop, {w} DataLoader workers"
                         + (", fp16 autocast" if gpu else ", fp32"), res[f"ref:{w}"], d["ref_batch"], str(w)))
    for key in res:
        if key.startswith("medtl:"):
            rows.append((key, f"medtl `fit`, `train.augment.backend={key.split(':', 1)[1]}`"
                         + (", bf16 autocast" if gpu else ""), res[key], d["batch"], "0"))
    if "ceiling" in res:
        rows.append(("ceiling", "bound: forward + backward + AdamW on ready batches, no augmentation", res["ceiling"],
                     d["batch"], "0"))
    return rows


def throughput() -> list[str]:
    files = sorted((BENCH / "throughput" / "results").glob("*.json"))
    out = ["## Fine-tuning throughput", "",
           f"medtl's training loop against the MONAI-tutorial loop on the same model and images; method: "
           f"{link(METHOD_READMES['throughput'])}. Images per second count training steps only; the first "
           "epoch of every loop is a warm-up and is not timed. † marks a loop whose timed epochs ran slower per "
           "image than its warm-up epoch, which carries the one-time costs: such a figure may be disturbed by "
           "other load on the machine (see the benchmark's README).", ""]
    for f in files:
        d = json.loads(f.read_text())
        rel = f.relative_to(ROOT).as_posix()
        ref_key = f"ref:{d['workers'][0]}"
        ref = d["results"][ref_key]["images_per_s"]
        out += [f"### {d['model']}, {d['size']} px, batch {d['batch']}, {d['n_train']} images per epoch "
                f"({d['env']['tag']})", "",
                f"Read from {link(rel)}.", "",
                f"- Command: `{d['command']}`",
                f"- Device: {_env_line(d['env'])}",
                f"- Timed: {d['timed_epochs']} epoch(s) after 1 warm-up epoch; `train.compile`: {d['compile']}", "",
                f"| loop | batch | workers | images timed | img/s | vs reference with {d['workers'][0]} workers | "
                "warm-up epoch s | timed s |",
                "|---|---|---|---|---|---|---|---|"]
        for key, name, r, batch, workers in _loop_rows(d):
            n_timed = max(1, len(r.get("per_epoch_images_per_s") or [None]))
            warm_rate = r["images_timed"] / n_timed / r["warmup_epoch_s"]  # the warm-up epoch has as many images
            flag = " †" if r["images_per_s"] < warm_rate else ""
            out.append(f"| {name}{flag} | {batch} | {workers} | {r['images_timed']} | **{r['images_per_s']:.1f}** | "
                       f"{r['images_per_s'] / ref:.2f}x | {r['warmup_epoch_s']:.1f} | {r['seconds_timed']:.1f} |")
        aug = d["results"].get("ceiling", {}).get("augment_only")
        if aug:
            out += ["", f"Augmentation alone on this device: medtl's `BatchAugment` "
                        f"{aug['batch_augment_torch']:,.0f} img/s, MONAI's preset per image "
                        f"{aug['monai_per_sample']:,.0f} img/s."]
        out.append("")
    return out


# --------------------------------------------------------------------------- CV wall time
def cv_walltime() -> list[str]:
    files = sorted((BENCH / "cv_walltime" / "results").glob("*.json"))
    out = ["## 5-fold cross-validation wall time", "",
           "`medtl cv` in a fresh run directory under `/usr/bin/time -v`: start-up, decoding, preprocessing, five "
           "folds of training with inner validation, bootstrap CIs and plots. \"training s\" is the training "
           f"stage of the run's compute bill (`metrics.json[\"compute\"]`, all folds). Method: {link(METHOD_READMES['cv_walltime'])}.", ""]
    for f in files:
        d = json.loads(f.read_text())
        rel = f.relative_to(ROOT).as_posix()
        out += [f"### Preset `{d['preset']}` ({d['env']['tag']})", "",
                f"Read from {link(rel)}.", "",
                f"- Command: `{d['command']}`",
                f"- Device: {_env_line(d['env'])}", "",
                "| case | medtl command | training device | cases | wall s | training s | peak RSS | "
                "pooled AUC [95 % CI] |",
                "|---|---|---|---|---|---|---|---|"]
        for r in d["results"]:
            out.append(f"| {r['case']} | `{r['command']}` | {r.get('device', '?')} | {r['n_cases']} | "
                       f"**{r['wall_s']:.1f}** | {r.get('train_seconds_sum', '–')} | {r['peak_rss_mib']:.0f} MiB | "
                       f"{r['auc']:.3f} {ci(r['auc_ci95'])} |")
        out.append("")
    return out


# --------------------------------------------------------------------------- ingest
def ingest() -> list[str]:
    path = BENCH / "ingest" / "results.json"
    d = json.loads(path.read_text())
    command = d.get("command") or f"python benchmarks/ingest/run.py --repeat {d['repeat']}"
    versions = ", ".join(f"{k} {v}" for k, v in d["versions"].items())
    out = ["## Ingest: medtl's readers vs raw decoding", "",
           "The same files decoded by raw pydicom (`dcmread`, `pixel_array`, rescale to float32 HU) or nibabel "
           "(`get_fdata`) and by medtl's `read_image`, which also validates the header and returns spacing and "
           f"non-identifying metadata. Best of {d['repeat']} passes each, raw and medtl passes interleaved; "
           "overhead = medtl time / raw time − 1.", "",
           f"Read from {link(path.relative_to(ROOT).as_posix())}.", "",
           f"- Command: `{command}`",
           f"- Device: {d['device']}, {d['cpu']}; {versions}", "",
           "| files | count | raw decode, files/s | medtl `read_image`, files/s | overhead |",
           "|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['set']} | {r['files']} | {r['raw_files_per_s']:.0f} | {r['medtl_files_per_s']:.0f} | "
                   f"{r['overhead_pct']:+.1f} % |")
    return out + [""]


def readme_only() -> list[str]:
    out = ["## Figures kept in their benchmark's README", "",
           "These benchmarks write no result file into the repository; each README gives its figures with the "
           "command and the device they were measured with.", ""]
    out += [f"- {link(p)}: {what}" for p, what in README_ONLY]
    return out + [""]


def main() -> str:
    head = ["# Benchmarks", "",
            "<!-- Generated by `python benchmarks/summary.py > docs/benchmarks.md`; do not edit by hand. -->", "",
            "Every figure below is quoted from a result file that a benchmark script wrote, with the command that "
            "produced it and the device recorded in it. To add a run, rerun its command (it rewrites its result "
            "file) and regenerate this page; `tests/test_docs.py` fails while the two disagree.", ""]
    lines = head + medmnist() + throughput() + cv_walltime() + ingest() + readme_only()
    return "\n".join(lines).rstrip("\n")


if __name__ == "__main__":
    sys.stdout.write(main() + "\n")
