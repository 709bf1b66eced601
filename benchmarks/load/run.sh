#!/usr/bin/env bash
# Load benchmark: 5,000 small DICOM files (1,250 patients, two classes), 5-fold patient-grouped
# CV on the CPU (1 epoch, 32 px, EfficientNet-Lite0), with the progress bar; reports peak RSS
# and wall time from /usr/bin/time -v. Holds the shared CPU lock throughout.
# Usage: bash benchmarks/load/run.sh [WORK_DIR] [N_FILES] [N_PATIENTS]
set -euo pipefail
# Hold the shared CPU lock once for the whole script (generation + measured run).
if [ -z "${MEDTL_LOAD_LOCKED:-}" ]; then
    exec env MEDTL_LOAD_LOCKED=1 flock /tmp/medtl-cpu.lock bash "$0" "$@"
fi
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/medtl-load}
n_files=${2:-5000}
n_patients=${3:-1250}
rm -rf "$work"
mkdir -p "$work"
python "$here/make_dataset.py" --out "$work/data" --n-files "$n_files" --n-patients "$n_patients"
cat > "$work/load.yaml" <<YAML
name: load
data:
  format: folder
  path: $work/data/images
  labels: {csv: $work/data/labels.csv, file_column: file, label_column: label}
  class_names: [normal, lesion]
  image_size: [32, 32]
  intensity: {mode: window, preset: abdomen}
model: {name: tf_efficientnet_lite0, pretrained: true}
train: {epochs: 1, batch_size: 64, tta: false}
cv: {n_splits: 5}
evaluate: {n_bootstrap: 200}
YAML
/usr/bin/time -v -o "$work/time.txt" python -m medtl cv "$work/load.yaml" --out "$work/run"
grep -E "Elapsed \(wall clock\)|Maximum resident set size|User time|System time" "$work/time.txt"
python - "$work/run" <<'PY'
import csv, json, sys
run = sys.argv[1]
m = json.load(open(f"{run}/metrics.json"))
print("cases", m["n_cases"], "patients", m["n_patients"], "skipped", m["n_skipped"], "seconds", m["seconds"])
print("pooled AUC", round(m["pooled"]["auc"]["value"], 3), [round(c, 3) for c in m["pooled"]["auc"]["ci95"]])
folds = {}
for r in csv.DictReader(open(f"{run}/predictions.csv")):
    folds.setdefault(r["patient_id"], set()).add(r["fold"])
print("patients in >1 fold:", sum(len(f) > 1 for f in folds.values()), "of", len(folds))
PY
