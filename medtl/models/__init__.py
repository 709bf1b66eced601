"""Stage 2: encoders and their weights (records, sources, the encoder contract)."""

from medtl.models.encoders import CHANNEL_MAPPINGS, CONVERSIONS_3D, MedtlClassifier, build_network, create_encoder
from medtl.models.records import (
    LAYOUTS,
    WeightRecord,
    get_record,
    list_records,
    register,
    register_alias,
    resolve_record,
)

__all__ = [
    "CHANNEL_MAPPINGS",
    "CONVERSIONS_3D",
    "LAYOUTS",
    "MedtlClassifier",
    "WeightRecord",
    "build_network",
    "create_encoder",
    "get_record",
    "list_records",
    "register",
    "register_alias",
    "resolve_record",
]
