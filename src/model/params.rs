//! Parameter layout: every tensor of the model as a named view (HF name) into one contiguous
//! buffer, with the role that decides its initialisation and optimizer group.

use crate::config::ModelConfig;
use std::collections::HashMap;

/// What a tensor does in the network; decides fan-in/fan-out and depth scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Embed,
    AttnQ,
    AttnK,
    AttnV,
    AttnO,
    MlpGate,
    MlpUp,
    MlpDown,
    Head,
    Norm,
}

impl Role {
    /// The tensor group telemetry and `keel check` report update/weight ratios by.
    pub fn group(self) -> &'static str {
        match self {
            Role::Embed => "embed",
            Role::AttnQ | Role::AttnK | Role::AttnV | Role::AttnO => "attn",
            Role::MlpGate | Role::MlpUp | Role::MlpDown => "mlp",
            Role::Norm => "norm",
            Role::Head => "head",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Embed => "embed",
            Role::AttnQ => "attn-q",
            Role::AttnK => "attn-k",
            Role::AttnV => "attn-v",
            Role::AttnO => "attn-out",
            Role::MlpGate => "mlp-gate",
            Role::MlpUp => "mlp-up",
            Role::MlpDown => "mlp-out",
            Role::Head => "head",
            Role::Norm => "norm",
        }
    }
}

/// One parameter tensor: HF name, shape (HF layout: linear weights are (out, in)), role,
/// transformer layer (None for embed/final norm/head) and where it lives in the buffer.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
    pub layer: Option<usize>,
    pub offset: usize,
    pub len: usize,
}

/// Offsets of one transformer block's tensors.
#[derive(Debug, Clone, Copy)]
pub struct LayerOffsets {
    pub ln1: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
    /// Per-head q / k RMSNorm weights (D each, adjacent: k_norm follows q_norm), with qk-norm.
    pub q_norm: Option<usize>,
    pub ln2: usize,
    pub gate: usize,
    pub up: usize,
    pub down: usize,
}

#[derive(Debug, Clone)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub total: usize,
    pub embed: usize,
    pub layers: Vec<LayerOffsets>,
    pub norm: usize,
    /// Offset of the lm_head weight; equals `embed` when embeddings are tied.
    pub head: usize,
    index: HashMap<String, usize>,
}

impl ParamLayout {
    pub fn new(c: &ModelConfig) -> Self {
        let (v, d, f, kv) = (c.vocab_size, c.hidden_size, c.intermediate_size, c.kv_dim());
        let mut specs = Vec::new();
        let mut total = 0usize;
        let mut push = |name: String, shape: Vec<usize>, role: Role, layer: Option<usize>| {
            let len = shape.iter().product();
            let off = total;
            specs.push(ParamSpec {
                name,
                shape,
                role,
                layer,
                offset: off,
                len,
            });
            total += len;
            off
        };
        let embed = push(
            "model.embed_tokens.weight".into(),
            vec![v, d],
            Role::Embed,
            None,
        );
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}.");
            let ly = Some(l);
            layers.push(LayerOffsets {
                ln1: push(
                    format!("{p}input_layernorm.weight"),
                    vec![d],
                    Role::Norm,
                    ly,
                ),
                q: push(
                    format!("{p}self_attn.q_proj.weight"),
                    vec![d, d],
                    Role::AttnQ,
                    ly,
                ),
                k: push(
                    format!("{p}self_attn.k_proj.weight"),
                    vec![kv, d],
                    Role::AttnK,
                    ly,
                ),
                v: push(
                    format!("{p}self_attn.v_proj.weight"),
                    vec![kv, d],
                    Role::AttnV,
                    ly,
                ),
                o: push(
                    format!("{p}self_attn.o_proj.weight"),
                    vec![d, d],
                    Role::AttnO,
                    ly,
                ),
                // after o_proj: q|k|v must stay contiguous for the fused projection
                q_norm: c.qk_norm.then(|| {
                    let hd = c.head_dim();
                    let q = push(
                        format!("{p}self_attn.q_norm.weight"),
                        vec![hd],
                        Role::Norm,
                        ly,
                    );
                    push(
                        format!("{p}self_attn.k_norm.weight"),
                        vec![hd],
                        Role::Norm,
                        ly,
                    );
                    q
                }),
                ln2: push(
                    format!("{p}post_attention_layernorm.weight"),
                    vec![d],
                    Role::Norm,
                    ly,
                ),
                gate: push(
                    format!("{p}mlp.gate_proj.weight"),
                    vec![f, d],
                    Role::MlpGate,
                    ly,
                ),
                up: push(
                    format!("{p}mlp.up_proj.weight"),
                    vec![f, d],
                    Role::MlpUp,
                    ly,
                ),
                down: push(
                    format!("{p}mlp.down_proj.weight"),
                    vec![d, f],
                    Role::MlpDown,
                    ly,
                ),
            });
        }
        let norm = push("model.norm.weight".into(), vec![d], Role::Norm, None);
        let head = if c.tie_embeddings {
            embed
        } else {
            push("lm_head.weight".into(), vec![v, d], Role::Head, None)
        };
        let index = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        ParamLayout {
            specs,
            total,
            embed,
            layers,
            norm,
            head,
            index,
        }
    }

    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.index.get(name).map(|&i| &self.specs[i])
    }
}
