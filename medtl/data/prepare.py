"""Decode once, preprocess once: from cases to in-memory arrays for a whole run.

Every file is read and preprocessed exactly once per run (not per epoch or per fold);
folds and epochs index into the cached arrays. Unreadable files are collected, never
dropped silently: ``data.on_error: raise`` stops before training with the full list,
``skip`` keeps going and records each skipped case with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtl.config import Config, DataConfig
from medtl.data.manifest import Case, read_labelled_folder, read_manifest, read_medmnist
from medtl.data.transforms import preprocess_transform
from medtl.errors import ConfigError, DataError, UnreadableFileError

__all__ = ["PreparedData", "load_cases", "prepare", "load_mask"]


@dataclass
class PreparedData:
    """Cached, preprocessed data of a run.

    Attributes:
        images: float32 ``(N, K, H, W)`` or ``(N, K, D, H, W)`` in [0, 1]; ``K`` is 1, or the
            number of windows with ``data.intensity.mode: multiwindow``.
        y: int64 ``(N,)`` class indices into ``class_names``.
        cases: the N kept cases, in order.
        class_names: sorted class names (or the configured order).
        skipped: ``[{"case_id", "path", "reason"}]`` for files that could not be used.
    """

    images: np.ndarray
    y: np.ndarray
    cases: list[Case]
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)

    @property
    def groups(self) -> np.ndarray:
        return np.array([c.patient_id for c in self.cases])

    def subset(self, split: str) -> np.ndarray:
        """Indices of the cases in an official split (``train``/``val``/``test``)."""
        return np.array([i for i, c in enumerate(self.cases) if c.split == split], dtype=int)


def load_cases(data: DataConfig, path: str | Path) -> list[Case]:
    """The configured cases (manifest, MedMNIST or folder + label CSV), optionally capped by ``max_cases``."""
    if data.format == "medmnist":
        cases = read_medmnist(path, split=data.split)
    elif data.format == "folder":
        if data.labels is None:
            raise DataError("data.format=folder needs a data.labels section (csv, file_column, label_column).")
        from medtl.config import expand_path

        lab = data.labels
        cases = read_labelled_folder(path, expand_path(lab.csv), file_column=lab.file_column,
                                     label_column=lab.label_column, patient_column=lab.patient_column,
                                     site_column=lab.site_column)
    else:
        cases = read_manifest(path, label_column=data.label_column)
    if data.max_cases is not None:
        rng = np.random.default_rng(0)
        keep = np.sort(rng.permutation(len(cases))[: data.max_cases])
        cases = [cases[i] for i in keep]
    return cases


def _decode(case: Case) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Raw channel-first pixels and their spacing in mm (``None`` when unknown)."""
    if case.array is not None:
        return np.asarray(case.array, dtype=np.float32), None
    from medtl.data.readers import read_image

    img = read_image(case.path)
    return img.array, tuple(img.spacing)


def prepare(cfg: Config, cases: Sequence[Case] | None = None, *, progress: bool = True,
            require_all_classes: bool = True) -> PreparedData:
    """Decode and preprocess every case once.

    Raises:
        DataError: unreadable files with ``on_error=raise`` (all of them listed), a class
            with no readable case, or unknown labels with configured ``class_names``.
    """
    data = cfg.data
    if data.spatial_dims != len(data.image_size):
        raise ConfigError(f"data.spatial_dims={data.spatial_dims} but data.image_size={list(data.image_size)} has "
                          f"{len(data.image_size)} entries. Use spatial_dims: 3 with image_size [D, H, W] for "
                          "volumes, or spatial_dims: 2 with [H, W] for images.")
    if cases is None:
        cases = load_cases(data, cfg.resolved_data_path())
    transform = preprocess_transform(data.intensity, data.image_size, spacing=data.spacing)
    want_dims = len(data.image_size)
    images, kept, skipped = [], [], []
    for case in _progress(cases, "Decoding scans", progress):
        try:
            raw, spacing = _decode(case)
            raw = _match_dims(raw, want_dims, case)
            if spacing is not None and len(spacing) != want_dims:
                spacing = spacing[-want_dims:]
            if not np.isfinite(raw).all():
                raise UnreadableFileError(case.path or case.case_id,
                                          f"{int((~np.isfinite(raw)).sum())} NaN/Inf pixel values")
            if data.spacing is not None and spacing is None:
                raise UnreadableFileError(case.path or case.case_id, "data.spacing is set but this image has "
                                          "no known pixel spacing; use data.spacing: null (plain resize)")
            images.append(transform(raw, spacing))
            kept.append(case)
        except UnreadableFileError as err:
            skipped.append({"case_id": case.case_id, "path": case.path, "reason": err.reason})
    if skipped and data.on_error == "raise":
        lines = "\n  ".join(f"{s['path'] or s['case_id']}: {s['reason']}" for s in skipped[:30])
        more = f"\n  ... and {len(skipped) - 30} more" if len(skipped) > 30 else ""
        raise DataError(f"{len(skipped)} of {len(cases)} file(s) could not be used:\n  {lines}{more}\n"
                        "Fix or remove them, run `medtl audit` for a full report, or set "
                        "data.on_error=skip to train without them (they are then listed in skipped.json).")
    if not kept:
        raise DataError("No readable case is left; nothing to train on.")
    class_names = _class_names(data, kept)
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted({c.label for c in kept if c.label not in index})
    if unknown:
        raise DataError(f"Labels {unknown} are not in data.class_names={class_names}. Add them or fix the labels.")
    y = np.array([index[c.label] for c in kept], dtype=np.int64)
    missing = [name for i, name in enumerate(class_names) if not (y == i).any()]
    if missing and require_all_classes:
        raise DataError(f"Class(es) {missing} have no readable case; a classifier cannot be trained. "
                        "Check the labels or data.class_names.")
    return PreparedData(np.stack(images).astype(np.float32), y, list(kept), class_names, skipped)


def _match_dims(raw: np.ndarray, want_dims: int, case: Case) -> np.ndarray:
    spatial = raw.ndim - 1
    if spatial == want_dims:
        return raw
    if spatial == 3 and want_dims == 2 and raw.shape[1] == 1:
        return raw[:, 0]
    if spatial == 2 and want_dims == 3:
        return raw[:, None]
    raise UnreadableFileError(case.path or case.case_id,
                              f"{spatial}D image of shape {tuple(raw.shape[1:])} but data.image_size has "
                              f"{want_dims} dimensions; set data.spatial_dims and data.image_size to match")


def _class_names(data: DataConfig, cases: Sequence[Case]) -> list[str]:
    if data.class_names:
        return list(data.class_names)
    labels = sorted({c.label for c in cases}, key=_natural)
    # MedMNIST cases come with names in index order; keep it.
    if data.format == "medmnist":
        from medtl.data.manifest import MEDMNIST_CLASSES

        for names in MEDMNIST_CLASSES.values():
            if set(labels) <= set(names):
                return [n for n in names if n in labels] if len(labels) == len(names) else labels
    return labels


def _natural(s: str):
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)


def load_mask(case: Case, image_size: Sequence[int]) -> np.ndarray | None:
    """The case's region mask resized (nearest) to ``image_size``, or ``None``."""
    if not case.mask:
        return None
    path = Path(case.mask)
    if not path.is_file():
        return None
    if path.suffix == ".npy":
        m = np.load(path).astype(np.float32)
    else:
        from medtl.data.readers import read_image

        m = read_image(path).array[0]
    from monai.transforms import Resize

    m = Resize(spatial_size=tuple(image_size), mode="nearest")(m[None])[0]
    return (np.asarray(m) > 0.5).astype(np.uint8)


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=desc, transient=True)
