#!/usr/bin/env bash
# The continuous-token generators on Fashion-MNIST (issue 5), after `bash launch/demo.sh [long]`
# (it reuses that run's classifier as the judge and its discrete AR model as the baseline row):
#   1. TransDiff 1-step (attention head, rectified flow) on pixel-patch latents,
#   2. MRAR fine-tuned from it (4 same-class images, 3 references),
#   3. MAR's baseline: per-token MLP head with DDPM,
#   4. a continuous DetailFlow tokenizer, then next-detail diffusion on its 1D tokens,
# each sampled (100 per class, rows = classes; flow models with 50 Euler-Maruyama steps) and judged;
# the table lands in pictures/table.md.
#
#   bash launch/demo_continuous.sh [DEMO_DIR]     DEMO_DIR: the demo's run folder (runs/demo_long)
# ~60 min on 2 cores.  Re-running resumes each stage from its checkpoints.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
DEMO="${1:-$ROOT/runs/demo_long}"
OUT="${TDJAX_CONT_DIR:-$ROOT/runs/continuous}"
PICS="$OUT/pictures"
JUDGE="$DEMO/classifier"
[ -d "$JUDGE" ] || { echo "launch/demo_continuous.sh: no classifier in $DEMO (run launch/demo.sh first)" >&2; exit 2; }
mkdir -p "$PICS"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=1}"
t0=$(date +%s)
stage() { echo "[continuous $(( $(date +%s) - t0 ))s] $*"; }
train() {  # name config
  python -m tdjax.train --config "$2" --workdir "$OUT/$1" 2>"$OUT/$1.log" || { tail -20 "$OUT/$1.log"; exit 1; }
  grep "eval at" "$OUT/$1.log" | tail -1 || true
}
judge() {  # name [sampling flags]; skipped when its judge report exists
  local name="$1"; shift
  [ -f "$PICS/${name}_judge.json" ] && { cat "$PICS/${name}_judge.json"; echo; return; }
  python -m tdjax.sample --workdir "$OUT/$name" --out "$PICS/$name.png" --overwrite --classes all --num 100 \
    --judge "$JUDGE" "$@" 2>"$OUT/${name}_sample.log" | tail -1 || { tail -20 "$OUT/${name}_sample.log"; exit 1; }
}

stage "1/4 TransDiff 1-step"
train transdiff configs/transdiff.py:size=demo
judge transdiff --steps 50
stage "2/4 MRAR from the 1-step run"
train mrar "configs/transdiff.py:size=demo,mrar=True,init_from=$OUT/transdiff"
judge mrar --steps 50
stage "3/4 MLP head + DDPM (MAR baseline)"
train mlp_ddpm configs/transdiff.py:size=demo,head=mlp,diffusion=ddpm
judge mlp_ddpm
stage "4/4 continuous tokenizer, then next-detail diffusion"
train tokenizer_continuous configs/detailflow_tokenizer.py:size=demo,bottleneck=continuous,kl=1e-3,steps=3000
train next_detail_diffusion "configs/next_detail_diffusion.py:size=demo,tokenizer=$OUT/tokenizer_continuous"
judge next_detail_diffusion

python - "$OUT" "$DEMO" <<'EOF'
import json, os, sys
out, demo = sys.argv[1:]
rows = [("next-detail AR, discrete (launch/demo.sh)", os.path.join(demo, "pictures", "samples_judge.json")),
        ("TransDiff 1-step", "transdiff"), ("TransDiff MRAR (3 references)", "mrar"),
        ("MLP head + DDPM (MAR baseline)", "mlp_ddpm"),
        ("next-detail diffusion (continuous 1D tokens)", "next_detail_diffusion")]
lines = ["| generator | class accuracy (1,000 samples) | Fréchet distance (judge features) |",
         "|---|---|---|"]
for name, path in rows:
  path = path if path.endswith(".json") else os.path.join(out, "pictures", path + "_judge.json")
  if os.path.exists(path):
    r = json.load(open(path))
    lines.append(f"| {name} | {100 * r['class_accuracy']:.1f} % | {r['frechet_distance']:.2f} |")
with open(os.path.join(out, "pictures", "table.md"), "w") as f:
  f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
stage "done: pictures in $PICS"
