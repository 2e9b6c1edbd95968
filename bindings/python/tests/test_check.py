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
