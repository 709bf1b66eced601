#!/usr/bin/env bash
# Nested CV of the BreastMNIST linear probe (all 780 images, 5 outer x 3 inner grouped folds, frozen
# ImageNet EfficientNet-Lite0 at 128 px): the probe's C chosen by an Optuna search (20 trials, TPE,
# median pruning) against a 4-point grid, plus the plain k-fold run whose probe picks C itself.
# Usage: bash benchmarks/search/run.sh [OUT_DIR]     (needs pip install 'medtl[search]')
# The first run computes the features and caches them (MEDTL_CACHE_DIR, here a fresh folder); the
# others reuse them, so their wall times are the search and the probes. Run under the CPU lock on a
# shared machine: flock /tmp/medtl-cpu.lock bash benchmarks/search/run.sh
set -euo pipefail
out=${1:-/tmp/medtl-bench-search}
export MEDTL_CACHE_DIR=${MEDTL_CACHE_DIR:-$out/cache}
rm -rf "$out"; mkdir -p "$out"
cfg=configs/breastmnist_linear_probe.yaml
optuna=(--set cv.scheme=nested --set cv.inner_splits=3 --set cv.search=optuna --set cv.n_trials=20
        --set 'cv.search_space=[{key: train.strategy.probe_C, kind: float, low: 1e-5, high: 10, log: true}]')
run() {  # name, extra --set arguments...
    local name=$1; shift
    echo "== $name: load before: $(uptime | sed 's/.*load/load/')"
    /usr/bin/time -f "$name wall %e s, user %U s, sys %S s, CPU %P, max RSS %M KB" \
        python -m medtl cv "$cfg" --out "$out/$name" --quiet "$@" > "$out/$name.log" 2>&1 || { tail -20 "$out/$name.log"; exit 1; }
    tail -1 "$out/$name.log"
    python - "$out/$name" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
f = lambda k: f"{m['pooled'][k]['value']:.3f} [{m['pooled'][k]['ci95'][0]:.3f}, {m['pooled'][k]['ci95'][1]:.3f}]"
st = m["compute"]["stages"]
line = (f"pooled AUC {f('auc')}  ACC {f('acc')}  fold AUC {m['fold_mean']['auc']['mean']:.3f} ± "
        f"{m['fold_mean']['auc']['sd']:.3f}  run {m['seconds']} s  features {st['features']['wall_s']} s")
s = m.get("search")
if s:
    line += (f"\n  search: {s['trials']} trials, {s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed;"
             f" trials {s['wall_s']} s, search stage {st['search']['wall_s']} s, {s['images']} probe-fit images")
    line += "\n  C per fold: " + ", ".join(f"{v['train.strategy.probe_C'][0]:.3g}" for v in
                                            (f["best_params"] for f in s["folds"]))
else:
    line += "\n  C per fold: " + ", ".join(f"{c:g}" for c in m["strategy"]["C_per_fold"])
print(line)
PY
}
run kfold_probe_grid                                       # kfold; the probe's own grouped inner CV picks C
run nested_grid --set cv.scheme=nested --set cv.inner_splits=3 \
    --set 'cv.grid={"train.strategy.probe_C": [0.001, 0.01, 0.1, 1.0]}'
run nested_optuna "${optuna[@]}"
run nested_optuna_nopruning "${optuna[@]}" --set cv.pruner=none
