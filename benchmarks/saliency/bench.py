"""Saliency throughput: maps/s for Grad-CAM and IG(50 steps), medtl's batched ``explain`` vs a
per-image Captum loop, same model, same device. Writes ``saliency.json`` and ``saliency.md``.

Usage: python benchmarks/saliency/bench.py [--out DIR] [--n 32] [--size 96] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

from medtl.explain import explain
from medtl.models import create_encoder


def _per_image(model, x, method: str, steps: int) -> torch.Tensor:
    """The loop people write first: one Captum call per image."""
    out = []
    for i in range(len(x)):
        xi = x[i:i + 1].requires_grad_(True)
        if method == "gradcam":
            cam = LayerGradCam(model, model.feature_layer).attribute(xi, target=1, relu_attributions=True)
            out.append(LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")[:, 0])
        else:
            out.append(IntegratedGradients(model).attribute(xi, baselines=0.0, target=1, n_steps=steps,
                                                            internal_batch_size=steps).sum(1))
    return torch.cat(out)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, cudnn)
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/saliency/results")
    ap.add_argument("--n", type=int, default=32, help="images per measurement")
    ap.add_argument("--size", type=int, default=96, help="image side (the demo uses 96)")
    ap.add_argument("--steps", type=int, default=50, help="IG steps")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    model = create_encoder("tf_efficientnet_lite0", pretrained=False, num_classes=2, in_chans=1).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(args.n, 1, args.size, args.size, device=dev)
    rows = []
    for method in ("gradcam", "ig"):
        kw = {"n_steps": args.steps} if method == "ig" else {}
        batched = _time(lambda: explain(model, x, 1, method, **kw), args.repeats)
        loop = _time(lambda: _per_image(model, x.clone(), method, args.steps), args.repeats)
        a = explain(model, x[:2], 1, method, **kw)
        b = _per_image(model, x[:2].clone(), method, args.steps)
        rows.append({"method": "Grad-CAM" if method == "gradcam" else f"IG ({args.steps} steps)",
                     "batched_maps_per_s": args.n / batched, "per_image_maps_per_s": args.n / loop,
                     "speedup": loop / batched, "max_abs_diff": float((a - b).abs().max())})
        print(rows[-1], flush=True)
    result = {"device": name, "torch": torch.__version__, "model": "tf_efficientnet_lite0 (1 channel in)",
              "image_size": [args.size, args.size], "n_images": args.n, "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "saliency.json").write_text(json.dumps(result, indent=2))
    md = [f"Device: {name}; torch {torch.__version__}; tf_efficientnet_lite0, {args.n} images of "
          f"{args.size}x{args.size}; best of {args.repeats}.", "",
          "| method | medtl `explain` (batched) maps/s | per-image Captum loop maps/s | speed-up | max abs diff |",
          "|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['batched_maps_per_s']:.1f} | {r['per_image_maps_per_s']:.1f} | "
           f"{r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |" for r in rows]
    (out / "saliency.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
