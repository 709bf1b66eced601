#!/usr/bin/env bash
# BreastMNIST official split (546 train / 78 val / 156 test), CPU: the runs of README.md.
# Runs are sequential (one training at a time); each prints wall time, load and test AUC/ACC with 95% CIs.
# Usage: bash benchmarks/breastmnist/run.sh [OUT_DIR] [ROW ...]     e.g. ... /tmp/bm recipe scratch
# Rows: recipe (configs/breastmnist.yaml as is, 20 epochs), e12, e16 (epochs), scratch12 / scratch (no ImageNet, 12 / 20 epochs).
set -euo pipefail
out=${1:-/tmp/medtl-bench-breastmnist}
shift || true
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(recipe e12 scratch12 scratch e16)
cfg=configs/breastmnist.yaml

run() {  # run NAME [--set k=v ...]
    local name=$1; shift
    rm -rf "$out/$name"; mkdir -p "$out"
    echo "== $name: load before: $(uptime | sed 's/.*load/load/')"
    /usr/bin/time -f "$name wall %e s, user %U s, sys %S s, CPU %P, max RSS %M KB" medtl train "$cfg" --out "$out/$name" -q "$@"
    echo "== $name: load after: $(uptime | sed 's/.*load/load/')"
    python - "$out/$name" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
t = m["test"]
f = lambda k: f"{t[k]['value']:.3f} [{t[k]['ci95'][0]:.3f}, {t[k]['ci95'][1]:.3f}]"
print(f"test AUC {f('auc')}  ACC {f('acc')}  best epoch {m['best_epoch']}  seconds {m['seconds']}")
PY
}

for r in "${rows[@]}"; do
    case $r in
        recipe)    run recipe ;;                                          # configs/breastmnist.yaml as is (20 epochs)
        scratch12) run scratch12 --set train.epochs=12 --set model.pretrained=false ;;
        scratch)   run scratch --set model.pretrained=false ;;            # 20 epochs
        e12)       run e12 --set train.epochs=12 ;;
        e16)       run e16 --set train.epochs=16 ;;
        *) echo "unknown row '$r' (recipe, scratch12, scratch, e12, e16)" >&2; exit 2 ;;
    esac
done
