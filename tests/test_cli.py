"""The CLI: exit codes, messages without tracebacks, audit findings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def medtl(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "medtl", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_help_lists_workflows():
    r = medtl("--help")
    assert r.returncode == 0
    for cmd in ("demo", "audit", "train", "cv", "explain", "weights"):
        assert cmd in r.stdout


def test_unknown_config_key_exits_2_without_traceback(tmp_path):
    r = medtl("cv", "configs/breastmnist.yaml", "--set", "train.epoch=1", "--out", tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "train.epoch" in r.stderr and "epochs" in r.stderr
    assert r.stderr.lstrip().startswith("error: ") and "[bold" not in r.stderr  # styled, not literal markup


def test_audit_of_broken_dicoms_names_each_file(shared_data, tmp_path):
    samples = shared_data / "dicom-samples"
    files = sorted(p for p in samples.iterdir() if p.suffix == ".dcm")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient_id\n" + "".join(f"{p},{i % 2},P{i}\n" for i, p in enumerate(files)))
    r = medtl("audit", manifest, "--out", tmp_path / "a", "-q")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    bad = {Path(u["path"]).name: u["reason"] for u in report["unreadable"]}
    for name in ("JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "MR_truncated.dcm", "badVR.dcm",
                 "nested_priv_SQ.dcm", "meta_missing_tsyntax.dcm", "rtplan.dcm"):
        assert name in bad and len(bad[name]) > 10, name
    assert len(set(bad.values())) >= 5  # specific, not one generic reason


def test_cv_on_broken_inputs_refuses_with_list(shared_data, tmp_path):
    samples = shared_data / "dicom-samples"
    manifest = tmp_path / "m.csv"
    names = ["CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm", "badVR.dcm"]
    manifest.write_text("path,label,patient_id\n" + "".join(f"{samples / n},{i % 2},P{i}\n" for i, n in enumerate(names)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {manifest}\n  image_size: [32, 32]\n")
    r = medtl("cv", cfg, "--out", tmp_path / "run", "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "MR_truncated.dcm" in r.stderr and "badVR.dcm" in r.stderr and "on_error=skip" in r.stderr


def test_weights_list_and_verify():
    r = medtl("weights", "list")
    assert r.returncode == 0 and "tf_efficientnet_lite0.in1k" in r.stdout
    r = medtl("weights", "verify", "tf_efficientnet_lite0.in1k")
    assert r.returncode == 0 and "OK" in r.stderr


def test_trust_and_id_map_flags_are_offered():
    helps = {cmd: medtl(cmd, "--help") for cmd in ("predict", "export", "explain")}
    for cmd, r in helps.items():
        assert r.returncode == 0 and "--trust-unverified" in r.stdout, cmd
    assert "--write-id-map" in helps["predict"].stdout


def test_os_errors_of_a_full_disk_or_missing_permissions_are_user_messages():
    import errno

    from medtl.cli import _os_error_message

    full = _os_error_message(OSError(errno.ENOSPC, "No space left on device", "/no/such/run/roc.png"))
    assert full.startswith("Cannot write to '/no/such/run': no space left on device while writing roc.png")
    assert "free)" in full  # the free bytes of the nearest existing folder
    denied = _os_error_message(PermissionError(errno.EACCES, "Permission denied", "/srv/run/metrics.json"))
    assert "Permission denied for '/srv/run/metrics.json'" in denied and "--out" in denied
    assert "read-only file system" in _os_error_message(OSError(errno.EROFS, "Read-only file system", "/ro/x"))
    assert _os_error_message(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None  # not the user's disk


def test_a_full_disk_in_a_workflow_exits_2_naming_the_folder(tmp_path):
    """An output medtl does not write itself (here the config) meets a full disk: exit 2, not 3."""
    code = ("import errno, os, sys\n"
            "def full(fd, data):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "os.write = full\nfrom medtl.cli import main\nsys.argv[0] = 'medtl'\nmain()\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {tmp_path / 'm.csv'}\n")
    (tmp_path / "m.csv").write_text("path,label,patient_id\na.dcm,0,P1\n")
    r = subprocess.run([sys.executable, "-c", code, "cv", str(cfg), "--out", str(tmp_path / "run"), "-q"],
                       check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    flat = " ".join(r.stderr.split())
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"Cannot write to '{tmp_path / 'run'}': no space left on device while writing config.yaml" in flat
    assert "free)" in flat and "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert list((tmp_path / "run").iterdir()) == []  # no .config.yaml.tmp, no .part
