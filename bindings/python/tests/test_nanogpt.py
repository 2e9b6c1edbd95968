"""keel dropped into a loop written the way karpathy's nanoGPT writes it (train.py), around a
small GPT written for this test (nanoGPT's model.py in miniature: fused c_attn, GELU MLP,
LayerNorm, tied head): the LR set on every param group each iteration, a global-RNG batch
sampler, gradient accumulation with the loss divided by the steps, a GradScaler (disabled
in fp32, as nanoGPT makes it), unscale_ then clip, `scaler.step(optimizer)`, checkpoints of
`optimizer.state_dict()` resumed into a raw AdamW. keel's part is two lines: the wrapper
where the optimizer is made and `optimizer.record(loss, step=iter_num)` beside backward."""

import io
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import keel
import keel.torch as kt


class CausalSelfAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.c_attn, self.c_proj, self.h = nn.Linear(d, 3 * d), nn.Linear(d, d), h

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), CausalSelfAttention(d, h), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=64, block=16, layers=2, heads=2, d=32):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


DATA = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(0))
BLOCK, BATCH, ACCUM = 16, 4, 2


def get_batch():
    ix = torch.randint(len(DATA) - BLOCK, (BATCH,))  # nanoGPT's sampler: the global RNG
    x = torch.stack([DATA[i : i + BLOCK] for i in ix])
    y = torch.stack([DATA[i + 1 : i + 1 + BLOCK] for i in ix])
    return x, y


def get_lr(it, lr=3e-3, warmup=5, decay=80):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    r = min(1.0, (it - warmup) / (decay - warmup))
    return lr * 0.1 + 0.5 * (1 + math.cos(math.pi * r)) * lr * 0.9


def train(iters, burst=(), guard=True, start=None, events=None):
    """nanoGPT's loop. `burst`: iterations whose loss is multiplied by 1e4 (finite: the
    scaler lets it through). Returns what the test inspects."""
    torch.manual_seed(1337)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    if guard:
        optimizer = kt.GuardedOptimizer(optimizer, model=model, snapshot_every=10, events=events)
    iter_num = 0
    if start is not None:  # nanoGPT's resume: the raw state dicts, read from the file
        start = torch.load(io.BytesIO(start), weights_only=False) if isinstance(start, bytes) else start
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        iter_num = start["iter_num"]
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # float32: nanoGPT's disabled scaler
    seen, ckpt = [], None
    X, Y = get_batch()
    while iter_num < iters:
        lr = get_lr(iter_num)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if iter_num == 30:  # written to disk and read back, as nanoGPT's torch.save does
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num}, buf)
            ckpt = buf.getvalue()
        for _ in range(ACCUM):
            _, loss = model(X, Y)
            loss = loss / ACCUM
            if iter_num in burst:
                loss = loss * 1e4
            seen.append((iter_num, X[0, :4].tolist()))
            X, Y = get_batch()
            scaler.scale(loss).backward()
            if guard:
                optimizer.record(loss, step=iter_num)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
    return model, optimizer, seen, ckpt


def weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_a_clean_nanogpt_run_is_untouched_by_the_guard():
    m0, _, _, _ = train(40, guard=False)
    m1, opt, _, _ = train(40)
    assert all(torch.equal(a, b) for a, b in zip(weights(m0).values(), weights(m1).values()))
    assert opt.step_count == 39  # the loop's own numbers: its last iteration


def test_a_burst_is_rolled_back_and_the_loop_moves_on_to_new_batches(tmp_path):
    ev = tmp_path / "events.jsonl"
    _, opt, seen, _ = train(40, burst=(22, 23, 24), events=ev)
    import json

    lines = [json.loads(l) for l in ev.read_text().splitlines()]
    steps = {e["step"] for e in lines if e["kind"] in ("skip", "rollback")}
    assert steps <= {22, 23, 24} and any(e["kind"] == "rollback" for e in lines), lines
    restored = [e for e in lines if e["kind"] == "restored"]
    assert restored and restored[0]["detail"]["to_step"] == 20, restored  # the loop's numbering
    # the global-RNG sampler is not rewound: no batch drawn before the incident comes back
    before = {tuple(x) for it, x in seen if it < 24}
    after = [tuple(x) for it, x in seen if it > 24]
    assert after and not any(x in before for x in after)


def test_checkpoints_resume_through_the_raw_optimizer_and_back():
    # the wrapper's state dict is the optimizer's own (keel's part under "keel"): nanoGPT's
    # resume loads it into a raw AdamW, and a raw AdamW's into the wrapper
    _, opt, _, ckpt = train(31)
    saved = torch.load(io.BytesIO(ckpt), weights_only=False)
    assert "param_groups" in saved["optimizer"] and "keel" in saved["optimizer"]
    m_raw, raw, _, _ = train(40, guard=False, start=ckpt)
    m_keel, wrapped, _, _ = train(40, start=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(weights(m_raw).values(), weights(m_keel).values()))
    assert wrapped.step_count == 39
    # and a raw AdamW's state dict into the wrapper: the same weights again (a fresh guard)
    m_back, back, _, _ = train(40, start={"model": saved["model"], "optimizer": _raw_only(saved["optimizer"]), "iter_num": 30})
    assert all(torch.equal(a, b) for a, b in zip(weights(m_raw).values(), weights(m_back).values()))
    assert back.step_count == 39


def test_a_resumed_run_logs_the_replayed_steps_events_once(tmp_path):
    """nanoGPT resumes from its last checkpoint after a crash and runs the steps after it
    again: the events file holds their events once, as the uninterrupted run's does."""
    import json

    whole = tmp_path / "whole.jsonl"
    train(40, burst=(35,), events=whole)
    ev = tmp_path / "events.jsonl"
    _, _, _, ckpt = train(40, burst=(35,), events=ev)  # ran to 40, then "crashed"
    train(40, burst=(35,), start=ckpt, events=ev)  # resumed at the iteration-30 checkpoint
    kinds = lambda p: [(e["step"], e["kind"]) for e in map(json.loads, p.read_text().splitlines())]  # noqa: E731
    assert kinds(ev) == kinds(whole) and (35, "spike") in kinds(ev), kinds(ev)


def test_checkpoint_mode_keeps_the_clean_checkpoint_the_trainer_overwrites_in_an_incident(tmp_path):
    """nanoGPT saves one ckpt.pt, in place, every eval_interval: one written inside an incident
    would leave no clean target (the rollback fell back to step 0, 150 iterations lost).
    keel copies the registered checkpoint beside itself when the incident opens."""
    import json

    torch.manual_seed(1337)
    model = GPT()
    opt = kt.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model=model,
                              rollback_from="checkpoints", events=tmp_path / "events.jsonl")
    ckpt = tmp_path / "ckpt.pt"
    for it in range(1, 31):
        X, Y = get_batch()
        _, loss = model(X, Y)
        if it in (22, 23, 24):
            loss = loss * 1e4  # a burst: skip, skip, rollback
        loss.backward()
        opt.record(loss, step=it)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it in (10, 20, 23):  # 23: inside the incident, over the only checkpoint file
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": it}, ckpt)
            opt.register_checkpoint(ckpt)
    ev = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    restored = [e["detail"] for e in ev if e["kind"] == "restored"]
    assert [r["to_step"] for r in restored] == [20], restored
    assert restored[0]["from"].endswith("ckpt.pt.keel-clean")
    assert os.path.exists(str(ckpt) + ".keel-clean")
    # once the incident is over, the next clean registration makes the copy needless: removed
    for it in range(31, 61):
        X, Y = get_batch()
        _, loss = model(X, Y)
        loss.backward()
        opt.record(loss, step=it)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % 10 == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": it}, ckpt)
            opt.register_checkpoint(ckpt)
    assert opt.checkpoints.steps == [60], opt.checkpoints.steps
    assert not os.path.exists(str(ckpt) + ".keel-clean")


def _raw_only(sd):
    return {k: v for k, v in sd.items() if k != "keel"}


def test_fp16_overflows_in_a_nanogpt_loop_are_the_scalers_business(tmp_path):
    # nanoGPT with dtype float16: an enabled GradScaler; a scale that overflows at once is
    # the scaler's to back off, and keel sees neither the overflow nor an incident
    torch.manual_seed(1337)
    model = GPT()
    opt = kt.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model=model,
                              events=tmp_path / "events.jsonl")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-90)
    for it in range(12):
        X, Y = get_batch()
        with torch.autocast("cpu", torch.float16):
            _, loss = model(X, Y)
        scaler.scale(loss).backward()
        opt.record(loss, step=it)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    ev = (tmp_path / "events.jsonl")
    kinds = [] if not ev.exists() else [l for l in ev.read_text().splitlines() if '"warning"' not in l]
    assert kinds == [], kinds
    assert opt.step_count == 11 and opt.guard.lr_factor == 1.0
