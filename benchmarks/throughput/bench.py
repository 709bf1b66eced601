"""Fine-tuning throughput (training images/s): medtl's ``fit`` vs the MONAI-tutorial loop.

Both sides train the same timm model (``medtl.create_encoder(name, pretrained=False,
num_classes=2, in_chans=1)``; weights do not change speed) on the same arrays: the BreastMNIST
train images ``(546, 1, 28, 28)`` scaled to [0, 1] and upsampled once with MONAI ``Resize``
(bilinear, anti-aliased) to ``(N, 1, S, S)``, optionally tiled ``--repeat`` times.

* **reference**: the loop as the MONAI tutorials write it: ``monai.data.ArrayDataset`` with
  MONAI array transforms per sample (RandFlip, RandAffine, RandScaleIntensity,
  RandShiftIntensity, RandAdjustContrast, RandGaussianNoise, the parameters of medtl's default
  ``AugmentConfig``), ``DataLoader(num_workers=W, shuffle, pin_memory on CUDA)``, default
  AdamW, plain NCHW, ``torch.autocast`` fp16 + ``GradScaler`` on CUDA (fp32 on CPU),
  ``loss.item()`` per step.
* **medtl**: ``medtl.training.loop.fit`` with ``train.augment.backend`` = ``torch`` (batched,
  device-resident) and/or ``monai`` (per-sample MONAI), reading ``train_seconds`` /
  ``train_images_per_s`` from ``FitResult.history`` (validation excluded).

The first epoch of every side is warm-up and is not timed; the timed epochs cover the same
number of images on both sides. Each side runs in its own subprocess (no state leaks between
them: cudnn flags, compile caches, thread settings). Writes ``results/<device-tag>.json`` and
``.md``.

Usage:
    python benchmarks/throughput/bench.py --model tf_efficientnet_lite0 --size 64 --batch 32 --device cpu
    python benchmarks/throughput/bench.py --device cuda        # resnet50, 224 px, batch 128; reference 64 x 8 workers
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _env import describe, finish, md_header  # noqa: E402

DATA = "/work/shared/datasets/medmnist/breastmnist.npz"
ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------- data
def load_arrays(path: str, size: int, repeat: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BreastMNIST train/val as ``(N, 1, size, size)`` float32 in [0, 1] and int64 labels ``(N,)``."""
    from monai.transforms import Resize

    d = np.load(path)
    resize = Resize(spatial_size=(size, size), mode="bilinear", anti_aliasing=True)

    def prep(a: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(resize(im[None].astype(np.float32) / 255.0), dtype=np.float32) for im in a])

    x, y = prep(d["train_images"]), d["train_labels"].reshape(-1).astype(np.int64)
    xv, yv = prep(d["val_images"]), d["val_labels"].reshape(-1).astype(np.int64)
    if repeat > 1:
        x, y = np.tile(x, (repeat, 1, 1, 1)), np.tile(y, repeat)
    return x, y, xv, yv


def _model(name: str, device: torch.device) -> torch.nn.Module:
    from medtl import create_encoder

    torch.manual_seed(0)
    return create_encoder(name, pretrained=False, num_classes=2, in_chans=1).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ reference
def reference_transforms(size: int):
    """The tutorial's per-sample training transforms, parameters from medtl's default AugmentConfig."""
    from monai.transforms import (Compose, EnsureType, RandAdjustContrast, RandAffine, RandFlip,
                                  RandGaussianNoise, RandScaleIntensity, RandShiftIntensity)

    rot = float(np.deg2rad(15.0))
    return Compose([
        RandFlip(prob=0.5, spatial_axis=1),
        RandAffine(prob=0.8, rotate_range=(rot,), scale_range=(0.1, 0.1), translate_range=(0.06 * size,) * 2,
                   padding_mode="zeros"),
        RandScaleIntensity(factors=0.1, prob=0.5),
        RandShiftIntensity(offsets=0.05, prob=0.5),
        RandAdjustContrast(gamma=(0.8, 1.25), prob=0.3),
        RandGaussianNoise(std=0.01, prob=0.2),
        EnsureType(data_type="tensor", track_meta=False),  # plain tensors to the model (the faster choice)
    ])


def run_reference(args, x, y, device: torch.device, workers: int, batch: int, epochs: int) -> dict:
    """Per-epoch ``(images, seconds)`` of the tutorial loop; epoch 1 is warm-up."""
    from monai.data import ArrayDataset, DataLoader

    ds = ArrayDataset(img=x, img_transform=reference_transforms(args.size), labels=y)
    ds.set_random_state(seed=0)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda")
    model = _model(args.model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    epochs_out = []
    for _ in range(epochs):
        model.train()
        epoch_loss, n = 0.0, 0
        t0 = time.perf_counter()
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            opt.zero_grad()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = loss_fn(model(xb), yb)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            epoch_loss += loss.item()
            n += len(xb)
        _sync(device)
        epochs_out.append({"images": n, "seconds": time.perf_counter() - t0, "loss": epoch_loss})
    return {"epochs": epochs_out}


# ---------------------------------------------------------------------------------------- medtl
class _StepClock:
    """A stand-in for ``rich.progress.Progress`` that timestamps every training step.

    Used only when ``FitResult.history`` has no ``train_seconds`` (the loop before the fast path).
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, task, advance: int = 0, **k) -> None:
        if advance:
            self.stamps.append(time.perf_counter())


def run_medtl(args, x, y, xv, yv, device: torch.device, backend: str, epochs: int) -> dict:
    """Per-epoch ``(images, seconds)`` of ``medtl.training.loop.fit``; epoch 1 is warm-up."""
    from medtl.config import AugmentConfig, TrainConfig
    from medtl.training.loop import fit

    aug = {}
    if "backend" in AugmentConfig.model_fields:
        aug["backend"] = backend
    elif backend != "monai":
        print(f"note: train.augment.backend does not exist yet; measuring the loop as it is ({backend!r} ignored)",
              file=sys.stderr)
    train = {"epochs": epochs, "batch_size": args.batch, "device": device.type, "tta": False, "augment": aug}
    if "compile" in TrainConfig.model_fields:
        train["compile"] = args.compile
    cfg = TrainConfig.model_validate(train)
    model = _model(args.model, torch.device("cpu"))
    clock = _StepClock()
    t0 = time.perf_counter()
    res = fit(model, x, y, xv, yv, cfg, num_classes=2, progress=clock)
    wall = time.perf_counter() - t0
    steps = len(x) // min(args.batch, len(x))
    out = []
    if all("train_seconds" in h for h in res.history):
        for h in res.history:
            out.append({"images": round(h["train_images_per_s"] * h["train_seconds"]), "seconds": h["train_seconds"],
                        "loss": h["train_loss"], "source": "history"})
    elif len(clock.stamps) == steps * epochs and steps > 1:  # first stamp of an epoch ends its first step
        for e in range(epochs):
            s = clock.stamps[e * steps:(e + 1) * steps]
            out.append({"images": (steps - 1) * args.batch, "seconds": s[-1] - s[0],
                        "loss": res.history[e]["train_loss"], "source": "step clock (steps 2..n)"})
    else:
        raise RuntimeError("fit() gave neither history['train_seconds'] nor one progress update per step")
    return {"epochs": out, "fit_wall_s": wall, "config": cfg.model_dump(mode="json")}


# ------------------------------------------------------------------------------------ ceiling
def run_ceiling(args, x, y, device: torch.device, batch: int, epochs: int) -> dict:
    """Forward + backward + fused AdamW on ready batches, no augmentation: the compute bound.

    channels_last, bf16 autocast on CUDA (fp32 on CPU); batches are slices of a tensor already
    on the device.
    """
    model = _model(args.model, device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt = torch.as_tensor(x, device=device).contiguous(memory_format=torch.channels_last)
    yt = torch.as_tensor(y, device=device)
    steps = len(x) // batch
    out = []
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for s in range(steps):
            xb, yb = xt[s * batch:(s + 1) * batch], yt[s * batch:(s + 1) * batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        out.append({"images": steps * batch, "seconds": time.perf_counter() - t0})
    return {"epochs": out, "augment_only": _augment_only(x, device, batch, steps)}


def _augment_only(x: np.ndarray, device: torch.device, batch: int, steps: int) -> dict:
    """Images/s of augmentation alone over one epoch: medtl's BatchAugment vs the MONAI per-sample preset."""
    from medtl.config import AugmentConfig
    from medtl.data.batch_augment import BatchAugment
    from medtl.data.transforms import augment_transform

    xt = torch.as_tensor(x, device=device)
    res = {}
    aug = BatchAugment(AugmentConfig(), spatial_dims=2, seed=0)
    for rep in range(2):  # first pass is warm-up
        t0 = time.perf_counter()
        for s in range(steps):
            aug(xt[s * batch:(s + 1) * batch])
        _sync(device)
        res["batch_augment_torch"] = round(steps * batch / (time.perf_counter() - t0), 1)
    mon = augment_transform(AugmentConfig(), x.shape[2:])
    mon.set_random_state(seed=0)
    n = min(len(x), 8 * batch)
    t0 = time.perf_counter()
    for i in range(n):
        np.asarray(mon(x[i]))
    res["monai_per_sample"] = round(n / (time.perf_counter() - t0), 1)
    return res


# ------------------------------------------------------------------------------- orchestration
def _steady(epochs: list[dict]) -> dict:
    timed = epochs[1:]
    n, t = sum(e["images"] for e in timed), sum(e["seconds"] for e in timed)
    return {"images_timed": n, "seconds_timed": round(t, 3), "images_per_s": round(n / t, 1),
            "warmup_epoch_s": round(epochs[0]["seconds"], 3),
            "per_epoch_images_per_s": [round(e["images"] / e["seconds"], 1) for e in timed]}


def _side(args, spec: str) -> dict:
    device = torch.device(args.device)
    x, y, xv, yv = load_arrays(args.data, args.size, args.repeat)
    kind, _, opt = spec.partition(":")
    if kind == "ref":
        r = run_reference(args, x, y, device, int(opt), args.ref_batch, args.epochs + 1)
    elif kind == "medtl":
        r = run_medtl(args, x, y, xv, yv, device, opt, args.epochs + 1)
    else:
        r = run_ceiling(args, x, y, device, args.batch, args.epochs + 1)
    return {**r, **_steady(r["epochs"]), "torch_threads": torch.get_num_threads(), "n_train": len(x)}


def _row(name: str, r: dict, batch, workers, aug: str, precision: str, ref_ips: float | None) -> str:
    ratio = f"{r['images_per_s'] / ref_ips:.2f}x" if ref_ips else "1.00x"
    return (f"| {name} | {batch} | {workers} | {aug} | {precision} | {r['images_timed']} | "
            f"**{r['images_per_s']:.1f}** | {ratio} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="timm name (default: tf_efficientnet_lite0 on CPU, resnet50 on CUDA)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 64 on CPU, 224 on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="medtl batch (default 32 on CPU, 128 on CUDA)")
    ap.add_argument("--ref-batch", type=int, default=None, help="reference batch (default: --batch on CPU, 64 on CUDA)")
    ap.add_argument("--workers", default=None, help="reference DataLoader workers, comma list (default 2,0 CPU; 8 CUDA)")
    ap.add_argument("--backends", default="torch,monai", help="medtl augment backends to time, comma list")
    ap.add_argument("--compile", default="off", help="train.compile for medtl (off|default|reduce-overhead|max-autotune)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None,
                    help="timed training steps at --batch (rounded up to whole epochs; default: 3 epochs)")
    ap.add_argument("--repeat", type=int, default=None, help="tile the 546 train images (default 1 CPU, 8 CUDA)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the forward+backward-only bound")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--tag", default=None, help="result file name (default: the device tag)")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side, print JSON
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.model = args.model or ("resnet50" if gpu else "tf_efficientnet_lite0")
    args.size = args.size or (224 if gpu else 64)
    args.batch = args.batch or (128 if gpu else 32)
    args.ref_batch = args.ref_batch or (64 if gpu else args.batch)
    args.repeat = args.repeat or (8 if gpu else 1)
    workers = [int(w) for w in (args.workers or ("8" if gpu else "2,0")).split(",")]
    n_train = 546 * args.repeat
    steps_per_epoch = n_train // args.batch
    args.epochs = math.ceil(args.steps / steps_per_epoch) if args.steps else 3
    if args.side is not None:
        print("RESULT " + json.dumps(_side(args, args.side)))
        return

    env = describe(args.device)
    common = [sys.executable, __file__, "--model", args.model, "--size", str(args.size), "--batch", str(args.batch),
              "--ref-batch", str(args.ref_batch), "--device", args.device, "--repeat", str(args.repeat),
              "--steps", str(args.epochs * steps_per_epoch), "--compile", args.compile, "--data", args.data]
    sides = [f"ref:{w}" for w in workers] + [f"medtl:{b}" for b in args.backends.split(",") if b]
    sides += [] if args.no_ceiling else ["ceiling"]
    results = {}
    for spec in sides:
        print(f"[{time.strftime('%H:%M:%S')}] {spec} ...", flush=True)
        proc = subprocess.run(common + ["--side", spec], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"side {spec} failed (exit {proc.returncode})")
        results[spec] = json.loads(line[0][len("RESULT "):])
        for note in proc.stderr.splitlines():
            if note.startswith("note:"):
                print("  " + note)
        print(f"  {results[spec]['images_per_s']:.1f} img/s over {results[spec]['images_timed']} images "
              f"(epochs: {results[spec]['per_epoch_images_per_s']})", flush=True)
    env = finish(env)

    ref_main = results[f"ref:{workers[0]}"]["images_per_s"]
    ref_best = max(results[f"ref:{w}"]["images_per_s"] for w in workers)
    amp_ref = "fp16 autocast + GradScaler" if gpu else "fp32"
    amp_medtl = "bf16 autocast" if gpu else "fp32"
    rows = [_row(f"reference (MONAI tutorial, W={w})", results[f"ref:{w}"], args.ref_batch, w,
                 "MONAI per sample, in workers" if w else "MONAI per sample, main process", amp_ref + ", NCHW", ref_main)
            for w in workers]
    for b in args.backends.split(","):
        if b:
            rows.append(_row(f"medtl fit, augment.backend={b}", results[f"medtl:{b}"], args.batch, 0,
                             "batched on device" if b == "torch" else "MONAI per sample", amp_medtl + ", channels_last",
                             ref_main))
    if "ceiling" in results:
        rows.append(_row("bound: forward+backward+AdamW only", results["ceiling"], args.batch, 0, "none",
                         amp_medtl + ", channels_last", ref_main))
    ratios = {f"medtl:{b}": {"vs_reference_W%d" % workers[0]: round(results[f"medtl:{b}"]["images_per_s"] / ref_main, 3),
                             "vs_best_reference": round(results[f"medtl:{b}"]["images_per_s"] / ref_best, 3)}
              for b in args.backends.split(",") if b}
    cmd = "python benchmarks/throughput/bench.py " + " ".join(a for a in sys.argv[1:])
    md = "\n".join([
        f"# Fine-tuning throughput: {args.model}, {args.size} px, {n_train} BreastMNIST train images",
        "", md_header(env), "", f"Command: `{cmd.strip()}`", "",
        f"Timed: {args.epochs} epochs after 1 warm-up epoch, the same number of images on every side. "
        f"Ratios are against the reference with W={workers[0]}.", "",
        "| loop | batch | workers | augmentation | precision / layout | images timed | img/s | ratio |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
    ])
    payload = {"env": env, "command": cmd.strip(), "model": args.model, "size": args.size, "batch": args.batch,
               "ref_batch": args.ref_batch, "workers": workers, "repeat": args.repeat, "n_train": n_train,
               "timed_epochs": args.epochs, "compile": args.compile, "results": results, "ratios": ratios}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or env["tag"]
    (out / f"{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{tag}.md").write_text(md)
    print(md)
    print(f"wrote {out / (tag + '.json')} and {out / (tag + '.md')}")


if __name__ == "__main__":
    main()
