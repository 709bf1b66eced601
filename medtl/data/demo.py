"""The embedded demo dataset: a small synthetic two-site chest CT study written as DICOM.

``medtl demo`` needs no network and no user data. :func:`make_demo_dataset` writes real
CT DICOM files (pydicom, CT Image Storage, Explicit VR Little Endian) of an analytic
chest phantom, a ground-truth nodule mask per lesion slice and a manifest::

    out_dir/
      manifest.csv                      path,label,patient_id,site,mask
      dicom/site_a/pat07/slice_01.dcm   one axial slice, stored uint16 + RescaleIntercept -1024
      masks/pat07_slice01.npy           uint8 (H, W) nodule mask, 1 = nodule
      .demo_identifiers.json            every identifying value written into the headers

Manifest paths are POSIX paths relative to the folder that holds ``manifest.csv``.
One row per slice. ``label`` is ``"lesion"`` or ``"normal"`` and is set per patient.
``patient_id`` is the DICOM PatientID (identifying, as in a hospital export). ``mask``
is empty when the slice shows no nodule: every slice of a normal patient, and the odd
slice of a lesion patient that lies above or below the nodule (those slices keep the
patient's ``"lesion"`` label, as slice labels inherited from a patient would).

The headers carry synthetic identifying values on purpose (PatientName
``DEMO^PATIENT^07``, PatientID ``DEMO-MRN-xxxxxx``, birth and study dates, accession
numbers, institution, UIDs) so that privacy handling downstream is exercised; no file
or folder name contains them. PatientSex and PatientAge are not written and StudyTime is
empty (a one-letter or six-digit value cannot be searched for without false hits).
:func:`demo_identifying_strings` reads the values back from the JSON sidecar and
:func:`find_identifying_strings` searches a text for them.

Sites differ the way two scanners do: ``site_b`` has more noise, a sharper
(edge-enhancing) kernel, a +8 HU calibration offset, thicker slices and a
two-valued WindowCenter/WindowWidth; both sites hold both classes in equal measure.
``screening_site`` makes the protocol of one site follow the clinical indication, as it
often does: that site's lesion patients have the standard-dose work-up protocol of the site,
its normal patients come from low-dose screening (about 1/8 of the dose, so about 2.8 times
the noise, 50 HU, and a smooth kernel). At that site the image noise then tells the classes
apart by itself, a shortcut a model can learn there instead of the nodule.
PixelSpacing (0.70-0.90 mm, per patient) is that of the 512-matrix reconstruction the
small image stands in for; it keeps any mm-based resampling downstream cheap.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
# SciPy (a scikit-learn dependency) gives the blur, noise correlation and distance maps;
# MONAI's transforms would add torch round trips for 96x96 arrays with no gain.
from scipy import ndimage

from medtl.errors import ConfigError, DataError

__all__ = [
    "make_demo_dataset",
    "demo_identifying_strings",
    "find_identifying_strings",
    "DEMO_LABELS",
    "DEMO_SITES",
    "IDENTIFIERS_FILE",
]

DEMO_LABELS: tuple[str, str] = ("lesion", "normal")
DEMO_SITES: tuple[str, str] = ("site_a", "site_b")
IDENTIFIERS_FILE = ".demo_identifiers.json"
_MANIFEST_COLUMNS = ("path", "label", "patient_id", "site", "mask")


@dataclass(frozen=True)
class _Site:
    name: str
    institution: str
    manufacturer: str
    model: str
    station: str
    serial: str
    kernel: str
    noise_hu: float      # standard deviation of the image noise
    noise_corr_px: float  # noise correlation length (Gaussian sigma)
    blur_px: float       # reconstruction point-spread function (Gaussian sigma)
    sharpen: float       # unsharp-mask amount of an edge-enhancing kernel
    hu_offset: float     # calibration offset
    thickness_mm: float
    window: tuple[str | list[str], str | list[str]]  # WindowCenter, WindowWidth


_SITES = (
    _Site("site_a", "Demo Hospital A", "Acme Imaging", "Acme CT 64", "DEMO-CT-A", "DEMO-SN-A0001",
          "STANDARD", 12.0, 0.8, 0.6, 0.0, 0.0, 2.5, ("40", "400")),
    _Site("site_b", "Demo Hospital B", "Borealis Medical", "Borealis Helix 128", "DEMO-CT-B",
          "DEMO-SN-B0002", "SHARP", 18.0, 0.6, 0.4, 0.35, 8.0, 3.0, (["-600", "40"], ["1500", "400"])),
)


@dataclass(frozen=True)
class _Patient:
    number: int
    folder: str
    site: _Site
    label: str
    ids: dict[str, str]  # identifying header values, keyed by DICOM keyword
    spacing_mm: float
    z0_mm: float  # table position of the first slice


def make_demo_dataset(out_dir: str | Path, *, n_patients: int = 24, slices_per_patient: int = 4,
                      size: int = 96, lesion_fraction: float = 0.5, seed: int = 0,
                      screening_site: str | None = None) -> Path:
    """Write the synthetic two-site chest CT demo dataset and return its manifest path.

    Each patient is one axial series of ``slices_per_patient`` contiguous ``(size, size)``
    slices in Hounsfield units after rescaling: air -1000, subcutaneous fat -100, soft
    tissue +40, lungs about -850 with texture and vessels, bone about +700, correlated
    Gaussian noise. Lesion patients (``round(n_patients * lesion_fraction)`` of them)
    have one ovoid soft-tissue nodule (+30..+60 HU, radius 4-9 px at size 96) inside a
    lung on most of their slices. The output is byte-identical for equal arguments.

    Args:
        out_dir: folder to write to; created if needed. A previous demo there is replaced;
            a non-empty folder that is not a demo is refused.
        n_patients: number of patients (>= 4), split between ``site_a`` and ``site_b``.
        slices_per_patient: slices per patient (>= 1).
        size: image side in pixels (32..1024).
        lesion_fraction: fraction of lesion patients; both classes need >= 2 patients.
        seed: random seed (>= 0).
        screening_site: a site (``"site_a"`` or ``"site_b"``) whose normal patients are scanned
            with a low-dose screening protocol (50 HU noise, smooth ``LOWDOSE`` kernel) while its
            lesion patients keep the site's protocol; ``None``: one protocol per site.

    Returns:
        Path of ``out_dir/manifest.csv`` (columns ``path,label,patient_id,site,mask``;
        paths relative to its folder; ``mask`` empty where no nodule is visible).

    Example:
        >>> manifest = make_demo_dataset(tmp_path, n_patients=4, slices_per_patient=2)
        >>> manifest.name
        'manifest.csv'
    """
    _check_int("n_patients", n_patients, 4)
    _check_int("slices_per_patient", slices_per_patient, 1)
    _check_int("size", size, 32, 1024)
    _check_int("seed", seed, 0)
    n_lesion = _check_fraction(lesion_fraction, n_patients)
    if screening_site is not None and screening_site not in DEMO_SITES:
        raise ConfigError(f"The 'screening_site' parameter of make_demo_dataset must be one of {list(DEMO_SITES)} or "
                          f"None. Got {screening_site!r} instead.")
    root = _prepare_out_dir(Path(out_dir))

    tag = f"{seed}:{n_patients}:{slices_per_patient}:{size}:{lesion_fraction!r}"
    patients = _draw_patients(n_patients, n_lesion, seed)
    if screening_site is not None:  # same draws, so every other patient stays byte-identical
        patients = [replace(p, site=_low_dose(p.site)) if p.site.name == screening_site and p.label == "normal"
                    else p for p in patients]
    rows: list[dict[str, str]] = []
    uids: list[str] = []
    for p in patients:
        rng = np.random.default_rng([seed, p.number])
        slices, masks = _render_patient(rng, p, slices_per_patient, size)
        study_uid, series_uid, frame_uid = (generate_uid(entropy_srcs=["medtl-demo", tag, p.folder, k])
                                            for k in ("study", "series", "frame"))
        uids += [study_uid, series_uid, frame_uid]
        series_dir = root / "dicom" / p.site.name / p.folder
        series_dir.mkdir(parents=True, exist_ok=True)
        for i, (pixels, mask) in enumerate(zip(slices, masks, strict=True)):
            sop_uid = generate_uid(entropy_srcs=["medtl-demo", tag, p.folder, "sop", str(i)])
            uids.append(sop_uid)
            dcm = series_dir / f"slice_{i + 1:02d}.dcm"
            _write_dicom(dcm, pixels, p, i, (study_uid, series_uid, frame_uid, sop_uid))
            mask_rel = ""
            if mask.any():
                mask_rel = f"masks/{p.folder}_slice{i + 1:02d}.npy"
                (root / "masks").mkdir(exist_ok=True)
                np.save(root / mask_rel, mask.astype(np.uint8))
            rows.append({"path": dcm.relative_to(root).as_posix(), "label": p.label,
                         "patient_id": p.ids["PatientID"], "site": p.site.name, "mask": mask_rel})

    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=_MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    _write_identifiers(root, patients, uids)
    return manifest


def demo_identifying_strings(out_dir: str | Path) -> list[str]:
    """Every identifying value written into a demo dataset's headers, sorted.

    Read from ``out_dir/.demo_identifiers.json``: patient names, patient IDs, birth and
    study dates (also as ``YYYY-MM-DD``), accession numbers, study IDs, institution,
    station and device names, referring physicians and all UIDs. No output of medtl may
    contain any of them (check with :func:`find_identifying_strings`).

    Example:
        >>> strings = demo_identifying_strings(manifest.parent)
        >>> "Demo Hospital A" in strings
        True
    """
    path = Path(out_dir) / IDENTIFIERS_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist, so {out_dir} is not a medtl demo dataset. "
                        "Create one with make_demo_dataset(out_dir) or `medtl demo`.")
    return list(json.loads(path.read_text(encoding="utf-8"))["strings"])


def find_identifying_strings(text: str, strings: Iterable[str]) -> list[str]:
    """The ``strings`` that occur in ``text``; all-digit ones only as whole numbers.

    Dates such as ``19570312`` are matched only where no digit touches them, so the digits
    of a long float (``0.1957031245``) are not reported as a leaked birth date.

    Example:
        >>> find_identifying_strings("id DEMO-MRN-123456, auc 0.1957031245", ["DEMO-MRN-123456", "19570312"])
        ['DEMO-MRN-123456']
    """
    found = []
    for s in strings:
        hit = (re.search(rf"(?<!\d){re.escape(s)}(?!\d)", text) if s.isdigit() else s in text)
        if hit:
            found.append(s)
    return found


# --------------------------------------------------------------------------- validation

def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    ok = ok and low <= value and (high is None or value <= high)
    if not ok:
        valid = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
        raise ConfigError(f"The '{name}' parameter of make_demo_dataset must be {valid}. Got {value!r} instead.")


def _check_fraction(fraction: object, n_patients: int) -> int:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 < fraction < 1:
        raise ConfigError("The 'lesion_fraction' parameter of make_demo_dataset must be a float in (0, 1). "
                          f"Got {fraction!r} instead.")
    n_lesion = int(np.floor(n_patients * float(fraction) + 0.5))
    if not 2 <= n_lesion <= n_patients - 2:
        raise ConfigError(f"lesion_fraction={fraction!r} with n_patients={n_patients} gives {n_lesion} lesion and "
                          f"{n_patients - n_lesion} normal patients; both sites need both classes, so each class "
                          "needs at least 2 patients. Raise n_patients or move lesion_fraction towards 0.5.")
    return n_lesion


def _prepare_out_dir(root: Path) -> Path:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"The demo output folder {root} is a file. Give a folder path instead.")
    if root.is_dir() and any(root.iterdir()):
        if not (root / IDENTIFIERS_FILE).is_file():
            raise DataError(f"{root} is not empty and holds no medtl demo dataset; refusing to write into it. "
                            "Choose an empty or new folder.")
        for sub in ("dicom", "masks"):  # replace our own previous demo only
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------- patients

def _draw_patients(n_patients: int, n_lesion: int, seed: int) -> list[_Patient]:
    """Labels shuffled over patient numbers, sites alternated within each class."""
    rng = np.random.default_rng([seed, 1_000_003])
    labels = np.array(["lesion"] * n_lesion + ["normal"] * (n_patients - n_lesion))[rng.permutation(n_patients)]
    site_of = {}
    for cls in DEMO_LABELS:
        members = np.flatnonzero(labels == cls)
        first = int(rng.integers(2))
        for j, idx in enumerate(members):
            site_of[int(idx)] = _SITES[(first + j) % 2]
    width = max(2, len(str(n_patients)))
    mrns = 100_000 + rng.choice(900_000, size=n_patients, replace=False)
    patients = []
    for idx in range(n_patients):
        number = idx + 1
        site = site_of[idx]
        birth = _date(rng, 1938, 1980)
        study = _date(rng, 2019, 2021)
        ids = {
            "PatientName": f"DEMO^PATIENT^{number:0{width}d}",
            "PatientID": f"DEMO-MRN-{mrns[idx]}",
            "PatientBirthDate": birth,
            "StudyDate": study,
            "AccessionNumber": f"DEMOACC{int(rng.integers(10**7, 10**8))}",
            "StudyID": f"DEMO-STUDY-{number:04d}",
            "InstitutionName": site.institution,
            "StationName": site.station,
            "DeviceSerialNumber": site.serial,
            "ReferringPhysicianName": f"DEMO^REFERRER^{site.name[-1].upper()}",
        }
        patients.append(_Patient(number, f"pat{number:0{width}d}", site, str(labels[idx]), ids,
                                 round(float(rng.uniform(0.70, 0.90)), 4), round(float(rng.uniform(-180, -120)), 1)))
    return patients


def _low_dose(site: _Site) -> _Site:
    """``site`` with a low-dose screening protocol: about 1/8 of the dose (noise x sqrt(8)), a smooth kernel."""
    return replace(site, kernel="LOWDOSE", noise_hu=50.0, noise_corr_px=0.9, blur_px=0.8, sharpen=0.0)


def _date(rng: np.random.Generator, first_year: int, last_year: int) -> str:
    return f"{int(rng.integers(first_year, last_year))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


def _write_identifiers(root: Path, patients: list[_Patient], uids: list[str]) -> None:
    by_tag: dict[str, list[str]] = {}
    for p in patients:
        for key, value in p.ids.items():
            by_tag.setdefault(key, [])
            if value not in by_tag[key]:
                by_tag[key].append(value)
    by_tag["UID"] = uids
    strings = {v for values in by_tag.values() for v in values}
    strings |= {f"{d[:4]}-{d[4:6]}-{d[6:]}" for key in ("PatientBirthDate", "StudyDate") for d in by_tag[key]}
    payload = {"note": "Synthetic identifiers written into the medtl demo DICOM headers.",
               "by_tag": by_tag, "strings": sorted(strings)}
    (root / IDENTIFIERS_FILE).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- phantom

def _render_patient(rng: np.random.Generator, p: _Patient, n_slices: int, size: int
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Stored uint16 slices ``(size, size)`` and bool nodule masks ``(size, size)``."""
    a = _draw_anatomy(rng)
    z_mm = np.arange(n_slices) * p.site.thickness_mm
    rendered = [_render_anatomy(a, float(z), size, rng) for z in z_mm]
    hus, lungs = [hu for hu, _ in rendered], [lung for _, lung in rendered]
    masks = [np.zeros((size, size), bool) for _ in range(n_slices)]
    if p.label == "lesion":
        _add_nodule(rng, hus, lungs, masks, size)
    stored = []
    for hu in hus:
        img = ndimage.gaussian_filter(hu, p.site.blur_px)
        if p.site.sharpen:
            img = img + p.site.sharpen * (img - ndimage.gaussian_filter(img, 1.0))
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), p.site.noise_corr_px)
        img = img + p.site.hu_offset + noise * (p.site.noise_hu / noise.std())
        stored.append(np.clip(np.rint(img + 1024.0), 0, 4095).astype("<u2"))
    return stored, masks


def _draw_anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Patient-specific phantom geometry in normalised coordinates (image spans [-1, 1])."""
    u = rng.uniform
    return {
        "cx": u(-0.04, 0.04), "cy": u(0.0, 0.05), "ax": u(0.82, 0.92), "ay": u(0.60, 0.70), "fat": u(0.06, 0.12),
        "lx": u(0.34, 0.40), "ly": u(-0.06, 0.02), "lax": u(0.25, 0.30), "lay": u(0.38, 0.45), "lrot": u(0.0, 0.2),
        "hx": u(0.06, 0.12), "hy": u(-0.18, -0.08), "hax": u(0.20, 0.26), "hay": u(0.17, 0.22), "hrot": u(-0.5, -0.2),
        "mw": u(0.10, 0.14), "z_period": u(80.0, 160.0), "z_phase": u(0.0, 2 * np.pi),
    }


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, rot: float = 0.0) -> np.ndarray:
    c, s = np.cos(rot), np.sin(rot)
    dx, dy = x - cx, y - cy
    return ((c * dx + s * dy) / ax) ** 2 + ((-s * dx + c * dy) / ay) ** 2 <= 1.0


def _render_anatomy(a: dict[str, float], z_mm: float, size: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU slice ``(size, size)`` float32 before blurring, and its bool lung mask."""
    coords = ((np.arange(size, dtype=np.float32) - (size - 1) / 2) / (size / 2)).astype(np.float32)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    w = 2 * np.pi * z_mm / a["z_period"] + a["z_phase"]
    sl, sh = 1.0 + 0.06 * np.sin(w), 1.0 + 0.08 * np.cos(w + 1.0)  # lungs and heart change along z
    cx, cy = a["cx"], a["cy"]
    iax, iay = a["ax"] * (1 - a["fat"]), a["ay"] * (1 - 1.3 * a["fat"])
    spine_y = cy + a["ay"] * 0.62

    hu = np.full((size, size), -1000.0, np.float32)
    hu[_ellipse(x, y, cx, cy, a["ax"], a["ay"])] = -100.0  # subcutaneous fat
    inner = _ellipse(x, y, cx, cy + 0.02, iax, iay)
    hu[inner] = 40.0  # muscle and mediastinal soft tissue
    hu[inner & _ellipse(x, y, cx, cy - 0.32, a["mw"] * 1.6, 0.16)] = -90.0  # anterior mediastinal fat
    heart = _ellipse(x, y, cx + a["hx"], cy + a["hy"], a["hax"] * sh, a["hay"] * sh, a["hrot"])
    hu[heart] = 45.0
    hu[_ellipse(x, y, cx + 0.09, spine_y - 0.2, 0.065, 0.065)] = 50.0  # descending aorta

    lung = np.zeros((size, size), bool)
    for side in (-1, 1):
        lung |= _ellipse(x, y, cx + side * a["lx"], cy + a["ly"], a["lax"] * sl, a["lay"] * sl, side * a["lrot"])
    lung &= inner & ~heart & ~_ellipse(x, y, cx, cy - 0.05, a["mw"], 0.7)
    lung &= ~_ellipse(x, y, cx, spine_y, 0.17, 0.16) & ~_ellipse(x, y, cx + 0.09, spine_y - 0.2, 0.09, 0.09)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 1.5)
    texture *= 20.0 / texture.std()
    hu[lung] = (-860.0 + 45.0 * (y - cy) + texture)[lung]  # denser posteriorly (gravity)
    vessels = np.zeros((size, size), np.float32)
    lung_idx = np.flatnonzero(lung)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    for k in rng.choice(lung_idx, size=min(16, lung_idx.size), replace=False):  # vessels: short tubes
        vy, vx = divmod(int(k), size)
        t, long_px, short_px = rng.uniform(0, np.pi), rng.uniform(0.8, 2.5), rng.uniform(0.5, 0.9)
        u = (np.cos(t) * (cols - vx) + np.sin(t) * (rows - vy)) / (long_px * size / 96)
        v = (-np.sin(t) * (cols - vx) + np.cos(t) * (rows - vy)) / (short_px * size / 96)
        vessels = np.maximum(vessels, rng.uniform(650.0, 880.0) * np.exp(-0.5 * (u * u + v * v)))
    hu[lung] += vessels[lung]

    bone = np.zeros((size, size), bool)
    vert = _ellipse(x, y, cx, spine_y, 0.12, 0.11)
    hu[vert] = 950.0  # cortex
    hu[_ellipse(x, y, cx, spine_y, 0.09, 0.08)] = 600.0  # cancellous bone
    post = _ellipse(x, y, cx, spine_y + 0.24, 0.15, 0.05) & ~vert
    hu[post] = 750.0
    hu[_ellipse(x, y, cx, spine_y + 0.16, 0.05, 0.05)] = 15.0  # spinal canal
    bone |= vert | post
    sternum = _ellipse(x, y, cx, cy + 0.02 - iay * 0.93, 0.07, 0.035)
    hu[sternum] = 650.0
    bone |= sternum
    for t in np.deg2rad([-160, -135, -105, -20, 15, 40, 140, 165, 195, 340]):  # ribs in the chest wall
        rib = _ellipse(x, y, cx + 0.93 * iax * np.cos(t), cy + 0.02 + 0.93 * iay * np.sin(t), 0.035, 0.03)
        hu[rib] = 700.0
        bone |= rib
    return hu, lung & ~bone


def _add_nodule(rng: np.random.Generator, hus: list[np.ndarray], lungs: list[np.ndarray],
                masks: list[np.ndarray], size: int) -> None:
    """Paint one ovoid nodule into ``hus`` (in place) on most slices, fully inside one lung."""
    n = len(hus)
    extent = int(rng.integers(int(np.ceil(0.6 * n)), n + 1))  # slices the nodule crosses
    start = int(rng.integers(0, n - extent + 1))
    on = range(start, start + extent)
    common = np.logical_and.reduce([lungs[i] for i in on])
    dist = ndimage.distance_transform_edt(common)
    scale = size / 96
    radius = rng.uniform(4.0, 9.0) * scale
    radius = max(min(radius, float(dist.max()) - 1.5), 2.0 * scale)  # must fit in this lung
    candidates = np.flatnonzero(dist >= radius + 1.0)
    if candidates.size == 0:
        candidates = np.flatnonzero(dist == dist.max())
    ny, nx = divmod(int(rng.choice(candidates)), size)
    elong, rot, value = rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), rng.uniform(30.0, 60.0)
    yy, xx = np.mgrid[0:size, 0:size]
    c, s = np.cos(rot), np.sin(rot)
    u, v = c * (xx - nx) + s * (yy - ny), -s * (xx - nx) + c * (yy - ny)
    centre = start + (extent - 1) / 2
    for i in on:
        r = radius * np.sqrt(1.0 - ((i - centre) / (extent / 2 + 0.5)) ** 2)
        disk = ((u / r) ** 2 + (v / (r * elong)) ** 2 <= 1.0) & lungs[i]
        hus[i][disk] = value + rng.normal(0.0, 5.0, int(disk.sum())).astype(np.float32)
        masks[i] |= disk


# --------------------------------------------------------------------------- DICOM

def _write_dicom(path: Path, pixels: np.ndarray, p: _Patient, index: int, uids: tuple[str, str, str, str]) -> None:
    """Write one ``(rows, cols)`` uint16 CT slice as a CT Image Storage file."""
    study_uid, series_uid, frame_uid, sop_uid = uids
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDTL_DEMO"
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    for key, value in p.ids.items():
        setattr(ds, key, value)
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = p.ids["StudyDate"]
    ds.StudyTime = ""  # Type 2; left empty so that no short all-digit identifier exists
    ds.Modality, ds.BodyPartExamined, ds.PatientPosition = "CT", "CHEST", "HFS"
    ds.Manufacturer, ds.ManufacturerModelName = p.site.manufacturer, p.site.model
    ds.StudyDescription, ds.SeriesDescription = "CT CHEST (synthetic)", "AXIAL 1 (synthetic)"
    ds.ImageComments = "Synthetic phantom written by medtl demo; not a real patient."
    ds.PatientIdentityRemoved, ds.BurnedInAnnotation = "NO", "NO"
    ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = 2, 1, index + 1
    ds.KVP, ds.ConvolutionKernel = "120", p.site.kernel
    thickness = p.site.thickness_mm
    z = p.z0_mm + index * thickness
    half = (pixels.shape[0] - 1) / 2 * p.spacing_mm
    ds.SliceThickness = ds.SpacingBetweenSlices = f"{thickness:g}"
    ds.ImagePositionPatient = [f"{-half:.4f}", f"{-half:.4f}", f"{z:.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.2f}"
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [f"{p.spacing_mm:g}", f"{p.spacing_mm:g}"]
    ds.WindowCenter, ds.WindowWidth = p.site.window
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
