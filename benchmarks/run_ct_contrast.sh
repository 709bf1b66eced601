#!/usr/bin/env bash
# 5-fold patient-grouped CV on the 100 TCGA chest CT slices (contrast yes/no), plus the audit.
# Usage: bash benchmarks/run_ct_contrast.sh [OUT_DIR]
set -euo pipefail
out=${1:-/tmp/medtl-bench-ct}
rm -rf "$out"
python -m medtl audit configs/ct_contrast.yaml --out "$out/audit" -q || true   # exits 1: it has findings
/usr/bin/time -f "wall %e s, max RSS %M KB" python -m medtl cv configs/ct_contrast.yaml --out "$out/cv" -q
python - "$out/cv" <<'PY'
import csv, json, sys
run = sys.argv[1]
m = json.load(open(f"{run}/metrics.json"))
print("pooled", {k: (round(v["value"], 3), [round(c, 3) for c in v["ci95"]]) for k, v in m["pooled"].items()})
folds = {}
for r in csv.DictReader(open(f"{run}/predictions.csv")):
    folds.setdefault(r["patient_id"], set()).add(r["fold"])
print("patients in >1 fold:", sum(len(f) > 1 for f in folds.values()), "of", len(folds))
PY
