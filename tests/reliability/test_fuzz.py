"""Property-based tests (hypothesis), bounded to a few seconds each.

* Mutated DICOM bytes (flipped, inserted, deleted bytes; truncation) either load or raise
  :class:`UnreadableFileError`; never any other exception type, and never the generic
  last-resort reason for the mutations seen so far.
* Random YAML configs and ``--set`` overrides give a :class:`Config` or a :class:`ConfigError`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medtl.config import Config, load_config
from medtl.data.readers import read_image
from medtl.errors import ConfigError, UnreadableFileError


def _samples() -> Path:
    env = os.environ.get("MEDTL_SHARED_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
    return root / "dicom-samples"


# Small seeds covering the decoders: native LE/BE/implicit, RLE, JPEG, JPEG-LS, JPEG 2000, multi-frame.
SEEDS = ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
         "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "rtdose.dcm"]
_BYTES = {n: (_samples() / n).read_bytes() for n in SEEDS if (_samples() / n).is_file()}

mutation = st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]),
                     st.floats(0.0, 1.0, allow_nan=False), st.binary(min_size=1, max_size=8))


def _mutate(raw: bytes, ops: list[tuple[str, float, bytes]]) -> bytes:
    b = bytearray(raw)
    for op, where, data in ops:
        i = min(int(where * len(b)), max(len(b) - 1, 0))
        if op == "set":
            b[i:i + len(data)] = data
        elif op == "insert":
            b[i:i] = data
        elif op == "delete":
            del b[i:i + len(data)]
        else:
            del b[i:]
    return bytes(b)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def test_seed_files_present(shared_data: Path) -> None:
    assert set(_BYTES) == set(SEEDS), f"seed files missing in {shared_data / 'dicom-samples'}"


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(SEEDS), ops=st.lists(mutation, min_size=1, max_size=6),
       header_only=st.booleans())
def test_mutated_dicom_loads_or_raises_unreadable(scratch: Path, name: str, ops: list, header_only: bool) -> None:
    raw = _BYTES[name]
    if header_only:  # aim the mutations at the header, where most parsing happens
        ops = [(op, where * min(1.0, 600 / len(raw)), data) for op, where, data in ops]
    path = scratch / "mutant.dcm"
    path.write_bytes(_mutate(raw, ops))
    try:
        img = read_image(path)
    except UnreadableFileError as exc:
        assert exc.reason and "unexpected decoder error" not in exc.reason, exc.reason
        return
    assert img.array.dtype == np.float32 and np.isfinite(img.array).all()


_KEYS = ["name", "data", "path", "format", "image_size", "intensity", "mode", "train", "epochs", "lr",
         "model", "pretrained", "cv", "n_splits", "privacy", "reveal_ids", "labels", "csv", "strategy"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=8)), kids, max_size=4)), max_leaves=20)
_configs = st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), _values, max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_configs, with_data=st.booleans())
def test_random_yaml_config_gives_config_or_config_error(scratch: Path, raw: dict, with_data: bool) -> None:
    if with_data:
        raw = {**raw, "data": {"path": "m.csv", **(raw["data"] if isinstance(raw.get("data"), dict) else {})}}
    path = scratch / "c.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(cfg, Config)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200), overrides=st.lists(st.text(max_size=30), max_size=3))
def test_random_yaml_text_and_overrides(scratch: Path, text: str, overrides: list[str]) -> None:
    path = scratch / "t.yaml"
    path.write_text(text)
    for source, sets in ((path, None), ({"data": {"path": "m.csv"}}, overrides)):
        try:
            assert isinstance(load_config(source, sets), Config)
        except ConfigError as exc:
            assert str(exc)
