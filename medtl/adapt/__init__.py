"""Stage 3: adaptation — how a pretrained encoder meets a new task.

This package holds the frozen-encoder tools (``probe``: cached feature extraction and the
sklearn linear-probe head; ``transferability``: LogME, LEEP and a quick probe AUC for
ranking encoders without fine-tuning) beside the fine-tuning strategies and domain
adaptation modules (``strategies``, ``layers``, ``domain``), imported from their modules.

Example:
    >>> from medtl.adapt import LinearProbe, extract_features, logme
"""

from __future__ import annotations

from medtl.adapt.probe import LinearProbe, default_cache_dir, extract_features, feature_cache_key, source_probabilities
from medtl.adapt.prototype import PrototypeClassifier
from medtl.adapt.transferability import leep, logme, probe_auc
from medtl.adapt.domain import (DomainClassifier, adabn, adaptation_inputs, collapse_dsbn, convert_dsbn, coral_loss,
                                domain_context, grad_reverse, mmd_loss)
from medtl.adapt.layers import add_adapters, add_lora, merge_adapters
from medtl.adapt.strategies import Strategy, make_strategy, parameter_blocks

__all__ = [
    "DomainClassifier",
    "Strategy",
    "adabn",
    "adaptation_inputs",
    "add_adapters",
    "add_lora",
    "collapse_dsbn",
    "convert_dsbn",
    "coral_loss",
    "domain_context",
    "grad_reverse",
    "make_strategy",
    "merge_adapters",
    "mmd_loss",
    "parameter_blocks",
    "LinearProbe",
    "PrototypeClassifier",
    "default_cache_dir",
    "extract_features",
    "feature_cache_key",
    "leep",
    "logme",
    "probe_auc",
    "source_probabilities",
]
