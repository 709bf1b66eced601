#!/usr/bin/env bash
# Multi-task CT (contrast + age) against the single-task contrast run, same code, same machine.
# Usage: bash benchmarks/multitask/run.sh [OUT_DIR]        (SEEDS="0 1 2 3 4" for the seed sweep)
# Each command takes the shared CPU lock, so runs of other jobs that take it do not overlap it.
set -euo pipefail
out=${1:-/tmp/medtl-bench-multitask}
seeds=${SEEDS:-0}
mkdir -p "$out"
for s in $seeds; do
  for cfg in ct_contrast ct_multitask; do
    rm -rf "$out/$cfg-seed$s"
    flock /tmp/medtl-cpu.lock /usr/bin/time -f "$cfg seed $s: wall %e s, max RSS %M KB" \
      python -m medtl cv "configs/$cfg.yaml" --out "$out/$cfg-seed$s" --set "train.seed=$s" -q
  done
done
python - "$out" <<'PY'
import json, pathlib, sys
fmt = lambda m: f"{m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
for run in sorted(pathlib.Path(sys.argv[1]).glob("*-seed*")):
    m = json.loads((run / "metrics.json").read_text())
    line = f"{run.name:22s} contrast AUC {fmt(m['pooled']['auc'])}  ({m['seconds']} s)"
    for name, t in (m.get("tasks") or {}).items():
        if t["kind"] == "regression":
            r = t["metrics"]
            line += (f"  {name} MAE {fmt(r['mae'])} baseline {fmt(r['baseline_mae'])}"
                     f" difference {fmt(r['mae_minus_baseline'])}")
    print(line)
PY
