#!/usr/bin/env bash
# 5-fold CV wall time end to end (medtl cv under /usr/bin/time -v): BreastMNIST pooled + the CT set.
# Holds the shared CPU lock where there is one (the 2-core machines).
# Usage: bash benchmarks/cv_walltime/run.sh [--preset cpu|gpu] [--cases breastmnist,ct] [--set k=v ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
if [ -e /tmp/medtl-cpu.lock ]; then lock=(flock /tmp/medtl-cpu.lock); else lock=(); fi
"${lock[@]}" python benchmarks/cv_walltime/bench.py "$@"
