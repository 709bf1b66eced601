"""The data fingerprint: what a dataset is, in the numbers a planner needs (as nnU-Net's ``dataset_fingerprint.json``).

:func:`fingerprint_cases` looks at the cases once: how many cases, patients, classes (cases and
patients per class), official splits and sites there are, all from the labels; and, from a
seeded sample of images (all of them when they are held in memory, as for MedMNIST), whether
they are 2D or 3D, their size, channels, modality, pixel spacing, value range, whether they
are 8-bit, whether CT values are in Hounsfield units, and how long one image takes to read.
:func:`fingerprint_data` does the same for a config's ``data`` section.

Nothing identifying is kept: patients are counted, never listed, and no path is stored (an
unreadable sampled file is counted; the run itself reports it by case id). Site names are
kept with their case counts, as per-site metrics show them.

Example:
    >>> fp = fingerprint_data(load_config("configs/breastmnist.yaml").data)   # doctest: +SKIP
    >>> fp.n_cases, fp.spatial_dims, fp.shape, fp.class_counts                # doctest: +SKIP
    (780, 2, (28, 28), {'malignant': 210, 'normal_or_benign': 570})
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medtl.config import DataConfig, expand_path
from medtl.data.manifest import Case
from medtl.errors import DataError, UnreadableFileError

__all__ = ["Fingerprint", "fingerprint_cases", "fingerprint_data", "MEDMNIST_MODALITIES"]

# Modality of the MedMNIST files the project knows (medmnist/info.py descriptions); an .npz carries none.
MEDMNIST_MODALITIES: dict[str, str] = {"breastmnist": "US", "pneumoniamnist": "CR", "adrenalmnist3d": "CT"}

_SAMPLE_VALUES = 200_000  # pixels per sampled image kept for the value percentiles (a strided subsample)
_MEMORY_SAMPLE = 512      # images looked at when they are held in memory (MedMNIST)


@dataclass(frozen=True)
class Fingerprint:
    """The facts about a dataset that planning uses; ``to_dict()`` is ``fingerprint.json``.

    Attributes:
        source: ``"medmnist"``, ``"manifest"`` or ``"folder"``.
        n_cases, n_patients: labelled cases and distinct patients (counted, never listed).
        max_cases_per_patient: the most cases one patient has (1: every case its own patient).
        class_counts: cases per class, classes sorted by name.
        patients_per_class: distinct patients per class.
        splits: cases per official split (``{"train": 546, "val": 78, "test": 156}``); ``{}`` without one.
        sites: cases per acquisition site; ``{}`` without a site column.
        spatial_dims: 2 (images) or 3 (volumes), the most common among the sampled images.
        shape: median spatial size of the sampled images, ``(H, W)`` or ``(D, H, W)``.
        shape_min, shape_max: the smallest and largest spatial size per axis.
        channels: the most common channel count of the sampled images (3: colour).
        modality: the most common DICOM modality (``"CT"``, ``"MR"``, ...), a MedMNIST file's known
            modality, or ``"unknown"``.
        spacing: median pixel spacing in mm per spatial axis, or ``None`` (no geometry: PNG, MedMNIST).
        value_range: the 0.5th and 99.5th percentiles of the sampled pixel values.
        is_8bit: every sampled value is an integer in 0..255 (MedMNIST, PNG/JPEG).
        is_hu: the sampled CT images were rescaled to Hounsfield units.
        n_sampled: images read for the image facts; n_unreadable: how many of them failed.
        seconds_per_image: mean read time of a sampled file (0 for images held in memory), for the
            cost of decoding the whole dataset.
    """

    source: str
    n_cases: int
    n_patients: int
    max_cases_per_patient: int
    class_counts: dict[str, int]
    patients_per_class: dict[str, int]
    splits: dict[str, int] = field(default_factory=dict)
    sites: dict[str, int] = field(default_factory=dict)
    spatial_dims: int = 2
    shape: tuple[int, ...] = ()
    shape_min: tuple[int, ...] = ()
    shape_max: tuple[int, ...] = ()
    channels: int = 1
    modality: str = "unknown"
    spacing: tuple[float, ...] | None = None
    value_range: tuple[float, float] = (0.0, 0.0)
    is_8bit: bool = False
    is_hu: bool = False
    n_sampled: int = 0
    n_unreadable: int = 0
    seconds_per_image: float = 0.0

    @property
    def n_classes(self) -> int:
        return len(self.class_counts)

    @property
    def minority_fraction(self) -> float:
        """Share of the cases in the smallest class."""
        return min(self.class_counts.values()) / max(1, self.n_cases)

    @property
    def has_official_split(self) -> bool:
        """Train, val and test cases all present (MedMNIST ``official``, a manifest ``split`` column)."""
        return all(self.splits.get(s, 0) > 0 for s in ("train", "val", "test"))

    @property
    def min_patients_per_class(self) -> int:
        return min(self.patients_per_class.values())

    def to_dict(self) -> dict:
        """JSON-serialisable view, with the derived facts too."""
        d = asdict(self)
        d.update(n_classes=self.n_classes, minority_fraction=round(self.minority_fraction, 4),
                 has_official_split=self.has_official_split)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprint:
        """The record of a ``fingerprint.json`` (derived keys ignored)."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("shape", "shape_min", "shape_max", "value_range"):
            if key in known and known[key] is not None:
                known[key] = tuple(known[key])
        if known.get("spacing") is not None:
            known["spacing"] = tuple(known["spacing"])
        return cls(**known)


def fingerprint_data(data: DataConfig, *, tasks=None, sample: int = 24, seed: int = 0) -> Fingerprint:
    """The fingerprint of a config's ``data`` section (its cases, as training would read them; with
    ``tasks``, a multi-task config's task list, the primary task's labels).

    Raises:
        DataError: the data cannot be read (missing file, bad manifest; the readers' messages).
    """
    from medtl.data.prepare import load_cases

    cases = load_cases(data, expand_path(data.path), tasks)
    return fingerprint_cases(cases, source=data.format, sample=sample, seed=seed, orientation=data.orientation,
                             name=Path(expand_path(data.path)).stem)


def fingerprint_cases(cases: Sequence[Case], *, source: str, sample: int = 24, seed: int = 0,
                      orientation: str = "RAS", name: str = "") -> Fingerprint:
    """The fingerprint of ``cases``: label facts from every case, image facts from a seeded sample.

    Args:
        cases: labelled cases (:func:`medtl.data.load_cases`).
        source: how they were read (``"medmnist"``, ``"manifest"``, ``"folder"``).
        sample: files read for the image facts (of images held in memory, up to 512 are looked at:
            they cost nothing to read).
        seed: seed of the sample.
        orientation: axis code the files are read in (``data.orientation``).
        name: the data file's stem, for the modality of a known MedMNIST file.

    Raises:
        DataError: no labelled case, or no sampled image could be read.
    """
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise DataError("The data holds no labelled case; medtl auto needs a label for every case it trains on.")
    classes = sorted({c.label for c in labelled})
    per_patient = Counter(c.patient_id for c in labelled)
    facts = dict(
        source=source, n_cases=len(labelled), n_patients=len(per_patient),
        max_cases_per_patient=max(per_patient.values()),
        class_counts={k: sum(c.label == k for c in labelled) for k in classes},
        patients_per_class={k: len({c.patient_id for c in labelled if c.label == k}) for k in classes},
        splits={s: n for s, n in sorted(Counter(c.split for c in labelled if c.split).items())},
        sites={s: n for s, n in sorted(Counter(c.site for c in labelled if c.site).items())},
    )
    in_memory = all(c.array is not None for c in labelled)
    rng = np.random.default_rng(seed)
    # images held in memory cost nothing to read: a larger sample of them (at most _MEMORY_SAMPLE)
    n_sample = min(len(labelled), max(sample, _MEMORY_SAMPLE) if in_memory else sample)
    idx = np.sort(rng.choice(len(labelled), size=n_sample, replace=False))
    images = _read_sample([labelled[i] for i in idx], orientation)
    read = [im for im in images if im is not None]
    if not read:
        raise DataError(f"None of the {len(images)} sampled images could be read, so the data cannot be "
                        "fingerprinted. Run `medtl audit` on the data to see why each file fails.")
    facts.update(_image_facts(read, name))
    facts.update(n_sampled=len(images), n_unreadable=len(images) - len(read),
                 seconds_per_image=0.0 if in_memory else round(
                     float(np.mean([im["seconds"] for im in read])), 4))
    return Fingerprint(**facts)


def _read_sample(cases: list[Case], orientation: str) -> list[dict | None]:
    """Per sampled case ``{array, modality, is_hu, spacing, seconds}``, or ``None`` when unreadable."""
    from medtl.data.readers import read_image

    out: list[dict | None] = []
    for c in cases:
        if c.array is not None:
            out.append({"array": np.asarray(c.array), "modality": None, "is_hu": False, "spacing": None,
                        "seconds": 0.0})
            continue
        t = time.perf_counter()
        try:
            img = read_image(c.path, orientation=orientation, series=c.series)
        except UnreadableFileError:  # counted only: the file's path may name a patient
            out.append(None)
            continue
        has_geometry = img.axcodes is not None
        out.append({"array": img.array, "modality": img.modality, "is_hu": img.is_hu,
                    "spacing": tuple(float(s) for s in img.spacing) if has_geometry else None,
                    "seconds": time.perf_counter() - t})
    return out


def _image_facts(read: list[dict], name: str) -> dict:
    dims = Counter(im["array"].ndim - 1 for im in read).most_common(1)[0][0]
    same = [im for im in read if im["array"].ndim - 1 == dims]
    shapes = np.array([im["array"].shape[1:] for im in same])
    values = np.concatenate([_value_sample(im["array"]) for im in same])
    modalities = Counter(im["modality"] for im in same if im["modality"])
    modality = modalities.most_common(1)[0][0] if modalities else MEDMNIST_MODALITIES.get(
        name.lower().replace("_224", ""), "unknown")
    spacings = [im["spacing"] for im in same if im["spacing"] is not None and len(im["spacing"]) == dims]
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return dict(
        spatial_dims=int(dims),
        shape=tuple(int(round(float(s))) for s in np.median(shapes, axis=0)),
        shape_min=tuple(int(s) for s in shapes.min(0)), shape_max=tuple(int(s) for s in shapes.max(0)),
        channels=int(Counter(im["array"].shape[0] for im in same).most_common(1)[0][0]),
        modality=str(modality),
        spacing=tuple(round(float(s), 4) for s in np.median(np.array(spacings), axis=0)) if spacings else None,
        value_range=(round(lo, 4), round(hi, 4)),
        is_8bit=bool(values.min() >= 0 and values.max() <= 255 and np.all(values == np.round(values))),
        is_hu=bool(any(im["is_hu"] for im in same)),
    )


def _value_sample(array: np.ndarray) -> np.ndarray:
    flat = np.asarray(array, dtype=np.float32).ravel()
    step = max(1, flat.size // _SAMPLE_VALUES)
    return flat[::step]
