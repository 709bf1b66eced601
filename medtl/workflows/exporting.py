"""Export a finished run's predictor for deployment: ONNX, TorchScript or a MONAI bundle.

The exported graph is the run's whole predictor: the fold models (or the final model),
each with its temperature, averaged into class probabilities. An official-split ensemble
(``train.ensemble_folds`` > 1) is its one final model, with its members and their flip TTA
inside the graph (:class:`~medtl.models.ensemble.EnsembleClassifier`). Input is the preprocessed
scan, ``(B, C, H, W)`` or ``(B, C, D, H, W)`` in [0, 1] (the run's ``data.intensity`` and
``data.image_size``, recorded in ``export.json``); output is ``(B, K)`` probabilities.
Every export is checked against PyTorch on random inputs and the largest absolute
difference is recorded; a difference above ``atol`` raises.

Example:
    >>> export("runs/ct", "onnx")          # doctest: +SKIP
    {'format': 'onnx', 'path': 'runs/ct/export/model.onnx', 'max_abs_diff': 2.1e-07, ...}
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtl._io import atomic_write_bytes, atomic_write_text, ensure_free_space, output_error, write_json
from medtl._version import __version__
from medtl.errors import ConfigError, MedtlError
from medtl.workflows.rundir import RunDir

__all__ = ["EXPORT_FORMATS", "EnsemblePredictor", "export"]

EXPORT_FORMATS = ("onnx", "torchscript", "monai-bundle")


class EnsemblePredictor(nn.Module):
    """Average of temperature-scaled softmax outputs of several models: ``(B, C, *S)`` -> ``(B, K)``."""

    def __init__(self, models: list[nn.Module], temperatures: list[float]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), device=x.device)
        for i, m in enumerate(self.models):
            out = out + torch.softmax(m(x) / self.temperatures[i], dim=1)
        return out / len(self.models)


def _example(cfg, in_chans: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((batch, in_chans, *cfg.data.image_size), generator=g)


def export(run_dir: str | Path, fmt: str = "onnx", *, out_dir: str | Path | None = None, atol: float = 1e-4,
           trust_unverified: bool = False) -> dict:
    """Export ``run_dir``'s predictor as ``fmt`` (one of :data:`EXPORT_FORMATS`) into ``out_dir``
    (default ``RUN_DIR/export``) and verify it against PyTorch. Returns the ``export.json`` record.

    Every checkpoint's sha256 is verified first; ``trust_unverified`` exports checkpoints that
    do not verify anyway, and ``export.json`` records it (``"trust_unverified": true`` and
    ``"unverified": {key: reason}``).

    Raises:
        UnverifiedCheckpointError: a checkpoint does not verify and ``trust_unverified`` is False.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"The 'format' parameter of export must be one of {EXPORT_FORMATS}. Got {fmt!r} instead.")
    run = RunDir(run_dir)
    cfg = run.read_config()
    loaded = run.load_models(trust_unverified=trust_unverified)
    trust = run.trust_record(loaded, trust_unverified)
    meta = loaded[0][2]
    in_chans = int(meta.get("build", {}).get("in_chans", 1))
    predictor = EnsemblePredictor([m for _, m, _ in loaded],
                                  [float(mt.get("temperature") or 1.0) for _, _, mt in loaded]).eval()
    out = RunDir(out_dir if out_dir is not None else run.path / "export").mkdir()
    # the exported graph holds every weight: refuse a disk that cannot hold it before writing anything
    n_bytes = sum(t.numel() * t.element_size() for t in [*predictor.parameters(), *predictor.buffers()])
    ensure_free_space(out, n_bytes, f"the {fmt} export")
    x = _example(cfg, in_chans)
    with torch.inference_mode():
        ref = predictor(x).numpy()
    if fmt == "onnx":
        path, got = _onnx(predictor, x, out)
    elif fmt == "torchscript":
        path, got = _torchscript(predictor, x, out / "model.ts")
    else:
        path, got = _bundle(predictor, x, out, cfg, meta, in_chans)
    diff = float(np.max(np.abs(got - ref)))
    record = {"format": fmt, "path": str(path), "max_abs_diff": diff, "atol": atol, "n_models": len(loaded),
              "models": [k for k, _, _ in loaded], "class_names": meta["class_names"],
              "input": {"shape": ["B", in_chans, *cfg.data.image_size], "range": [0.0, 1.0],
                        "intensity": cfg.data.intensity.model_dump(), "spatial_dims": cfg.data.spatial_dims},
              "output": {"shape": ["B", len(meta["class_names"])], "kind": "probabilities"},
              "threshold": float(np.mean([float(mt.get("threshold", 0.5)) for _, _, mt in loaded])),
              **trust, "medtl_version": __version__, "torch_version": torch.__version__}
    members = {k: {"members": [m["key"] for m in mt["ensemble"]["members"]], "tta": bool(mt["ensemble"].get("tta"))}
               for k, _, mt in loaded if mt.get("ensemble")}
    if members:  # an official-split ensemble: one model of the export, its members inside the graph
        record["ensemble"] = members
    write_json(out / "export.json", record)
    if not diff <= atol:
        raise MedtlError(f"Exported {fmt} model disagrees with PyTorch: max |diff| {diff:.2e} > atol {atol:.0e}. "
                         f"The export at {path} should not be used; please report this with export.json.")
    return record


def _onnx(predictor: nn.Module, x: torch.Tensor, out: Path) -> tuple[Path, np.ndarray]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MedtlError("ONNX export needs onnx, onnxscript and onnxruntime: "
                         "pip install 'medtl[export]' (or pip install onnx onnxscript onnxruntime).") from exc
    path = out / "model.onnx"
    tmp = out / ".model.onnx.part"  # moved into place once complete: a failed export leaves the old file
    try:
        torch.onnx.export(predictor, (x,), str(tmp), input_names=["image"], output_names=["probabilities"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}}, dynamo=True,
                          external_data=False)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (err := output_error(exc, path)) is not None:
            raise err from None
        raise
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path, sess.run(None, {"image": x.numpy()})[0]


def _torchscript(predictor: nn.Module, x: torch.Tensor, path: Path) -> tuple[Path, np.ndarray]:
    with torch.inference_mode():
        ts = torch.jit.trace(predictor, x, check_trace=False)
    ts = torch.jit.freeze(ts.eval()) if hasattr(torch.jit, "freeze") else ts
    buf = io.BytesIO()
    torch.jit.save(ts, buf)
    atomic_write_bytes(path, buf.getvalue())
    loaded = torch.jit.load(str(path))
    with torch.inference_mode():
        return path, loaded(x).numpy()


def _bundle(predictor: nn.Module, x: torch.Tensor, out: Path, cfg, meta: dict, in_chans: int) -> tuple[Path, np.ndarray]:
    """A MONAI bundle folder: configs/metadata.json, configs/inference.json, models/model.ts."""
    import monai
    from monai.bundle import ConfigParser

    root = out / "bundle"
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "docs").mkdir(exist_ok=True)
    _torchscript(predictor, x, root / "models" / "model.ts")
    names = meta["class_names"]
    metadata = {
        "version": "0.1.0", "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "name": f"medtl {cfg.name}", "task": "classification",
        "description": f"medtl export of run '{cfg.name}' ({cfg.model.name}), ensemble of fold models",
        "authors": "medtl", "copyright": "see the run's data and weights licences",
        "changelog": {"0.1.0": "exported by medtl"},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": in_chans,
                                 "spatial_shape": list(cfg.data.image_size), "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {str(i): "intensity" for i in range(in_chans)}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(names),
                                 "spatial_shape": [len(names)], "dtype": "float32", "value_range": [0, 1],
                                 "is_onehot": False, "channel_def": {str(i): n for i, n in enumerate(names)}}},
        },
        "medtl": {"intensity": cfg.data.intensity.model_dump(), "image_size": list(cfg.data.image_size)},
    }
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts')",
        "network": "$@network_def.to(@device).eval()",
    }
    atomic_write_text(root / "configs" / "metadata.json", json.dumps(metadata, indent=2))
    atomic_write_text(root / "configs" / "inference.json", json.dumps(inference, indent=2))
    atomic_write_text(root / "docs" / "README.md",
        f"# {cfg.name}\n\nExported by medtl {__version__}. Input: preprocessed scan {['B', in_chans, *cfg.data.image_size]}"
        f" in [0, 1] (intensity: {cfg.data.intensity.model_dump()}). Output: class probabilities for {names}.\n")
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network")
    with torch.inference_mode():
        return root, net(x).numpy()
