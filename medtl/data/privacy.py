"""Pseudonymisation of patient identifiers.

Patient IDs (and every other identifying DICOM tag) never reach reports, logs or file
names unless the user sets ``privacy.reveal_ids: true``. Within one run a patient keeps
the same pseudonym, so grouping can still be checked from ``predictions.csv``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

__all__ = ["Pseudonymizer", "IDENTIFYING_TAGS"]

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
