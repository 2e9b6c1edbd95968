#!/usr/bin/env python3
"""Check that keel checkpoints and Hugging Face transformers load each other's models.

Purpose
-------
Checks, end to end, that keel's checkpoints work with Hugging Face ``transformers``
and the reverse:

1. keel -> HF.  Trains three small keel runs (micro preset, 100 steps, built-in
   corpus): untied, tied embeddings (``model.tie_embeddings=true``), and MQA +
   tied + RoPE theta 5e5. Loads each checkpoint with
   ``transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=float32,
   output_loading_info=True)``. Requires: no missing, unexpected or mismatched
   keys, the loaded config equal to keel's ``config.json``, and for tied runs
   ``lm_head`` sharing the embedding values.
2. Tokenizer.  Loads ``tokenizer.json`` with ``tokenizers.Tokenizer.from_file``,
   ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` and
   ``AutoTokenizer.from_pretrained(ckpt)``. Requires that all three give the same
   ids for sample sentences (non-ASCII included), that decoding gives back the
   text, and that their ids equal keel's own: the whole built-in corpus against
   the run's ``data/tokens.bin``, and a sample-sentence file that keel tokenizes
   with the checkpoint's tokenizer (a 1-step ``keel train --data``).
3. Same numbers.  Compares ``keel eval`` with ``hf_reference.py eval`` (mean
   next-token cross-entropy, same windows) on uniform-random tokens and on real
   text (the last 20000 tokens of the run's own token cache). The relative
   difference must be below ``--tol`` (default 1e-4). Also checks that greedy
   ``keel sample`` matches greedy decoding with the HF model.
4. HF -> keel.  ``hf_reference.py init`` models (micro preset, and MQA + tied +
   RoPE theta 5e5 through ``--config-json``), evaluated by keel and by HF.

Prints a summary table. Exits with 1 if any check fails, 2 on bad arguments.

Command (from the repository root; needs python3 with torch, transformers,
tokenizers, safetensors and numpy):

    python3 scripts/check_interop.py --keel target/release/keel

Options: ``--work DIR`` (default /tmp/keel_interop; its run folders are deleted
and made again, because keel resumes an existing run directory),
``--hf-reference PATH`` (default: the ``shared/bench/hf_reference.py`` next to
the repository, else /work/shared/bench/hf_reference.py), ``--steps N``, ``--tol X``.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLMC_MAGIC = 20240520
SAMPLE_SENTENCES = [
    "rosa lives in delft. rosa is a pilot.",
    "The quick brown fox jumps over the lazy dog, 12345 times!",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "naïve café — Zürich, 東京, emoji 🚀 and ümlauts.",
]


# ---------------------------------------------------------------- bookkeeping
class Results:
    def __init__(self):
        self.checks = []  # (name, ok, detail)
        self.evals = []   # dict rows

    def check(self, name, ok, detail=""):
        self.checks.append((name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        return bool(ok)

    @property
    def failed(self):
        return [c for c in self.checks if not c[1]]


def run_cmd(cmd, log_path=None, timeout=1800):
    """Run cmd (list); return (rc, stdout, stderr). Echo the command."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if log_path:
        with open(log_path, "w") as f:
            f.write("$ " + " ".join(cmd) + f"\n# rc={p.returncode} {dt:.1f}s\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p.returncode, p.stdout, p.stderr


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON object in output")


def tail(s, n=1500):
    s = s.strip()
    return s if len(s) <= n else "..." + s[-n:]


# ---------------------------------------------------------------- keel steps
def keel_train(a, res, name, out, extra):
    if os.path.exists(out):
        shutil.rmtree(out)  # an existing run directory would be resumed
    cmd = [a.keel, "train", "--preset", "micro", "--steps", str(a.steps), "--out", out,
           "--set", "data.builtin_bytes=300000", "--set", "train.batch_size=8"] + extra
    rc, so, se = run_cmd(cmd, os.path.join(a.work, f"log_train_{name}.txt"))
    ckpt = os.path.join(out, "checkpoints", f"step-{a.steps:08d}")
    needed = ["config.json", "model.safetensors", "tokenizer.json"]
    missing = [f for f in needed if not os.path.exists(os.path.join(ckpt, f))]
    ok = rc == 0 and not missing
    res.check(f"keel train {name}", ok,
              f"rc={rc}" + (f", missing in {ckpt}: {missing}" if missing else "")
              + ("" if ok else f"\n{tail(se or so)}"))
    return ckpt if ok else None


def keel_eval(a, model, tokens, seq_len):
    cmd = [a.keel, "eval", "--model", model, "--tokens", tokens, "--seq-len", str(seq_len)]
    rc, so, se = run_cmd(cmd)
    if rc != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` rc={rc}\n{tail(se or so)}")
    return last_json(so)


def hf_eval(a, model, tokens, seq_len):
    cmd = [sys.executable, a.hf_reference, "eval", "--model", model, "--tokens", tokens,
           "--seq-len", str(seq_len)]
    rc, so, se = run_cmd(cmd)
    if rc != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` rc={rc}\n{tail(se or so)}")
    return last_json(so)


def compare_eval(a, res, label, model, tokens, seq_len=64, max_ce=None):
    row = dict(label=label, keel=float("nan"), hf=float("nan"), rel=float("nan"), windows="-", ok=False)
    res.evals.append(row)
    try:
        k = keel_eval(a, model, tokens, seq_len)
        h = hf_eval(a, model, tokens, seq_len)
    except Exception as e:  # noqa: BLE001 - report any failure as a failed check
        res.check(f"eval {label}", False, str(e))
        return row
    kce, hce = float(k["mean_ce"]), float(h["mean_ce"])
    rel = abs(kce - hce) / max(abs(hce), 1e-12)
    same_windows = k.get("windows") == h["n_windows"] and k.get("tokens") == h["n_predictions"]
    ok = math.isfinite(kce) and rel < a.tol and same_windows
    detail = (f"keel {kce:.8f} vs hf {hce:.8f}, rel {rel:.2e} (tol {a.tol:g}); "
              f"windows keel {k.get('windows')}/hf {h['n_windows']}, "
              f"predictions keel {k.get('tokens')}/hf {h['n_predictions']}")
    if max_ce is not None:
        ok = ok and hce < max_ce
        detail += f"; require ce < {max_ce:.3f}"
    row.update(keel=kce, hf=hce, rel=rel, windows=f"{k.get('windows')}", ok=ok)
    res.check(f"eval {label}", ok, detail)
    return row


# ---------------------------------------------------------------- HF-side checks
def check_hf_load(res, name, ckpt):
    """Load ckpt with LlamaForCausalLM; check keys, config and tying. Returns the model or None."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    try:
        model, info = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        res.check(f"HF load {name}", False, f"{type(e).__name__}: {e}")
        return None
    model.eval()
    bad = {k: sorted(v) for k, v in info.items() if v}
    res.check(f"HF load {name} (missing/unexpected/mismatched keys)", not bad,
              "none" if not bad else json.dumps(bad))

    with open(os.path.join(ckpt, "config.json")) as f:
        kc = json.load(f)
    c = model.config
    rope = getattr(c, "rope_parameters", None) or {}
    hf_theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    want_theta = kc.get("rope_theta", (kc.get("rope_parameters") or {}).get("rope_theta"))
    diffs = []
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "hidden_act"):
        if key in kc and getattr(c, key, None) != kc[key]:
            diffs.append(f"{key}: keel {kc[key]!r} vs HF {getattr(c, key, None)!r}")
    if "head_dim" in kc and getattr(c, "head_dim", None) != kc["head_dim"]:
        diffs.append(f"head_dim: keel {kc['head_dim']} vs HF {getattr(c, 'head_dim', None)}")
    if want_theta is None or hf_theta is None or float(hf_theta) != float(want_theta):
        diffs.append(f"rope_theta: keel {want_theta} vs HF {hf_theta}")
    res.check(f"HF config {name} == keel config.json", not diffs,
              "; ".join(diffs) if diffs else
              f"kv_heads {c.num_key_value_heads}, tie {c.tie_word_embeddings}, rope_theta {hf_theta}")

    # Tensor names/dtypes in the file vs what HF expects.
    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="pt") as f:
        file_keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in file_keys}
        file_lm = f.get_tensor("lm_head.weight") if "lm_head.weight" in file_keys else None
        file_emb = f.get_tensor("model.embed_tokens.weight") if "model.embed_tokens.weight" in file_keys else None
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    if kc.get("tie_word_embeddings"):
        shared = head.data_ptr() == emb.data_ptr()
        equal = torch.equal(head, emb)
        file_ok = file_lm is None or (file_emb is not None and torch.equal(file_lm, file_emb))
        res.check(f"HF tied {name}: lm_head shares embedding", shared and equal and file_ok,
                  f"same storage {shared}, equal values {equal}, "
                  f"lm_head.weight in file: {'no' if file_lm is None else 'yes, equal to embedding: ' + str(file_ok)}")
    else:
        res.check(f"HF untied {name}: lm_head is separate", "lm_head.weight" in file_keys
                  and head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb),
                  f"lm_head.weight in file: {'lm_head.weight' in file_keys}")
    res.check(f"safetensors {name}: dtypes", dtypes == {"F32"}, f"{sorted(dtypes)}, {len(file_keys)} tensors")
    return model


def check_tokenizer(a, res, name, ckpt, run_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tj = os.path.join(ckpt, "tokenizer.json")
    try:
        tk = Tokenizer.from_file(tj)
        ptf = PreTrainedTokenizerFast(tokenizer_file=tj)
    except Exception as e:  # noqa: BLE001
        res.check(f"tokenizer {name} loads", False, f"{type(e).__name__}: {e}")
        return None
    try:
        auto = AutoTokenizer.from_pretrained(ckpt)
    except Exception as e:  # noqa: BLE001
        auto = None
        res.check(f"tokenizer {name}: AutoTokenizer.from_pretrained(ckpt)", False, f"{type(e).__name__}: {e}")
    res.check(f"tokenizer {name} loads (tokenizers + PreTrainedTokenizerFast)", True,
              f"vocab {tk.get_vocab_size()}")

    problems = []
    for s in SAMPLE_SENTENCES:
        ids = tk.encode(s).ids
        ids_p = ptf(s, add_special_tokens=True)["input_ids"]
        if ids_p != ids:
            problems.append(f"PreTrainedTokenizerFast ids differ on {s!r}: {ids_p[:12]} vs {ids[:12]}")
        if auto is not None and auto(s)["input_ids"] != ids:
            problems.append(f"AutoTokenizer ids differ on {s!r}")
        for who, dec in (("tokenizers", tk.decode(ids)), ("PreTrainedTokenizerFast", ptf.decode(ids_p))):
            if dec != s:
                problems.append(f"{who} round trip {s!r} -> {dec!r}")
    res.check(f"tokenizer {name}: ids agree across loaders + decode round trip", not problems,
              "; ".join(problems) if problems else f"{len(SAMPLE_SENTENCES)} sentences")

    # keel's own encoding of the built-in corpus (the run's token cache).
    corpus = os.path.join(run_dir, "data", "builtin-corpus.txt")
    cache = os.path.join(run_dir, "data", "tokens.bin")
    if os.path.exists(corpus) and os.path.exists(cache):
        keel_ids = read_llmc(cache)
        with open(corpus, encoding="utf-8") as f:
            hf_ids = np.array(tk.encode(f.read()).ids, dtype=np.int64)
        same = len(hf_ids) == len(keel_ids) and np.array_equal(hf_ids, keel_ids)
        detail = f"{len(keel_ids)} tokens"
        if not same:
            n = min(len(hf_ids), len(keel_ids))
            first = int(np.argmax(hf_ids[:n] != keel_ids[:n])) if np.any(hf_ids[:n] != keel_ids[:n]) else n
            detail = f"keel {len(keel_ids)} vs HF {len(hf_ids)} tokens, first difference at {first}"
        res.check(f"tokenizer {name}: HF encoding of corpus == keel data/tokens.bin", same, detail)
    return tk


def check_keel_encodes_sentences(a, res, ckpt, tk):
    """keel tokenizes a sentence file with the checkpoint's tokenizer (1-step train); compare ids."""
    text = "".join(s if s.endswith("\n") else s + "\n" for s in SAMPLE_SENTENCES) * 30
    path = os.path.join(a.work, "sentences.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    out = os.path.join(a.work, "run_tokcheck")
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = [a.keel, "train", "--preset", "micro", "--steps", "1", "--out", out, "--data", path,
           "--set", "train.batch_size=2", "--set", f"data.tokenizer={os.path.join(ckpt, 'tokenizer.json')}"]
    rc, so, se = run_cmd(cmd, os.path.join(a.work, "log_train_tokcheck.txt"))
    cache = os.path.join(out, "data", "tokens.bin")
    if rc != 0 or not os.path.exists(cache):
        return res.check("tokenizer: keel ids of sample sentences == HF ids", False,
                         f"`{' '.join(cmd)}` rc={rc}, token cache present: {os.path.exists(cache)}\n{tail(se or so)}")
    keel_ids = read_llmc(cache)
    hf_ids = np.array(tk.encode(text).ids, dtype=np.int64)
    same = np.array_equal(keel_ids, hf_ids)
    return res.check("tokenizer: keel ids of sample sentences == HF ids", same,
                     f"{len(keel_ids)} keel vs {len(hf_ids)} HF tokens (text incl. non-ASCII, tabs, newlines)")


def check_greedy_sample(a, res, name, ckpt, model, prompt="the favourite colour of", n_new=40):
    import torch
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ckpt, "tokenizer.json"))
    cmd = [a.keel, "sample", "--model", ckpt, "--prompt", prompt, "--temperature", "0",
           "--max-new-tokens", str(n_new)]
    rc, so, se = run_cmd(cmd)
    if rc != 0:
        return res.check(f"greedy sample {name}: keel == HF", False, f"rc={rc}\n{tail(se or so)}")
    keel_text = so[:-1] if so.endswith("\n") else so
    x = tok(prompt, return_tensors="pt")["input_ids"]
    seq = model.config.max_position_embeddings
    gaps = []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(input_ids=x[:, -seq:], use_cache=False).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            x = torch.cat([x, logits.argmax().view(1, 1)], dim=1)
    hf_text = tok.decode(x[0])
    if keel_text == hf_text:
        return res.check(f"greedy sample {name}: keel == HF", True, f"{hf_text!r}")
    # Tolerate a divergence only at a near-tie between the top two logits.
    k_ids = tok(keel_text)["input_ids"]
    h_ids = x[0].tolist()
    n_prompt = len(tok(prompt)["input_ids"])
    first = next((i for i in range(min(len(k_ids), len(h_ids))) if k_ids[i] != h_ids[i]), None)
    tie = first is not None and first >= n_prompt and gaps[first - n_prompt] < 1e-3
    return res.check(f"greedy sample {name}: keel == HF", tie,
                     f"keel {keel_text!r} vs HF {hf_text!r}; first different token {first}"
                     + (f", HF top-2 logit gap there {gaps[first - n_prompt]:.2e}" if first and first >= n_prompt else ""))


def read_llmc(path):
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != LLMC_MAGIC:
        raise ValueError(f"{path}: magic {header[0]} != {LLMC_MAGIC}")
    n = int(header[2])
    toks = np.fromfile(path, dtype="<u2", offset=256 * 4)
    if len(toks) != n:
        raise ValueError(f"{path}: header says {n} tokens, file has {len(toks)}")
    return toks.astype(np.int64)


# ---------------------------------------------------------------- main
def default_hf_reference():
    for p in (os.path.join(os.path.dirname(REPO), "shared", "bench", "hf_reference.py"),
              "/work/shared/bench/hf_reference.py"):
        if os.path.exists(p):
            return p
    return "hf_reference.py"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keel", default="target/release/keel", help="keel binary (default %(default)s)")
    ap.add_argument("--work", default="/tmp/keel_interop", help="work directory (default %(default)s)")
    ap.add_argument("--hf-reference", default=default_hf_reference(), help="path to hf_reference.py")
    ap.add_argument("--steps", type=int, default=100, help="keel training steps per run")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative difference of mean_ce")
    ap.add_argument("--text-tokens", type=int, default=20000, help="real-text tokens to evaluate")
    a = ap.parse_args()
    a.keel = os.path.abspath(a.keel)
    a.work = os.path.abspath(a.work)
    a.hf_reference = os.path.abspath(a.hf_reference)
    for p, what in ((a.keel, "keel binary"), (a.hf_reference, "hf_reference.py")):
        if not os.path.exists(p):
            ap.error(f"{what} not found: {p}")
    os.makedirs(a.work, exist_ok=True)
    res = Results()
    W = lambda *p: os.path.join(a.work, *p)  # noqa: E731
    t_start = time.perf_counter()

    import torch
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, keel {a.keel}", flush=True)

    # Token file of uniform random ids.
    toks = W("toks.u16")
    rc, so, se = run_cmd([sys.executable, a.hf_reference, "tokens", "--out", toks, "--n", "20000",
                          "--vocab", "256", "--seed", "0", "--dtype", "uint16"])
    if not res.check("hf_reference tokens", rc == 0 and os.path.exists(toks), tail(se) if rc else ""):
        return finish(res, t_start)

    # 1-3: keel-trained runs.
    runs = [
        ("run", []),
        ("run_tied", ["--set", "model.tie_embeddings=true"]),
        ("run_mqa_tied_theta5e5", ["--set", "model.tie_embeddings=true", "--set", "model.num_kv_heads=1",
                                   "--set", "model.rope_theta=500000"]),
    ]
    first_tok = None
    for name, extra in runs:
        run_dir = W(name)
        ckpt = keel_train(a, res, name, run_dir, extra)
        if ckpt is None:
            continue
        model = check_hf_load(res, name, ckpt)
        tk = check_tokenizer(a, res, name, ckpt, run_dir)
        if tk is not None and first_tok is None:
            first_tok = tk
            check_keel_encodes_sentences(a, res, ckpt, tk)
        if model is not None:
            check_greedy_sample(a, res, name, ckpt, model)
        compare_eval(a, res, f"{name} / random toks", ckpt, toks)
        # Real text: the last N tokens of the run's own token cache, raw uint16.
        try:
            cache = read_llmc(os.path.join(run_dir, "data", "tokens.bin"))
            text = W(f"text_{name}.u16") if name != "run" else W("text.u16")
            cache[-a.text_tokens:].astype("<u2").tofile(text)
            compare_eval(a, res, f"{name} / real text", ckpt, text, max_ce=0.6 * math.log(256))
        except Exception as e:  # noqa: BLE001
            res.check(f"eval {name} / real text", False, f"{type(e).__name__}: {e}")

    # 4: HF-initialised models evaluated by keel.
    hf_models = [("hfinit", ["--preset", "micro"], None),
                 ("hfinit_mqa_tied", [], dict(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=1,
                                               intermediate_size=172, tie_word_embeddings=True,
                                               rope_theta=500000.0, max_position_embeddings=64,
                                               rms_norm_eps=1e-5, hidden_act="silu"))]
    for name, extra, cfg in hf_models:
        out = W(name)
        if os.path.exists(out):
            shutil.rmtree(out)
        if cfg is not None:
            cj = W(f"{name}_config.json")
            with open(cj, "w") as f:
                json.dump(cfg, f, indent=1)
            extra = ["--config-json", cj]
        rc, so, se = run_cmd([sys.executable, a.hf_reference, "init", "--out", out, "--seed", "0"] + extra)
        if not res.check(f"hf_reference init {name}", rc == 0, tail(se) if rc else ""):
            continue
        with open(os.path.join(out, "config.json")) as f:
            saved = json.load(f)
        info = json.loads(so.strip().splitlines()[-1])
        print(f"  {name}: config.json rope keys: rope_theta={saved.get('rope_theta')}, "
              f"rope_parameters={saved.get('rope_parameters')}; tensors: {sorted(info['tensors'])}", flush=True)
        if cfg is not None:
            theta = (saved.get("rope_parameters") or {}).get("rope_theta", saved.get("rope_theta"))
            res.check(f"{name}: HF saved the requested config", theta == 500000.0
                      and saved.get("num_key_value_heads") == 1 and saved.get("tie_word_embeddings") is True,
                      f"rope_theta {theta}, kv_heads {saved.get('num_key_value_heads')}, "
                      f"tie {saved.get('tie_word_embeddings')}, lm_head.weight stored: {'lm_head.weight' in info['tensors']}")
        compare_eval(a, res, f"{name} / random toks", out, toks)

    return finish(res, t_start)


def finish(res, t_start):
    print("\n=== keel vs HF mean next-token cross-entropy (seq_len 64) ===")
    print(f"{'model / tokens':<40} {'keel mean_ce':>14} {'HF mean_ce':>14} {'rel diff':>10} {'windows':>8}  ok")
    for r in res.evals:
        print(f"{r['label']:<40} {r['keel']:>14.8f} {r['hf']:>14.8f} {r['rel']:>10.2e} {r['windows']:>8}  "
              f"{'PASS' if r['ok'] else 'FAIL'}")
    n_pass = sum(c[1] for c in res.checks)
    print(f"\n=== checks: {n_pass}/{len(res.checks)} passed ({time.perf_counter() - t_start:.0f}s) ===")
    for name, ok, detail in res.failed:
        print(f"FAIL {name}: {detail}")
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
