#!/usr/bin/env bash
# The demo: set-up, then on Fashion-MNIST (32x32 grey, 10 classes):
#   1. a classifier (the offline judge of generated images),
#   2. the DetailFlow 1D coarse-to-fine tokenizer, with its coarse-to-fine strip and PSNR curve,
#   3. the tokenizer's codes, with self-correction triplets,
#   4. the next-detail AR transformer on those codes,
#   5. class-conditional samples (rows = classes), scored by the classifier.
# Pictures land in runs/demo/pictures (override the run folder with TDJAX_DEMO_DIR).
# The classifier (1) trains in the background beside stages 2-4: every stage is compute-bound and
# neither job uses both cores fully, so the two together finish ~20 % sooner than one after the other.
# Re-running resumes each stage from its checkpoints.
#
#   bash launch/demo.sh        ~12-15 min on 2 cores: tokenizer 3,000 steps of batch 16, samples at
#                              CFG 3.0
#   bash launch/demo.sh long   ~37 min: tokenizer 6,000 steps of batch 32 (sharper reconstructions
#                              and samples), samples at CFG 3.0 and 4.0; default folder runs/demo_long
# The quick tokenizer recipe buys steps rather than batch: at batch 16 a step costs half, and its
# self-correction branch (DetailFlow 3.3) runs on every second step (the paper: every step), so
# 3,000 steps cost about what 1,000 of batch 32 did and reach 19.5 dB PSNR instead of 17.0
# (docs/measurements.md, "Demo tokenizer recipe").
# Then `bash launch/demo_continuous.sh runs/demo_long` adds the continuous-token generators.
set -euo pipefail
MODE="${1:-quick}"
case "$MODE" in
  quick) TOK_RECIPE="steps=3000,batch=16,lr=2e-3,correction_every=2"; CFGS="3.0"; DEFAULT_OUT=demo ;;
  long) TOK_RECIPE="steps=6000"; CFGS="3.0 4.0"; DEFAULT_OUT=demo_long ;;
  *) echo "launch/demo.sh: unknown mode '$MODE' (expected quick or long)" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
OUT="${TDJAX_DEMO_DIR:-$ROOT/runs/$DEFAULT_OUT}"
PICS="$OUT/pictures"
mkdir -p "$PICS"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=1}"
# The AR stage runs data parallel on two fake CPU devices, a half batch per core: 7-9 % more steps/s
# than one device on the 2 cores, the same training losses. The other stages gain nothing from it:
# the classifier and the tokenizer already share the cores, sampling is no faster and the codes
# extraction (a single-device encode) is slower on two.
AR_XLA_FLAGS="${XLA_FLAGS/--xla_force_host_platform_device_count=1/--xla_force_host_platform_device_count=2}"
t0=$(date +%s)
stage() { echo "[demo $(( $(date +%s) - t0 ))s] $*"; }

stage "1/5 classifier (in the background)"
python -m tdjax.train --config configs/classifier.py --workdir "$OUT/classifier" 2>"$OUT/classifier.log" &
CLF_PID=$!
trap 'kill "$CLF_PID" 2>/dev/null || true' EXIT

stage "2/5 tokenizer"
python -m tdjax.train --config configs/detailflow_tokenizer.py:size=demo,$TOK_RECIPE --workdir "$OUT/tokenizer" 2>"$OUT/tokenizer.log" \
  || { tail -20 "$OUT/tokenizer.log"; exit 1; }
grep "eval at" "$OUT/tokenizer.log" | tail -1 || true

stage "3/5 codes"
if [ ! -f "$OUT/codes.npz" ]; then
  python -m tdjax.data.codes --tokenizer_workdir "$OUT/tokenizer" --out "$OUT/codes.npz" --views flip 2>"$OUT/codes.log" \
    || { tail -20 "$OUT/codes.log"; exit 1; }
fi

stage "4/5 next-detail AR"
XLA_FLAGS="$AR_XLA_FLAGS" python -m tdjax.train --config "configs/next_detail.py:size=demo,codes=$OUT/codes.npz,tokenizer=$OUT/tokenizer" \
  --workdir "$OUT/ar" 2>"$OUT/ar.log" || { tail -20 "$OUT/ar.log"; exit 1; }
grep "eval at" "$OUT/ar.log" | tail -1 || true

stage "5/5 waiting for the classifier, then reconstructions and samples"
wait "$CLF_PID" || { echo "classifier failed:"; tail -20 "$OUT/classifier.log"; exit 1; }
grep "eval at" "$OUT/classifier.log" | tail -1 || true
python -m tdjax.reconstruct --workdir "$OUT/tokenizer" --out "$PICS/coarse_to_fine.png" --judge "$OUT/classifier" \
  2>"$OUT/reconstruct.log" \
  || { tail -20 "$OUT/reconstruct.log"; exit 1; }
for cfg in $CFGS; do
  name=samples; [ "$cfg" = 3.0 ] || name="samples_cfg$cfg"
  python -m tdjax.sample --workdir "$OUT/ar" --out "$PICS/$name.png" --overwrite --classes all --num 100 --cfg "$cfg" \
    --judge "$OUT/classifier" 2>"$OUT/$name.log" || { tail -20 "$OUT/$name.log"; exit 1; }
done
cp "$OUT"/*/pictures/*.png "$PICS/" 2>/dev/null || true
stage "done: pictures in $PICS"
ls "$PICS"
