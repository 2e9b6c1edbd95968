#!/usr/bin/env bash
# A real instability (no injected fault): the tiny preset at a peak LR 10× too high, no
# warmup. Within 5 steps the loss jumps from 8.4 to 22. Unguarded, training limps on to a
# poor loss; guarded, keel skips the bad steps, sees the divergence persist, rolls back to
# the initial weights and lowers the LR for good (guard.rollback_lr_factor = 0.03), then
# finishes close to a stable run at the LR it settled on.
# Usage: examples/instability/run.sh [OUT_DIR]   (about 5 minutes on 2 cores)
set -euo pipefail
OUT=${1:-runs/instability}
KEEL=${KEEL:-target/release/keel}
COMMON=(--preset tiny --steps 300 --set train.batch_size=4)
"$KEEL" train "${COMMON[@]}" --out "$OUT/unguarded" --set optim.lr=1e-1 --set guard.enabled=false
"$KEEL" train "${COMMON[@]}" --out "$OUT/guarded" --set optim.lr=1e-1 --set guard.rollback_lr_factor=0.03
"$KEEL" train "${COMMON[@]}" --out "$OUT/stable" --set optim.lr=3e-3
for r in unguarded guarded stable; do
  printf '%-10s ' "$r"
  grep val_loss "$OUT/$r/metrics.jsonl" | tail -1 |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print("step %d  train loss %.4f  val loss %.4f" % (m["step"], m["loss"], m["val_loss"]))'
done
