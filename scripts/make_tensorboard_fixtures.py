#!/usr/bin/env python3
"""TensorBoard event files for tests/watch.rs, written by the writers people use.

    python3 scripts/make_tensorboard_fixtures.py   # needs torch, tensorboard, lightning

Each holds the same deterministic run: 60 steps of a loss falling from 5.0 with small noise,
then 20 steps growing 12% a step (a divergence from step ~61), plus a gradient norm and an
LR. Written by:
- torch.utils.tensorboard.SummaryWriter, classic scalars (simple_value), HF-style tags
  (train/loss, train/grad_norm, train/learning_rate), one add_scalar call per tag;
- the same writer with new_style=True (a rank-0 tensor under the scalars plugin, as
  TF2's tf.summary.scalar writes), tags loss and grad_norm;
- Lightning's TensorBoardLogger.log_metrics (tags train_loss, grad_norm, in a version_0
  folder), plus an earlier version_1-less sibling run to check the newest run is chosen.
"""

import math
import os
import shutil
import time

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tensorboard")


def curve():
    rows = []
    for s in range(1, 81):
        noise = 0.02 * math.sin(1.7 * s)
        loss = 5.0 * math.exp(-s / 40) + 1.5 + noise if s <= 60 else None
        if loss is None:
            loss = rows[-1][1] * 1.12
        gn = 0.5 + 0.05 * math.cos(s) if s <= 60 else 0.5 * 1.3 ** (s - 60)
        rows.append((s, loss, gn, 3e-4))
    return rows


def main():
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    d = os.path.join(OUT, "torch_hf_tags")
    w = SummaryWriter(d)
    for s, loss, gn, lr in curve():
        w.add_scalar("train/loss", loss, s)
        w.add_scalar("train/grad_norm", gn, s)
        w.add_scalar("train/learning_rate", lr, s)
    w.close()

    d = os.path.join(OUT, "torch_new_style")
    w = SummaryWriter(d)
    for s, loss, gn, lr in curve():
        w.add_scalar("loss", loss, s, new_style=True)
        w.add_scalar("grad_norm", gn, s, new_style=True)
    w.close()

    from lightning.pytorch.loggers import TensorBoardLogger

    # an older run first, then the diverging one: a log directory's newest run is read
    for version, rows in ((0, curve()[:30]), (1, curve())):
        lg = TensorBoardLogger(os.path.join(OUT, "lightning"), name="", version=version)
        for s, loss, gn, lr in rows:
            lg.log_metrics({"train_loss": loss, "grad_norm": gn}, step=s)
        lg.finalize("success")
        time.sleep(1.1)  # distinct modification times
    # keep only the event files (hparams.yaml is Lightning's, not needed)
    for root, _, files in os.walk(OUT):
        for f in files:
            if "tfevents" not in f:
                os.remove(os.path.join(root, f))
    for root, _, files in os.walk(OUT):
        for f in files:
            print(os.path.relpath(os.path.join(root, f), OUT), os.path.getsize(os.path.join(root, f)))


if __name__ == "__main__":
    main()
