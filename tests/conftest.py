"""Shared fixtures: the seed, and the real data in ``MEDTL_SHARED_DATA``."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs one pytest-xdist worker per core: each worker (and any medtl it starts
    # in a subprocess) then uses one torch thread, so workers do not fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def shared_data_dir() -> Path:
    """The shared real-data folder (``MEDTL_SHARED_DATA``, default ``../shared/datasets``)."""
    env = os.environ.get("MEDTL_SHARED_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "datasets").resolve()


@pytest.fixture
def shared_data() -> Path:
    """The shared dataset folder. Fails (never skips) when it is missing."""
    root = shared_data_dir()
    if not (root / "README.md").exists():
        pytest.fail(
            f"Real test data not found at {root}. Place the shared datasets there or set "
            "MEDTL_SHARED_DATA to their folder (it must contain README.md, medmnist/, "
            "ct-contrast-tcga/, dicom-samples/ and nifti-samples/)."
        )
    return root


MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def shared_weights(monkeypatch) -> Path:
    """The shared weights folder (``../shared/weights``, beside the datasets) as ``MEDTL_WEIGHTS_DIR``,
    the way a user's download cache holds torchvision's MobileNetV2 file. Fails (never skips) when missing."""
    folder = shared_data_dir().parent / "weights"
    if not (folder / MOBILENET_V2_FILE).is_file():
        pytest.fail(f"{MOBILENET_V2_FILE} not found in {folder}: place torchvision's file there (see "
                    "../shared/datasets/README.md, 'weights') or set MEDTL_SHARED_DATA.")
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(folder))
    return folder


@pytest.fixture(autouse=True)
def seed() -> int:
    """One seed for every test: Python, NumPy and torch."""
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0
