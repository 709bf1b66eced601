#!/usr/bin/env bash
# AdrenalMNIST3D official split (1188 train / 98 val / 298 test), 3D, CPU: the rows of README.md.
# Runs are sequential and each holds the shared CPU lock; each prints wall time, load and test AUC/ACC with 95% CIs.
# Usage: bash benchmarks/adrenalmnist3d/run.sh [OUT_DIR] [ROW ...]     e.g. ... /tmp/adr inflate scratch
# Rows: inflate (configs/adrenalmnist3d.yaml as is: ImageNet Lite0, I3D-inflated), scratch (same 3D net, random
# init), acs (ImageNet Lite0 with ACS convolutions). MEDTL_TRAIN replaces the training command (default
# `python -m medtl train`).
set -euo pipefail
out=${1:-/tmp/medtl-bench-adrenalmnist3d}
shift || true
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(inflate scratch acs)
cfg=configs/adrenalmnist3d.yaml
lock=${MEDTL_CPU_LOCK:-/tmp/medtl-cpu.lock}
train=${MEDTL_TRAIN:-python -m medtl train}

run() {  # run NAME [--set k=v ...]
    local name=$1; shift
    rm -rf "${out:?}/$name"; mkdir -p "$out"
    flock "$lock" bash -c '
        echo "== $1: load before: $(uptime | sed "s/.*load/load/")"
        /usr/bin/time -f "$1 wall %e s, user %U s, sys %S s, CPU %P" timeout 960 $2 "$3" --out "$4" -q "${@:5}"
        echo "== $1: load after: $(uptime | sed "s/.*load/load/")"' _ "$name" "$train" "$cfg" "$out/$name" "$@"
    python - "$out/$name" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
t = m["test"]
f = lambda k: f"{t[k]['value']:.3f} [{t[k]['ci95'][0]:.3f}, {t[k]['ci95'][1]:.3f}]"
print("val AUC per epoch", [round(h["val_auc"], 3) for h in m["history"]])
print(f"test AUC {f('auc')}  ACC {f('acc')}  best epoch {m['best_epoch']}  seconds {m['seconds']}")
PY
}

for r in "${rows[@]}"; do
    case $r in
        inflate) run inflate ;;                                   # configs/adrenalmnist3d.yaml as is
        scratch) run scratch --set model.pretrained=false ;;
        acs)     run acs --set model.conversion_3d=acs ;;
        *) echo "unknown row '$r' (inflate, scratch, acs)" >&2; exit 2 ;;
    esac
done
