#!/usr/bin/env bash
# Domain adaptation on BreastMNIST with a simulated new-hospital scanner (see README.md).
# One row per method: source-only (none), adabn, dsbn, dann, mmd, coral; same data, model,
# epochs (12), LR, seed and 64 px for all. Prints one JSON line per method and writes results.json.
# Usage: bash benchmarks/domain_adaptation/run.sh [OUT_DIR] [extra bench.py args, e.g. --set train.seed=1]
# About 25 min on 2 free CPU cores. Hold the shared CPU lock while it runs.
set -euo pipefail
out=${1:-/tmp/medtl-bench-da}
shift || true
cd "$(dirname "$0")/../.."
echo "== load before: $(uptime | sed 's/.*load/load/')"
/usr/bin/time -f "total wall %e s, user %U s, CPU %P" \
    python benchmarks/domain_adaptation/bench.py --config configs/breastmnist_da.yaml --out "$out" "$@"
echo "== load after: $(uptime | sed 's/.*load/load/')"
