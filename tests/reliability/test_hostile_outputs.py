"""Hostile outputs (issue 18, classes 3, 4 and 6), generated from one seed.

* Patient-named folders and files (``DOE_JOHN_19600101/scan_DOE.dcm`` and seeded ones) go
  through ``medtl predict``: no name, birth date or path component in any file written or
  in stdout/stderr; the id -> path map only with ``--write-id-map``, in a file marked as
  identifying.
* A full disk under ``medtl cv``: a real small tmpfs when this process may mount one (root),
  and a disk reported as full (``medtl._io.free_bytes`` patched in the subprocess) always.
  Exit 2 naming the folder with the bytes needed and free, no temporary file left, the
  earlier results in the folder byte-identical.
* A tampered checkpoint (a flipped byte in ``model.safetensors``, ``model_sha256`` deleted)
  under ``medtl predict`` and ``medtl export``: exit 2 naming the checkpoint and the reason;
  exit 0 with ``--trust-unverified``, recorded in the outputs.

Every CLI run is a subprocess under a 4 GiB address-space cap and a 120 s timeout, and must
print no traceback and no "internal error".
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from reliability_util import REPO_ROOT, medtl_env, run_medtl, write_ct

from medtl.config import load_config
from medtl.data.demo import make_demo_dataset
from medtl.errors import OutputError
from medtl.workflows import cross_validate
from medtl.workflows.rundir import RunDir

pytestmark = pytest.mark.slow

SEED = 18
MEMORY_CAP = 4 << 30
TIMEOUT = 120
SETTINGS = {
    "name": "hostile", "data": {"format": "manifest", "image_size": [32, 32], "class_names": ["normal", "lesion"],
                                "intensity": {"mode": "window", "preset": "lung"}},
    "model": {"name": "mobilenetv3_small_050", "pretrained": False},
    "train": {"epochs": 1, "batch_size": 8, "tta": False, "num_threads": 2},
    "cv": {"n_splits": 2}, "evaluate": {"n_bootstrap": 50},
}


# -- running the CLI -------------------------------------------------------------------------------------------

def _cap() -> None:  # in the child, before exec: the address space is bounded whatever the machine's RAM
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _medtl(*args, patch: str = "") -> subprocess.CompletedProcess:
    """``medtl ARGS`` in a capped subprocess; ``patch`` is Python run first (e.g. to report a full disk)."""
    if not patch:
        return run_medtl([str(a) for a in args], cwd=REPO_ROOT, timeout=TIMEOUT, preexec_fn=_cap)
    code = f"{patch}\nimport sys\nfrom medtl.cli import main\nsys.argv[0] = 'medtl'\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], check=False, cwd=REPO_ROOT,
                          env=medtl_env(), capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=_cap)


def _user_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The stderr of a run that must have failed as a user error (exit 2) saying every needle."""
    text = res.stdout + res.stderr
    assert res.returncode == 2, text[-3000:]
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    flat = " ".join(res.stderr.split())  # rich wraps long lines
    for needle in needles:
        assert needle in flat, (needle, flat[-3000:])
    return flat


def _ok(res: subprocess.CompletedProcess) -> str:
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "internal error" not in text
    return text


# -- one finished run, reused by every test ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """``(config file, finished 2-fold run)``: 8 synthetic patients, 32 px, a 0.6 M-parameter network."""
    root = tmp_path_factory.mktemp("hostile")
    manifest = make_demo_dataset(root / "data", n_patients=8, slices_per_patient=2, size=32)
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({**SETTINGS, "data": {**SETTINGS["data"], "path": str(manifest)}}))
    run = root / "run"
    cross_validate(load_config(cfg_path), run, progress=False)
    return cfg_path, run


def _copy_run(run: Path, dest: Path) -> Path:
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("predict", "export")))


# -- class 3: patient-named folders and files through predict -----------------------------------------------------

def _patient_tree(root: Path) -> tuple[Path, set[str], str]:
    """Scans in folders and files named after (seeded, invented) patients, one of them unreadable.

    Returns the scan folder, every identifying needle (names, birth dates in several
    spellings, folder and file names, stems) and the unreadable file's path in the folder."""
    rng = np.random.default_rng(SEED)
    consonants, vowels = "BDFGKLMNPRSTVZ", "AEIOU"

    def word(n: int) -> str:
        return "".join(rng.choice(list(consonants)) + rng.choice(list(vowels)) for _ in range(n))

    people = [("DOE", "JOHN", "19600101")]
    for _ in range(4):
        people.append((word(3), word(3), f"{rng.integers(1930, 2005)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"))
    scans = root / "scans"
    needles: set[str] = set()
    for i, (last, first, born) in enumerate(people):
        folder = scans / f"{last}_{first}_{born}"
        files = [folder / f"scan_{last}.dcm", folder / "series1" / f"IMG_{first}_{last}.dcm"]
        for k, path in enumerate(files):
            pixels = rng.integers(0, 2000, (32, 32)).astype(np.uint16)
            write_ct(path, pixels, patient_id=f"{last}{born}", PatientName=f"{last}^{first}", PatientBirthDate=born)
        if i == 2:  # unreadable: listed in skipped.json, by case id only
            files[1].write_bytes(b"DICM but not really " + last.encode() + b" " + born.encode())
            broken = str(files[1].relative_to(scans))
        needles |= {f"{last}_{first}_{born}", f"{last}_{first}", last, first, born, f"scan_{last}",
                    f"IMG_{first}_{last}", f"{born[:4]}-{born[4:6]}-{born[6:]}", f"{born[6:]}.{born[4:6]}.{born[:4]}"}
    return scans, {n.lower() for n in needles if len(n) >= 3}, broken


def _leaks(folder: Path, needles: set[str], logs: str) -> list[tuple[str, str]]:
    """(where, needle) for every needle found in a file of ``folder``, its relative name, or the logs."""
    blobs = {"stdout+stderr": logs.encode()}
    for path in folder.rglob("*"):
        if path.is_file():
            rel = str(path.relative_to(folder))
            blobs[rel], blobs[f"name of {rel}"] = path.read_bytes(), rel.encode()
    return [(where, n) for where, blob in blobs.items() for n in needles if n.encode() in blob.lower()]


def test_patient_named_folders_never_reach_predict_outputs(finished, tmp_path: Path) -> None:
    _, run = finished
    scans, needles, broken = _patient_tree(tmp_path)
    order = sorted(str(p.relative_to(scans)) for p in scans.rglob("*.dcm"))  # ids follow the sorted paths
    ids = {rel: f"scan-{i:04d}" for i, rel in enumerate(order, start=1)}
    out = tmp_path / "pred"
    text = _ok(_medtl("predict", run, "--data", scans, "--out", out, "-q"))
    assert sorted(p.name for p in out.iterdir()) == [".pseudonym_salt", "predict.json", "predictions.csv",
                                                     "skipped.json"]
    assert _leaks(out, needles, text) == []
    rows = (out / "predictions.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [ids[rel] for rel in order if rel != broken]
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped == [{"case_id": ids[broken], "reason": skipped[0]["reason"]}] and skipped[0]["reason"]
    record = json.loads((out / "predict.json").read_text())
    assert record["id_map"] is None and record["trust_unverified"] is False and record["n_cases"] == len(order) - 1

    # the id -> path map only on request, marked as identifying; everything else stays clean
    text = _ok(_medtl("predict", run, "--data", scans, "--out", out, "-q", "--write-id-map"))
    id_map = out / "IDENTIFYING_id_map.csv"
    lines = id_map.read_text().splitlines()
    assert lines[0].startswith("# IDENTIFYING") and lines[1] == "id,path" and len(lines) == 2 + len(order)
    assert sorted(lines[2:]) == sorted(f"{i},{rel}" for rel, i in ids.items())
    assert f"{ids['DOE_JOHN_19600101/scan_DOE.dcm']},DOE_JOHN_19600101/scan_DOE.dcm" in lines
    assert "do not share" in " ".join(text.split())
    id_map_text = id_map.read_bytes()
    id_map.unlink()
    assert _leaks(out, needles, text) == []
    id_map.write_bytes(id_map_text)

    # a later prediction without the flag removes the stale map (it would link the wrong scans)
    _ok(_medtl("predict", run, "--data", scans, "--out", out, "-q"))
    assert not id_map.exists()


# -- class 4: a full disk under cv -------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _temporary_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith((".part", ".tmp")) or ".tmp" in p.name]


def _assert_disk_full_refused(cfg: Path, out: Path, patch: str = "") -> None:
    before = _snapshot(out)
    res = _medtl("cv", cfg, "--out", out, "--no-resume", "-q", patch=patch)
    flat = _user_error(res, f"Cannot write to '{out / 'checkpoints' / 'fold0'}'", "not enough free space",
                       "model.safetensors", "free)", "needs ")
    assert "MB" in flat or "kB" in flat
    assert _temporary_files(out) == []
    after = _snapshot(out)
    assert after == before  # earlier results intact, byte for byte (config.yaml rewritten identically)


def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=False,
                         capture_output=True)
    return res.returncode == 0


def test_full_tmpfs_under_cv_is_a_user_error_and_keeps_earlier_results(finished, tmp_path: Path) -> None:
    cfg, run = finished
    ckpt = (run / "checkpoints" / "fold0" / "model.safetensors").stat().st_size
    used = sum(-(-len(b) // 4096) * 4096 for b in _snapshot(run).values())
    disk = tmp_path / "disk"
    # room for the earlier run and half a checkpoint more: a retrained fold cannot be written beside the old one
    size = -(-(used + ckpt // 2 + (256 << 10)) // 4096) * 4096
    if not _mount_tmpfs(disk, size):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission); "
                    "the patched full disk test covers the same path")
    try:
        out = _copy_run(run, disk / "run")
        _assert_disk_full_refused(cfg, out)
    finally:
        subprocess.run(["umount", str(disk)], check=False, capture_output=True)


def test_disk_reported_full_under_cv_is_a_user_error_and_keeps_earlier_results(finished, tmp_path: Path) -> None:
    cfg, run = finished
    out = _copy_run(run, tmp_path / "run")
    _assert_disk_full_refused(cfg, out, patch="import medtl._io as io; io.free_bytes = lambda path: 150_000")


def test_run_start_on_a_full_disk_leaves_no_temporary_config(finished, tmp_path: Path, monkeypatch) -> None:
    cfg, _ = finished
    real = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    config = load_config(cfg)
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputError) as exc:
        RunDir(tmp_path / "run").start(config, resume=True)
    monkeypatch.setattr(os, "write", real)
    assert str(tmp_path / "run") in str(exc.value) and "config.yaml" in str(exc.value) and "free" in str(exc.value)
    assert os.listdir(tmp_path / "run") == []  # neither .config.yaml.tmp nor a .part file


# -- class 6: a tampered checkpoint ------------------------------------------------------------------------------

def _tamper(run: Path, *, delete_sha: bool) -> Path:
    ckpt = run / "checkpoints" / "fold0"
    weights = ckpt / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x01
    weights.write_bytes(bytes(raw))
    if delete_sha:
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["model_sha256"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    return ckpt


@pytest.mark.parametrize("delete_sha,reason", [(True, "meta.json records no model_sha256"),
                                               (False, "model.safetensors sha256 mismatch")])
def test_tampered_checkpoint_is_refused_by_predict_unless_trusted(finished, tmp_path: Path, delete_sha: bool,
                                                                  reason: str) -> None:
    _, run = finished
    tampered = _copy_run(run, tmp_path / "run")
    ckpt = _tamper(tampered, delete_sha=delete_sha)
    manifest = Path(yaml.safe_load((tampered / "config.yaml").read_text())["data"]["path"])
    out = tmp_path / "pred"
    _user_error(_medtl("predict", tampered, "--data", manifest, "--out", out, "-q"),
                f"Checkpoint '{ckpt}'", reason, "--trust-unverified")
    assert not (out / "predictions.csv").exists()
    if not delete_sha:
        return  # trusting is the same path for both reasons; run it once

    text = _ok(_medtl("predict", tampered, "--data", manifest, "--out", out, "-q", "--trust-unverified"))
    assert "warning: checkpoint fold0 is NOT verified" in " ".join(text.split())
    for name in ("predict.json", "metrics.json"):
        record = json.loads((out / name).read_text())
        assert record["trust_unverified"] is True and reason in record["unverified"]["fold0"], name
        assert list(record["unverified"]) == ["fold0"]


def test_tampered_checkpoint_is_refused_by_export_unless_trusted(finished, tmp_path: Path) -> None:
    _, run = finished
    tampered = _copy_run(run, tmp_path / "run")
    ckpt = _tamper(tampered, delete_sha=True)
    out = tmp_path / "export"
    _user_error(_medtl("export", tampered, "--format", "torchscript", "--out", out),
                f"Checkpoint '{ckpt}'", "records no model_sha256", "--trust-unverified")
    assert not (out / "export.json").exists()
    _ok(_medtl("export", tampered, "--format", "torchscript", "--out", out, "--trust-unverified"))
    record = json.loads((out / "export.json").read_text())
    assert record["trust_unverified"] is True and "model_sha256" in record["unverified"]["fold0"]


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0.in1k", "resnet18.tv_in1k"])
def test_weight_file_with_a_known_sha256_is_refused_on_mismatch_unless_trusted(tmp_path: Path, monkeypatch, caplog,
                                                                              name: str) -> None:
    """The rule of checkpoints holds for pretrained weight files whose sha256 (or hash prefix) is known."""
    import dataclasses

    from medtl.errors import WeightsError
    from medtl.models import get_record
    from medtl.models._sources import locate_weight_file

    tampered = tmp_path / "weights.pth"
    tampered.write_bytes(b"not the published weights")
    record = dataclasses.replace(get_record(name), source="local", location=str(tampered))
    with pytest.raises(WeightsError, match="Checksum mismatch") as exc:
        locate_weight_file(record)
    assert str(tampered) in str(exc.value) and "trusted explicitly" in str(exc.value)
    assert locate_weight_file(record, trust_unverified=True) == tampered
    assert "Used anyway because trust_unverified was given" in caplog.text
