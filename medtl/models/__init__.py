"""Stage 2: encoders and their weights (records, sources, the encoder contract)."""

from medtl.models.encoders import CHANNEL_MAPPINGS, MedtlClassifier, create_encoder
from medtl.models.records import WeightRecord, get_record, list_records, register, resolve_record

__all__ = [
    "CHANNEL_MAPPINGS",
    "MedtlClassifier",
    "WeightRecord",
    "create_encoder",
    "get_record",
    "list_records",
    "register",
    "resolve_record",
]
