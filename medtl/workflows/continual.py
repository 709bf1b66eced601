"""``medtl continual``: learning across sites in sequence, and how much each method forgets.

Each site's patients are split once into training and held-out test patients (patient-grouped,
stratified by class, ``continual.test_fraction``, seeded by ``cv.seed``); the training patients
give up ``cv.val_fraction`` of themselves as the stage's validation set (the best epoch). Then,
per repeat ``r`` (``continual.repeats``; seeds ``FoldSeeds(train.seed, r, t)`` for stage ``t``):

* ``init``: the configured encoder with its new, seeded head, untrained. Its scores are the
  baseline ``b`` of forward transfer.
* ``naive``, ``ewc``, ``replay``: stage 0 trains on the first site (one training, shared by the
  three: it is the same computation); stage ``t`` continues on site ``t`` alone, ``ewc`` with
  the penalty of every earlier stage (:class:`medtl.training.continual.EWC`), ``replay`` with a
  batch from a bounded buffer of earlier sites' training cases every step
  (:class:`medtl.training.continual.ReplayBuffer`).
* ``joint``: one stage on every site's training patients at once (the upper bound).

After every stage every site's held-out patients are scored: ``R[t][i]``, AUC (the primary
metric: threshold-free, so a shift of the predicted probabilities between sites does not count
as forgetting a ranking the model still has) and accuracy at 0.5. Lopez-Paz & Ranzato (2017),
with ``T`` sites: ``BWT = mean_{i<T-1} (R[T-1][i] - R[i][i])`` (negative: forgetting) and
``FWT = mean_{i>0} (R[i-1][i] - b_i)``. CIs are percentile intervals of a patient bootstrap of
the held-out predictions, resampled within each site, with the same resamples for every method
(so differences between methods are paired); with repeats, each resample scores the mean over
repeats, and the spread over repeats is reported beside it.

Run directory::

    OUT/config.yaml                 the resolved config and its hash
    OUT/stages/<key>.json           one finished stage: held-out probabilities on every site, history, bill
    OUT/stages/<key>.safetensors    its weights (the next stage starts from them); ewc: <key>.ewc.safetensors
    OUT/continual.json              per method: the matrix, BWT, FWT, final mean, with CIs; the compute bill
    OUT/continual.html              self-contained report: heatmaps, BWT/FWT with CIs, compute bill

Stage keys: ``r0_init``, ``r0_seq_s0`` (the shared first stage), ``r0_ewc_s1``, ..., ``r0_joint``.
A killed run resumes: finished stages (same config hash, weights matching their sha256) are reused.
"""

from __future__ import annotations

import base64
import copy
import csv
import hashlib
import html
import io
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from medtl._compute import ComputeBill, bill_rows
from medtl._io import atomic_write_bytes, atomic_write_text, read_json, write_json
from medtl._runtime import FoldSeeds, console, device_name, progress_bar, resolve_device, seed_everything, split_seed
from medtl.config import Config, config_hash
from medtl.data.prepare import PreparedData
from medtl.data.shift import scanner_shift
from medtl.errors import ConfigError, DataError, MedtlError
from medtl.evaluate.splits import inner_split
from medtl.training.continual import EWC, ReplayBuffer, train_stage
from medtl.training.loop import predict_proba
from medtl.workflows._folds import start
from medtl.workflows.trainers import make_model

__all__ = ["continual", "transfer_scores"]

METRICS = ("auc", "acc")
_SEQUENTIAL = ("naive", "ewc", "replay")


def continual(cfg: Config, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
              data: PreparedData | None = None) -> dict:
    """Learn the sites of ``cfg`` in sequence with every method of ``cfg.continual``; returns ``continual.json``.

    Args:
        cfg: the run config (``continual`` section; ``train`` is the recipe of every stage).
        out_dir: the run directory (created; with ``resume``, finished stages there are reused).
        resume: reuse stages an earlier run of the same config finished in ``out_dir``.
        progress: show progress bars.
        data: already prepared data (otherwise decoded from ``cfg.data``).

    Example:
        >>> cfg = load_config("configs/continual_demo.yaml")          # doctest: +SKIP
        >>> res = continual(cfg, "runs/continual")                    # doctest: +SKIP
        >>> res["methods"]["ewc"]["bwt"]["auc"]                       # doctest: +SKIP
        {'value': -0.02, 'ci95': [-0.08, 0.03]}
    """
    t0 = time.time()
    device = resolve_device(cfg.train.device)
    bill = ComputeBill(device=str(device), cpu_watts_per_core=cfg.train.cpu_watts_per_core)
    _check_supported(cfg)
    if resume:
        _check_resumable(Path(out_dir) / "stages", config_hash(cfg))
    run, h, data, progress = start(cfg, out_dir, resume=resume, progress=progress, data=data, bill=bill)
    cc = cfg.continual
    sites = _case_sites(cfg, data)
    order = _site_order(cc.sites, sites)
    images = _shifted(data.images, sites, cc.site_shift, order, seed=cfg.cv.seed)
    split = _split_sites(cfg, data, sites, order)
    stages = _Stages(run.path / "stages", h, resume, bill)
    epochs = cc.epochs_per_stage or cfg.train.epochs
    k = len(data.class_names)
    test = {s: split[s]["test"] for s in order}
    probs: dict[str, list[dict]] = {m: [] for m in [*cc.methods, "init"]}  # per repeat: {row: {site: proba}}
    info: dict[str, list] = {m: [] for m in cc.methods}
    with (progress_bar() if progress else nullcontext()) as bar:
        for r in range(cc.repeats):
            seed_everything(FoldSeeds(cfg.train.seed, r, 0).int("init"))
            model0 = make_model(cfg, k)
            rec = stages.read(f"r{r}_init", None)  # the untrained model is rebuilt from its seed, not loaded
            init = _Stage(model0, rec) if rec is not None else \
                stages.run(f"r{r}_init", lambda m=model0: (m, {}), test, images, cfg, keep_weights=False)
            probs["init"].append({"init": init.record["proba"]})
            ctx = _Ctx(cfg, data, images, split, order, test, epochs, stages, bar, r)
            seq = [m for m in cc.methods if m in _SEQUENTIAL]
            first = _train(ctx, f"r{r}_seq_s0", init.model, 0, order[0]) if seq else None
            for method in seq:
                rows, chosen = _sequence(ctx, method, first)
                probs[method].append(rows)
                info[method].append(chosen)
            if "joint" in cc.methods:
                joint = _train(ctx, f"r{r}_joint", init.model, 0, None)
                probs["joint"].append({"joint": joint.record["proba"]})
                info["joint"].append([joint.record["best_epoch"]])
    with bill.stage("evaluation"):
        result = transfer_scores(data.y, data.groups, test, order, probs, n_boot=cfg.evaluate.n_bootstrap,
                                 seed=cfg.evaluate.seed)
    for m in cc.methods:
        result["methods"][m]["best_epochs"] = info[m]
    result.update({
        "task": "continual", "name": cfg.name, "config_hash": h, "class_names": data.class_names,
        "sites": order, "site_column": cc.site_column, "site_shift": dict(cc.site_shift),
        "patients": {s: {p: len(set(data.groups[split[s][p]])) for p in ("train", "val", "test")} for s in order},
        "cases": {s: {p: len(split[s][p]) for p in ("train", "val", "test")} for s in order},
        "settings": {"epochs_per_stage": epochs, "ewc_lambda": cc.ewc_lambda, "ewc_samples": cc.ewc_samples,
                     "replay_size": cc.replay_size, "replay_policy": cc.replay_policy,
                     "replay_batch": _replay_batch(cfg), "repeats": cc.repeats, "test_fraction": cc.test_fraction,
                     "val_fraction": cfg.cv.val_fraction, "model": cfg.model.name, "pretrained": cfg.model.pretrained},
        "device": device_name(device), "seconds": round(time.time() - t0, 1), "compute": bill.as_dict(),
    })
    write_json(run.path / "continual.json", result)
    atomic_write_text(run.path / "continual.html", _report(result))
    _print(result)
    return result


def _check_supported(cfg: Config) -> None:
    """What the stage trainer does not do, said before any data is decoded."""
    strategy, problems = cfg.train.strategy.name, []
    if strategy == "linear_probe":
        problems.append("train.strategy.name=linear_probe fits a scikit-learn head once; continual learning "
                        "trains the network stage after stage. Use finetune, llrd, partial or gradual_unfreeze.")
    if strategy in ("adapters", "lora") and "ewc" in cfg.continual.methods:
        problems.append(f"train.strategy.name={strategy} trains adapters that are merged after each stage, so EWC "
                        "(which anchors the trained parameters) would protect nothing. Use finetune, llrd, partial "
                        "or gradual_unfreeze, or drop ewc from continual.methods.")
    if cfg.tasks:
        problems.append("medtl continual trains one classification head; the config has tasks. Drop the tasks.")
    if cfg.adapt.method != "none":
        problems.append(f"adapt.method={cfg.adapt.method} adapts to an unlabelled target site, which medtl continual "
                        "does not have (every site is learnt with its labels). Set adapt.method=none.")
    if problems:
        raise ConfigError("medtl continual cannot run this config:\n  " + "\n  ".join(problems))


def _check_resumable(folder: Path, h: str) -> None:
    """Refuse, before anything is written, to resume stages finished under another config."""
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            old = read_json(path).get("config_hash")
        except (OSError, ValueError, AttributeError):
            continue
        if old != h:
            raise MedtlError(f"'{folder.parent}' holds a continual run made with a different config (hash {old}, now "
                             f"{h}). Use a new --out directory, or --no-resume to overwrite it.")


# --------------------------------------------------------------------------- sites and splits

def _case_sites(cfg: Config, data: PreparedData) -> np.ndarray:
    """``(N,)`` site of every case, from ``continual.site_column``."""
    col = cfg.continual.site_column
    if cfg.data.format == "manifest" and col != "site":
        path = cfg.resolved_data_path()
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            if col not in (reader.fieldnames or []):
                raise ConfigError(f"continual.site_column={col!r} is not a column of the manifest {path.name}. Got "
                                  f"columns {reader.fieldnames}. Name the column that holds each case's site.")
            by_line = {i + 2: (row.get(col) or "").strip() for i, row in enumerate(reader)}
        sites = [by_line.get(int(c.case_id[3:]), "") if c.case_id.startswith("row") else "" for c in data.cases]
    else:
        sites = [c.site or "" for c in data.cases]
    missing = sum(1 for s in sites if not s)
    if missing:
        where = ("the manifest's column " + repr(col)) if cfg.data.format == "manifest" else \
            "data.labels.site_column" if cfg.data.format == "folder" else "the data (MedMNIST has no sites)"
        raise DataError(f"{missing} of {len(sites)} case(s) have no site in {where}; medtl continual learns the "
                        "sites in sequence, so every case needs one. Fill the site of every case (manifest column "
                        "`site`, or continual.site_column; folder data: data.labels.site_column).")
    return np.array(sites, dtype=object)


def _site_order(wanted: list[str] | None, sites: np.ndarray) -> list[str]:
    present = sorted(set(sites.tolist()))
    if wanted is None:
        if len(present) < 2:
            raise DataError(f"medtl continual needs at least 2 sites; the data hold {len(present)} ({present}). "
                            "Add a second site, or use medtl cv for one site.")
        return present
    unknown = [s for s in wanted if s not in present]
    if unknown or len(set(wanted)) != len(wanted):
        raise ConfigError(f"continual.sites must name distinct sites of the data, in the order to learn them. Got "
                          f"{wanted}; the data hold {present}{f' (unknown: {unknown})' if unknown else ''}.")
    return list(wanted)


def _shifted(images: np.ndarray, sites: np.ndarray, shifts: dict[str, str], order: list[str], *, seed: int
             ) -> np.ndarray:
    """The images with ``continual.site_shift`` applied to its sites (a copy only when there is a shift)."""
    unknown = [s for s in shifts if s not in order]
    if unknown:
        raise ConfigError(f"continual.site_shift names site(s) {unknown} that are not learnt; the sites are {order}. "
                          "Use one of those names.")
    if not shifts:
        return images
    out = images.copy()
    for site, preset in shifts.items():
        idx = np.flatnonzero(sites == site)
        out[idx] = scanner_shift(preset)(images[idx], seed=seed)
    return out


def _split_sites(cfg: Config, data: PreparedData, sites: np.ndarray, order: list[str]) -> dict[str, dict]:
    """Per site: ``{"train", "val", "test"}`` case indices, disjoint by patient."""
    out = {}
    for k, s in enumerate(order):
        idx = np.flatnonzero(sites == s)
        y, g = data.y[idx], data.groups[idx]
        if len(set(g.tolist())) < 4:
            raise DataError(f"site '{s}' has {len(set(g.tolist()))} patient(s); a site needs at least 4 (training, "
                            "validation and held-out test patients). Add patients or leave the site out of "
                            "continual.sites.")
        trn, te = inner_split(y, g, val_fraction=cfg.continual.test_fraction, seed=split_seed(cfg.cv.seed, k))
        itr, iva = inner_split(y[trn], g[trn], val_fraction=cfg.cv.val_fraction,
                               seed=FoldSeeds(cfg.train.seed, 0, k).int("inner_split"))
        out[s] = {"train": idx[trn][itr], "val": idx[trn][iva], "test": idx[te]}
    return out


def _replay_batch(cfg: Config) -> int:
    return cfg.continual.replay_batch or max(1, cfg.train.batch_size // 2)


# --------------------------------------------------------------------------- stages

class _Stage:
    def __init__(self, model: torch.nn.Module, record: dict) -> None:
        self.model, self.record = model, record


class _Stages:
    """Finished stages on disk: a record and weights per key, written atomically, reused on resume."""

    def __init__(self, folder: Path, config_hash: str, resume: bool, bill: ComputeBill) -> None:
        self.folder, self.hash, self.resume, self.bill = folder, config_hash, resume, bill

    def read(self, key: str, model: torch.nn.Module | None) -> dict | None:
        """The finished record of ``key`` (weights loaded into ``model``), or ``None``."""
        path = self.folder / f"{key}.json"
        if not self.resume or not path.is_file():
            return None
        try:
            rec = read_json(path)
        except (OSError, ValueError):
            return None
        if rec.get("config_hash") != self.hash:
            raise MedtlError(f"'{self.folder.parent}' holds a continual run made with a different config (hash "
                             f"{rec.get('config_hash')}, now {self.hash}). Use a new --out directory, or --no-resume "
                             "to overwrite it.")
        if model is not None and rec.get("weights_sha256"):
            from safetensors.torch import load

            wpath = self.folder / f"{key}.safetensors"
            blob = wpath.read_bytes() if wpath.is_file() else b""
            if hashlib.sha256(blob).hexdigest() != rec["weights_sha256"]:
                console.print(f"[yellow]{key}: its weights are missing or do not match their sha256; training it "
                              "again.[/]")
                return None
            model.load_state_dict(load(blob))
        self.bill.merge(rec.get("compute") or {}, earlier=True)
        console.print(f"{key}: finished earlier, loaded from stages/{key}.json")
        return rec

    def write(self, key: str, model: torch.nn.Module | None, record: dict, extra: dict[str, torch.Tensor] | None
              ) -> None:
        from safetensors.torch import save

        if model is not None:
            blob = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
            atomic_write_bytes(self.folder / f"{key}.safetensors", blob)
            record["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        if extra:
            atomic_write_bytes(self.folder / f"{key}.ewc.safetensors", save(extra))
        write_json(self.folder / f"{key}.json", {"config_hash": self.hash, "key": key, **record})  # last: complete

    def run(self, key: str, fn, test: dict[str, np.ndarray], images: np.ndarray, cfg: Config, *,
            keep_weights: bool = True, extra=None) -> _Stage:
        """Compute ``key``: ``fn() -> (model, record)``, score every site's held-out cases, write it."""
        stage = ComputeBill(device=self.bill.device, cpu_watts_per_core=self.bill.cpu_watts_per_core)
        with stage.stage("training"):
            model, record = fn()
        stage.add_images("training", record.pop("images_trained", 0))
        with stage.stage("evaluation"):
            device = resolve_device(cfg.train.device)
            record["proba"] = {s: predict_proba(model, images[idx], device=device, tta=cfg.train.tta).tolist()
                               for s, idx in test.items()}
            stage.add_images("evaluation", sum(len(i) for i in test.values()))
        record["compute"] = stage.as_dict()
        self.bill.merge(record["compute"])
        self.write(key, model if keep_weights else None, record, extra() if extra else None)
        return _Stage(model, record)


class _Ctx:
    def __init__(self, cfg, data, images, split, order, test, epochs, stages, bar, repeat) -> None:
        self.cfg, self.data, self.images, self.split, self.order = cfg, data, images, split, order
        self.test, self.epochs, self.stages, self.bar, self.repeat = test, epochs, stages, bar, repeat


def _train(ctx: _Ctx, key: str, start_model: torch.nn.Module, t: int, site: str | None, *,
           penalty: EWC | None = None, buffer: ReplayBuffer | None = None) -> _Stage:
    """One stage from ``start_model`` (not changed): site ``site``'s training patients, or all sites' (``None``)."""
    cfg, data = ctx.cfg, ctx.data
    model = copy.deepcopy(start_model)
    rec = ctx.stages.read(key, model)
    if rec is not None:
        return _Stage(model, rec)
    parts = [ctx.split[site]] if site is not None else [ctx.split[s] for s in ctx.order]
    trn = np.concatenate([p["train"] for p in parts])
    val = np.concatenate([p["val"] for p in parts])

    def fit():
        tcfg = cfg.train.model_copy(update={"seed": FoldSeeds(cfg.train.seed, ctx.repeat, t).int("fit")})
        replay, rb = None, 0
        if buffer is not None and len(buffer):
            bi = buffer.indices()
            replay, rb = (ctx.images[bi], data.y[bi]), _replay_batch(cfg)
        res = train_stage(model, ctx.images[trn], data.y[trn], ctx.images[val], data.y[val], tcfg,
                          num_classes=len(data.class_names), epochs=ctx.epochs,
                          penalty=penalty.penalty if penalty is not None and penalty.terms_ else None,
                          replay=replay, replay_batch=rb, description=key, progress=ctx.bar)
        bs = min(cfg.train.batch_size, len(trn))
        per_step = bs + (min(rb, len(replay[0])) if replay is not None else 0)
        record = {"site": site or "all", "best_epoch": res.best_epoch, "history": res.history,
                  "n_train": len(trn), "n_val": len(val),
                  "images_trained": ctx.epochs * max(1, len(trn) // bs) * per_step}
        if buffer is not None:
            record["buffer"] = {"size": buffer.size, "policy": buffer.policy, "counts": buffer.counts(),
                                "indices": buffer.indices().tolist()}
        return res.model, record

    extra = (lambda: penalty.state_dict()) if penalty is not None and penalty.terms_ else None
    return ctx.stages.run(key, fit, ctx.test, ctx.images, cfg, extra=extra)


def _sequence(ctx: _Ctx, method: str, first: _Stage) -> tuple[dict, list]:
    """Stages 1..T-1 of one sequential method from the shared first stage; returns its rows and best epochs."""
    cfg, cc, r = ctx.cfg, ctx.cfg.continual, ctx.repeat
    rows = {f"after {ctx.order[0]}": first.record["proba"]}
    chosen = [first.record["best_epoch"]]
    ewc = EWC(cc.ewc_lambda) if method == "ewc" else None
    buffer = ReplayBuffer(cc.replay_size, policy=cc.replay_policy,
                          seed=FoldSeeds(cfg.train.seed, r, 0).int("search")) if method == "replay" else None
    prev = first
    for t in range(1, len(ctx.order)):
        key = f"r{r}_{method}_s{t}"
        before = ctx.order[t - 1]
        done_json = ctx.stages.folder / f"{key}.json"
        if ewc is not None:
            ewc_file = ctx.stages.folder / f"{key}.ewc.safetensors"
            if ctx.stages.resume and done_json.is_file() and ewc_file.is_file():
                from safetensors.torch import load

                ewc.load_state_dict(load(ewc_file.read_bytes()))
            else:
                trn = ctx.split[before]["train"]
                with ctx.stages.bill.stage("training"):
                    ewc.consolidate(prev.model, ctx.images[trn], batch_size=cfg.train.batch_size,
                                    device=resolve_device(cfg.train.device), max_samples=cc.ewc_samples,
                                    seed=FoldSeeds(cfg.train.seed, r, t).int("search"))
        if buffer is not None:
            trn = ctx.split[before]["train"]
            buffer.add(trn, ctx.data.y[trn], before)
        prev = _train(ctx, key, prev.model, t, ctx.order[t], penalty=ewc, buffer=buffer)
        rows[f"after {ctx.order[t]}"] = prev.record["proba"]
        chosen.append(prev.record["best_epoch"])
    return rows, chosen


# --------------------------------------------------------------------------- scores

def _site_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(1 + n_boot, n)`` case weights: a row of ones, then patient-bootstrap draw counts."""
    _, gi = np.unique(groups, return_inverse=True)
    n_g = int(gi.max()) + 1
    counts = np.random.default_rng(seed).multinomial(n_g, np.full(n_g, 1.0 / n_g), size=n_boot)
    return np.vstack([np.ones(len(groups)), counts[:, gi.ravel()]]).astype(np.float64)


def _weighted_scores(y: np.ndarray, proba: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """AUC (class 1 vs the rest; macro over classes when K > 2) and accuracy for each weight row ``(B, n)``."""
    k = proba.shape[1]
    pred = (proba[:, 1] >= 0.5).astype(int) if k == 2 else proba.argmax(1)
    acc = (w * (pred == y)).sum(1) / w.sum(1)
    aucs = []
    for c in ([1] if k == 2 else range(k)):
        pos, neg = y == c, y != c
        if not pos.any() or not neg.any():
            aucs.append(np.full(len(w), np.nan))
            continue
        s = proba[:, c]
        cmp = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        wp, wn = w[:, pos], w[:, neg]
        den = wp.sum(1) * wn.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(np.where(den > 0, np.einsum("bp,pn,bn->b", wp, cmp, wn) / den, np.nan))
    return {"auc": np.mean(aucs, axis=0), "acc": acc}


def _ci(v: np.ndarray) -> dict:
    """``{"value": v[0], "ci95": percentile interval of v[1:]}`` (undefined resamples dropped)."""
    boot = v[1:][np.isfinite(v[1:])]
    lo, hi = np.percentile(boot, [2.5, 97.5]).tolist() if len(boot) else [float("nan")] * 2
    return {"value": float(v[0]), "ci95": [lo, hi]}


def transfer_scores(y: np.ndarray, groups: np.ndarray, test: dict[str, np.ndarray], order: list[str],
                    probs: dict[str, list[dict]], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy matrices, BWT, FWT and final mean per method, with paired patient-bootstrap CIs.

    Args:
        y, groups: ``(N,)`` class and patient of every case.
        test: ``{site: held-out case indices}``.
        order: the sites in the order learnt.
        probs: ``{method: [per repeat {row name: {site: (n_site, K) probabilities}}]}``; ``"init"``
            holds the untrained model (row ``init``), the FWT baseline.
        n_boot: patient-bootstrap resamples (within each site; the same for every method).

    Returns:
        ``{"primary_metric", "metrics", "ci", "baseline", "methods": {method: {"rows", "matrix",
        "final_mean", "bwt", "fwt", "vs_naive", "repeats"}}}``; every figure is ``{"value", "ci95"}``
        and the matrices are ``{"value": [[...]], "ci95": [[[lo, hi], ...]]}`` (rows: stages, columns: sites).
    """
    w = {s: _site_weights(groups[test[s]], n_boot, int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
         for k, s in enumerate(order)}

    def cell(p, s: str) -> dict[str, np.ndarray]:
        return _weighted_scores(y[test[s]], np.asarray(p, dtype=np.float64), w[s])

    def rows_of(method: str) -> tuple[list[str], list[dict[str, list[dict]]]]:
        names = list(probs[method][0])
        per_rep = [{row: [cell(rep[row][s], s) for s in order] for row in names} for rep in probs[method]]
        return names, per_rep

    _, base_rep = rows_of("init")
    base = {m: [np.mean([rep["init"][j][m] for rep in base_rep], axis=0) for j in range(len(order))] for m in METRICS}
    out: dict = {"primary_metric": "auc", "metrics": list(METRICS),
                 "baseline": {"what": "the untrained model: the pretrained encoder with its new, seeded head",
                              **{m: [_ci(v) for v in base[m]] for m in METRICS}},
                 "ci": {"method": "percentile", "level": 0.95, "n_boot": int(n_boot), "seed": int(seed),
                        "unit": "patient, resampled within each site's held-out patients; the same resamples for "
                                "every method (paired); with repeats, each resample scores the mean over repeats"},
                 "methods": {}}
    boot_bwt: dict[str, dict[str, np.ndarray]] = {}
    T = len(order)
    for method in [m for m in probs if m != "init"]:
        if not probs[method]:
            continue
        names, per_rep = rows_of(method)
        mean = {m: [[np.mean([rep[row][j][m] for rep in per_rep], axis=0) for j in range(T)] for row in names]
                for m in METRICS}
        res: dict = {"rows": names, "matrix": {m: {"value": [[float(c[0]) for c in row] for row in mean[m]],
                                                   "ci95": [[_ci(c)["ci95"] for c in row] for row in mean[m]]}
                                               for m in METRICS},
                     "final_mean": {m: _ci(np.mean(mean[m][-1], axis=0)) for m in METRICS}}
        if len(names) == T:  # a sequence: one row per stage
            bwt = {m: np.mean([mean[m][T - 1][i] - mean[m][i][i] for i in range(T - 1)], axis=0) for m in METRICS}
            fwt = {m: np.mean([mean[m][i - 1][i] - base[m][i] for i in range(1, T)], axis=0) for m in METRICS}
            res["bwt"] = {m: _ci(bwt[m]) for m in METRICS}
            res["fwt"] = {m: _ci(fwt[m]) for m in METRICS}
            boot_bwt[method] = bwt
            if len(per_rep) > 1:
                res["repeats"] = [{"bwt": {m: float(np.mean([rep[names[T - 1]][i][m][0] - rep[names[i]][i][m][0]
                                                             for i in range(T - 1)])) for m in METRICS}}
                                  for rep in per_rep]
        out["methods"][method] = res
    for method, bwt in boot_bwt.items():
        if method != "naive" and "naive" in boot_bwt:
            diff = {m: _ci(bwt[m] - boot_bwt["naive"][m]) for m in METRICS}
            out["methods"][method]["vs_naive"] = {
                "bwt_difference": diff,
                "separates": {m: bool(diff[m]["ci95"][0] > 0 or diff[m]["ci95"][1] < 0) for m in METRICS},
                "cis_overlap": {m: _overlap(out["methods"][method]["bwt"][m], out["methods"]["naive"]["bwt"][m])
                                for m in METRICS}}
    return out


def _overlap(a: dict, b: dict) -> bool:
    return bool(a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1])


# --------------------------------------------------------------------------- report

def _fmt(v: dict | None) -> str:
    if not v or v.get("value") is None or not np.isfinite(v["value"]):
        return "n/a"
    lo, hi = v["ci95"]
    return f"{v['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _heatmaps(res: dict) -> str:
    """``R[stage][site]`` heatmaps, one row per metric and one column per method, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(res["methods"])
    fig, axes = plt.subplots(len(METRICS), len(methods), squeeze=False,
                             figsize=(3.2 * len(methods), len(METRICS) * (1.6 + 0.5 * len(res["sites"]))))
    for row, metric in zip(axes, METRICS, strict=True):
        for ax, m in zip(row, methods, strict=True):
            r = res["methods"][m]
            mat = np.array(r["matrix"][metric]["value"], dtype=float)
            ax.imshow(mat, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(mat):
                lo, hi = r["matrix"][metric]["ci95"][i][j]
                ax.text(j, i, f"{v:.2f}\n[{lo:.2f}, {hi:.2f}]", ha="center", va="center", fontsize=8,
                        color="white" if not v >= 0.8 else "black")
            ax.set_xticks(range(len(res["sites"])), res["sites"])
            ax.set_yticks(range(len(r["rows"])), r["rows"])
            ax.set_title(f"{m}: {metric.upper()}", fontsize=10)
    fig.supxlabel("held-out patients of site")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _report(res: dict) -> str:
    """The self-contained HTML report (figures inline)."""
    e = html.escape
    rows = []
    for m, r in res["methods"].items():
        vs = r.get("vs_naive", {})
        sep = "" if not vs else ("CI excludes 0" if vs["separates"]["auc"] else "CI includes 0")
        rows.append(f"<tr><td>{e(m)}</td><td>{_fmt(r.get('bwt', {}).get('auc'))}</td>"
                    f"<td>{_fmt(r.get('fwt', {}).get('auc'))}</td><td>{_fmt(r['final_mean']['auc'])}</td>"
                    f"<td>{_fmt(vs.get('bwt_difference', {}).get('auc'))} {sep}</td>"
                    f"<td>{_fmt(r.get('bwt', {}).get('acc'))}</td><td>{_fmt(r['final_mean']['acc'])}</td></tr>")
    bill = res.get("compute") or {}
    bill_html = "".join(f"<tr><td>{e(a)}</td><td>{e(b)}</td><td>{e(c)}</td><td>{e(d)}</td></tr>"
                        for a, b, c, d in bill_rows(bill))
    s = res["settings"]
    shift = ", ".join(f"{k}: {v}" for k, v in res["site_shift"].items()) or "none"
    pats = ", ".join(f"{k} {v['train']}/{v['val']}/{v['test']}" for k, v in res["patients"].items())
    figs = f'<img alt="score matrices" src="data:image/png;base64,{_heatmaps(res)}">'
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>continual: {e(res['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>Continual learning across sites: {e(res['name'])}</h1>
<p>Sites learnt in order: <b>{e(' → '.join(res['sites']))}</b>.
Patients per site (train/val/held-out test): {e(pats)}.
Simulated scanner shift: {e(shift)}. Model {e(s['model'])} ({'pretrained' if s['pretrained'] else 'random init'}),
{s['epochs_per_stage']} epochs per stage, {s['repeats']} repeat(s); EWC λ = {s['ewc_lambda']:g};
replay buffer {s['replay_size']} cases ({e(s['replay_policy'])}), {s['replay_batch']} per step.
Device: {e(res['device'])}; {res['seconds']:.0f} s.</p>
<h2>Backward and forward transfer</h2>
<p>Primary metric: AUC on each site's held-out patients. BWT = mean over earlier sites of (score after the last
stage − score right after learning that site): below 0 means forgetting. FWT = mean over later sites of (score
before learning the site − the untrained model's score). 95 % CIs: {e(res['ci']['unit'])}
({res['ci']['n_boot']} resamples).</p>
<table><tr><th>method</th><th>BWT (AUC)</th><th>FWT (AUC)</th><th>final mean AUC</th>
<th>BWT − naive BWT (AUC, paired)</th><th>BWT (accuracy)</th><th>final mean accuracy</th></tr>{''.join(rows)}</table>
<h2>Score matrices R[stage][site] (95 % CI)</h2>{figs}
<h2>Compute bill</h2><table><tr><th>stage</th><th>wall</th><th>images</th><th>images/s</th></tr>{bill_html}</table>
<p>Energy {bill.get('energy_wh', 0):.3f} Wh: {e(bill.get('energy_method', ''))} Peak memory
{(bill.get('peak_rss_bytes') or 0) / 2**30:.2f} GiB on {e(bill.get('device_name', ''))}.</p>
</body></html>
"""


def _print(res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{res['name']}: {' → '.join(res['sites'])} (AUC on held-out patients, 95 % CI)")
    for col in ("method", "BWT", "FWT", "final mean", "BWT − naive"):
        t.add_column(col, justify="right")
    for m, r in res["methods"].items():
        t.add_row(m, _fmt(r.get("bwt", {}).get("auc")), _fmt(r.get("fwt", {}).get("auc")),
                  _fmt(r["final_mean"]["auc"]), _fmt(r.get("vs_naive", {}).get("bwt_difference", {}).get("auc")))
    console.print(t)
