"""Decode once, preprocess once: from cases to cached arrays for a whole run.

Every file is read and preprocessed exactly once per run (not per epoch or per fold);
folds and epochs index into the cached arrays. Unreadable files are collected, never
dropped silently: ``data.on_error: raise`` stops before training with the full list,
``skip`` keeps going and records each skipped case with its reason.

Memory is bounded by ``data.memory_budget`` (default: half the available memory). When the
cache of every case at ``data.image_size`` fits in it, the images are held in memory as one
array; otherwise they are written to an on-disk cache as they are decoded
(:mod:`medtl.data._diskcache`: in ``data.cache_dir``, else the run directory's ``decoded/``)
and read back a batch at a time through the same fast path, so memory holds one batch, not
the data set. A finished on-disk cache is reused by a resumed run without decoding anything.
Each file's declared image size is checked against the per-image limit before its pixels
are decoded, and a ``MemoryError`` while decoding one file is that file's failure, with its
reason.

Every prepared image keeps its geometry (:class:`~medtl.data._grid.Geometry`): the scan's
affine and shape and the affine of the model's grid, so that maps computed on the model's
grid can be written back over the scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medtl._fastpath import DiskArray
from medtl.config import Config, DataConfig, available_memory, format_bytes, memory_budget_bytes
from medtl.data._geometry import axis_codes
from medtl.data._grid import Geometry, match_dims
from medtl.data._memory import image_limit, out_of_memory_reason
from medtl.data.manifest import Case, canonical_labels, read_labelled_folder, read_manifest, read_medmnist
from medtl.data.transforms import preprocess_transform
from medtl.errors import ConfigError, DataError, UnreadableFileError

__all__ = ["PreparedData", "load_cases", "load_mask", "prepare"]


@dataclass
class PreparedData:
    """Cached, preprocessed data of a run.

    Attributes:
        images: float32 ``(N, K, H, W)`` or ``(N, K, D, H, W)`` in [0, 1]; ``K`` is 1, or the
            number of windows with ``data.intensity.mode: multiwindow``. A NumPy array, or a
            :class:`~medtl._fastpath.DiskArray` when the data are over ``data.memory_budget``
            (index it like an array: ``images[idx]`` is a view, ``np.asarray`` reads it).
        y: int64 ``(N,)`` class indices into ``class_names``.
        cases: the N kept cases, in order.
        class_names: sorted class names (or the configured order).
        skipped: ``[{"case_id", "path", "reason"}]`` for files that could not be used.
        tasks: multi-task runs (config ``tasks``): one :class:`~medtl.data.tasks.TaskTargets` per
            task, the primary first (its labels are ``y``); ``None`` for a single-task run.
        geometry: one :class:`~medtl.data._grid.Geometry` per kept case (the scan's affine and
            shape, the model grid's affine), or ``None`` for an in-memory array (MedMNIST).
    """

    images: np.ndarray | DiskArray
    y: np.ndarray
    cases: list[Case]
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)
    tasks: list | None = None
    geometry: list[Geometry | None] = field(default_factory=list)

    @property
    def on_disk(self) -> bool:
        """Whether the images are in the on-disk cache (over ``data.memory_budget``)."""
        return isinstance(self.images, DiskArray)

    @property
    def groups(self) -> np.ndarray:
        return np.array([c.patient_id for c in self.cases])

    def subset(self, split: str) -> np.ndarray:
        """Indices of the cases in an official split (``train``/``val``/``test``)."""
        return np.array([i for i, c in enumerate(self.cases) if c.split == split], dtype=int)


def load_cases(data: DataConfig, path: str | Path, tasks=None) -> list[Case]:
    """The configured cases (manifest, MedMNIST or folder + label CSV), optionally capped by ``max_cases``.

    With ``tasks`` (the config's task list) the primary task's column is the label column and
    the other tasks' columns are kept per case (:attr:`Case.targets`)."""
    extra: list[str] = []
    if tasks:
        from medtl.data.tasks import target_columns

        primary, extra = target_columns(tasks)
        data = data.model_copy(update={"label_column": primary, "labels": data.labels.model_copy(
            update={"label_column": primary}) if data.labels is not None else None})
    if data.format == "medmnist":
        cases = read_medmnist(path, split=data.split)
    elif data.format == "folder":
        if data.labels is None:
            raise DataError("data.format=folder needs a data.labels section (csv, file_column, label_column).")
        from medtl.config import expand_path

        lab = data.labels
        cases = read_labelled_folder(path, expand_path(lab.csv), file_column=lab.file_column,
                                     label_column=lab.label_column, patient_column=lab.patient_column,
                                     site_column=lab.site_column, target_columns=extra)
    else:
        cases = read_manifest(path, label_column=data.label_column, target_columns=extra)
    if data.max_cases is not None:
        rng = np.random.default_rng(0)
        keep = np.sort(rng.permutation(len(cases))[: data.max_cases])
        cases = [cases[i] for i in keep]
    return cases


def _decode(case: Case, max_bytes: int | None = None, orientation: str = "RAS"
            ) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None, bool]:
    """Raw channel-first pixels, their spacing in mm and their affine (both ``None`` when unknown),
    and whether that affine is patient geometry (not only a pixel grid)."""
    if case.array is not None:
        return np.asarray(case.array, dtype=np.float32), None, None, False
    from medtl.data.readers import read_image

    img = read_image(case.path, max_bytes=max_bytes, orientation=orientation, series=case.series)
    return img.array, tuple(img.spacing), img.affine, img.axcodes is not None


def prepare(cfg: Config, cases: Sequence[Case] | None = None, *, progress: bool = True,
            require_all_classes: bool = True, min_patients_per_class: int | None = None,
            cache_dir: str | Path | None = None, store: str = "auto") -> PreparedData:
    """Decode and preprocess every case once.

    Args:
        require_all_classes: refuse data with fewer than two classes, or a configured class
            without cases (training needs them; prediction does not).
        min_patients_per_class: refuse a class held by fewer patients, e.g. ``cv.n_splits`` for
            stratified k-fold CV; checked on the labels before decoding and again after.
        cache_dir: where the on-disk cache goes when ``data.cache_dir`` is not set (a run passes
            its ``decoded/`` folder); neither: a temporary folder removed when the process ends.
        store: ``auto`` (in memory when the cache fits in ``data.memory_budget``, else on disk),
            ``memory`` or ``disk``.

    Raises:
        DataError: unreadable files with ``on_error=raise`` (all of them listed), a single
            class, a class with no readable case or too few patients, unknown labels with
            configured ``class_names``.
        OutputError: the on-disk cache does not fit on its disk.
    """
    if store not in ("auto", "memory", "disk"):
        raise ValueError(f"The 'store' parameter of prepare must be 'auto', 'memory' or 'disk'. Got {store!r} instead.")
    data = cfg.data
    if cfg.tasks and cfg.tasks[0].class_names:  # the primary task's classes are the run's classes
        data = data.model_copy(update={"class_names": list(cfg.tasks[0].class_names)})
    if data.spatial_dims != len(data.image_size):
        raise ConfigError(f"data.spatial_dims={data.spatial_dims} but data.image_size={list(data.image_size)} has "
                          f"{len(data.image_size)} entries. Use spatial_dims: 3 with image_size [D, H, W] for "
                          "volumes, or spatial_dims: 2 with [H, W] for images.")
    if cases is None:
        cases = load_cases(data, cfg.resolved_data_path(), cfg.tasks)
    if require_all_classes:
        _check_classes(data, cases, min_patients_per_class, decoded=False)
    on_disk = store == "disk" or (store == "auto" and _cache_bytes(data, len(cases)) >
                                  memory_budget_bytes(data.memory_budget))
    cached = _decode_all(data, cases, progress, _disk_folder(data, cache_dir) if on_disk else None)
    images, kept, skipped, geometry = cached.images, cached.kept, cached.skipped, cached.geometry
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
    if require_all_classes:
        _check_classes(data, kept, min_patients_per_class, decoded=True, n_skipped=len(skipped))
    tasks = None
    if cfg.tasks:
        from medtl.data.tasks import encode_tasks

        tasks = encode_tasks(cfg.tasks, kept, y, class_names, require_labels=require_all_classes)
    return PreparedData(images, y, list(kept), class_names, skipped, tasks, geometry)


@dataclass
class _Decoded:
    images: np.ndarray | DiskArray
    kept: list[Case]
    skipped: list[dict]
    geometry: list[Geometry | None]


def _decode_all(data: DataConfig, cases: Sequence[Case], progress: bool, disk: tuple[Path, bool] | None
                ) -> _Decoded:
    """Decode and preprocess ``cases`` into memory, or into the on-disk cache ``disk = (folder, owned)``.

    A finished on-disk entry for the same settings and sources is reused without decoding.
    """
    from medtl.data import _diskcache

    writer = None
    if disk is not None:
        folder, owned = disk
        key = _diskcache.cache_key(data, cases)
        entry = _diskcache.entry_folder(folder, key)
        hit = _diskcache.open_entry(entry, key)
        if hit is not None:
            by_id = {c.case_id: c for c in cases}
            return _Decoded(hit.images, [by_id[i] for i in hit.case_ids], _diskcache.restore_skipped(hit, by_id),
                            hit.geometry)
        if owned:  # the run's own cache folder holds one entry: an older one is stale
            _diskcache.prune(folder, keep=entry)
        writer = _diskcache.CacheWriter(entry, key, max_bytes=_cache_bytes(data, len(cases)))
    transform = preprocess_transform(data.intensity, data.image_size, spacing=data.spacing)
    want_dims = len(data.image_size)
    buffer: np.ndarray | None = None
    kept, skipped, geometry = [], [], []
    try:
        for case in _progress(cases, "Decoding scans", progress):
            try:
                raw, spacing, affine, world = _decode(case, image_limit(data.memory_budget), data.orientation)
                spatial = raw.ndim - 1
                raw = _match_dims(raw, want_dims, case)
                if spacing is not None and len(spacing) != want_dims:
                    spacing = spacing[-want_dims:]
                if not np.isfinite(raw).all():
                    raise UnreadableFileError(case.path or case.case_id,
                                              f"{int((~np.isfinite(raw)).sum())} NaN/Inf pixel values")
                if data.spacing is not None and spacing is None:
                    raise UnreadableFileError(case.path or case.case_id, "data.spacing is set but this image has "
                                              "no known pixel spacing; use data.spacing: null (plain resize)")
                image = transform(raw, spacing)
                geo = _geometry(data, affine, spatial, raw.shape[1:], spacing, world)
            except UnreadableFileError as err:
                skipped.append({"case_id": case.case_id, "path": case.path, "reason": err.reason})
                continue
            except MemoryError:
                skipped.append({"case_id": case.case_id, "path": case.path,
                                "reason": out_of_memory_reason("decoding or preprocessing")})
                continue
            if writer is not None:
                writer.append(image, case.case_id, geo)
            else:
                if buffer is None:  # one array for every case, filled in place (no list, no stacking copy)
                    buffer = _allocate(len(cases), image.shape)
                buffer[len(kept)] = image
            kept.append(case)
            geometry.append(geo)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        if not kept:
            writer.abort()
            return _Decoded(np.zeros((0, 1, *data.image_size), np.float32), kept, skipped, geometry)
        writer.skipped = skipped
        return _Decoded(writer.finish().images, kept, skipped, geometry)
    images = buffer[: len(kept)] if buffer is not None else np.zeros((0, 1, *data.image_size), np.float32)
    return _Decoded(images, kept, skipped, geometry)


def _allocate(n: int, shape: tuple[int, ...]) -> np.ndarray:
    try:
        return np.empty((n, *shape), dtype=np.float32)
    except MemoryError:
        raise DataError(f"The {n} decoded image(s) do not fit in memory ({format_bytes(available_memory())} "
                        "available). Lower data.image_size, set data.max_cases for a trial, lower "
                        "data.memory_budget so that they are cached on disk, or free memory.") from None


def _geometry(data: DataConfig, affine: np.ndarray | None, spatial: int, shape: tuple[int, ...],
              spacing: tuple[float, ...] | None, world: bool = False) -> Geometry | None:
    """Where the model's grid lies in the scan (``None`` without an affine, e.g. MedMNIST arrays);
    with ``world`` (patient geometry) it carries the grid's axis codes, for display."""
    if affine is None:
        return None
    affine = match_dims(np.asarray(affine, dtype=np.float64), spatial, len(shape))
    codes = axis_codes(affine, len(shape)) if world else None
    if data.spacing is None:
        return replace(Geometry.of_resize(affine, shape, data.image_size), axcodes=codes)
    if spacing is None or len(spacing) != len(shape):
        return None
    return replace(Geometry.of_spacing(affine, shape, data.image_size, spacing, data.spacing), axcodes=codes)


def _disk_folder(data: DataConfig, cache_dir: str | Path | None) -> tuple[Path, bool]:
    """``(folder, owned)``: ``data.cache_dir`` (shared), the caller's folder (the run's own), or a temporary one."""
    configured = getattr(data, "cache_dir", None)
    if configured:
        from medtl.config import expand_path

        return Path(expand_path(configured)), False
    if cache_dir is not None:
        return Path(cache_dir), True
    import atexit
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="medtl-decoded-")
    atexit.register(shutil.rmtree, tmp, True)
    return Path(tmp), True


def _cache_bytes(data: DataConfig, n_cases: int) -> int:
    """Bytes of the decoded cache: ``n_cases`` x channels x ``prod(image_size)`` float32."""
    channels = len(data.intensity.windows) if data.intensity.mode == "multiwindow" else 1
    return n_cases * channels * int(np.prod([int(s) for s in data.image_size])) * 4


def _check_classes(data: DataConfig, cases: Sequence[Case], min_patients: int | None, *, decoded: bool,
                   n_skipped: int = 0) -> None:
    """At least two classes, every configured class present, and ``min_patients`` patients per class."""
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        return
    counts: dict[str, int] = {}
    patients: dict[str, set[str]] = {}
    for c in labelled:
        counts[c.label] = counts.get(c.label, 0) + 1
        patients.setdefault(c.label, set()).add(c.patient_id)
    where = "readable case" if decoded else "case"
    after = f" (after {n_skipped} unreadable file(s) were skipped)" if decoded and n_skipped else ""
    column = {"folder": "data.labels.label_column", "manifest": "data.label_column"}.get(data.format)
    names = _configured_names(data)
    if names is not None:
        missing = [n for n in names if n not in counts]
        if missing:
            raise DataError(f"Class(es) {missing} of data.class_names have no {where}{after}; a classifier cannot "
                            f"be trained. The labels present are {sorted(counts)}. Check the labels"
                            f"{f' ({column})' if column else ''} or data.class_names.")
    if len(counts) < 2:
        (only, n), = counts.items()
        raise DataError(f"Only one class is present: all {n} labelled {where}s{after} have label '{only}' "
                        f"({len(patients[only])} patient(s)). A classifier needs at least two classes. "
                        + (f"Check that {column} names the label column, or add" if column else "Add")
                        + " cases of the other class(es).")
    if min_patients is not None:
        few = {k: len(v) for k, v in patients.items() if len(v) < min_patients}
        if few:
            listing = ", ".join(f"'{k}' ({v} patient{'s' if v != 1 else ''})" for k, v in sorted(few.items()))
            lowest = min(len(v) for v in patients.values())
            advice = (f"Lower cv.n_splits to {lowest}, or add patients of that class." if lowest >= 2 else
                      "Add patients of that class, or remove it.")
            raise DataError(f"Class(es) {listing} have fewer patients than the {min_patients} folds{after}: "
                            f"stratified k-fold CV puts every class in each fold. {advice}")


def _configured_names(data: DataConfig) -> list[str] | None:
    """``data.class_names`` in the labels' canonical spelling (``["0.0", "1.0"]`` -> ``["0", "1"]``)."""
    if not data.class_names:
        return None
    mapping = canonical_labels(data.class_names, "data.class_names")
    names = [mapping[n] for n in data.class_names]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.class_names={list(data.class_names)} name one class twice once spelled the same "
                          f"way ({names}). Give each class once.")
    return names


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
        return _configured_names(data)
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


def load_mask(case: Case, image_size: Sequence[int], orientation: str = "RAS") -> np.ndarray | None:
    """The case's region mask in the image's layout (``orientation``, as the image is read), resized
    (nearest) to ``image_size``, or ``None``. A ``.npy`` mask follows the image's stored pixels
    (:func:`~medtl.data.readers.orient_mask`); a NIfTI or DICOM mask is read with its own geometry."""
    if not case.mask:
        return None
    path = Path(case.mask)
    if not path.is_file():
        return None
    from medtl.data.readers import orient_mask, read_image

    if path.suffix == ".npy":
        m = np.load(path).astype(np.float32)
        m = orient_mask(m, case.path, orientation=orientation) if case.path else m
    else:
        m = read_image(path, orientation=orientation).array[0]
    from monai.transforms import Resize

    m = Resize(spatial_size=tuple(image_size), mode="nearest")(m[None])[0]
    return (np.asarray(m) > 0.5).astype(np.uint8)


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=desc, transient=True)
