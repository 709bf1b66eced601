#!/usr/bin/env bash
# Fine-tuning throughput, medtl fit vs the MONAI-tutorial loop, same model/data/device.
# Holds the shared CPU lock where there is one (the 2-core machines).
# Usage: bash benchmarks/throughput/run.sh [extra bench.py args]
#   CPU (default): tf_efficientnet_lite0, 64 px, batch 32; reference with 2 and 0 workers
#   GPU:           bash benchmarks/throughput/run.sh --device cuda   (resnet50, 224 px, batch 128; reference 64 x 8 workers)
set -euo pipefail
cd "$(dirname "$0")/../.."
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
if [ -e /tmp/medtl-cpu.lock ]; then lock=(flock /tmp/medtl-cpu.lock); else lock=(); fi
"${lock[@]}" python benchmarks/throughput/bench.py "$@"
