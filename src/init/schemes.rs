//! Role-aware initialisation schemes: for every tensor, its fans (HF layout: weight
//! [out, in], as `torch.nn.init` computes them), the distribution the scheme assigns, the
//! formula, and whether depth scaling applies.

use crate::config::{ConfigError, ModelConfig};
use crate::model::{ParamLayout, ParamSpec, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Scheme names (DESIGN.md contract).
pub const SCHEMES: &[&str] = &[
    "xavier-uniform",
    "xavier-normal",
    "kaiming-uniform",
    "kaiming-normal",
    "lecun-normal",
    "normal",
    "trunc-normal",
    "depth-scaled",
    "megatron",
    "small-init",
    "wang",
    "mitchell",
    "deepnorm",
    "mup",
    "orthogonal",
];

/// Per-role override (`[init.roles.<role>]`): replaces the scheme's σ for that role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RoleOverride {
    pub std: Option<f64>,
    /// Set the role to zeros (e.g. a zero-initialised readout).
    #[serde(default)]
    pub zero: bool,
}

/// `[init]`: scheme and its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InitSection {
    pub scheme: String,
    pub seed: u64,
    /// σ of normal, trunc-normal, depth-scaled, megatron (HF default 0.02); base σ of mup.
    pub std: f64,
    /// Gain of xavier / kaiming / orthogonal (kaiming default √2 as torch's relu/leaky_relu(0)).
    pub gain: Option<f64>,
    /// kaiming fan mode: fan_in or fan_out.
    pub mode: String,
    /// Truncation bound of trunc-normal and mitchell, in units of σ.
    pub trunc_sigma: f64,
    /// muP base width (the width the hyper-parameters were tuned at).
    pub base_width: usize,
    /// Per-role overrides, keyed by role name (embed, attn-q, ..., head).
    pub roles: BTreeMap<String, RoleOverride>,
}

impl Default for InitSection {
    fn default() -> Self {
        InitSection {
            scheme: "normal".into(),
            seed: 0,
            std: 0.02,
            gain: None,
            mode: "fan_in".into(),
            trunc_sigma: 2.0,
            base_width: 256,
            roles: BTreeMap::new(),
        }
    }
}

/// The distribution one tensor is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Dist {
    Ones,
    Zeros,
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
    /// Normal truncated at ±`sigma_bound`·s (resampled, not clamped), scaled so the realised
    /// std is exactly `std` when `corrected`; otherwise s = std (torch.nn.init.trunc_normal_).
    TruncNormal {
        std: f64,
        sigma_bound: f64,
        corrected: bool,
    },
    Orthogonal {
        gain: f64,
    },
}

/// Std of the standard normal truncated to [−a, a].
pub fn trunc_std(a: f64) -> f64 {
    let phi = (-a * a / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let mass = erf(a / std::f64::consts::SQRT_2);
    (1.0 - 2.0 * a * phi / mass).sqrt()
}

/// erf to ~1e-12 (series / continued fraction split), enough for bound corrections.
pub fn erf(x: f64) -> f64 {
    if x < 0.0 {
        return -erf(-x);
    }
    if x < 3.0 {
        // Maclaurin series
        let (mut term, mut sum, x2) = (x, x, x * x);
        for n in 1..200 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz)
        let mut f = x;
        let (mut c, mut d) = (x, 0.0f64);
        for n in 1..200 {
            let an = n as f64 / 2.0;
            d = x + an * d;
            d = 1.0 / d;
            c = x + an / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-x * x).exp() / (std::f64::consts::PI.sqrt() * f)
    }
}

impl Dist {
    /// The std the values should have (the audit's target).
    pub fn target_std(&self, rows: usize, cols: usize) -> f64 {
        match *self {
            Dist::Ones | Dist::Zeros => 0.0,
            Dist::Normal { std } => std,
            Dist::Uniform { bound } => bound / 3f64.sqrt(),
            Dist::TruncNormal {
                std,
                sigma_bound,
                corrected,
            } => {
                if corrected {
                    std
                } else {
                    std * trunc_std(sigma_bound)
                }
            }
            Dist::Orthogonal { gain } => gain / (rows.max(cols) as f64).sqrt(),
        }
    }

    /// Largest |value| the distribution can produce, if bounded.
    pub fn bound(&self) -> Option<f64> {
        match *self {
            Dist::Uniform { bound } => Some(bound),
            Dist::TruncNormal {
                std,
                sigma_bound,
                corrected,
            } => {
                let s = if corrected {
                    std / trunc_std(sigma_bound)
                } else {
                    std
                };
                Some(sigma_bound * s)
            }
            _ => None,
        }
    }
}

/// The plan for one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorPlan {
    pub name: String,
    pub role: &'static str,
    pub shape: Vec<usize>,
    pub layer: Option<usize>,
    pub fan_in: usize,
    pub fan_out: usize,
    pub dist: Dist,
    pub target_std: f64,
    pub formula: String,
    /// Depth scaling this tensor carries (empty: none).
    pub depth_scaling: String,
}

fn is_out(role: Role) -> bool {
    matches!(role, Role::AttnO | Role::MlpDown)
}

fn role_by_name(name: &str) -> Option<Role> {
    [
        Role::Embed,
        Role::AttnQ,
        Role::AttnK,
        Role::AttnV,
        Role::AttnO,
        Role::MlpGate,
        Role::MlpUp,
        Role::MlpDown,
        Role::Head,
        Role::Norm,
    ]
    .into_iter()
    .find(|r| r.name() == name)
}

/// (fan_in, fan_out) as torch.nn.init computes them for a 2-D weight [out, in].
pub fn fans(spec: &ParamSpec) -> (usize, usize) {
    match spec.shape.as_slice() {
        [out, inp] => (*inp, *out),
        [n] => (*n, *n),
        _ => (1, 1),
    }
}

fn check_params(ic: &InitSection) -> Result<(), ConfigError> {
    if !SCHEMES.contains(&ic.scheme.as_str()) {
        return Err(ConfigError::new(
            "init.scheme",
            format!("unknown scheme '{}'", ic.scheme),
            format!("use one of: {}", SCHEMES.join(", ")),
        ));
    }
    if !(ic.std.is_finite() && ic.std > 0.0 && ic.std < 10.0) {
        return Err(ConfigError::new(
            "init.std",
            format!("must be in (0, 10), got {}", ic.std),
            "use e.g. 0.02",
        ));
    }
    if let Some(g) = ic.gain {
        if !(g.is_finite() && g > 0.0 && g < 100.0) {
            return Err(ConfigError::new(
                "init.gain",
                format!("must be in (0, 100), got {g}"),
                "use e.g. 1.0",
            ));
        }
    }
    if ic.mode != "fan_in" && ic.mode != "fan_out" {
        return Err(ConfigError::new(
            "init.mode",
            format!("'{}' is not a fan mode", ic.mode),
            "use fan_in or fan_out",
        ));
    }
    if !(ic.trunc_sigma.is_finite() && ic.trunc_sigma >= 0.5 && ic.trunc_sigma <= 10.0) {
        return Err(ConfigError::new(
            "init.trunc_sigma",
            format!("must be in [0.5, 10] (units of σ), got {}", ic.trunc_sigma),
            "use 2 or 3: bounds are in σ, not absolute units",
        ));
    }
    if ic.base_width == 0 {
        return Err(ConfigError::new(
            "init.base_width",
            "must be positive",
            "use the width you tuned at, e.g. 256",
        ));
    }
    for (k, o) in &ic.roles {
        if role_by_name(k).is_none() {
            return Err(ConfigError::new(
                &format!("init.roles.{k}"),
                "unknown role",
                "use embed, attn-q, attn-k, attn-v, attn-out, mlp-gate, mlp-up, mlp-out, head or norm",
            ));
        }
        if let Some(s) = o.std {
            if !(s.is_finite() && (0.0..10.0).contains(&s)) {
                return Err(ConfigError::new(
                    &format!("init.roles.{k}.std"),
                    format!("{s} is out of range"),
                    "use a std in [0, 10)",
                ));
            }
        }
    }
    Ok(())
}

/// The per-tensor plan of a scheme for a model.
pub fn plan(
    cfg: &ModelConfig,
    layout: &ParamLayout,
    ic: &InitSection,
) -> Result<Vec<TensorPlan>, ConfigError> {
    check_params(ic)?;
    let (d, l_total) = (cfg.hidden_size as f64, cfg.num_layers as f64);
    let s0 = ic.std;
    let mut out = Vec::new();
    for spec in &layout.specs {
        let (fi, fo) = fans(spec);
        let (fin, fout) = (fi as f64, fo as f64);
        let layer = spec.layer;
        let lp1 = layer.map(|l| l as f64 + 1.0).unwrap_or(1.0);
        let out_role = is_out(spec.role);
        let mut depth = String::new();
        let (dist, formula) = if spec.role == Role::Norm {
            (Dist::Ones, "1".to_string())
        } else {
            match ic.scheme.as_str() {
                "xavier-uniform" => {
                    let g = ic.gain.unwrap_or(1.0);
                    (
                        Dist::Uniform {
                            bound: g * (6.0 / (fin + fout)).sqrt(),
                        },
                        format!("U(±{g}·√(6/(fan_in+fan_out)))"),
                    )
                }
                "xavier-normal" => {
                    let g = ic.gain.unwrap_or(1.0);
                    (
                        Dist::Normal {
                            std: g * (2.0 / (fin + fout)).sqrt(),
                        },
                        format!("{g}·√(2/(fan_in+fan_out))"),
                    )
                }
                "kaiming-uniform" | "kaiming-normal" => {
                    let g = ic.gain.unwrap_or(2f64.sqrt());
                    let fan = if ic.mode == "fan_in" { fin } else { fout };
                    let std = g / fan.sqrt();
                    if ic.scheme == "kaiming-uniform" {
                        (
                            Dist::Uniform {
                                bound: 3f64.sqrt() * std,
                            },
                            format!("U(±√3·{g:.4}/√{})", ic.mode),
                        )
                    } else {
                        (Dist::Normal { std }, format!("{g:.4}/√{}", ic.mode))
                    }
                }
                "lecun-normal" => (
                    Dist::Normal {
                        std: 1.0 / fin.sqrt(),
                    },
                    "1/√fan_in".into(),
                ),
                "normal" => (Dist::Normal { std: s0 }, format!("{s0}")),
                "trunc-normal" => (
                    Dist::TruncNormal {
                        std: s0,
                        sigma_bound: ic.trunc_sigma,
                        corrected: true,
                    },
                    format!("{s0}, truncated at ±{}σ, std-corrected", ic.trunc_sigma),
                ),
                "depth-scaled" => {
                    if out_role {
                        depth = "1/√(2(l+1))".into();
                        (
                            Dist::Normal {
                                std: s0 / (2.0 * lp1).sqrt(),
                            },
                            format!("{s0}/√(2(l+1))"),
                        )
                    } else {
                        (Dist::Normal { std: s0 }, format!("{s0}"))
                    }
                }
                "megatron" => {
                    if out_role {
                        depth = "1/√(2L)".into();
                        (
                            Dist::Normal {
                                std: s0 / (2.0 * l_total).sqrt(),
                            },
                            format!("{s0}/√(2L)"),
                        )
                    } else {
                        (Dist::Normal { std: s0 }, format!("{s0}"))
                    }
                }
                "small-init" => (
                    Dist::Normal {
                        std: (2.0 / (5.0 * d)).sqrt(),
                    },
                    "√(2/(5d))".into(),
                ),
                "wang" => {
                    if out_role {
                        depth = "2/(L√d)".into();
                        (
                            Dist::Normal {
                                std: 2.0 / (l_total * d.sqrt()),
                            },
                            "2/(L√d)".into(),
                        )
                    } else {
                        (
                            Dist::Normal {
                                std: (2.0 / (5.0 * d)).sqrt(),
                            },
                            "√(2/(5d))".into(),
                        )
                    }
                }
                "mitchell" => {
                    let (std, f) = match spec.role {
                        Role::Embed | Role::Head => (1.0 / d.sqrt(), "1/√d".to_string()),
                        r if is_out(r) => {
                            depth = "1/√(2(l+1))".into();
                            (
                                1.0 / fin.sqrt() / (2.0 * lp1).sqrt(),
                                "1/√fan_in/√(2(l+1))".to_string(),
                            )
                        }
                        _ => (1.0 / fin.sqrt(), "1/√fan_in".to_string()),
                    };
                    (
                        Dist::TruncNormal {
                            std,
                            sigma_bound: 3.0,
                            corrected: false,
                        },
                        format!("{f}, truncated at ±3σ"),
                    )
                }
                "deepnorm" => {
                    let beta = (8.0 * l_total).powf(-0.25);
                    let g = match spec.role {
                        Role::AttnV | Role::AttnO | Role::MlpGate | Role::MlpUp | Role::MlpDown => {
                            depth = format!("β = (8L)^(-1/4) = {beta:.4}");
                            beta
                        }
                        _ => 1.0,
                    };
                    (
                        Dist::Normal {
                            std: g * (2.0 / (fin + fout)).sqrt(),
                        },
                        format!("{g:.4}·√(2/(fan_in+fan_out))"),
                    )
                }
                "mup" => {
                    // μP (Yang et al. 2022) init part: hidden matrices σ·√(base/width) (∝ 1/√fan_in),
                    // embedding σ, readout zero.
                    let m = d / ic.base_width as f64;
                    match spec.role {
                        Role::Embed => (Dist::Normal { std: s0 }, format!("{s0}")),
                        Role::Head => (Dist::Zeros, "0 (μP readout)".into()),
                        _ => (
                            Dist::Normal { std: s0 / m.sqrt() },
                            format!("{s0}/√(d/{})", ic.base_width),
                        ),
                    }
                }
                "orthogonal" => {
                    let g = ic.gain.unwrap_or(1.0);
                    (
                        Dist::Orthogonal { gain: g },
                        format!("orthogonal, gain {g}"),
                    )
                }
                _ => unreachable!("checked by check_params"),
            }
        };
        // per-role overrides
        let (dist, formula) = match ic.roles.get(spec.role.name()) {
            Some(o) if o.zero => (Dist::Zeros, "0 (override)".to_string()),
            Some(RoleOverride { std: Some(s), .. }) => {
                (Dist::Normal { std: *s }, format!("{s} (override)"))
            }
            _ => (dist, formula),
        };
        let (rows, cols) = (fo, fi);
        out.push(TensorPlan {
            name: spec.name.clone(),
            role: spec.role.name(),
            shape: spec.shape.clone(),
            layer,
            fan_in: fi,
            fan_out: fo,
            target_std: dist.target_std(rows, cols),
            dist,
            formula,
            depth_scaling: depth,
        });
    }
    Ok(out)
}
