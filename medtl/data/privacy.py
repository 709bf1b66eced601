"""Pseudonymisation of patient identifiers.

Patient IDs (and every other identifying DICOM tag) never reach reports, logs or file
names unless the user sets ``privacy.reveal_ids: true``. Within one run a patient keeps
the same pseudonym, so grouping can still be checked from ``predictions.csv``.

Free text that may hold an identifier (a file path with a folder named after the patient, a
reason quoting that path) goes through :func:`make_redactor`, which replaces identifiers as
whole values only, never inside other words or numbers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["Pseudonymizer", "IDENTIFYING_TAGS", "make_redactor"]

# DICOM keywords that identify a patient, a visit or an institution (PS3.15 Annex E, basic
# profile, the subset medtl can meet in image headers). They are never copied into outputs.
IDENTIFYING_TAGS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "PatientAge", "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs",
    "OtherPatientNames", "IssuerOfPatientID", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "AccessionNumber", "StudyID", "StationName", "DeviceSerialNumber",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime",
)


class Pseudonymizer:
    """Map patient IDs to stable, non-reversible pseudonyms ``P-xxxxxxxx``.

    A keyed hash (HMAC-SHA256) with a per-run secret salt is used, so short hospital
    IDs cannot be recovered by brute force from the pseudonym alone.

    Args:
        salt: hex secret; a new random one is drawn when ``None``.
        reveal: when ``True`` IDs pass through unchanged (the user asked for it).

    Example:
        >>> p = Pseudonymizer(salt="00")
        >>> p("MRN123") == p("MRN123")
        True
    """

    def __init__(self, salt: str | None = None, reveal: bool = False) -> None:
        self.salt = salt if salt is not None else secrets.token_hex(16)
        self.reveal = reveal

    def __call__(self, patient_id: str) -> str:
        if self.reveal:
            return str(patient_id)
        digest = hmac.new(bytes.fromhex(self.salt) if _is_hex(self.salt) else self.salt.encode(),
                          str(patient_id).encode(), hashlib.sha256).hexdigest()
        return f"P-{digest[:10]}"

    @classmethod
    def for_run(cls, run_dir: str | Path, reveal: bool = False) -> Pseudonymizer:
        """The run's pseudonymiser; its salt is kept in ``RUN_DIR/.pseudonym_salt``."""
        path = Path(run_dir) / ".pseudonym_salt"
        if path.exists():
            return cls(path.read_text().strip(), reveal)
        inst = cls(None, reveal)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(inst.salt)
        return inst


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
        return len(s) % 2 == 0
    except ValueError:
        return False


#: numeric ids up to this many digits (and any id of 1-2 characters) collide with ordinary
#: numbers and words in messages ("NumberOfFrames=3", "512 x 512"): they are replaced only as
#: a whole path component or as the whole text
_SHORT_NUMBER_DIGITS = 5
_COMPONENT = re.compile(r"(?<![^/\\])[^/\\]+(?![^/\\])")  # a run between path separators (or the ends)


def _is_short(identifier: str) -> bool:
    return len(identifier) <= 2 or (identifier.isdigit() and len(identifier) <= _SHORT_NUMBER_DIGITS)


def make_redactor(identifiers: Iterable[str], pseudonymize: Callable[[str], str]
                  ) -> Callable[[str | None], str | None]:
    """A function replacing identifiers in free text by their pseudonyms, as whole values only.

    An identifier is replaced where it stands as a whole token: between the ends of the text or
    characters other than letters and digits (``/data/MRN123/ct.dcm``, ``MRN123_ct.dcm``), never
    inside a longer word or number (``MRN1234``, ``XMRN123``). Short numeric identifiers (up to
    five digits) and identifiers of one or two characters are replaced only as a whole path
    component (``/data/3/ct.dcm``) or when they are the whole text, so that ``NumberOfFrames=3``
    or ``512 x 512`` stay readable with a patient ``3`` or ``512``.

    Args:
        identifiers: the raw ids (patient ids) to hide.
        pseudonymize: maps one id to its pseudonym (e.g. a :class:`Pseudonymizer`); ids it
            maps to themselves (``reveal_ids``) are left alone.

    Example:
        >>> redact = make_redactor(["3", "MRN123"], lambda i: "P-" + i.lower())
        >>> redact("/data/MRN123/3/scan.dcm: NumberOfFrames=3")
        '/data/P-mrn123/P-3/scan.dcm: NumberOfFrames=3'
    """
    mapping: dict[str, str] = {}
    for raw in identifiers:
        text = str(raw)
        if text.strip() and text not in mapping:
            alias = pseudonymize(text)
            if alias != text:
                mapping[text] = alias
    if not mapping:
        return lambda text: text
    short = {i for i in mapping if _is_short(i)}
    long = sorted((i for i in mapping if i not in short), key=len, reverse=True)
    pattern = (re.compile("(?<![A-Za-z0-9])(" + "|".join(re.escape(i) for i in long) + ")(?![A-Za-z0-9])")
               if long else None)

    def component(m: re.Match) -> str:
        return mapping[m.group(0)] if m.group(0) in short else m.group(0)

    def redact(text: str | None) -> str | None:
        if text is None:
            return None
        if text in mapping:
            return mapping[text]
        if short:
            text = _COMPONENT.sub(component, text)
        if pattern is not None:
            text = pattern.sub(lambda m: mapping[m.group(1)], text)
        return text

    return redact
