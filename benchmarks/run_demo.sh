#!/usr/bin/env bash
# Time the offline demo end to end (synthetic DICOM -> 5-fold CV -> report.html).
# Usage: bash benchmarks/run_demo.sh [OUT_DIR]
set -euo pipefail
out=${1:-/tmp/medtl-bench-demo}
rm -rf "$out"
echo "device: $(python -c 'import torch;print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -f "wall %e s, max RSS %M KB" python -m medtl demo --out "$out" -q
python - "$out" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/run/metrics.json"))
print({k: (round(v["value"], 3), [round(c, 3) for c in v["ci95"]]) for k, v in m["pooled"].items()})
PY
