"""Shared fixtures: the keel binary (built by `cargo build --release` at the repo root, or
KEEL_BIN) and a small Llama config."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def keel_binary():
    env = os.environ.get("KEEL_BIN")
    if env:
        if not os.path.exists(env):
            raise FileNotFoundError(f"KEEL_BIN={env} does not exist")
        return env
    p = ROOT / "target" / "release" / "keel"
    return str(p) if p.exists() else None


@pytest.fixture(scope="session")
def keel_bin():
    b = keel_binary()
    if b is None:
        pytest.skip("no keel binary: run `cargo build --release` at the repo root or set KEEL_BIN")
    return b


def run_keel(bin_, *args, check=True, **kw):
    r = subprocess.run([bin_, *map(str, args)], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"keel {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr}")
    return r


def small_config(**over):
    from transformers import LlamaConfig

    c = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    c.update(over)
    return LlamaConfig(**c)
