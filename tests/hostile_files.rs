//! Malformed or hostile model files: each gets a clear error naming the file, never a panic,
//! a hang or a huge allocation.

mod common;
use common::{keel, tmpdir};

use std::path::{Path, PathBuf};

/// A valid micro model directory to corrupt.
fn model_dir(name: &str) -> PathBuf {
    let d = tmpdir(name);
    let st = keel()
        .args(["init", "--preset", "micro", "--out"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(st.status.success());
    d
}

fn eval_fails(dir: &Path, needles: &[&str]) {
    let toks = dir.join("t.u16");
    std::fs::write(&toks, vec![1u8; 400]).unwrap();
    let o = keel()
        .args(["eval", "--model"])
        .arg(dir)
        .arg("--tokens")
        .arg(&toks)
        .args(["--seq-len", "16"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    for n in needles {
        assert!(e.contains(n), "error lacks '{n}': {e}");
    }
}

/// safetensors bytes from a header JSON and a data blob.
fn st_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn hostile_safetensors_headers() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("huge header length", {
            let mut v = (u64::MAX / 2).to_le_bytes().to_vec();
            v.extend_from_slice(b"{}");
            v
        }),
        (
            "offsets out of bounds",
            st_file(
                r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[256,64],"data_offsets":[0,65536]}}"#,
                &[0u8; 16],
            ),
        ),
        (
            "overlapping offsets",
            st_file(
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
                &[0u8; 24],
            ),
        ),
        (
            "shape product overflow",
            st_file(
                r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#,
                &[0u8; 16],
            ),
        ),
        ("not json", st_file("{not json", &[])),
        ("truncated", vec![1, 2, 3]),
        ("empty", vec![]),
    ];
    for (what, bytes) in cases {
        let d = model_dir(&what.replace(' ', "-"));
        std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
        eval_fails(&d, &["model.safetensors"]);
    }
    // well-formed file, wrong dtype for a weight
    let d = model_dir("dtype");
    let data = vec![0u8; 256 * 64 * 8];
    std::fs::write(
        d.join("model.safetensors"),
        st_file(r#"{"model.embed_tokens.weight":{"dtype":"I64","shape":[256,64],"data_offsets":[0,131072]}}"#, &data),
    )
    .unwrap();
    eval_fails(&d, &["model.safetensors"]);
}

#[test]
fn hostile_config_json() {
    for (what, text, field) in [
        (
            "vocab 1e12",
            r#"{"model_type":"llama","vocab_size":1000000000000,"hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":4}"#,
            "vocab_size",
        ),
        (
            "wrong type",
            r#"{"model_type":"llama","vocab_size":"256","hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":4}"#,
            "vocab_size",
        ),
        (
            "negative",
            r#"{"model_type":"llama","vocab_size":256,"hidden_size":-64,"intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":4}"#,
            "hidden_size",
        ),
        (
            "missing field",
            r#"{"model_type":"llama","vocab_size":256}"#,
            "missing",
        ),
        (
            "qwen3 sliding window",
            r#"{"model_type":"qwen3","vocab_size":256,"hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":4,"head_dim":16,"use_sliding_window":true}"#,
            "use_sliding_window",
        ),
        (
            "qwen3 biases",
            r#"{"model_type":"qwen3","vocab_size":256,"hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":4,"head_dim":16,"attention_bias":true}"#,
            "attention_bias",
        ),
        (
            "qwen3 default head_dim",
            r#"{"model_type":"qwen3","vocab_size":256,"hidden_size":64,"intermediate_size":172,"num_hidden_layers":2,"num_attention_heads":4}"#,
            "head_dim",
        ),
        ("not an object", "[1,2,3]", "config.json"),
        ("binary", "\u{0}\u{1}\u{2}", "config.json"),
    ] {
        let d = model_dir(&what.replace(' ', "-"));
        std::fs::write(d.join("config.json"), text).unwrap();
        eval_fails(&d, &["config.json", field]);
    }
}

#[test]
fn qk_norm_on_a_checkpoint_without_qk_norm_weights_is_refused() {
    // a Llama checkpoint's weights under a config that asks for qk-norm (Qwen3)
    let d = model_dir("qk-norm-missing");
    let text = std::fs::read_to_string(d.join("config.json")).unwrap();
    let text = text.replace("\"llama\"", "\"qwen3\"");
    std::fs::write(d.join("config.json"), text).unwrap();
    eval_fails(
        &d,
        &["model.safetensors", "q_norm.weight is missing", "qk-norm"],
    );
}

#[test]
fn hostile_run_toml() {
    let d = tmpdir("toml");
    for (what, text, needle) in [
        ("syntax", "[train\nsteps = 3", "TOML"),
        (
            "absurd size",
            "[model]\npreset = \"micro\"\nhidden_size = 10000000000",
            "model.hidden_size",
        ),
        ("wrong type", "[optim]\nlr = \"fast\"", "optim.lr"),
        ("negative z-loss", "[train]\nz_loss = -1e-4", "train.z_loss"),
        ("infinite z-loss", "[train]\nz_loss = inf", "train.z_loss"),
        (
            "NaN weight decay",
            "[optim]\nweight_decay = nan",
            "optim.weight_decay",
        ),
        (
            "negative weight decay",
            "[optim]\nweight_decay = -0.1",
            "optim.weight_decay",
        ),
        ("unknown section", "[trainer]\nsteps = 3", "trainer"),
        (
            "huge batch",
            "[model]\npreset = \"small\"\n[train]\nbatch_size = 100000000",
            "memory",
        ),
    ] {
        let p = d.join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&p, text).unwrap();
        let o = keel()
            .args(["train", "--config"])
            .arg(&p)
            .arg("--out")
            .arg(d.join("run"))
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {e}");
        assert!(
            e.contains(needle) && e.contains(p.file_name().unwrap().to_str().unwrap()),
            "{what}: {e}"
        );
        assert!(!e.contains("panicked"), "{what}: {e}");
    }
}

#[test]
fn hostile_tokenizer_file() {
    let d = tmpdir("tok");
    std::fs::write(
        d.join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": 5}}"#,
    )
    .unwrap();
    std::fs::write(d.join("data.txt"), "some text ".repeat(2000)).unwrap();
    let o = keel()
        .args(["train", "--preset", "micro", "--steps", "2", "--data"])
        .arg(d.join("data.txt"))
        .arg("--set")
        .arg(format!(
            "data.tokenizer={:?}",
            d.join("tokenizer.json").display().to_string()
        ))
        .arg("--out")
        .arg(d.join("run"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("tokenizer.json") && !e.contains("panicked"),
        "{e}"
    );
}

/// A run writes inside its run directory only: with HOME, TMPDIR and the working directory
/// empty sandboxes, they stay empty except the run directory itself.
#[test]
fn training_writes_nothing_outside_its_run_directory() {
    let root = std::env::temp_dir().join(format!("keel-sandbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (cwd, home, tmp) = (root.join("cwd"), root.join("home"), root.join("tmp"));
    for d in [&cwd, &home, &tmp] {
        std::fs::create_dir_all(d).unwrap();
    }
    let o = keel()
        .current_dir(&cwd)
        .env("HOME", &home)
        .env("TMPDIR", &tmp)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .args([
            "train", "--preset", "micro", "--steps", "12", "--out", "run",
        ])
        .args([
            "--set",
            "data.builtin_bytes=200000",
            "--set",
            "checkpoint.every=5",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect()
    };
    assert_eq!(names(&cwd), vec!["run".to_string()]);
    assert!(names(&home).is_empty(), "{:?}", names(&home));
    assert!(names(&tmp).is_empty(), "{:?}", names(&tmp));
    let _ = std::fs::remove_dir_all(&root);
}
