"""keel.check is `keel check --json`: the same theory, measurement, steps and gates."""

import json

import pytest

import keel
from conftest import run_keel, small_config


def test_check_equals_the_cli(keel_bin, tmp_path):
    cfg = small_config()
    cfg.to_json_file(tmp_path / "config.json")
    cli = json.loads(
        run_keel(keel_bin, "--threads", "1", "check", "--hf", tmp_path / "config.json", "--init", "xavier-normal",
                 "--steps", "2", "--lr", "3e-3", "--seq", "32", "--json").stdout
    )
    keel._keel.set_threads(1)
    r = keel.check(cfg, "xavier-normal", steps=2, lr=3e-3, seq=32)
    assert r == cli
    assert [g["name"] for g in r["gates"]][:2] == ["initial loss", "residual growth"]
    assert r["verdict"] in ("Pass", "Warn", "Fail")


def test_check_flags_a_planted_problem_and_takes_presets():
    # embedding σ 1 with a tied head: huge output logits
    r = keel.check(small_config(tie_word_embeddings=True), "normal", init={"roles": {"embed": {"std": 1.0}}}, seq=32)
    bad = {g["name"]: g["verdict"] for g in r["gates"]}
    assert r["verdict"] == "Fail" and bad["output logits"] == "Fail", bad
    assert keel.check("micro", "normal", seq=32)["layers"] == 2


def test_check_refuses_bad_options():
    with pytest.raises(ValueError, match="unknown check option 'stepz'"):
        keel.check("micro", "normal", stepz=3)
    with pytest.raises(ValueError, match="lr"):
        keel.check("micro", "normal", lr=-1.0)


def test_passing_gates_carry_no_suggestion_and_every_gate_its_thresholds():
    r = keel.check("micro", "normal", seq=32)
    for g in r["gates"]:
        assert (g["suggestion"] is None) == (g["verdict"] == "Pass"), g
        assert g["pass"] > 0 and g["basis"], g


def test_a_config_too_big_for_memory_is_a_value_error_not_an_abort():
    # 16M-token vocabulary: well over 100 GB to measure; refused before allocating
    with pytest.raises(ValueError, match="vocab_size"):
        keel.check(small_config(vocab_size=16_777_216, hidden_size=4096, num_attention_heads=32,
                                num_key_value_heads=32, intermediate_size=11008), "normal")


def test_ctrl_c_interrupts_a_running_check():
    import os
    import signal
    import threading
    import time

    cfg = small_config(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        keel.check(cfg, "normal", seq=128, steps=3)
    assert time.time() - t0 < 2.5
