#!/usr/bin/env bash
# Saliency throughput (maps/s): Grad-CAM and IG(50), medtl's batched explain() vs a per-image
# Captum loop on the same device. Holds the shared CPU lock on the 2-core machines.
# Usage: bash benchmarks/saliency/run.sh [OUT_DIR] [extra bench.py args, e.g. --device cuda]
set -euo pipefail
out=${1:-benchmarks/saliency/results}
shift || true
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
if [ -e /tmp/medtl-cpu.lock ]; then lock=(flock /tmp/medtl-cpu.lock); else lock=(); fi
"${lock[@]}" python benchmarks/saliency/bench.py --out "$out" "$@"
