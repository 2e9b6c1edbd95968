"""Two processes under torch.distributed (gloo, CPU): a NaN injected on one rank makes both
ranks skip the same step, and a rollback leaves identical weights on both."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import keel.torch as kt

STEPS = 40
NAN_AT = {1: [12, 27, 28, 29]}  # rank 1 alone: one transient NaN, then three in a row
SPIKE_AT = {0: [35]}  # rank 0 alone sees a 50× loss (not NaN: DDP's gradient all-reduce
# does not spread it; only keel's reduction of the loss makes rank 1 see it too)


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=10,
                               events=os.path.join(out_dir, f"events-{rank}.jsonl"))
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    log = []
    for step in range(1, STEPS + 1):
        x = torch.randint(0, 50, (4, 8), generator=g)
        loss = torch.nn.functional.cross_entropy(ddp(x), x[:, 0])
        if step in NAN_AT.get(rank, []):
            loss = loss * float("nan")
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        seen = loss * 50 if step in SPIKE_AT.get(rank, []) else loss
        a = gopt.step(seen, gn)  # local loss: keel averages it over the ranks
        gopt.zero_grad()
        log.append([a.step, a.kind])
    torch.save(model.state_dict(), os.path.join(out_dir, f"weights-{rank}.pt"))
    with open(os.path.join(out_dir, f"actions-{rank}.json"), "w") as f:
        json.dump(log, f)
    dist.destroy_process_group()


def test_two_ranks_take_the_same_actions(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a0 = json.loads((tmp_path / "actions-0.json").read_text())
    a1 = json.loads((tmp_path / "actions-1.json").read_text())
    assert a0 == a1
    kinds = dict((s, k) for s, k in a0)
    assert kinds[12] == "skip" and kinds[27] == "skip" and kinds[29] == "rollback", a0
    assert kinds[35] == "skip", a0
    assert sum(k != "proceed" for _, k in a0) == 5
    w0 = torch.load(tmp_path / "weights-0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights-1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    ev = [json.loads(l) for l in (tmp_path / "events-0.jsonl").read_text().splitlines()]
    restored = [e for e in ev if e["kind"] == "restored"]
    # the NaN at 12 was a bad batch (step 13 ran the same weights clean): it opened no
    # incident, so the snapshot at 20 was taken and both ranks went back to it (when a lone NaN
    # counted as an incident, the snapshot waited and they went back to step 10)
    assert [e["detail"]["to_step"] for e in restored] == [20]
    assert [e["step"] for e in ev if e["kind"] == "bad_batch"] == [13]


def wrap_first_worker(rank, world, init_file, out_dir):
    # nanoGPT makes its optimizer before DDP(...): each rank's own (different) init weights
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different initial weights on each rank until DDP broadcasts
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=100,
                               events=os.path.join(out_dir, "events.jsonl"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(100 + rank)
    kinds = []
    for step in range(1, 9):
        x = torch.randint(0, 50, (4, 8), generator=g)
        loss = torch.nn.functional.cross_entropy(ddp(x), x[:, 0])
        if step in (3, 4, 5):
            loss = loss * float("nan")  # a burst: rollback to the base snapshot (step 0)
        loss.backward()
        kinds.append(gopt.step(loss, torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)).kind)
        gopt.zero_grad()
    torch.save(model.state_dict(), os.path.join(out_dir, f"weights-{rank}.pt"))
    with open(os.path.join(out_dir, f"kinds-{rank}.json"), "w") as f:
        json.dump(kinds, f)
    dist.destroy_process_group()


def test_wrapping_before_ddp_rolls_back_to_agreed_weights(tmp_path):
    mp.spawn(wrap_first_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    k0 = json.loads((tmp_path / "kinds-0.json").read_text())
    assert k0[4] == "rollback", k0
    w0 = torch.load(tmp_path / "weights-0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights-1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "ranks ended with different weights"
    # one events file, written once (rank 0), not every line twice
    ev = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "rollback" for e in ev) == 1, ev
