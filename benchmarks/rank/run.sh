#!/usr/bin/env bash
# `medtl rank` on BreastMNIST vs. fine-tuning: does the zero-training ranking predict which encoder
# fine-tunes best? Scores each candidate with LogME / LEEP / probe AUC on the official train+val
# images (no training), then fine-tunes every candidate on the official split at one small, equal
# budget (64 px, EPOCHS epochs; a REDUCED budget, not the 20-epoch 128 px recipe) and reports
# Spearman's rho between the LogME ranking and the fine-tuned test AUCs.
# Usage: bash benchmarks/rank/run.sh [OUT_DIR]        (EPOCHS=10 by default; about 15 min on 2 CPU cores)
# On a shared machine run it under the CPU lock: flock /tmp/medtl-cpu.lock bash benchmarks/rank/run.sh
set -euo pipefail
out=${1:-/tmp/medtl-bench-rank}
epochs=${EPOCHS:-10}
cands=${CANDIDATES:-tf_efficientnet_lite0,tf_efficientnet_lite1,tf_efficientnet_lite2,resnet18:scratch,tf_efficientnet_lite0:scratch}
cfg=configs/breastmnist.yaml
size='data.image_size=[64, 64]'
medtl() { python -m medtl "$@"; }
mkdir -p "$out"

echo "== rank: load before: $(uptime | sed 's/.*load/load/')"
/usr/bin/time -f "rank wall %e s, max RSS %M KB" medtl rank "$cfg" --candidates "$cands" --set "$size" --out "$out/rank" -q

IFS=, read -ra specs <<< "$cands"
for spec in "${specs[@]}"; do
    name=${spec%%:*}; pretrained=true
    [[ $spec == *:scratch ]] && pretrained=false
    dir="$out/ft_${spec//:/_}"
    rm -rf "$dir"
    echo "== fine-tune $spec: load before: $(uptime | sed 's/.*load/load/')"
    /usr/bin/time -f "$spec wall %e s" medtl train "$cfg" --out "$dir" -q --set "$size" --set "model.name=$name" \
        --set "model.pretrained=$pretrained" --set "train.epochs=$epochs"
done

python - "$out" "$cands" <<'PY'
import json, sys
from pathlib import Path
from scipy.stats import spearmanr
out, specs = Path(sys.argv[1]), sys.argv[2].split(",")
rank = {r["encoder"]: r for r in json.loads((out / "rank" / "rank.json").read_text())["candidates"]}
rows = []
for s in specs:
    m = json.loads((out / f"ft_{s.replace(':', '_')}" / "metrics.json").read_text())
    r = rank[s]
    rows.append((s, r["logme"], r["leep"], r["probe_auc"], m["test"]["auc"]["value"], m["test"]["auc"]["ci95"], m["seconds"]))
print("| encoder | LogME | LEEP | probe AUC (train+val, 5-fold) | fine-tuned test AUC [95% CI] | fine-tune s |")
print("|---|---:|---:|---:|---:|---:|")
for s, lm, le, pa, auc, ci, sec in sorted(rows, key=lambda r: -r[1]):
    le_s = "n/a" if le is None else f"{le:.3f}"
    print(f"| {s} | {lm:.3f} | {le_s} | {pa:.3f} | {auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {sec:.0f} |")
ft = [r[4] for r in rows]
for label, col in (("LogME", 1), ("probe AUC", 3)):
    rho, p = spearmanr([r[col] for r in rows], ft)
    print(f"Spearman rho({label}, fine-tuned test AUC) = {rho:.3f} (p = {p:.3f}, n = {len(rows)})")
pre = [r for r in rows if r[2] is not None]
if len(pre) >= 3:
    rho, p = spearmanr([r[2] for r in pre], [r[4] for r in pre])
    print(f"Spearman rho(LEEP, fine-tuned test AUC), pretrained only = {rho:.3f} (p = {p:.3f}, n = {len(pre)})")
PY
