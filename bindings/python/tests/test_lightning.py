"""keel.lightning.GuardCallback: an injected NaN step is skipped (weights untouched) and a
persistent one rolled back, inside Lightning's automatic optimisation."""

import json

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

import keel.lightning  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, poison=()):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
        self.poison, self.before, self.unchanged = set(poison), None, {}

    def training_step(self, batch, i):
        x = batch[0]
        loss = torch.nn.functional.cross_entropy(self.net(x), x[:, 0])
        step = self.trainer.global_step + 1
        if step in self.poison:
            self.before = {k: v.detach().clone() for k, v in self.state_dict().items()}
            loss = loss * float("nan")
        return loss

    def on_train_batch_end(self, out, batch, i):
        step = self.trainer.global_step
        if step in self.poison:
            now = self.state_dict()
            self.unchanged[step] = all(torch.equal(v, now[k]) for k, v in self.before.items())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.01 * s))}


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (400, 8), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)


def fit(tmp_path, module, cb, steps, ckpt=None, **kw):
    tr = L.Trainer(max_steps=steps, callbacks=[cb], default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0, accelerator="cpu", **kw)
    tr.fit(module, loader(), ckpt_path=ckpt)
    return tr


def test_lightning_skip_and_rollback(tmp_path):
    m = Tiny(poison=[15, 40, 41, 42])
    cb = keel.lightning.GuardCallback(snapshot_every=10)
    fit(tmp_path, m, cb, 60)
    # 15 is a bad batch (16 ran the same weights clean): it counts toward no back-off; 40-42
    # in a row are the weights: a persistent divergence
    assert [(a.step, a.kind) for a in cb.actions] == [(15, "skip"), (40, "skip"), (41, "skip"), (42, "rollback")]
    assert m.unchanged[15] and m.unchanged[40]
    ev = [json.loads(l) for l in (tmp_path / "keel-events.jsonl").read_text().splitlines()]
    # the bad batch at 15 opened no incident, so the snapshots at 20 and 30 were taken: the
    # incident that began at 40 goes back to 30
    assert [e["detail"]["to_step"] for e in ev if e["kind"] == "restored"] == [30]
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_lightning_accumulation_and_checkpoint_resume(tmp_path):
    """With accumulate_grad_batches=2 a NaN in one micro-batch makes that optimizer step a
    skip; the guard's state rides in Lightning's checkpoint and a resumed fit continues it."""
    m = Tiny(poison=[7])  # optimizer step 7 (micro-batches 13-14)
    cb = keel.lightning.GuardCallback(snapshot_every=5)
    tr = fit(tmp_path, m, cb, 20, accumulate_grad_batches=2)
    assert [(a.step, a.kind) for a in cb.actions] == [(7, "skip")]
    tr.save_checkpoint(tmp_path / "c.ckpt")
    cb2 = keel.lightning.GuardCallback(snapshot_every=5)
    fit(tmp_path, Tiny(), cb2, 30, ckpt=str(tmp_path / "c.ckpt"), accumulate_grad_batches=2)
    assert cb2.gopt.step_count == 30
    assert cb2.guard.state_dict()["state"] != keel.Guard().state_dict()["state"]
