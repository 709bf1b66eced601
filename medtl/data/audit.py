"""Audit a dataset before trusting it: unreadable files, duplicates, label conflicts, leaks.

:func:`audit_cases` decodes every file once and returns a JSON-serialisable report:
class balance, cases per patient, unreadable files, exact and near duplicates (with
whether they cross patients or labels), patients with several labels, repeated paths,
technical header fields that predict the label on their own (scanner model, contrast
agent tag, ...) and per-label intensity ranges. Patient ids only appear pseudonymised;
paths and reasons are redacted as whole values (:func:`~medtl.data.privacy.make_redactor`).
Label spellings that were canonicalised when the manifest was read (``1.0`` -> ``1``) are
reported once, under ``notes``.

Example:
    >>> report = audit_cases(cases, progress=False)        # doctest: +SKIP
    >>> has_findings(report), report["findings"][:1]       # doctest: +SKIP
    (True, ['patient P-3fa81c02de has both labels 0 and 1 (4 and 2 cases)'])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from medtl.config import parse_bytes
from medtl.data._memory import image_limit, out_of_memory_reason
from medtl.data.manifest import Case, label_spellings
from medtl.data.privacy import Pseudonymizer, make_redactor
from medtl.data.readers import ScanImage, read_image
from medtl.errors import ConfigError, DataError, MedtlError

__all__ = ["audit_cases", "write_audit", "print_audit_summary", "has_findings"]

# Technical fields checked for label leakage ("confounders"); all non-identifying.
_CONFOUNDER_FIELDS = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SliceThickness",
                      "KVP", "ContrastBolusAgent", "BodyPartExamined", "transfer_syntax", "photometric",
                      "bits_stored", "modality", "size", "spacing", "site")
_MISSING = "<missing>"
_UNLABELLED = "<unlabelled>"
# 16x16 = 256-bit difference hash: on the 100 real chest CT slices an 8x8 hash put slices of
# different patients within distance 1-3, while 16x16 keeps them >= 34 apart and an image
# plus 1% noise within 2.
_DHASH_SIZE = 16
_DHASH_DEAD_ZONE = 0.01  # brightness steps below 1% of the range count as flat (noise-robust)
_LOPO_MARGIN = 0.15      # leave-one-patient-out accuracy this far above the prior → flagged
_CRAMERS_V_FLAG = 0.5
# Bits set per byte; np.bitwise_count (numpy >= 2) is used when present.
_POPCOUNT_LUT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_popcount = getattr(np, "bitwise_count", lambda a: _POPCOUNT_LUT[a])


@dataclass
class _Source:
    """One decoded file (or in-memory array) and the cases that point to it."""

    key: str
    path: str | None
    cases: list[Case] = field(default_factory=list)
    error: str | None = None
    sha: str = ""
    dhash: np.ndarray = field(default_factory=lambda: np.zeros(_DHASH_SIZE**2 // 8, dtype=np.uint8))
    stats: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)


def audit_cases(cases: Sequence[Case], *, load: Callable[[Case], ScanImage] | None = None,
                pseudonymize: Callable[[str], str] | None = None, near_dup_max_distance: int = 4,
                progress: bool = True, memory_budget: int | str | None = None) -> dict:
    """Check a list of cases for data problems; each file is decoded exactly once.

    Args:
        cases: the dataset (see :class:`~medtl.data.manifest.Case`).
        load: decodes a case to a :class:`ScanImage` (float32 ``(C, H, W)`` or
            ``(C, D, H, W)``); default :func:`read_image` on ``case.path``, or ``case.array``.
        pseudonymize: maps patient ids to printable pseudonyms; default a fresh
            :class:`~medtl.data.privacy.Pseudonymizer`.
        near_dup_max_distance: largest Hamming distance between 256-bit difference hashes
            (of the min-max normalised middle slice) for two images to be near duplicates.
        progress: show a progress bar while decoding.
        memory_budget: ``data.memory_budget`` (bytes or ``"4GB"``): a file whose header declares
            a larger image is listed as unreadable before it is decoded; ``None``: half the
            available memory.

    Returns:
        The report dict (JSON-serialisable); ``report["findings"]`` lists the problems.

    Example:
        >>> report = audit_cases(cases, progress=False)   # doctest: +SKIP
        >>> report["clean"]                                # doctest: +SKIP
        False
    """
    if isinstance(near_dup_max_distance, bool) or not isinstance(near_dup_max_distance, (int, np.integer)) \
            or near_dup_max_distance < 0:
        raise ConfigError("The 'near_dup_max_distance' parameter of audit_cases must be an int >= 0. "
                          f"Got {near_dup_max_distance!r} instead.")
    cases = list(cases)
    pseudo = pseudonymize or Pseudonymizer()
    try:
        budget = None if memory_budget is None else parse_bytes(memory_budget)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"The 'memory_budget' parameter of audit_cases must be bytes or a size such as '4GB'. "
                          f"Got {memory_budget!r} instead ({exc}).") from None
    load = load or (lambda case: _default_load(case, budget))
    sources = _group_sources(cases)
    for src in _progress(sources, progress):
        _decode(src, load)
    readable = [s for s in sources if s.error is None]
    findings: list[str] = []
    report: dict[str, Any] = {"n_cases": len(cases), "n_patients": len({c.patient_id for c in cases})}
    report["class_balance"] = _class_balance(cases, findings)
    report["per_patient"] = _per_patient(cases, pseudo)
    redact = _redactor(cases, pseudo)  # paths and reasons may hold a folder named by patient id
    report["unreadable"] = [{"case_id": c.case_id, "path": redact(s.path), "reason": redact(s.error)}
                            for s in sources if s.error is not None for c in s.cases]
    if report["unreadable"]:
        first = report["unreadable"][0]
        n = len(report["unreadable"])
        findings.append(f"{n} file{'s' if n > 1 else ''} unreadable (e.g. case {first['case_id']}: {first['reason']})")
    report["duplicate_paths"] = _duplicate_paths(sources, redact, findings)
    report["exact_duplicates"] = _exact_duplicates(readable, pseudo, findings)
    report["near_duplicates"] = _near_duplicates(readable, near_dup_max_distance, findings)
    report["label_conflicts"] = _label_conflicts(cases, pseudo, findings)
    report["metadata_confounders"] = _confounders(readable, findings)
    report["intensity"] = _intensity(readable, findings)
    spellings = label_spellings(cases)
    report["label_spellings"] = spellings
    report["notes"] = [f"labels canonicalised: {_spelling_text(spellings)}"] if spellings else []
    report["findings"] = findings
    report["clean"] = not findings
    return report


def has_findings(report: dict) -> bool:
    """True when the audit found at least one problem (the CLI then exits with code 1)."""
    return bool(report.get("findings"))


def write_audit(report: dict, out_dir: str | Path) -> Path:
    """Write ``out_dir/audit.json`` (creating ``out_dir``) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "audit.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def print_audit_summary(report: dict, console: Console | None = None) -> None:
    """Print a short table of the audit and its findings with rich (stdout by default)."""
    console = console or Console()
    table = Table(title="Dataset audit", show_header=False)
    table.add_row("cases", str(report["n_cases"]))
    table.add_row("patients", str(report["n_patients"]))
    balance = ", ".join(f"{k}: {v['count']} ({v['fraction']:.0%})" for k, v in report["class_balance"].items())
    table.add_row("labels", balance or "-")
    pp = report["per_patient"]
    table.add_row("cases per patient", f"min {pp['min']}, median {pp['median']:g}, max {pp['max']}")
    for key, name in (("unreadable", "unreadable files"), ("exact_duplicates", "exact duplicate groups"),
                      ("near_duplicates", "near-duplicate groups"), ("label_conflicts", "patients with >1 label"),
                      ("duplicate_paths", "paths listed twice")):
        table.add_row(name, str(len(report[key])))
    flagged = [f for f, v in report["metadata_confounders"].get("fields", {}).items() if v["flagged"]]
    table.add_row("label-predicting header fields", ", ".join(flagged) or "none")
    console.print(table)
    for note in report.get("notes", []):
        console.print(f"note: {note}", markup=False, highlight=False)
    unreadable = report.get("unreadable", [])
    for entry in unreadable[:10]:
        console.print(f"unreadable: case {entry['case_id']}: {entry['reason']}", markup=False, highlight=False)
    if len(unreadable) > 10:
        console.print(f"unreadable: ... and {len(unreadable) - 10} more (see audit.json)", markup=False)
    if report["clean"]:
        console.print("[green]No problems found.[/green]")
        return
    console.print(f"[bold red]{len(report['findings'])} finding(s):[/bold red]")
    for finding in report["findings"]:
        console.print(f"  [red]•[/red] {finding}", markup=True, highlight=False)


# --------------------------------------------------------------------------- decoding
def _spelling_text(spellings: dict[str, dict[str, int]]) -> str:
    """``'1.0' -> '1' (3 cases), 'TRUE' -> 'True' (2 cases)``."""
    return ", ".join(f"{raw!r} -> {label!r} ({n} case{'s' if n != 1 else ''})"
                     for label, spell in spellings.items() for raw, n in spell.items())


def _default_load(case: Case, budget: int | None = None) -> ScanImage:
    if case.path is not None:
        return read_image(case.path, max_bytes=image_limit(budget), series=case.series)
    if case.array is None:
        raise DataError(f"Case {case.case_id!r} has neither a path nor an in-memory array.")
    arr = np.asarray(case.array, dtype=np.float32)
    return ScanImage(arr, (1.0,) * (arr.ndim - 1))


def _group_sources(cases: list[Case]) -> list[_Source]:
    sources: dict[str, _Source] = {}
    for i, case in enumerate(cases):
        key = f"path:{_resolved(case.path)}" if case.path is not None else f"memory:{i}"
        key += f"#series={case.series}" if case.series else ""
        src = sources.setdefault(key, _Source(key, None if case.path is None else str(case.path)))
        src.cases.append(case)
    return list(sources.values())


def _resolved(path: str) -> str:
    """``path`` with symlinks resolved; as given (made absolute) for a symlink loop, which the
    decoder then reports as unreadable."""
    try:
        return str(Path(path).resolve())
    except (RuntimeError, OSError):  # RuntimeError: "Symlink loop" (Python < 3.13)
        return os.path.abspath(path)


def _progress(items: list[_Source], enabled: bool) -> Iterable[_Source]:
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description="Auditing images", transient=True, console=Console(stderr=True))


def _decode(src: _Source, load: Callable[[Case], ScanImage]) -> None:
    case = src.cases[0]
    try:
        image = load(case)
        arr = np.asarray(image.array, dtype=np.float32)
        if arr.ndim not in (3, 4) or arr.size == 0:
            raise DataError(f"expected a (C, H, W) or (C, D, H, W) array, got shape {arr.shape}")
    except MedtlError as exc:
        src.error = getattr(exc, "reason", None) or str(exc)
        return
    except MemoryError:
        src.error = out_of_memory_reason()
        return
    except Exception as exc:  # noqa: BLE001 - an audit reports every failure instead of stopping
        src.error = f"unexpected error: {type(exc).__name__}: {exc}"
        return
    src.sha = hashlib.sha256(arr.tobytes() + repr(arr.shape).encode()).hexdigest()
    finite = np.isfinite(arr)
    values = arr[finite]
    src.dhash = _dhash(arr)
    src.stats = {"min": float(values.min()) if values.size else float("nan"),
                 "max": float(values.max()) if values.size else float("nan"),
                 "mean": float(values.mean()) if values.size else float("nan"),
                 "nan": bool(not finite.all()), "is_hu": bool(image.is_hu)}
    meta = dict(image.meta or {})
    meta.update(modality=image.modality, site=case.site,
                size="x".join(str(s) for s in arr.shape[1:]),
                spacing="x".join(f"{s:.2f}" for s in image.spacing))
    src.fields = {f: _field_value(meta.get(f)) for f in _CONFOUNDER_FIELDS}


def _field_value(value: Any) -> str:
    if value is None or value == "" or value == []:
        return _MISSING
    if isinstance(value, (list, tuple)):
        return "\\".join(_field_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return " ".join(str(value).split())


def _dhash(arr: np.ndarray) -> np.ndarray:
    """256-bit difference hash (32 uint8) of the min-max normalised middle slice (channel mean)."""
    from PIL import Image

    img = arr.mean(axis=0)
    if img.ndim == 3:
        img = img[img.shape[0] // 2]
    img = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(img.min()), float(img.max())
    norm = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    small = np.asarray(Image.fromarray(norm, mode="F").resize((_DHASH_SIZE + 1, _DHASH_SIZE), Image.Resampling.BOX))
    bits = (small[:, 1:] - small[:, :-1]) > _DHASH_DEAD_ZONE
    return np.packbits(bits.ravel())


# --------------------------------------------------------------------------- checks
def _class_balance(cases: list[Case], findings: list[str]) -> dict[str, dict[str, float]]:
    counts = Counter(_UNLABELLED if c.label is None else str(c.label) for c in cases)
    n = max(len(cases), 1)
    labelled = [k for k in counts if k != _UNLABELLED]
    if not cases:
        findings.append("the dataset has no cases")
    if len(labelled) == 1:
        findings.append(f"only one label ({labelled[0]!r}) among {counts[labelled[0]]} labelled cases")
    if labelled and counts.get(_UNLABELLED):
        findings.append(f"{counts[_UNLABELLED]} cases have no label")
    return {k: {"count": v, "fraction": round(v / n, 4)} for k, v in sorted(counts.items())}


def _per_patient(cases: list[Case], pseudo: Callable[[str], str]) -> dict[str, Any]:
    counts = Counter(c.patient_id for c in cases)
    if not counts:
        return {"min": 0, "median": 0.0, "max": 0, "histogram": {}, "top": []}
    values = np.array(list(counts.values()))
    hist = Counter(int(v) for v in values)
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max()),
            "histogram": {str(k): hist[k] for k in sorted(hist)},
            "top": [{"patient": pseudo(p), "n_cases": n} for p, n in counts.most_common(5)]}


def _group_info(cases: list[Case]) -> dict[str, bool]:
    labels = {c.label for c in cases if c.label is not None}
    return {"cross_patient": len({c.patient_id for c in cases}) > 1, "cross_label": len(labels) > 1}


def _describe(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _duplicate_paths(sources: list[_Source], redact: Callable[[str | None], str | None],
                     findings: list[str]) -> list[dict[str, Any]]:
    out = []
    for src in sources:
        if src.path is not None and len(src.cases) > 1:
            ids = [c.case_id for c in src.cases]
            out.append({"path": redact(src.path), "case_ids": ids, **_group_info(src.cases)})
            findings.append(f"the same file is listed {len(ids)} times (cases {_describe(ids)})")
    return out


def _flags_text(info: dict[str, bool]) -> str:
    parts = [p for p, on in (("across patients", info["cross_patient"]), ("across labels", info["cross_label"])) if on]
    return f" ({', '.join(parts)})" if parts else ""


def _exact_duplicates(readable: list[_Source], pseudo: Callable[[str], str],
                      findings: list[str]) -> list[dict[str, Any]]:
    by_hash: dict[str, list[_Source]] = defaultdict(list)
    for src in readable:
        by_hash[src.sha].append(src)
    out = []
    for group in by_hash.values():
        if len(group) < 2:
            continue
        cases = [c for s in group for c in s.cases]
        ids = [c.case_id for c in cases]
        info = _group_info(cases)
        out.append({"case_ids": ids, "n_files": len(group),
                    "patients": sorted({pseudo(c.patient_id) for c in cases}), **info})
        findings.append(f"{len(group)} files have identical pixels{_flags_text(info)}: cases {_describe(ids)}")
    return out


def _near_duplicates(readable: list[_Source], max_distance: int, findings: list[str]) -> list[dict[str, Any]]:
    n = len(readable)
    if n < 2:
        return []
    hashes = np.stack([s.dhash for s in readable])  # (n, 32) uint8
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    edges: dict[int, int] = {}
    for i in range(n - 1):
        dist = _popcount(hashes[i] ^ hashes[i + 1:]).sum(axis=1, dtype=np.int64)
        for k in np.nonzero(dist <= max_distance)[0]:
            j = i + 1 + int(k)
            if readable[i].sha == readable[j].sha:
                continue  # exact duplicates are reported separately
            ri, rj = root(i), root(j)
            parent[ri] = rj
            edges[i] = max(edges.get(i, 0), int(dist[k]))
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[root(i)].append(i)
    out = []
    for members in groups.values():
        if len({readable[i].sha for i in members}) < 2:
            continue
        cases = [c for i in members for c in readable[i].cases]
        ids = [c.case_id for c in cases]
        info = _group_info(cases)
        distance = max(edges.get(i, 0) for i in members)
        out.append({"case_ids": ids, "max_hamming_distance": distance, **info})
        findings.append(f"{len(members)} near-duplicate images (hash distance <= {distance})"
                        f"{_flags_text(info)}: cases {_describe(ids)}")
    return out


def _label_conflicts(cases: list[Case], pseudo: Callable[[str], str], findings: list[str]) -> list[dict[str, Any]]:
    per_patient: dict[str, Counter] = defaultdict(Counter)
    for c in cases:
        if c.label is not None:
            per_patient[c.patient_id][str(c.label)] += 1
    out = []
    for patient, labels in per_patient.items():
        if len(labels) > 1:
            pid = pseudo(patient)
            names = sorted(labels)
            out.append({"patient": pid, "labels": {k: labels[k] for k in names}})
            findings.append(f"patient {pid} has labels {' and '.join(names)} "
                            f"({' and '.join(str(labels[k]) for k in names)} cases)")
    return out


def _confounders(readable: list[_Source], findings: list[str]) -> dict[str, Any]:
    rows = [(s.fields, str(c.label), c.patient_id) for s in readable for c in s.cases if c.label is not None]
    labels = sorted({r[1] for r in rows})
    if len(labels) < 2:
        return {"fields": {}, "constant_fields": [], "note": "fewer than two labels: nothing to check"}
    y = np.array([r[1] for r in rows])
    patients = np.array([r[2] for r in rows])
    prior = max(Counter(y.tolist()).values()) / len(y)
    out: dict[str, Any] = {"fields": {}, "constant_fields": [], "prior": round(prior, 4)}
    for name in _CONFOUNDER_FIELDS:
        x = np.array([r[0].get(name, _MISSING) for r in rows])
        values = sorted(set(x.tolist()))
        if values == [_MISSING]:
            continue
        if len(values) == 1:
            out["constant_fields"].append(name)
            continue
        table = {v: {lab: int(((x == v) & (y == lab)).sum()) for lab in labels} for v in values}
        v_corr = _cramers_v(np.array([[table[v][lab] for lab in labels] for v in values], dtype=float))
        acc = _lopo_accuracy(x, y, patients)
        flagged = acc >= prior + _LOPO_MARGIN or (v_corr >= _CRAMERS_V_FLAG and acc > prior + 0.05)
        presence = _presence_leak(x, y, patients)
        out["fields"][name] = {"n_values": len(values), "table": table, "cramers_v": round(v_corr, 4),
                               "lopo_accuracy": round(acc, 4), "presence": presence,
                               "flagged": bool(flagged or (presence or {}).get("flagged", False))}
        if flagged:
            findings.append(f"header field {name} predicts the label on its own (leave-one-patient-out "
                            f"accuracy {acc:.2f} vs prior {prior:.2f}, Cramér's V {v_corr:.2f}): a model "
                            "can learn the scanner/protocol instead of the anatomy")
        elif presence and presence["flagged"]:
            only = "only" if presence["n_label"] == presence["n_present"] else "almost only"
            findings.append(f"header field {name} is set {only} in label {presence['label']} cases "
                            f"({presence['n_label']} of {presence['n_present']} cases, {presence['n_patients']} "
                            "patients): its presence leaks the label")
    return out


def _presence_leak(x: np.ndarray, y: np.ndarray, patients: np.ndarray) -> dict[str, Any] | None:
    """Is 'the field is set' (vs missing) a label marker, e.g. a contrast agent tag?

    Tested over patients (cases of one patient are not independent): a one-sided binomial
    tail of how many patients with the field set share its majority label.
    """
    present = x != _MISSING
    if present.all() or not present.any():
        return None
    label, n_label = Counter(y[present].tolist()).most_common(1)[0]
    pats = sorted(set(patients[present].tolist()))
    pat_major = [Counter(y[present & (patients == p)].tolist()).most_common(1)[0][0] for p in pats]
    m, k = len(pats), sum(lab == label for lab in pat_major)
    base = float((y == label).mean())
    p_value = sum(math.comb(m, j) * base**j * (1 - base) ** (m - j) for j in range(k, m + 1))
    purity = n_label / int(present.sum())
    return {"label": label, "n_present": int(present.sum()), "n_label": n_label, "n_patients": m,
            "purity": round(purity, 4), "p_value": round(p_value, 6),
            "flagged": bool(purity >= 0.9 and p_value < 0.01 and base < 0.9)}


def _cramers_v(table: np.ndarray) -> float:
    """Bias-corrected Cramér's V (Bergsma 2013) of an ``(n_values, n_labels)`` table."""
    n = table.sum()
    r, k = table.shape
    if n < 2 or r < 2 or k < 2:
        return 0.0
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    chi2 = float(((table - expected) ** 2 / np.where(expected > 0, expected, 1)).sum())
    phi2 = max(0.0, chi2 / n - (k - 1) * (r - 1) / (n - 1))
    r_c, k_c = r - (r - 1) ** 2 / (n - 1), k - (k - 1) ** 2 / (n - 1)
    denom = min(k_c - 1, r_c - 1)
    return float(np.sqrt(phi2 / denom)) if denom > 0 else 0.0


def _lopo_accuracy(x: np.ndarray, y: np.ndarray, patients: np.ndarray) -> float:
    """Accuracy of 'predict the majority label of other patients with the same value'."""
    overall = Counter(y.tolist())
    correct = 0
    for i in range(len(y)):
        others = (x == x[i]) & (patients != patients[i])
        votes = Counter(y[others].tolist()) if others.any() else overall
        correct += votes.most_common(1)[0][0] == y[i]
    return correct / len(y)


def _intensity(readable: list[_Source], findings: list[str]) -> dict[str, Any]:
    per_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    nan_ids, blank_ids = [], []
    for s in readable:
        for c in s.cases:
            per_label[_UNLABELLED if c.label is None else str(c.label)].append(s.stats)
            if s.stats["nan"]:
                nan_ids.append(c.case_id)
            elif s.stats["min"] == s.stats["max"]:
                blank_ids.append(c.case_id)
    summary = {}
    for label, stats in sorted(per_label.items()):
        mins = np.array([st["min"] for st in stats])
        maxs = np.array([st["max"] for st in stats])
        means = np.array([st["mean"] for st in stats])
        entry = {"n": len(stats), "min": _num(np.nanmin(mins)), "max": _num(np.nanmax(maxs)),
                 "median_image_min": _num(np.nanmedian(mins)), "median_image_max": _num(np.nanmedian(maxs)),
                 "mean_of_means": _num(np.nanmean(means))}
        hu = [st for st in stats if st["is_hu"]]
        if hu:
            entry["hu_range"] = [_num(min(st["min"] for st in hu)), _num(max(st["max"] for st in hu))]
        summary[label] = entry
    if nan_ids:
        findings.append(f"{len(nan_ids)} images contain NaN/Inf values (cases {_describe(nan_ids)})")
    if blank_ids:
        findings.append(f"{len(blank_ids)} images are blank (one constant value): cases {_describe(blank_ids)}")
    labels = [k for k in summary if k != _UNLABELLED]
    separating = []
    for stat in ("min", "max"):
        ranges = {k: (np.nanmin([st[stat] for st in per_label[k]]), np.nanmax([st[stat] for st in per_label[k]]))
                  for k in labels}
        ordered = sorted(ranges.values())
        if len(ordered) > 1 and all(a[1] < b[0] for a, b in zip(ordered, ordered[1:])):
            separating.append(stat)
            desc = "; ".join(f"label {k}: {lo:g} to {hi:g}" for k, (lo, hi) in ranges.items())
            findings.append(f"the per-image {stat}imum intensity alone separates the labels ({desc}): "
                            "the classes were probably exported or scaled differently")
    return {"per_label": summary, "nan_images": nan_ids, "blank_images": blank_ids,
            "separating_statistics": separating}


def _num(value: Any) -> float | None:
    value = float(value)
    return round(value, 4) if np.isfinite(value) else None


def _redactor(cases: list[Case], pseudo: Callable[[str], str]) -> Callable[[str | None], str | None]:
    """Function replacing raw patient ids in a path or reason (e.g. ``/data/MRN123/ct``) by pseudonyms,
    as whole values only (a reason ``NumberOfFrames=3`` stays as it is for patient ``3``)."""
    return make_redactor((c.patient_id for c in cases), pseudo)
