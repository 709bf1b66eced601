"""The decoded-once cache on disk, for data larger than ``data.memory_budget`` (private).

When the decoded images of a run would not fit in the memory budget,
:func:`medtl.data.prepare.prepare` writes them here one at a time as they are decoded, and
training, prediction and saliency read them back a batch at a time
(:class:`medtl._fastpath.DiskArray`). A cache entry is one folder::

    CACHE_DIR/<key>/images.f32     (N, C, *S) float32, little-endian, C order, rows in case order
    CACHE_DIR/<key>/manifest.json  key, shape, sha256 of images.f32, the kept case ids, their geometry

``<key>`` is the sha256 of what decides the pixels: the preprocessing settings
(``data.intensity``, ``image_size``, ``spacing``, ``orientation``), the medtl version and every
case's id and source (file size and modification time, each file of a series folder, or the
bytes of an in-memory array). An entry is written in a private temporary folder beside it
(images, fsync, manifest last) and renamed into place when complete, so a reader never sees
half of one, and two runs sharing ``data.cache_dir`` never write into the same folder. An
entry without a manifest, with a different key, a wrong size or a wrong sha256 is never used:
it is decoded again. So a run killed while decoding starts over, and a run killed later (or
rerun with ``--resume``) reads the finished cache instead of decoding anything.

Nothing identifying is stored: case ids are the manifest's row ids, and an unreadable file is
kept as its case id and reason, with its path taken out of the reason (as in ``skipped.json``).

Example:
    >>> key = cache_key(cfg.data, cases)                                          # doctest: +SKIP
    >>> hit = open_entry(Path("runs/ct/decoded") / key[:16], key)                 # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtl._fastpath import DiskArray
from medtl._io import ensure_free_space, fsync_dir, output_error, read_json, sha256_file, write_json
from medtl._version import __version__
from medtl.config import DataConfig
from medtl.data._grid import Geometry
from medtl.data.manifest import Case

__all__ = ["CacheWriter", "Cached", "cache_key", "entry_folder", "open_entry", "prune", "restore_skipped"]

IMAGES = "images.f32"
MANIFEST = "manifest.json"
_FORMAT = 1


def cache_key(data: DataConfig, cases: Sequence[Case]) -> str:
    """sha256 (hex) of the preprocessing settings and every case's source, in order."""
    h = hashlib.sha256()
    settings = {"format": _FORMAT, "medtl": __version__, "intensity": data.intensity.model_dump(mode="json"),
                "image_size": [int(s) for s in data.image_size], "spacing": data.spacing,
                "orientation": getattr(data, "orientation", None)}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for c in cases:
        h.update(b"\0case\0" + str(c.case_id).encode())
        if c.array is not None:
            a = np.ascontiguousarray(c.array)
            h.update(f"array {a.dtype.str} {a.shape}".encode())
            h.update(memoryview(a).cast("B"))
        else:
            h.update(_source_stamp(c.path).encode())
            if c.series:  # one series of a folder holding several
                h.update(f"\0series\0{c.series}".encode())
    return h.hexdigest()


def _source_stamp(path: str | None) -> str:
    """``path``, its size and modification time; for a folder, those of every entry in it."""
    if not path:
        return "none"
    p = Path(path)
    parts = [str(p)]
    try:
        if p.is_dir():
            for e in sorted(os.scandir(p), key=lambda e: e.name):
                st = e.stat()
                parts.append(f"{e.name}:{st.st_size}:{st.st_mtime_ns}")
        else:
            st = p.stat()
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    except OSError as exc:  # unreadable now: part of the key, so a later fix invalidates the entry
        parts.append(f"error:{exc.errno}")
    return "|".join(parts)


def entry_folder(cache_dir: str | Path, key: str) -> Path:
    """The folder of the entry ``key`` under ``cache_dir``."""
    return Path(cache_dir) / key[:16]


class Cached:
    """A finished cache entry: the images on disk, the kept case ids, their geometry, the skipped cases."""

    def __init__(self, images: DiskArray, case_ids: list[str], geometry: list[Geometry | None],
                 skipped: list[dict]) -> None:
        self.images = images
        self.case_ids = case_ids
        self.geometry = geometry
        self.skipped = skipped


def restore_skipped(cached: Cached, cases_by_id: dict[str, Case]) -> list[dict]:
    """The entry's skipped cases as :func:`~medtl.data.prepare.prepare` lists them (``case_id``, ``path``, ``reason``)."""
    return [{"case_id": s["case_id"], "path": getattr(cases_by_id.get(s["case_id"]), "path", None),
             "reason": s["reason"]} for s in cached.skipped]


def prune(cache_dir: str | Path, keep: Path) -> None:
    """Remove every entry of ``cache_dir`` but ``keep`` (only folders that hold a cache entry)."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        return
    for sub in folder.iterdir():
        if sub != keep and sub.is_dir() and ((sub / MANIFEST).exists() or sub.name.endswith(".part")):
            shutil.rmtree(sub, ignore_errors=True)


def open_entry(folder: str | Path, key: str, *, verify: bool = True) -> Cached | None:
    """The finished entry in ``folder`` when its manifest says ``key`` and its file checks; else ``None``.

    With ``verify`` the image file's sha256 is recomputed (one sequential read of the file).
    """
    folder = Path(folder)
    try:
        m = read_json(folder / MANIFEST)
    except (OSError, ValueError):
        return None
    try:
        if m.get("key") != key or m.get("format") != _FORMAT:
            return None
        shape = tuple(int(s) for s in m["shape"])
        path = folder / IMAGES
        if path.stat().st_size != int(np.prod(shape)) * 4:
            return None
        if verify and sha256_file(path) != m["sha256"]:
            return None
        geometry = [Geometry.from_dict(g) if g else None for g in m["geometry"]]
        ids = [str(i) for i in m["case_ids"]]
        skipped = [{"case_id": str(s["case_id"]), "reason": str(s["reason"])} for s in m["skipped"]]
    except (OSError, KeyError, TypeError, ValueError):
        return None
    if len(ids) != shape[0] or len(geometry) != shape[0]:
        return None
    return Cached(DiskArray(path, shape), ids, geometry, skipped)


class CacheWriter:
    """Writes one entry: :meth:`append` each preprocessed image in order, then :meth:`finish`.

    Args:
        folder: the entry's folder (made when :meth:`finish` renames the finished entry into place).
        key: :func:`cache_key` of the data.
        max_bytes: the most the images may take (every case kept), checked against the free
            disk space before anything is written.

    Example:
        >>> w = CacheWriter(folder, key, max_bytes=n * 4 * 32 * 64 * 64)   # doctest: +SKIP
        >>> w.append(img, "row00001", geometry)                             # doctest: +SKIP
        >>> cached = w.finish()                                             # doctest: +SKIP
    """

    def __init__(self, folder: str | Path, key: str, *, max_bytes: int) -> None:
        self.entry = Path(folder)
        self.key = key
        self.entry.parent.mkdir(parents=True, exist_ok=True)
        ensure_free_space(self.entry.parent, max_bytes, f"the decoded-image cache ({IMAGES})")
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.entry.name}.", suffix=".part", dir=self.entry.parent))
        self._tmp = self.folder / IMAGES
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed by finish() or abort()
        self._sha = hashlib.sha256()
        self._row: tuple[int, ...] | None = None
        self.case_ids: list[str] = []
        self.geometry: list[Geometry | None] = []
        self.skipped: list[dict] = []  # [{"case_id", "path", "reason"}], set before finish()

    def append(self, image: np.ndarray, case_id: str, geometry: Geometry | None) -> None:
        """Write one preprocessed image ``(C, *S)`` (float32) as the next row."""
        a = np.ascontiguousarray(image, dtype="<f4")
        if self._row is None:
            self._row = tuple(a.shape)
        elif tuple(a.shape) != self._row:
            raise ValueError(f"every cached image must have shape {self._row}; got {tuple(a.shape)}")
        buf = memoryview(a).cast("B")
        try:
            self._fh.write(buf)
        except OSError as exc:
            self.abort()
            err = output_error(exc, self._tmp, needed=len(buf))
            if err is not None:
                raise err from None
            raise
        self._sha.update(buf)
        self.case_ids.append(str(case_id))
        self.geometry.append(geometry)

    def finish(self) -> Cached:
        """Make the entry complete (fsync, manifest last, rename into place) and return it."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        shape = (len(self.case_ids), *(self._row or ()))
        skipped = [{"case_id": str(s["case_id"]), "reason": _without_path(str(s["reason"]), s.get("path"))}
                   for s in self.skipped]
        write_json(self.folder / MANIFEST, {
            "format": _FORMAT, "key": self.key, "medtl_version": __version__, "dtype": "float32 little-endian",
            "shape": list(shape), "sha256": self._sha.hexdigest(), "case_ids": self.case_ids,
            "geometry": [g.as_dict() if g is not None else None for g in self.geometry], "skipped": skipped})
        fsync_dir(self.folder)
        if self.entry.exists():  # stale (it did not open), or finished meanwhile by a run sharing the folder
            done = open_entry(self.entry, self.key)
            if done is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                return done
            shutil.rmtree(self.entry, ignore_errors=True)
        try:
            os.rename(self.folder, self.entry)
        except OSError:  # another run renamed its identical entry into place first
            done = open_entry(self.entry, self.key)
            shutil.rmtree(self.folder, ignore_errors=True)
            if done is None:
                raise
            return done
        fsync_dir(self.entry.parent)
        return Cached(DiskArray(self.entry / IMAGES, shape), list(self.case_ids), list(self.geometry), skipped)

    def abort(self) -> None:
        """Drop the unfinished entry."""
        try:
            self._fh.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _without_path(reason: str, path: str | None) -> str:
    """``reason`` with the file's path (and its name) replaced by ``<file>``."""
    if path:
        reason = reason.replace(str(path), "<file>")
        name = Path(str(path)).name
        if len(name) > 3:
            reason = reason.replace(name, "<file>")
    return reason
