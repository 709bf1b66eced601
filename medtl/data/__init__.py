"""Stage 1: data. Manifests and MedMNIST, readers, MONAI transforms, the decode-once cache, audit checks, demo data."""

from __future__ import annotations

from medtl.data.manifest import Case, read_manifest, read_medmnist
from medtl.data.prepare import PreparedData, load_cases, prepare
from medtl.data.privacy import Pseudonymizer
from medtl.data.readers import ScanImage, read_image

__all__ = ["Case", "PreparedData", "Pseudonymizer", "ScanImage", "load_cases", "prepare", "read_image", "read_manifest",
           "read_medmnist"]
