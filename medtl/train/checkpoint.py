"""Checkpoints: ``model.safetensors`` plus ``meta.json`` (record, preprocessing, labels, config hash).

Loading rebuilds the network from the stored weight record without fetching pretrained
weights again, so a checkpoint is usable offline and on another machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from medtl.errors import MedtlError

__all__ = ["save_checkpoint", "load_checkpoint", "read_meta"]


def save_checkpoint(model, folder: str | Path, meta: dict) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/meta.json``; returns the folder.

    ``meta`` should hold ``class_names``, ``data`` (intensity/image size), ``config_hash``
    and anything else useful; the weight record is added from ``model.weights_record``.
    The weights are written to a temporary name first so a killed run never leaves a
    half-written checkpoint behind.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / "model.safetensors.part"
    save_file(state, str(tmp))
    meta = dict(meta)
    meta["weights_record"] = model.weights_record.to_dict()
    meta.setdefault("channel_mapping", model.channel_mapping)
    meta.setdefault("in_chans", model.in_chans)
    meta.setdefault("num_classes", model.num_classes)
    (folder / "meta.json.part").write_text(json.dumps(meta, indent=2, default=str))
    tmp.replace(folder / "model.safetensors")
    (folder / "meta.json.part").replace(folder / "meta.json")
    return folder


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise MedtlError(f"No checkpoint at '{folder}' (meta.json missing). Was the run finished?")
    return json.loads(path.read_text())


def load_checkpoint(folder: str | Path):
    """Rebuild the model saved in ``folder``; returns ``(model, meta)``."""
    import dataclasses

    from medtl.models.encoders import MedtlClassifier
    from medtl.models.records import WeightRecord

    meta = read_meta(folder)
    rec_dict = dict(meta["weights_record"])
    for k in ("mean", "std", "input_size", "tags"):
        rec_dict[k] = tuple(rec_dict[k])
    record = WeightRecord(**rec_dict)
    import timm

    mapping = meta["channel_mapping"]
    in_chans = int(meta["in_chans"])
    net_chans = record.in_chans if mapping == "repeat" else in_chans
    net = timm.create_model(record.architecture, pretrained=False, num_classes=int(meta["num_classes"]),
                            in_chans=net_chans)
    model = MedtlClassifier(net, dataclasses.replace(record), in_chans=in_chans, channel_mapping=mapping)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=True)
    return model.eval(), meta
