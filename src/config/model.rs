//! Model configuration: LLaMA shape, presets, validation, HF `config.json` read and write.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;

use super::ConfigError;

/// Shape and numerics of a LLaMA-architecture model (HF `LlamaForCausalLM`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_embeddings: bool,
    /// Longest sequence the model is built for (HF `max_position_embeddings`).
    pub max_seq_len: usize,
    /// Attention logit scale; None = 1/√head_dim (LLaMA). μP sets √(base head dim)/head_dim.
    #[serde(default)]
    pub attn_scale: Option<f64>,
    /// Multiplier on the output logits (μP readout: 1/width_mult). 1 = LLaMA.
    #[serde(default = "one")]
    pub logit_scale: f64,
    /// Residual scaling α: x ← α·x + f(x) in every block (DeepNorm). 1 = LLaMA.
    #[serde(default = "one")]
    pub residual_scale: f64,
    /// Per-head RMSNorm on q and k before RoPE, with learnable weights over the head dimension
    /// (HF `Qwen3ForCausalLM`'s q_norm / k_norm); checkpoints are written as Qwen3.
    #[serde(default)]
    pub qk_norm: bool,
}

fn one() -> f64 {
    1.0
}

/// Largest sizes accepted before allocating anything: guards against absurd or hostile configs.
const MAX_VOCAB: usize = 1 << 22;
const MAX_HIDDEN: usize = 1 << 17;
const MAX_LAYERS: usize = 1024;
const MAX_SEQ: usize = 1 << 21;

impl ModelConfig {
    /// Names of the built-in presets, trainable ones first.
    pub const PRESETS: &'static [&'static str] = &[
        "micro",
        "tiny",
        "small",
        "llama2-7b",
        "llama2-13b",
        "llama2-70b",
        "llama3-8b",
        "llama3-70b",
    ];

    #[allow(clippy::too_many_arguments)]
    fn shape(
        vocab: usize,
        d: usize,
        l: usize,
        h: usize,
        kv: usize,
        ffn: usize,
        seq: usize,
        theta: f64,
        eps: f64,
    ) -> Self {
        ModelConfig {
            vocab_size: vocab,
            hidden_size: d,
            num_layers: l,
            num_heads: h,
            num_kv_heads: kv,
            intermediate_size: ffn,
            rope_theta: theta,
            rms_norm_eps: eps,
            tie_embeddings: false,
            max_seq_len: seq,
            attn_scale: None,
            logit_scale: 1.0,
            residual_scale: 1.0,
            qk_norm: false,
        }
    }

    /// A named preset (see DESIGN.md). Large ones are shape-only, for analysis.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let c = match name {
            "micro" => Self::shape(256, 64, 2, 4, 2, 172, 64, 10000.0, 1e-5),
            "tiny" => Self::shape(4096, 256, 4, 4, 4, 688, 256, 10000.0, 1e-5),
            "small" => Self::shape(8192, 512, 8, 8, 4, 1376, 512, 10000.0, 1e-5),
            "llama2-7b" => Self::shape(32000, 4096, 32, 32, 32, 11008, 4096, 10000.0, 1e-5),
            "llama2-13b" => Self::shape(32000, 5120, 40, 40, 40, 13824, 4096, 10000.0, 1e-5),
            "llama2-70b" => Self::shape(32000, 8192, 80, 64, 8, 28672, 4096, 10000.0, 1e-5),
            "llama3-8b" => Self::shape(128256, 4096, 32, 32, 8, 14336, 8192, 500000.0, 1e-5),
            "llama3-70b" => Self::shape(128256, 8192, 80, 64, 8, 28672, 8192, 500000.0, 1e-5),
            other => {
                return Err(ConfigError::new(
                    "model.preset",
                    format!("unknown preset '{other}'"),
                    format!("use one of: {}", Self::PRESETS.join(", ")),
                ))
            }
        };
        Ok(c)
    }

    /// True when the model is plain LLaMA (loads identically in transformers).
    pub fn is_plain_llama(&self) -> bool {
        self.attn_scale.is_none() && self.logit_scale == 1.0 && self.residual_scale == 1.0
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.num_kv_heads
    }

    /// Check every constraint the engine relies on; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_seq_len", self.max_seq_len),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(ConfigError::new(
                    &format!("model.{k}"),
                    "must be positive, got 0",
                    "set it to a positive integer",
                ));
            }
        }
        let limits = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_HIDDEN),
            ("intermediate_size", self.intermediate_size, MAX_HIDDEN * 8),
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("max_seq_len", self.max_seq_len, MAX_SEQ),
        ];
        for (k, v, max) in limits {
            if v > max {
                return Err(ConfigError::new(
                    &format!("model.{k}"),
                    format!("{v} is larger than keel supports ({max})"),
                    "check the value; it is probably a typo or a corrupt config",
                ));
            }
        }
        if self.num_heads > self.hidden_size || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(ConfigError::new(
                "model.num_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_heads, self.hidden_size
                ),
                "choose num_heads so that hidden_size / num_heads is an integer",
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ConfigError::new(
                "model.num_heads",
                format!(
                    "head dim {} is odd; RoPE needs an even head dim",
                    self.head_dim()
                ),
                "choose num_heads so that hidden_size / num_heads is even",
            ));
        }
        if self.num_kv_heads > self.num_heads || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ConfigError::new(
                "model.num_kv_heads",
                format!(
                    "{} kv heads do not divide num_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
                "choose num_kv_heads as a divisor of num_heads (num_heads itself for plain MHA)",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(ConfigError::new(
                "model.rope_theta",
                format!("must be a finite number > 1, got {}", self.rope_theta),
                "use 10000 (LLaMA 1/2) or 500000 (LLaMA 3)",
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(ConfigError::new(
                "model.rms_norm_eps",
                format!("must be in (0, 1), got {}", self.rms_norm_eps),
                "use 1e-5 or 1e-6",
            ));
        }
        let scales = [
            ("model.attn_scale", self.attn_scale.unwrap_or(1.0)),
            ("model.logit_scale", self.logit_scale),
            ("model.residual_scale", self.residual_scale),
        ];
        for (k, v) in scales {
            if !(v.is_finite() && v > 0.0 && v < 1e4) {
                return Err(ConfigError::new(
                    k,
                    format!("must be a positive finite number, got {v}"),
                    "leave it unset for LLaMA",
                ));
            }
        }
        Ok(())
    }

    /// Total parameter count (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let (v, d, f, l) = (
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
        );
        let per_layer = 2 * d + d * d * 2 + 2 * d * self.kv_dim() + 3 * d * f;
        let head = if self.tie_embeddings { 0 } else { v * d };
        v * d + l * per_layer + d + head
    }

    /// Training FLOPs per token as counted in shared/bench/CONFIGS.md: 6 × (non-embedding
    /// parameters + lm_head) plus attention 12·L·T·d (forward + backward).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let (v, d) = (self.vocab_size as f64, self.hidden_size as f64);
        let non_embed =
            self.num_params() as f64 - v * d + if self.tie_embeddings { v * d } else { 0.0 };
        6.0 * non_embed + 12.0 * self.num_layers as f64 * seq_len as f64 * d
    }

    /// Read an HF `config.json` (LlamaForCausalLM). Accepts `rope_theta` and `rope_parameters`.
    pub fn from_hf_json(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&file, format!("cannot read: {e}"), "check the path"))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            ConfigError::new(&file, format!("not valid JSON: {e}"), "fix the JSON syntax")
        })?;
        Self::from_hf_value(&v).map_err(|e| e.in_file(&file))
    }

    pub fn from_hf_value(v: &Value) -> Result<Self, ConfigError> {
        let obj = v.as_object().ok_or_else(|| {
            ConfigError::new(
                "config.json",
                "top level is not an object",
                "give an HF config.json",
            )
        })?;
        let model_type = obj.get("model_type").and_then(Value::as_str);
        let qwen3 = model_type == Some("qwen3");
        if let Some(mt) = model_type {
            // Llama-architecture models under other names are taken as the Llama they are;
            // what keel cannot represent is refused, named
            let why_not = match mt {
                "llama" | "qwen3" | "mistral" => None,
                "qwen2" => Some((
                    "model_type",
                    "Qwen2 adds learned biases to the q, k and v projections; keel's attention has none".to_string(),
                    "use a Llama, Mistral or Qwen3 config (Qwen3 dropped the biases)",
                )),
                "olmo2" => Some((
                    "model_type",
                    "OLMo 2 normalises after each attention and MLP block and over the whole q/k width; keel is pre-norm with per-head q/k norm".to_string(),
                    "use a Llama config of the same shape (hidden_size, layers, heads) to study its init",
                )),
                "mixtral" | "qwen2_moe" | "qwen3_moe" => Some((
                    "model_type",
                    format!("'{mt}' is a mixture of experts; keel's MLP is one dense SwiGLU"),
                    "use the dense config of the same family",
                )),
                _ => Some((
                    "model_type",
                    format!("'{mt}' is not a Llama-architecture model keel knows"),
                    "keel takes model_type \"llama\", \"mistral\" (no sliding window) or \"qwen3\"; for another Llama-shaped model set model_type to \"llama\"",
                )),
            };
            if let Some((field, problem, fix)) = why_not {
                return Err(ConfigError::new(field, problem, fix));
            }
            if mt == "mistral" {
                // Mistral is Llama with an optional sliding window: none, or one at least as
                // long as the context, is plain causal attention
                let max_pos = obj.get("max_position_embeddings").and_then(Value::as_u64);
                if let Some(w) = obj.get("sliding_window").and_then(Value::as_u64) {
                    if max_pos.is_none_or(|m| w < m) {
                        return Err(ConfigError::new(
                            "sliding_window",
                            format!("sliding-window attention ({w} tokens) is not supported"),
                            "set sliding_window to null (Mistral 7B v0.2 and later have none)",
                        ));
                    }
                }
            }
        }
        if qwen3 {
            // Qwen3 = Llama + q/k norm; its other options keel does not implement
            if obj.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
                return Err(ConfigError::new(
                    "use_sliding_window",
                    "sliding-window attention is not supported",
                    "set use_sliding_window to false",
                ));
            }
        }
        if let Some(bias) = obj.get("attention_bias").and_then(Value::as_bool) {
            if bias {
                return Err(ConfigError::new(
                    "attention_bias",
                    "attention biases are not supported",
                    "set attention_bias to false",
                ));
            }
        }
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(ConfigError::new(
                    "hidden_act",
                    format!("'{act}' is not supported"),
                    "keel implements SwiGLU with silu",
                ));
            }
        }
        let req = |k: &str| -> Result<usize, ConfigError> {
            let val = obj.get(k).ok_or_else(|| {
                ConfigError::new(k, "missing", "add it; every Llama config.json has it")
            })?;
            val.as_u64().map(|x| x as usize).ok_or_else(|| {
                ConfigError::new(
                    k,
                    format!("expected a non-negative integer, got {val}"),
                    "fix its type",
                )
            })
        };
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_heads,
            Some(_) => req("num_key_value_heads")?,
        };
        let rope_theta = match (obj.get("rope_theta"), obj.get("rope_parameters")) {
            (Some(t), _) if !t.is_null() => t.as_f64().ok_or_else(|| {
                ConfigError::new(
                    "rope_theta",
                    format!("expected a number, got {t}"),
                    "fix its type",
                )
            })?,
            (_, Some(p)) if !p.is_null() => {
                if let Some(rt) = p.get("rope_type").and_then(Value::as_str) {
                    if rt != "default" {
                        return Err(ConfigError::new(
                            "rope_parameters.rope_type",
                            format!("'{rt}' RoPE scaling is not supported"),
                            "keel implements default RoPE; remove the scaling for analysis",
                        ));
                    }
                }
                p.get("rope_theta").and_then(Value::as_f64).ok_or_else(|| {
                    ConfigError::new(
                        "rope_parameters.rope_theta",
                        "missing or not a number",
                        "add rope_theta",
                    )
                })?
            }
            _ => 10000.0,
        };
        if let Some(s) = obj.get("rope_scaling") {
            if !s.is_null() {
                return Err(ConfigError::new(
                    "rope_scaling",
                    "RoPE scaling is not supported",
                    "remove rope_scaling (set it to null)",
                ));
            }
        }
        let eps = match obj.get("rms_norm_eps") {
            None => 1e-6,
            Some(e) => e.as_f64().ok_or_else(|| {
                ConfigError::new(
                    "rms_norm_eps",
                    format!("expected a number, got {e}"),
                    "fix its type",
                )
            })?,
        };
        let tie = match obj.get("tie_word_embeddings") {
            None => false,
            Some(t) => t.as_bool().ok_or_else(|| {
                ConfigError::new(
                    "tie_word_embeddings",
                    format!("expected a bool, got {t}"),
                    "use true or false",
                )
            })?,
        };
        let hidden = req("hidden_size")?;
        // Qwen3Config's head_dim defaults to 128 when absent
        let qwen3_default = Value::from(128u64);
        let head_dim = match obj.get("head_dim") {
            None | Some(Value::Null) if qwen3 => Some(&qwen3_default),
            other => other,
        };
        if let Some(hd) = head_dim {
            if let Some(hd) = hd.as_u64() {
                if num_heads > 0 && hd as usize * num_heads != hidden {
                    return Err(ConfigError::new(
                        "head_dim",
                        format!("head_dim {hd} × heads {num_heads} != hidden_size {hidden}"),
                        "keel needs head_dim = hidden_size / num_attention_heads",
                    ));
                }
            }
        }
        let c = ModelConfig {
            vocab_size: req("vocab_size")?,
            hidden_size: hidden,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            intermediate_size: req("intermediate_size")?,
            rope_theta,
            rms_norm_eps: eps,
            tie_embeddings: tie,
            max_seq_len: match obj.get("max_position_embeddings") {
                None => 2048,
                Some(_) => req("max_position_embeddings")?,
            },
            attn_scale: obj.get("keel_attn_scale").and_then(Value::as_f64),
            logit_scale: obj
                .get("keel_logit_scale")
                .and_then(Value::as_f64)
                .unwrap_or(1.0),
            residual_scale: obj
                .get("keel_residual_scale")
                .and_then(Value::as_f64)
                .unwrap_or(1.0),
            qk_norm: qwen3,
        };
        c.validate()?;
        Ok(c)
    }

    /// HF `config.json` for this model, loadable by `LlamaConfig.from_pretrained`.
    pub fn to_hf_value(&self) -> Value {
        let mut m = Map::new();
        let entries = [
            (
                "architectures",
                json!([if self.qk_norm {
                    "Qwen3ForCausalLM"
                } else {
                    "LlamaForCausalLM"
                }]),
            ),
            (
                "model_type",
                json!(if self.qk_norm { "qwen3" } else { "llama" }),
            ),
            ("vocab_size", json!(self.vocab_size)),
            ("hidden_size", json!(self.hidden_size)),
            ("intermediate_size", json!(self.intermediate_size)),
            ("num_hidden_layers", json!(self.num_layers)),
            ("num_attention_heads", json!(self.num_heads)),
            ("num_key_value_heads", json!(self.num_kv_heads)),
            ("head_dim", json!(self.head_dim())),
            ("max_position_embeddings", json!(self.max_seq_len)),
            ("rms_norm_eps", json!(self.rms_norm_eps)),
            ("rope_theta", json!(self.rope_theta)),
            ("rope_scaling", Value::Null),
            ("hidden_act", json!("silu")),
            ("attention_bias", json!(false)),
            ("attention_dropout", json!(0.0)),
            ("mlp_bias", json!(false)),
            ("tie_word_embeddings", json!(self.tie_embeddings)),
            ("initializer_range", json!(0.02)),
            ("torch_dtype", json!("float32")),
            ("use_cache", json!(true)),
            ("bos_token_id", Value::Null),
            ("eos_token_id", Value::Null),
        ];
        for (k, v) in entries {
            m.insert(k.to_string(), v);
        }
        if self.qk_norm {
            m.insert("use_sliding_window".into(), json!(false));
            m.insert("sliding_window".into(), Value::Null);
        }
        // Variants transformers does not implement: recorded so keel reloads them exactly.
        if let Some(a) = self.attn_scale {
            m.insert("keel_attn_scale".into(), json!(a));
        }
        if self.logit_scale != 1.0 {
            m.insert("keel_logit_scale".into(), json!(self.logit_scale));
        }
        if self.residual_scale != 1.0 {
            m.insert("keel_residual_scale".into(), json!(self.residual_scale));
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama_like(model_type: &str) -> Value {
        json!({"model_type": model_type, "hidden_size": 256, "intermediate_size": 688,
               "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
               "vocab_size": 512, "max_position_embeddings": 1024, "hidden_act": "silu"})
    }

    #[test]
    fn llama_architecture_models_under_other_names_are_taken_as_llama() {
        let m = ModelConfig::from_hf_value(&llama_like("mistral")).unwrap();
        assert_eq!((m.hidden_size, m.num_kv_heads), (256, 2));
        let mut v = llama_like("mistral");
        v["sliding_window"] = json!(null);
        assert!(ModelConfig::from_hf_value(&v).is_ok());
        v["sliding_window"] = json!(4096); // at least the context: plain causal attention
        assert!(ModelConfig::from_hf_value(&v).is_ok());
        v["sliding_window"] = json!(128);
        let e = ModelConfig::from_hf_value(&v).unwrap_err();
        assert_eq!(e.field, "sliding_window");
        // what keel cannot represent is refused, named
        let e = ModelConfig::from_hf_value(&llama_like("qwen2")).unwrap_err();
        assert!(e.problem.contains("biases"), "{e}");
        let e = ModelConfig::from_hf_value(&llama_like("olmo2")).unwrap_err();
        assert!(e.problem.contains("normalises after"), "{e}");
        let e = ModelConfig::from_hf_value(&llama_like("gpt2")).unwrap_err();
        assert!(e.fix.contains("mistral"), "{e}");
    }
}
