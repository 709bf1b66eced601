"""Cases and manifests: what a dataset is before any pixel is decoded.

Labels mean what they say: numeric and true/false spellings of one class are read as one
class (``1``, ``1.0``, ``+1`` -> ``1``; ``true``, ``TRUE`` -> ``True``), and the mapping is logged
once and kept on each case (``Case.raw_label``) for the audit to report. A column whose
spellings cannot be read one way (``1`` beside ``true``; ``Benign`` beside ``benign``) and a
header that repeats a column name are refused.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from medtl.errors import DataError

__all__ = ["Case", "read_manifest", "read_medmnist", "read_labelled_folder", "canonical_labels",
           "label_spellings", "MEDMNIST_CLASSES", "REQUIRED_COLUMNS"]

_log = logging.getLogger("medtl.data")


@dataclass(frozen=True)
class Case:
    """One labelled scan.

    Attributes:
        case_id: stable, non-identifying id, e.g. ``"row0007"`` (manifest row) or
            ``"train-00012"`` (MedMNIST split and index). Safe to print.
        path: DICOM file, DICOM series folder, NIfTI or PNG/JPEG file; ``None`` when
            the pixels are held in memory (``array``).
        label: class name as a string (``None`` for unlabelled cases).
        patient_id: the user's patient ID. Identifying: pseudonymise before output.
        site: acquisition site, or ``None``.
        array: in-memory pixels, channel-first float32 ``(C, H, W)`` or ``(C, D, H, W)``.
        mask: optional path to a region mask (e.g. a lesion) used to score saliency.
        split: ``"train"``/``"val"``/``"test"`` for official-split runs, else ``None``.
        raw_label: the label as spelled in the file when it was canonicalised (``"1.0"`` for
            ``label`` ``"1"``), else ``None``.
        targets: the cells of further label columns (multi-task runs), ``{column: text}``,
            stripped; ``""`` where the cell is empty or a missing-value word (``nan``, ``na``, ...).
        series: for a DICOM folder holding several series, the one to read (a manifest's
            ``series`` column: an index or key as the reader's error lists them, or the
            SeriesInstanceUID; see :func:`medtl.data.readers.read_image`), else ``None``.
    """

    case_id: str
    path: str | None
    label: str | None
    patient_id: str
    site: str | None = None
    array: np.ndarray | None = field(default=None, repr=False, compare=False)
    mask: str | None = None
    split: str | None = None
    raw_label: str | None = field(default=None, compare=False)
    targets: dict[str, str] | None = field(default=None, compare=False, repr=False)
    series: str | None = None


REQUIRED_COLUMNS = ("path", "label", "patient_id")
OPTIONAL_COLUMNS = ("site", "mask", "split", "series")

# Class names of the MedMNIST files shipped with the project (medmnist/info.py, v3.0.2).
MEDMNIST_CLASSES: dict[str, list[str]] = {
    "breastmnist": ["malignant", "normal_or_benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "adrenalmnist3d": ["normal", "hyperplasia"],
}


def read_manifest(path: str | Path, *, label_column: str = "label", root: str | Path | None = None,
                  allow_duplicates: bool = False, target_columns: Sequence[str] = ()) -> list[Case]:
    """Read a manifest CSV with columns ``path,label,patient_id`` (+ optional ``site``,
    ``mask``, ``split``, ``series``). Relative paths resolve against the manifest's folder.
    ``series`` picks one series of a DICOM folder that holds several (:attr:`Case.series`);
    one folder may then be listed once per series.

    Every problem in the file is collected and raised together as one :class:`DataError`
    that names the file, the row numbers and what to fix; nothing is silently dropped.

    Args:
        root: when given, every image and mask path must resolve (symlinks followed) to a
            location inside this folder; rows pointing elsewhere (``../../etc``, absolute
            paths) are errors.
        allow_duplicates: keep rows that repeat an earlier row's image path (the audit
            reports them); by default they are errors, because a file listed twice is
            counted twice and, under two patient ids, leaks across folds.
        target_columns: further label columns (multi-task runs), kept per case in
            :attr:`Case.targets`; their cells may be empty (a missing label).

    Example:
        >>> cases = read_manifest("data/manifest.csv", root="data")   # doctest: +SKIP
        >>> cases[0].case_id, cases[0].label                          # doctest: +SKIP
        ('row00002', 'contrast')
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Manifest '{path}' does not exist. Give a CSV with columns "
                        f"{','.join(REQUIRED_COLUMNS)} (optional: {','.join(OPTIONAL_COLUMNS)}).")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"Manifest '{path}' is not UTF-8 text ({exc}). Save it as UTF-8 CSV.") from exc
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip() for h in (reader.fieldnames or [])]
        _check_unique_columns(header, f"Manifest '{path}'")
        rows = list(reader)
    except csv.Error as exc:
        raise DataError(f"Manifest '{path}' is not a valid CSV: {exc}.") from exc
    required = ("path", label_column, "patient_id")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"Manifest '{path}' lacks column(s) {missing}. Found columns {header}; required "
                        f"are {list(required)} (optional: {list(OPTIONAL_COLUMNS)}).")
    _check_target_columns(target_columns, header, f"Manifest '{path}'")
    problems: list[str] = []
    cases: list[Case] = []
    base = path.parent
    root_dir = Path(root).expanduser().resolve() if root is not None else None
    first_row: dict[str, int] = {}
    for i, row in enumerate(rows):
        line = i + 2  # 1-based, after the header
        raw_label = next((v for k, v in row.items() if (k or "").strip() == label_column and isinstance(v, str)), None)
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in row.items()}
        if None in row or "" in row and row[""]:
            problems.append(f"row {line}: more fields than columns in the header")
            continue
        empty = [c for c in required if not row.get(c)]
        if empty:
            problems.append(f"row {line}: empty {', '.join(empty)}")
            continue
        if row[label_column].lower() in ("nan", "na", "none", "null"):
            problems.append(f"row {line}: label is '{row[label_column]}'")
            continue
        p = Path(row["path"]).expanduser()
        p = p if p.is_absolute() else base / p
        mask = row.get("mask") or None
        if mask and not Path(mask).is_absolute():
            mask = str(base / mask)
        try:
            outside = [str(q) for q in (p, mask) if q and root_dir is not None and not _inside(q, root_dir)]
        except (RuntimeError, OSError):  # Path.resolve() on a symlink that leads back to itself
            problems.append(f"row {line}: path '{row['path']}' is a symlink loop (a link that leads back to itself)")
            continue
        if outside:
            problems.append(f"row {line}: path '{outside[0]}' is outside the data root '{root_dir}'")
            continue
        series = row.get("series") or None
        key = str(Path(os.path.normpath(p))) + (f"#series={series}" if series else "")
        if key in first_row and not allow_duplicates:
            problems.append(f"row {line}: path '{row['path']}' is already listed in row {first_row[key]}")
            continue
        first_row.setdefault(key, line)
        split = (row.get("split") or "").lower() or None
        if split is not None and split not in ("train", "val", "test"):
            problems.append(f"row {line}: split '{row['split']}' is not one of train, val, test")
            continue
        cases.append(Case(case_id=f"row{line:05d}", path=str(p), label=row[label_column],
                          patient_id=row["patient_id"], site=row.get("site") or None, mask=mask,
                          split=split, raw_label=raw_label, targets=_targets(row, target_columns),
                          series=series))
    if problems:
        raise DataError(f"Manifest '{path}' has {len(problems)} malformed row(s):\n  {_listing(problems)}\n"
                        "Fix these rows (or remove them deliberately) and run again.")
    if not cases:
        raise DataError(f"Manifest '{path}' has no rows.")
    return _canonicalise(cases, f"Manifest '{path}' column '{label_column}'")


def read_medmnist(path: str | Path, *, split: str = "official") -> list[Case]:
    """Cases from an official MedMNIST ``.npz``: images in memory, ``split`` set from the file.

    MedMNIST carries no patient IDs; each image is its own group (``patient_id`` = case id).
    Arrays become channel-first float32 ``(1, H, W)`` or ``(1, D, H, W)`` (RGB -> ``(3, H, W)``)
    with the original 0-255 values.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MedMNIST file '{path}' does not exist. Set data.path (shipped configs use "
                        "${MEDTL_SHARED_DATA}/medmnist/...; set MEDTL_SHARED_DATA to the datasets folder).")
    try:
        npz = np.load(path)
        keys = set(npz.files)
    except Exception as exc:  # zip/pickle errors from np.load
        raise DataError(f"'{path}' is not a readable .npz file: {exc}") from exc
    need = {f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")}
    if not need <= keys:
        raise DataError(f"'{path}' is not a MedMNIST file: missing keys {sorted(need - keys)} (found {sorted(keys)}).")
    names = MEDMNIST_CLASSES.get(path.stem.lower().replace("_224", ""))
    cases = []
    for s in ("train", "val", "test"):
        images, labels = npz[f"{s}_images"], npz[f"{s}_labels"]
        if labels.ndim != 2 or labels.shape[1] != 1:
            raise DataError(f"'{path}': {s}_labels has shape {labels.shape}; medtl supports single-label "
                            "MedMNIST tasks (labels of shape (N, 1)).")
        for j in range(len(images)):
            arr = images[j].astype(np.float32)
            arr = np.moveaxis(arr, -1, 0) if arr.ndim == 3 and arr.shape[-1] == 3 else arr[None]
            y = int(labels[j, 0])
            cid = f"{s}-{j:05d}"
            cases.append(Case(case_id=cid, path=None, label=names[y] if names else str(y),
                              patient_id=cid, array=arr, split=s if split == "official" else None))
    return cases


def read_labelled_folder(folder: str | Path, labels_csv: str | Path, *, file_column: str, label_column: str,
                         patient_column: str | None = None, site_column: str | None = None,
                         target_columns: Sequence[str] = ()) -> list[Case]:
    """Cases from a folder of scans plus a label CSV keyed by file name (a typical hospital export).

    Each CSV row names one file (``file_column``, relative to ``folder``). The patient is
    taken from ``patient_column`` when given, else from the file's DICOM PatientID, so
    grouping by patient works without the user copying IDs by hand. IDs are kept in memory
    only and pseudonymised in every output.

    Raises:
        DataError: missing columns, missing files, empty labels or absent PatientIDs, all
            listed at once with row numbers.
    """
    folder, labels_csv = Path(folder), Path(labels_csv)
    if not folder.is_dir():
        raise DataError(f"Image folder '{folder}' does not exist (data.path).")
    if not labels_csv.is_file():
        raise DataError(f"Label CSV '{labels_csv}' does not exist (data.labels.csv).")
    try:
        with labels_csv.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            _check_unique_columns([h.strip() for h in header], f"Label CSV '{labels_csv}'")
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"Label CSV '{labels_csv}' is not UTF-8 text ({exc}). Save it as UTF-8 CSV.") from None
    except csv.Error as exc:
        raise DataError(f"Label CSV '{labels_csv}' is not a valid CSV: {exc}.") from None
    need = [c for c in (file_column, label_column, patient_column, site_column) if c]
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(f"Label CSV '{labels_csv}' lacks column(s) {missing}; it has {header}. "
                        "Set data.labels.file_column / label_column / patient_column to existing columns.")
    _check_target_columns(target_columns, [h.strip() for h in header], f"Label CSV '{labels_csv}'")
    from medtl.data.readers import read_dicom_patient_id

    problems, cases = [], []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        line = i + 2
        fname, label = (row.get(file_column) or "").strip(), (row.get(label_column) or "").strip()
        if not fname or not label:
            problems.append(f"row {line}: empty {file_column if not fname else label_column}")
            continue
        path = folder / fname
        if fname in seen:
            problems.append(f"row {line}: file '{fname}' is already listed in row {seen[fname]}")
            continue
        seen[fname] = line
        if not path.exists():
            loop = _is_symlink_loop(path)
            problems.append(f"row {line}: file '{fname}' is a symlink loop (a link that leads back to itself)" if loop
                            else f"row {line}: file '{fname}' not found in {folder}")
            continue
        pid = (row.get(patient_column) or "").strip() if patient_column else None
        if not pid:
            try:
                pid = read_dicom_patient_id(path)
            except Exception as exc:  # UnreadableFileError or a header problem: report with the row
                problems.append(f"row {line}: cannot read PatientID from '{fname}' ({exc})")
                continue
        if not pid:
            problems.append(f"row {line}: '{fname}' has no PatientID; add a patient column to the CSV "
                            "and set data.labels.patient_column")
            continue
        site = (row.get(site_column) or "").strip() or None if site_column else None
        cases.append(Case(case_id=f"row{line:05d}", path=str(path), label=label, patient_id=pid, site=site,
                          raw_label=row.get(label_column),
                          targets=_targets({(k or "").strip(): v for k, v in row.items()}, target_columns)))
    if problems:
        raise DataError(f"Label CSV '{labels_csv}' has {len(problems)} problem(s):\n  {_listing(problems)}")
    if not cases:
        raise DataError(f"Label CSV '{labels_csv}' has no rows.")
    return _canonicalise(cases, f"Label CSV '{labels_csv}' column '{label_column}'")


# --------------------------------------------------------------------------- labels
_BOOLEANS = {"true": "True", "false": "False"}  # the spelling of Python, pandas and most exports


def _kind(label: str) -> tuple[str, str]:
    """``(kind, canonical)`` of one stripped label: ``num`` (``"1.0"`` -> ``"1"``, ``"0.50"`` -> ``"0.5"``),
    ``bool`` (``"TRUE"`` -> ``"True"``) or ``text`` (unchanged)."""
    low = label.lower()
    if low in _BOOLEANS:
        return "bool", _BOOLEANS[low]
    try:
        d = Decimal(label)
    except (InvalidOperation, ValueError):
        return "text", label
    if not d.is_finite():  # "nan", "inf": words, and never a class spelled as a number
        return "text", label
    if d == d.to_integral_value():
        return "num", str(int(d))
    return "num", format(d.normalize(), "f")


def canonical_labels(labels: Iterable[str], what: str = "the label column") -> dict[str, str]:
    """Map every spelling in ``labels`` to its class name; raise when the spellings cannot be read one way.

    Numeric spellings become one canonical number (``1``, `` 1``, ``1.0``, ``+1``, ``1e0`` -> ``1``)
    and ``true``/``false`` in any letter case become ``True``/``False``. Text labels stay as they are.

    Raises:
        DataError: the column mixes numeric and true/false spellings (``1`` and ``true``), or
            text labels that differ only in letter case or spacing (``Benign``, ``benign``).

    Example:
        >>> canonical_labels(["0", "1.0", " 1", "0.0"])
        {'0': '0', '1.0': '1', ' 1': '1', '0.0': '0'}
        >>> canonical_labels(["True", "true", "FALSE"])
        {'True': 'True', 'true': 'True', 'FALSE': 'False'}
    """
    spellings = list(dict.fromkeys(str(x) for x in labels))
    kinds = {s: _kind(s.strip()) for s in spellings}
    present = {k for k, _ in kinds.values()}
    if {"num", "bool"} <= present:
        nums = sorted({s.strip() for s, (k, _) in kinds.items() if k == "num"})
        bools = sorted({s.strip() for s, (k, _) in kinds.items() if k == "bool"})
        raise DataError(f"{what} mixes numeric labels ({_quoted(nums)}) and true/false labels ({_quoted(bools)}), "
                        "so it is not clear which are the same class. Spell each class one way (e.g. 0/1, or "
                        "False/True) and run again.")
    by_fold: dict[str, set[str]] = {}
    for k, c in kinds.values():
        if k == "text":
            by_fold.setdefault(" ".join(c.split()).casefold(), set()).add(c)
    clashes = [sorted(v) for v in by_fold.values() if len(v) > 1]
    if clashes:
        listing = "; ".join(_quoted(c) for c in clashes)
        raise DataError(f"{what} spells one class several ways that differ only in letter case or spacing "
                        f"({listing}), so they would train as different classes. Use one spelling per class and "
                        "run again.")
    return {s: c for s, (_, c) in kinds.items()}


def label_spellings(cases: Iterable[Case]) -> dict[str, dict[str, int]]:
    """``{class: {spelling: n_cases}}`` of the labels that were canonicalised (``Case.raw_label``).

    Example:
        >>> label_spellings([Case("a", None, "1", "P1", raw_label="1.0")])
        {'1': {'1.0': 1}}
    """
    out: dict[str, Counter] = {}
    for c in cases:
        if c.raw_label is not None and c.label is not None and c.raw_label != c.label:
            out.setdefault(c.label, Counter())[c.raw_label] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def _canonicalise(cases: list[Case], what: str) -> list[Case]:
    """``cases`` with canonical labels; logs the mapping once (spellings that changed)."""
    from dataclasses import replace

    mapping = canonical_labels([c.label for c in cases if c.label is not None], what)
    out = []
    for c in cases:
        label = mapping.get(c.label, c.label) if c.label is not None else None
        # the spelling in the file, when it differs from the class name by more than surrounding spaces
        raw = c.raw_label if c.raw_label is not None and c.raw_label.strip() != label else None
        out.append(replace(c, label=label, raw_label=raw) if (label, raw) != (c.label, c.raw_label) else c)
    changed = label_spellings(out)
    if changed:
        _log.warning("%s: labels canonicalised: %s", what, _mapping_text(changed))
    return out


def _mapping_text(changed: dict[str, dict[str, int]]) -> str:
    """``'1.0' -> '1' (3 rows), 'TRUE' -> 'True' (2 rows)``."""
    return ", ".join(f"{raw!r} -> {label!r} ({n} row{'s' if n != 1 else ''})"
                     for label, spell in changed.items() for raw, n in spell.items())


def _quoted(values: Iterable[str], limit: int = 8) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _check_unique_columns(header: list[str], what: str) -> None:
    """Refuse a header that names a column twice (csv.DictReader would silently keep the last)."""
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(header):
        if name:
            seen.setdefault(name, []).append(i + 1)
    repeated = {k: v for k, v in seen.items() if len(v) > 1}
    if repeated:
        where = "; ".join(f"'{k}' in columns {', '.join(map(str, v))}" for k, v in repeated.items())
        raise DataError(f"{what} repeats column name(s) in its header: {where}. A CSV reader keeps only the last "
                        "of them, silently. Rename or remove the repeated column(s) and run again.")


#: cell values read as a missing label in a further label column (multi-task runs)
MISSING_LABELS = ("", "nan", "na", "n/a", "none", "null")


def _targets(row: dict, columns: Sequence[str]) -> dict[str, str] | None:
    """``{column: stripped cell}`` of the further label columns; ``""`` for a missing label."""
    if not columns:
        return None
    out = {}
    for c in columns:
        v = row.get(c)
        v = v.strip() if isinstance(v, str) else ""
        out[c] = "" if v.lower() in MISSING_LABELS else v
    return out


def _check_target_columns(columns: Sequence[str], header: list[str], what: str) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{what} lacks the task column(s) {missing} named in `tasks`; it has {header}. Set each "
                        "task's column (or columns) to an existing column.")


def _is_symlink_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        import errno

        return exc.errno == errno.ELOOP
    return False


def _inside(path: str | Path, root: Path) -> bool:
    """True when ``path`` (symlinks resolved) lies in ``root`` (already resolved)."""
    return Path(path).resolve().is_relative_to(root)


def _listing(problems: list[str], limit: int = 20) -> str:
    """The first ``limit`` problems, one per line, and how many more there are."""
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  ".join(problems[:limit]) + more
