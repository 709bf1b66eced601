"""Every file of the real bad-input corpora goes through ingest: it loads, or it fails with a named reason.

The corpora are pydicom's and nibabel's own test files (``dicom-samples/``, ``nifti-samples/``
in the shared datasets folder). Files are discovered at test time: a file listed in
``EXPECTED`` must have exactly that outcome; any other file must load or raise
:class:`UnreadableFileError` with a specific (non-generic) reason, never another exception.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from medtl.data.privacy import IDENTIFYING_TAGS
from medtl.data.readers import read_image
from medtl.errors import UnreadableFileError

LOAD = "load"
# file -> LOAD, or a substring the UnreadableFileError reason must contain.
EXPECTED: dict[str, str] = {
    # compressed transfer syntaxes that must decode with the installed plugins
    "SC_rgb_jpeg_dcmtk.dcm": LOAD, "SC_jpeg_no_color_transform.dcm": LOAD,      # JPEG baseline
    "SC_rgb_dcmtk_+eb+cy+n2.dcm": LOAD, "examples_ybr_color.dcm": LOAD,
    "SC_rgb_small_odd_jpeg.dcm": LOAD, "SC_rgb_jpeg_lossy_gdcm.dcm": LOAD,
    "JPGExtended.dcm": LOAD,                                                      # JPEG extended 12 bit
    "SC_rgb_jpeg_gdcm.dcm": LOAD,                                                 # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": LOAD, "JPEGLSNearLossless_08.dcm": LOAD,     # JPEG-LS
    "JPEGLSNearLossless_16.dcm": LOAD, "SC_rgb_jls_lossy_line.dcm": LOAD, "SC_rgb_jls_lossy_sample.dcm": LOAD,
    "JPEG2000.dcm": LOAD, "MR_small_jp2klossless.dcm": LOAD, "693_J2KI.dcm": LOAD,  # JPEG 2000
    "GDCMJ2K_TextGBR.dcm": LOAD, "examples_jpeg2k.dcm": LOAD, "J2K_pixelrep_mismatch.dcm": LOAD,
    "SC_rgb_gdcm_KY.dcm": LOAD,
    "MR_small_RLE.dcm": LOAD, "SC_rgb_rle.dcm": LOAD, "SC_rgb_rle_32bit_2frame.dcm": LOAD,  # RLE
    "rtdose_rle.dcm": LOAD,
    "image_dfl.dcm": LOAD,                                                        # deflated
    # uncompressed, other encodings
    "CT_small.dcm": LOAD, "MR_small.dcm": LOAD, "MR_small_bigendian.dcm": LOAD, "MR_small_implicit.dcm": LOAD,
    "ExplVR_BigEnd.dcm": LOAD, "examples_palette.dcm": LOAD, "liver_1frame.dcm": LOAD, "rtdose.dcm": LOAD,
    "SC_rgb_jpeg_dcmd.dcm": LOAD,
    # broken on purpose
    "JPEG-lossy.dcm": "corrupt JPEG Extended (Process 2 and 4) pixel stream",
    "JPEG2000-embedded-sequence-delimiter.dcm": "corrupt JPEG 2000 Image Compression pixel stream",
    "SC_rgb_jpeg.dcm": "requires Explicit VR but the data set is encoded as Implicit VR",
    "MR_truncated.dcm": "truncated file: the Pixel Data declares 8192 bytes",
    "rtplan_truncated.dcm": "truncated file: the data element",
    "badVR.dcm": "invalid header value: NumberOfFrames (0028,0008) (VR IS)",
    "nested_priv_SQ.dcm": "elements that describe it are missing",
    "meta_missing_tsyntax.dcm": "no Transfer Syntax UID (0002,0010)",
    "no_meta.dcm": "not a DICOM file",
    # header-only or stripped image objects
    "UN_sequence.dcm": "claims to be a CT Image Storage object but holds no image",
    "priv_SQ.dcm": "claims to be a MR Image Storage object but holds no image",
    "no_meta_group_length.dcm": "claims to be a RT Image Storage object but holds no image",
    "empty_charset_LEI.dcm": "no Pixel Data element",
    # non-image SOP classes
    "rtplan.dcm": "RT Plan Storage / Modality RTPLAN object, not an image",
    "ExplVR_BigEndNoMeta.dcm": "RT Ion Plan Storage", "ExplVR_LitEndNoMeta.dcm": "RT Ion Plan Storage",
    "rtstruct.dcm": "RT Structure Set Storage / Modality RTSTRUCT object, not an image",
    "test-SR.dcm": "Comprehensive SR Storage / Modality SR object, not an image",
    "reportsi.dcm": "Basic Text SR Storage", "reportsi_with_empty_number_tags.dcm": "Basic Text SR Storage",
    "waveform_ecg.dcm": "12-lead ECG Waveform Storage",
    # not images at all
    "README.txt": "unsupported file type '.txt'", "crayons.icc": "unsupported file type '.icc'",
    "rtplan.dump": "unsupported file type '.dump'", "test1.json": "unsupported file type '.json'",
    "zipMR.gz": "unsupported file type '.gz'",
    # NIfTI
    "anatomical.nii": LOAD, "standard.nii.gz": LOAD, "reoriented_anat_moved.nii": LOAD,
    "example4d.nii.gz": "4D volume (shape (128, 96, 24, 2))",
    "example_nifti2.nii.gz": "4D volume (shape (32, 20, 12, 2))",
    "functional.nii": "4D volume (shape (17, 21, 3, 20))",
    "resampled_anat_moved.nii": "NaN/Inf in image data (153 of 1071 voxels)",
}
GENERIC = ("unexpected decoder error", "could not read", "unparsable DICOM header: Exception")


def _root() -> Path:
    env = os.environ.get("MEDTL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def _corpus() -> list[Path]:
    files = []
    for sub in ("dicom-samples", "nifti-samples"):
        folder = _root() / sub
        files += sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return files


def _outcome(path: Path) -> tuple[str, str]:
    """``("load", "")``, ``("reject", reason)`` or ``("crash", type: message)``."""
    try:
        img = read_image(path)
    except UnreadableFileError as exc:
        return "reject", exc.reason
    except Exception as exc:  # noqa: BLE001 - this is what the test counts
        return "crash", f"{type(exc).__name__}: {exc}"
    assert img.array.dtype == np.float32 and np.isfinite(img.array).all()
    assert img.array.ndim in (3, 4) and img.array.shape[0] in (1, 3) and min(img.array.shape) > 0
    assert len(img.spacing) == img.array.ndim - 1 and all(s > 0 for s in img.spacing)
    assert not set(img.meta) & set(IDENTIFYING_TAGS)
    return "load", ""


@pytest.mark.parametrize("path", _corpus(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_file_loads_or_fails_with_a_named_reason(path: Path) -> None:
    kind, detail = _outcome(path)
    assert kind != "crash", f"{path.name} raised {detail} instead of UnreadableFileError"
    want = EXPECTED.get(path.name)
    if want == LOAD:
        assert kind == "load", f"{path.name} should load: {detail}"
    elif want is not None:
        assert kind == "reject" and want in detail, f"{path.name}: expected '{want}', got {kind} '{detail}'"
    if kind == "reject":
        assert len(detail) >= 20 and not any(g in detail for g in GENERIC), detail


def test_corpus_is_present_and_the_table_is_current(shared_data: Path) -> None:
    names = {p.name for p in _corpus()}
    assert len(names) >= 90, f"expected the full corpora under {shared_data}"
    assert set(EXPECTED) <= names, sorted(set(EXPECTED) - names)


def test_corpus_counts(shared_data: Path) -> None:
    """Tally for the record: every file is tried; 0 crashes."""
    counts = {"load": 0, "reject": 0, "crash": 0}
    for path in _corpus():
        counts[_outcome(path)[0]] += 1
    print(f"\ncorpus: {sum(counts.values())} files, {counts['load']} loaded, "
          f"{counts['reject']} rejected with a specific reason, {counts['crash']} crashes")
    assert counts["crash"] == 0 and counts["load"] >= 55 and counts["reject"] >= 30


# The decoder plugin each compressed family uses here, and the package the message must name.
_MISSING_DECODER = [
    ("SC_rgb_jpeg_dcmtk.dcm", "pylibjpeg-libjpeg"),       # JPEG baseline
    ("JPGExtended.dcm", "pylibjpeg-libjpeg"),             # JPEG extended
    ("SC_rgb_jpeg_gdcm.dcm", "pylibjpeg-libjpeg"),        # JPEG lossless
    ("MR_small_jpeg_ls_lossless.dcm", "pylibjpeg-libjpeg"),  # JPEG-LS
    ("MR_small_jp2klossless.dcm", "pylibjpeg-openjpeg"),  # JPEG 2000
]


@pytest.mark.parametrize("name,package", _MISSING_DECODER, ids=[n for n, _ in _MISSING_DECODER])
def test_missing_decoder_names_the_package_to_install(shared_data: Path, monkeypatch: pytest.MonkeyPatch,
                                                      name: str, package: str) -> None:
    import pydicom

    path = shared_data / "dicom-samples" / name
    ts = UID(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    monkeypatch.setattr(get_decoder(ts), "_available", {})  # as if no plugin were installed
    with pytest.raises(UnreadableFileError) as exc:
        read_image(path)
    reason = exc.value.reason
    assert f"compressed transfer syntax {ts.name} and no decoder for it is installed" in reason
    assert package in reason and "python-gdcm" in reason and "pip install" in reason


def test_rle_needs_no_plugin(shared_data: Path) -> None:
    """pydicom decodes RLE itself: no package is needed beyond pydicom."""
    decoder = get_decoder(UID("1.2.840.10008.1.2.5"))
    assert "pydicom" in decoder._available
    img = read_image(shared_data / "dicom-samples" / "MR_small_RLE.dcm")
    np.testing.assert_array_equal(img.array, read_image(shared_data / "dicom-samples" / "MR_small.dcm").array)
