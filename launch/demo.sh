#!/usr/bin/env bash
# The demo: set-up, then on Fashion-MNIST (32x32 grey, 10 classes):
#   1. a classifier (the offline judge of generated images),
#   2. the DetailFlow 1D coarse-to-fine tokenizer, with its coarse-to-fine strip and PSNR curve,
#   3. the tokenizer's codes, with self-correction triplets,
#   4. the next-detail AR transformer on those codes,
#   5. class-conditional samples (rows = classes), scored by the classifier.
# Pictures land in runs/demo/pictures (override the run folder with TDJAX_DEMO_DIR).
# Re-running resumes each stage from its checkpoints.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
OUT="${TDJAX_DEMO_DIR:-$ROOT/runs/demo}"
PICS="$OUT/pictures"
mkdir -p "$PICS"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=1}"
t0=$(date +%s)
stage() { echo "[demo $(( $(date +%s) - t0 ))s] $*"; }

stage "1/5 classifier"
python -m tdjax.train --config configs/classifier.py --workdir "$OUT/classifier" 2>"$OUT/classifier.log" \
  || { tail -20 "$OUT/classifier.log"; exit 1; }
grep "eval at" "$OUT/classifier.log" | tail -1 || true

stage "2/5 tokenizer"
python -m tdjax.train --config configs/detailflow_tokenizer.py:size=demo --workdir "$OUT/tokenizer" 2>"$OUT/tokenizer.log" \
  || { tail -20 "$OUT/tokenizer.log"; exit 1; }
grep "eval at" "$OUT/tokenizer.log" | tail -1 || true
python -m tdjax.reconstruct --workdir "$OUT/tokenizer" --out "$PICS/coarse_to_fine.png" --judge "$OUT/classifier" \
  2>"$OUT/reconstruct.log" \
  || { tail -20 "$OUT/reconstruct.log"; exit 1; }

stage "3/5 codes"
if [ ! -f "$OUT/codes.npz" ]; then
  python -m tdjax.data.codes --tokenizer_workdir "$OUT/tokenizer" --out "$OUT/codes.npz" --views flip 2>"$OUT/codes.log" \
    || { tail -20 "$OUT/codes.log"; exit 1; }
fi

stage "4/5 next-detail AR"
python -m tdjax.train --config "configs/detailflow_ar.py:size=demo,codes=$OUT/codes.npz,tokenizer=$OUT/tokenizer" \
  --workdir "$OUT/ar" 2>"$OUT/ar.log" || { tail -20 "$OUT/ar.log"; exit 1; }
grep "eval at" "$OUT/ar.log" | tail -1 || true

stage "5/5 samples"
python -m tdjax.sample --workdir "$OUT/ar" --out "$PICS/samples.png" --classes all --num 100 --cfg 3.0 \
  --judge "$OUT/classifier" 2>"$OUT/sample.log" || { tail -20 "$OUT/sample.log"; exit 1; }
cp "$OUT"/*/pictures/*.png "$PICS/" 2>/dev/null || true
stage "done: pictures in $PICS"
ls "$PICS"
