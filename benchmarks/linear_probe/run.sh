#!/usr/bin/env bash
# Linear probe on BreastMNIST (all 780 images, 5-fold CV): frozen ImageNet EfficientNet-Lite0 at 128 px,
# one feature pass, logistic head with C chosen by grouped inner CV per fold.
# Usage: bash benchmarks/linear_probe/run.sh [OUT_DIR]
# The first run is cold (features computed and cached in MEDTL_CACHE_DIR, here a fresh folder);
# the second reuses the cached features. Run under the CPU lock on a shared machine.
set -euo pipefail
out=${1:-/tmp/medtl-bench-lp}
export MEDTL_CACHE_DIR=${MEDTL_CACHE_DIR:-$out/cache}
rm -rf "$out"; mkdir -p "$out"
for run in cold warm; do
    echo "== $run: load before: $(uptime | sed 's/.*load/load/')"
    /usr/bin/time -f "$run wall %e s, user %U s, sys %S s, CPU %P, max RSS %M KB" \
        python -m medtl cv configs/breastmnist_linear_probe.yaml --out "$out/$run" --quiet
    python - "$out/$run" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
f = lambda k: f"{m['pooled'][k]['value']:.3f} [{m['pooled'][k]['ci95'][0]:.3f}, {m['pooled'][k]['ci95'][1]:.3f}]"
s = m["strategy"]
print(f"pooled AUC {f('auc')}  ACC {f('acc')}  fold AUC {m['fold_mean']['auc']['mean']:.3f} ± {m['fold_mean']['auc']['sd']:.3f}"
      f"  C per fold {s['C_per_fold']}  features {s['feature_seconds']} s ({s['feature_cache']})  run {m['seconds']} s")
PY
done
