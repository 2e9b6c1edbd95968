"""FSDP2 (`fully_shard`) on two CPU processes (gloo), used as the README says: pass the loss
and the norm `clip_grad_norm_` returned (a replicated DTensor), or nothing (keel reduces the
shards' squared norms in its one all_reduce). A NaN on one rank only makes both skip; a
burst on one rank makes both roll back to the same snapshot; the gathered weights agree."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import keel.torch as kt

fsdp = pytest.importorskip("torch.distributed.fsdp")

STEPS = 36
NAN_AT = {1: [12, 13, 27, 28, 29]}  # two in a row at 12-13: not a bad batch, an incident


def gathered(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model.state_dict().items()}


def burst_loss(model, g, rank, step):
    """This rank's loss on its next batch, NaN at its NAN_AT steps."""
    x = torch.randint(0, 50, (4, 8), generator=g)
    loss = torch.nn.functional.cross_entropy(model(x), x[:, 0])
    return loss * float("nan") if step in NAN_AT.get(rank, []) else loss


def logs(tmp_path):
    return [json.loads((tmp_path / f"actions-{r}.json").read_text()) for r in (0, 1)]


def worker(rank, world, init_file, out_dir, pass_norm, fmt="torch"):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
    fsdp.fully_shard(model[0])
    fsdp.fully_shard(model[2])
    fsdp.fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    snaps = os.path.join(out_dir, "snaps") if fmt == "dcp" else None
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=10, snapshot_dir=snaps, snapshot_format=fmt,
                               events=os.path.join(out_dir, f"events-{rank}.jsonl"))
    at10 = restored = None
    g = torch.Generator().manual_seed(100 + rank)
    log, norms = [], []
    for step in range(1, STEPS + 1):
        loss = burst_loss(model, g, rank, step)
        loss.backward()
        if pass_norm:
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            norms.append(float(gn.full_tensor()) if hasattr(gn, "full_tensor") else float(gn))
            a = gopt.step(loss, gn)
        else:
            if step == 5:
                # keel's own reduction of the shards equals FSDP's global norm
                ref = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                norms.append([float(ref.full_tensor()), gopt._read(loss, None, {})[1]])
            a = gopt.step(loss)
        gopt.zero_grad()
        log.append([a.step, a.kind])
        if step == 10:
            at10 = gathered(model)
        if a.kind == "rollback":
            restored = gathered(model)
    full = gathered(model)
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "weights.pt"))
    same10 = all(torch.equal(at10[k], restored[k]) for k in at10) if restored is not None else None
    with open(os.path.join(out_dir, f"actions-{rank}.json"), "w") as f:
        json.dump({"log": log, "norms": norms, "restored_equals_step_10": same10}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("pass_norm", [True, False])
def test_fsdp2_ranks_take_the_same_actions(tmp_path, pass_norm):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path), pass_norm), nprocs=2, join=True)
    r0, r1 = logs(tmp_path)
    assert r0["log"] == r1["log"]
    kinds = dict((s, k) for s, k in r0["log"])
    assert kinds[12] == "skip" and kinds[13] == "skip" and kinds[27] == "skip" and kinds[29] == "rollback", r0
    assert kinds[28] == "lr_backoff", r0  # a third skip within the incident window
    ev = [json.loads(l) for l in (tmp_path / "events-0.jsonl").read_text().splitlines()]
    assert [e["detail"]["to_step"] for e in ev if e["kind"] == "restored"] == [10]
    if not pass_norm:
        (ref, ours), = r0["norms"]
        assert abs(ref - ours) <= 1e-5 * ref, (ref, ours)
        assert r1["norms"] == r0["norms"]
    w = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in w.values())


def test_fsdp2_rolls_back_from_torch_distributed_checkpoint_snapshots(tmp_path):
    # sharded snapshots in the format FSDP users checkpoint in: one directory the ranks share
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path), True, "dcp"), nprocs=2, join=True)
    r0, r1 = logs(tmp_path)
    assert r0["log"] == r1["log"]
    assert dict((s, k) for s, k in r0["log"])[29] == "rollback"
    # the rollback read the step-10 snapshot back: the gathered weights are step 10's
    assert r0["restored_equals_step_10"] is True and r1["restored_equals_step_10"] is True
    names = sorted(os.listdir(tmp_path / "snaps"))
    assert names == ["step-00000000", "step-00000010"], names
    assert (tmp_path / "snaps" / "step-00000010" / ".metadata").exists()


def fsdp1_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    model = FSDP(torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50)),
                 device_id=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=10)
    g = torch.Generator().manual_seed(100 + rank)
    log = []
    for step in range(1, STEPS + 1):
        loss = burst_loss(model, g, rank, step)
        loss.backward()
        a = gopt.step(loss, model.clip_grad_norm_(1.0))  # FSDP1's norm: a plain global tensor
        gopt.zero_grad()
        log.append([a.step, a.kind])
    with open(os.path.join(out_dir, f"actions-{rank}.json"), "w") as f:
        json.dump({"log": log}, f)
    dist.destroy_process_group()


def test_fsdp1_ranks_take_the_same_actions(tmp_path):
    mp.spawn(fsdp1_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = logs(tmp_path)
    assert r0["log"] == r1["log"]
    kinds = dict((s, k) for s, k in r0["log"])
    assert kinds[12] == "skip" and kinds[27] == "skip" and kinds[29] == "rollback", r0
