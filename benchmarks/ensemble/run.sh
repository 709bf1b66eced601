#!/usr/bin/env bash
# BreastMNIST official split (546 train / 78 val / 156 test) at a short budget, 64 px and 6 epochs:
# one model (train.ensemble_folds=1) against fold ensembles of 3 and 5 members, same recipe otherwise.
# Runs are sequential (one training at a time); each prints wall time, load, test AUC/ACC with 95% CIs,
# and for an ensemble every member and the paired DeLong test ensemble - member.
# Usage: bash benchmarks/ensemble/run.sh [OUT_DIR] [ROW ...]     e.g. ... /tmp/ens single k3
# Rows: single (k = 1), k3, k5 (train.ensemble_folds). Then: medtl compare OUT/k3 OUT/single
set -euo pipefail
out=${1:-/tmp/medtl-bench-ensemble}
shift || true
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(single k3 k5)
cfg=configs/breastmnist.yaml
budget=(--set "data.image_size=[64,64]" --set train.epochs=6)

run() {  # run NAME [--set k=v ...]
    local name=$1; shift
    rm -rf "${out:?}/$name"; mkdir -p "$out"
    echo "== $name: load before: $(uptime | sed 's/.*load/load/')"
    /usr/bin/time -f "$name wall %e s, user %U s, sys %S s, CPU %P, max RSS %M KB" \
        medtl train "$cfg" --out "$out/$name" -q "${budget[@]}" "$@"
    echo "== $name: load after: $(uptime | sed 's/.*load/load/')"
    python - "$out/$name" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
t, c = m["test"], m["compute"]
f = lambda k: f"{t[k]['value']:.3f} [{t[k]['ci95'][0]:.3f}, {t[k]['ci95'][1]:.3f}]"
print(f"test AUC {f('auc')}  ACC {f('acc')}  val AUC {m['val']['auc']:.3f}  seconds {m['seconds']}  "
      f"training {c['stages']['training']['wall_s']:.0f} s for {c['stages']['training']['images']} images")
e = m.get("ensemble")
if e:
    for mb in e["members"]:
        d = mb["delong"]
        print(f"  {mb['key']}: AUC {mb['test']['auc']:.3f} ACC {mb['test']['acc']:.3f} best epoch {mb['best_epoch']}  "
              f"ensemble - member {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] p {d['p_value']:.3f}")
    mm = e["member_mean"]
    print(f"  member mean: AUC {mm['auc']['mean']:.3f} ± {mm['auc']['sd']:.3f}  ACC {mm['acc']['mean']:.3f} ± "
          f"{mm['acc']['sd']:.3f}")
else:
    print(f"  best epoch {m['best_epoch']}")
PY
}

for r in "${rows[@]}"; do
    case $r in
        single) run single ;;
        k3)     run k3 --set train.ensemble_folds=3 ;;
        k5)     run k5 --set train.ensemble_folds=5 ;;
        *) echo "unknown row '$r' (single, k3, k5)" >&2; exit 2 ;;
    esac
done
