//! Parity with PyTorch / HF transformers `LlamaForCausalLM`: logits, loss, every parameter
//! gradient, and 10 AdamW steps, against fixtures made by `scripts/make_fixtures.py`.

use keel::config::ModelConfig;
use keel::model::Model;
use keel::optim::{clip_grad_norm, AdamW, OptimConfig};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

struct Fixture {
    bytes: Vec<u8>,
    cfg: Value,
    adamw: Value,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let path = format!(
            "{}/tests/fixtures/{name}.safetensors",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let md = meta.metadata().clone().unwrap();
        let cfg = serde_json::from_str(&md["config"]).unwrap();
        let adamw = serde_json::from_str(&md["adamw"]).unwrap();
        Fixture { bytes, cfg, adamw }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        f32_tensor(&self.st(), name)
    }

    fn u32s(&self, name: &str) -> Vec<u32> {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I32);
        t.data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32)
            .collect()
    }

    fn usize(&self, k: &str) -> usize {
        self.cfg[k].as_u64().unwrap() as usize
    }

    fn model(&self) -> (Model, Vec<u32>, Vec<u32>) {
        let c = &self.cfg;
        let cfg = ModelConfig {
            vocab_size: self.usize("vocab_size"),
            hidden_size: self.usize("hidden_size"),
            num_layers: self.usize("num_layers"),
            num_heads: self.usize("num_heads"),
            num_kv_heads: self.usize("num_kv_heads"),
            intermediate_size: self.usize("intermediate_size"),
            rope_theta: c["rope_theta"].as_f64().unwrap(),
            rms_norm_eps: c["rms_norm_eps"].as_f64().unwrap(),
            tie_embeddings: c["tie_embeddings"].as_bool().unwrap(),
            max_seq_len: self.usize("seq"),
            attn_scale: None,
            logit_scale: 1.0,
            residual_scale: 1.0,
            qk_norm: c["qk_norm"].as_bool().unwrap_or(false),
        };
        cfg.validate().unwrap();
        let mut m = Model::new(&cfg, self.usize("batch"), self.usize("seq"));
        for spec in m.layout.specs.clone() {
            let w = self.f32s(&spec.name);
            assert_eq!(w.len(), spec.len, "{}", spec.name);
            m.params[spec.offset..spec.offset + spec.len].copy_from_slice(&w);
        }
        (m, self.u32s("input_ids"), self.u32s("targets"))
    }
}

/// max |a-b| / max(|b|) over the tensor (relative to the tensor's scale).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-12);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

fn check_forward_backward(name: &str) {
    let fx = Fixture::load(name);
    let (mut m, x, y) = fx.model();
    let loss = m.forward(&x, &y).unwrap();
    let ref_loss = fx.f32s("loss")[0];
    let e_logits = rel_err(m.logits().unwrap(), &fx.f32s("logits"));
    assert!(e_logits < 1e-5, "{name}: logits rel err {e_logits:.2e}");
    let e_loss = ((loss - ref_loss) / ref_loss).abs();
    assert!(e_loss < 1e-5, "{name}: loss {loss} vs torch {ref_loss}");
    m.zero_grad();
    m.backward(1.0).unwrap();
    let mut worst = (0f64, String::new());
    for spec in m.layout.specs.clone() {
        let g = &m.grads[spec.offset..spec.offset + spec.len];
        let e = rel_err(g, &fx.f32s(&format!("grad.{}", spec.name)));
        if e > worst.0 {
            worst = (e, spec.name.clone());
        }
    }
    assert!(
        worst.0 < 1e-4,
        "{name}: worst gradient {} rel err {:.2e}",
        worst.1,
        worst.0
    );
    eprintln!(
        "{name}: logits {e_logits:.1e}, loss {e_loss:.1e}, worst grad {:.1e} ({})",
        worst.0, worst.1
    );
}

fn check_adamw(name: &str) {
    let fx = Fixture::load(name);
    let (mut m, x, y) = fx.model();
    let a = &fx.adamw;
    let oc = OptimConfig {
        lr: a["lr"].as_f64().unwrap(),
        beta1: a["beta1"].as_f64().unwrap(),
        beta2: a["beta2"].as_f64().unwrap(),
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
        grad_clip: a["grad_clip"].as_f64().unwrap(),
        decay_embeddings: true,
        decoupled_wd: false,
    };
    let mut opt = AdamW::new(oc.clone(), &m.layout);
    let ref_losses = fx.f32s("adamw_losses");
    let ref_norms = fx.f32s("adamw_grad_norms");
    for (i, (&rl, &rn)) in ref_losses.iter().zip(&ref_norms).enumerate() {
        m.zero_grad();
        let loss = m.forward(&x, &y).unwrap();
        m.backward(1.0).unwrap();
        let norm = clip_grad_norm(&mut m.grads, oc.grad_clip);
        assert!(
            ((loss - rl) / rl).abs() < 1e-4,
            "{name} step {i}: loss {loss} vs torch {rl}"
        );
        assert!(
            ((norm - rn as f64) / rn as f64).abs() < 1e-3,
            "{name} step {i}: grad norm {norm} vs torch {rn}"
        );
        opt.update(&mut m.params, &m.grads, oc.lr);
    }
}

#[test]
fn micro_matches_pytorch() {
    check_forward_backward("micro");
}

#[test]
fn gqa_tied_matches_pytorch() {
    check_forward_backward("gqa_tied");
}

#[test]
fn micro_adamw_10_steps_match_pytorch() {
    check_adamw("micro");
}

#[test]
fn gqa_tied_adamw_10_steps_match_pytorch() {
    check_adamw("gqa_tied");
}

/// qk-norm (`model.qk_norm`) against HF `Qwen3ForCausalLM`: per-head q/k RMSNorm before
/// RoPE, its weight gradients included.
#[test]
fn qwen3_qk_norm_matches_pytorch() {
    check_forward_backward("qwen3_qknorm");
}

#[test]
fn qwen3_qk_norm_adamw_10_steps_match_pytorch() {
    check_adamw("qwen3_qknorm");
}

/// One f32 tensor of a fixture, by name.
fn f32_tensor(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture lacks {name}"));
    assert_eq!(t.dtype(), Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// f32 tensors of another fixture file (no config metadata), by name.
fn fixture_f32(file: &str, name: &str) -> Vec<f32> {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    f32_tensor(&SafeTensors::deserialize(&bytes).unwrap(), name)
}

fn l2(a: &[f32]) -> f64 {
    a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// keel's Hessian-vector product (a central difference of its exact f32 gradients) against
/// torch's double backward in float64 (`scripts/make_hvp_fixture.py`), along the fixture's
/// own gradient direction; and λ_max(H) by keel's Lanczos against float64 Lanczos with full
/// reorthogonalisation.
#[test]
fn micro_hessian_vector_product_and_sharpness_match_double_backward() {
    use keel::probe::sharpness::{hessian_vector, measure, Scratch, SharpnessOptions};
    let fx = Fixture::load("micro");
    let (mut m, x, y) = fx.model();
    let mut v = vec![0f32; m.params.len()];
    for spec in m.layout.specs.clone() {
        let g = fx.f32s(&format!("grad.{}", spec.name));
        v[spec.offset..spec.offset + spec.len].copy_from_slice(&g);
    }
    let nv = l2(&v) as f32;
    v.iter_mut().for_each(|x| *x /= nv);
    let p_before = m.params.clone();
    let mut hv = vec![0f32; v.len()];
    let fd_rel = SharpnessOptions::default().fd_rel;
    hessian_vector(&mut m, &x, &y, &v, fd_rel, &mut hv).unwrap();
    assert_eq!(m.params, p_before, "the weights must come back bit for bit");
    let mut want = vec![0f32; v.len()];
    for spec in m.layout.specs.clone() {
        let t = fixture_f32("micro_hvp.safetensors", &format!("hv.{}", spec.name));
        want[spec.offset..spec.offset + spec.len].copy_from_slice(&t);
    }
    let diff: Vec<f32> = hv.iter().zip(&want).map(|(a, b)| a - b).collect();
    let e = l2(&diff) / l2(&want);
    eprintln!(
        "H·v: ‖keel − torch‖/‖torch‖ = {e:.2e} (‖Hv‖ {:.4})",
        l2(&want)
    );
    // measured: 1.3e-4 at the default step (truncation ∝ h² above it: 1.2e-2 at 1e-3;
    // f32 rounding ∝ 1/h below: 3.8e-3 at 1e-6)
    assert!(e < 1e-3, "H·v rel err {e:.2e}");

    let lam = fixture_f32("micro_hvp.safetensors", "lambda_max")[0] as f64;
    let o = SharpnessOptions {
        iters: 80,
        tol: 1e-5,
        ..Default::default()
    };
    let s = measure(&mut m, &x, &y, None, 1e-3, &o, &mut Scratch::new(0)).unwrap();
    let got = s.lambda_max.unwrap();
    eprintln!(
        "λ_max: keel {got:.5} vs torch f64 {lam:.5} ({} HVPs, converged {})",
        s.hvps, s.converged
    );
    assert!(
        (got - lam).abs() / lam < 2e-3,
        "λ_max {got} vs {lam} (converged {})",
        s.converged
    );
    assert_eq!(m.params, p_before);
    // gradient descent's edge: 2/λ
    assert!((s.lr_edge - 2.0 / got).abs() < 1e-12);
}
