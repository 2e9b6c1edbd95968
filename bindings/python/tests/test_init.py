"""keel.init_ equals `keel init` bit for bit; explain is `keel init --explain`'s plan; audit
is `keel check --model`'s; names keel does not know are refused with a list."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import keel
from conftest import run_keel, small_config

SCHEMES = ["normal", "xavier-uniform", "trunc-normal", "depth-scaled", "mitchell", "orthogonal", "small-init"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tied", [False, True])
def test_init_equals_keel_init_bit_for_bit(keel_bin, tmp_path, scheme, tied):
    cfg = small_config(tie_word_embeddings=tied)
    cfg.to_json_file(tmp_path / "config.json")
    run_keel(keel_bin, "init", "--hf", tmp_path / "config.json", "--init", scheme, "--seed", "7", "--out", tmp_path / "out")
    ref = load_file(tmp_path / "out" / "model.safetensors")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    keel.init_(model, scheme=scheme, seed=7)
    got = dict(model.named_parameters())
    assert set(got) == set(ref), set(got) ^ set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k].detach(), v), f"{scheme}: {k} differs"
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_init_options_reach_the_plan(keel_bin, tmp_path):
    cfg = small_config()
    cfg.to_json_file(tmp_path / "config.json")
    run_keel(
        keel_bin, "init", "--hf", tmp_path / "config.json", "--init", "xavier-normal", "--seed", "3",
        "--set", "init.gain=0.5", "--set", "init.roles.head.std=0.001", "--out", tmp_path / "out",
    )
    ref = load_file(tmp_path / "out" / "model.safetensors")
    model = keel.init_(LlamaForCausalLM(cfg), "xavier-normal", 3, gain=0.5, roles={"head": {"std": 0.001}})
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[k]), k


def test_explain_is_the_cli_plan(keel_bin, tmp_path):
    cfg = small_config()
    plan = keel.explain(cfg, "megatron")
    names = [t["name"] for t in plan["tensors"]]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    o = next(t for t in plan["tensors"] if t["name"] == "model.layers.2.self_attn.o_proj.weight")
    assert o["role"] == "attn-out" and o["depth_scaling"] and abs(o["target_std"] - 0.02 / (2 * 3) ** 0.5) < 1e-12
    cfg.to_json_file(tmp_path / "config.json")
    text = run_keel(keel_bin, "init", "--hf", tmp_path / "config.json", "--init", "megatron", "--explain").stdout
    for t in plan["tensors"]:
        row = next(l for l in text.splitlines() if l.startswith(t["name"] + " "))
        cols = row.split()
        assert cols[1] == t["role"] and float(cols[5]) == pytest.approx(t["target_std"], rel=1e-3), row
    # any size: a 70B config is planned without allocating it
    big = keel.explain({"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8}, "mitchell")
    assert big["params"] > 70e9


def test_audit_passes_a_clean_init_and_names_planted_bugs(keel_bin, tmp_path):
    cfg = small_config(hidden_size=128, intermediate_size=320)
    model = keel.init_(LlamaForCausalLM(cfg), "mitchell", 0)
    r = keel.audit(model, "mitchell")
    assert r["verdict"] == "Pass" and not r["findings"], r["findings"]
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.mul_(8.0)
    r = keel.audit(model, "mitchell")
    assert r["verdict"] == "Fail"
    bad = {f["name"] for f in r["findings"]}
    assert {"lm_head.weight", "model.layers.1.mlp.down_proj.weight"} <= bad, bad
    # the same verdicts as `keel check --model` on the same weights
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    out = run_keel(keel_bin, "check", "--model", tmp_path / "m", "--init", "mitchell", "--json", check=False)
    assert out.returncode == 4
    cli = {json.loads(l)["name"]: json.loads(l)["verdict"] for l in out.stdout.splitlines()}
    assert cli == {t["name"]: t["verdict"] for t in r["tensors"]}


def test_wrapped_and_bare_modules_match_names():
    cfg = small_config()
    full = keel.init_(LlamaForCausalLM(cfg), "normal", 1)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
            self.config = m.config

    w = keel.init_(Wrap(LlamaForCausalLM(cfg)), "normal", 1)
    for (a, p), (b, q) in zip(full.named_parameters(), w.named_parameters()):
        assert b == "module." + a and torch.equal(p, q)


def test_unknown_names_keys_and_schemes_are_refused():
    cfg = small_config()
    m = LlamaForCausalLM(cfg)
    m.model.layers[0].self_attn.register_parameter("q_norm", torch.nn.Parameter(torch.ones(16)))
    with pytest.raises(ValueError, match=r"does not know.*layers\.0\.self_attn\.q_norm"):
        keel.init_(m, "normal")
    with pytest.raises(ValueError, match=r"init\.gainn.*gain"):
        keel.init_(LlamaForCausalLM(cfg), "xavier-normal", gainn=0.5)
    with pytest.raises(ValueError, match="unknown scheme 'xavier'.*xavier-normal"):
        keel.init_(LlamaForCausalLM(cfg), "xavier")
    with pytest.raises(ValueError, match="no .config"):
        keel.init_(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="model_type"):
        keel.explain({"model_type": "gpt2", "vocab_size": 10}, "normal")
