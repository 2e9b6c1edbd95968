#!/usr/bin/env bash
# Real instabilities (no injected fault), guarded with the default settings:
#  - the tiny preset at a peak LR 33× too high (0.1, no warm-up): attention logits pass 100
#    at step 3 and the loss jumps from 8.4 to 22 by step 5 when unguarded;
#  - the tiny preset initialised with σ = 1 (every matrix 50× HF's 0.02): first loss ~60;
# each next to its unguarded run and a stable run (peak LR 3e-3, HF's init).
# Usage: examples/instability/run.sh [OUT_DIR]   (about 7 minutes on 2 cores)
set -euo pipefail
OUT=${1:-runs/instability}
KEEL=${KEEL:-target/release/keel}
COMMON=(--preset tiny --steps 300 --set train.batch_size=4)
"$KEEL" train "${COMMON[@]}" --out "$OUT/high-lr-unguarded" --set optim.lr=1e-1 --set guard.enabled=false
"$KEEL" train "${COMMON[@]}" --out "$OUT/high-lr-guarded" --set optim.lr=1e-1
"$KEEL" train "${COMMON[@]}" --out "$OUT/bad-init-unguarded" --set optim.lr=3e-3 --set init.std=1.0 --set guard.enabled=false
"$KEEL" train "${COMMON[@]}" --out "$OUT/bad-init-guarded" --set optim.lr=3e-3 --set init.std=1.0
"$KEEL" train "${COMMON[@]}" --out "$OUT/stable" --set optim.lr=3e-3
for r in high-lr-unguarded high-lr-guarded bad-init-unguarded bad-init-guarded stable; do
  printf '%-20s ' "$r"
  grep val_loss "$OUT/$r/metrics.jsonl" | tail -1 |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print("step %d  train loss %.4f  val loss %.4f" % (m["step"], m["loss"], m["val_loss"]))'
done
