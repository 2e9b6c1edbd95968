"""keel checkpoints with qk-norm are Qwen3 checkpoints: transformers loads them as
Qwen3ForCausalLM with no missing or unexpected keys, and evaluates them as keel does."""

import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from conftest import run_keel


def test_qk_norm_checkpoint_loads_as_qwen3(keel_bin, tmp_path):
    run = tmp_path / "run"
    run_keel(keel_bin, "--threads", "1", "train", "--preset", "micro", "--steps", "30", "--out", run,
             "--set", "model.qk_norm=true", "--set", "train.z_loss=1e-4", "--set", "optim.decoupled_wd=true",
             "--set", "optim.weight_decay=1e-4", "--set", "checkpoint.every=30", "--set", "train.report=false")
    ck = sorted((run / "checkpoints").iterdir())[-1]
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForCausalLM"]
    model, info = AutoModelForCausalLM.from_pretrained(ck, output_loading_info=True)
    assert isinstance(model, Qwen3ForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # the trained q/k norm weights moved away from 1 and arrived intact
    qn = model.model.layers[0].self_attn.q_norm.weight
    assert (qn - 1).abs().max() > 1e-4
    model.eval()
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg["vocab_size"], 33 * 8).astype(np.uint16)
    (tmp_path / "t.u16").write_bytes(toks.tobytes())
    out = json.loads(run_keel(keel_bin, "eval", "--model", ck, "--tokens", tmp_path / "t.u16", "--seq-len", "32").stdout)
    # keel eval: window w has inputs t[wL, wL+L) and targets one further (hf_reference.py)
    L, n = 32, out["windows"]
    t = torch.tensor(toks.astype(np.int64))
    x = torch.stack([t[w * L : w * L + L] for w in range(n)])
    y = torch.stack([t[w * L + 1 : w * L + L + 1] for w in range(n)])
    with torch.no_grad():
        logits = model(input_ids=x).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert abs(out["mean_ce"] - ce) / ce < 1e-5, (out, ce)
