//! Variance propagation through a pre-norm LLaMA at initialisation (Glorot & Bengio's
//! forward/backward analysis extended to RMSNorm, RoPE attention, SwiGLU and the residual
//! stream). Assumptions, stated once:
//! - weights are independent, zero-mean, with the per-tensor σ of the init plan; norm gains 1;
//! - tokens are random, so positions are independent at the input; an RMSNorm output has
//!   RMS 1 whatever its input scale;
//! - q and k are independent (RoPE is a rotation and keeps their norms), so an attention
//!   logit has std = scale·√D·σ_q·σ_k·d, and its spread over one query's keys is that times
//!   √(1 − ρ̄) (ρ̄: mean correlation between positions); softmax weights of Gaussian logits
//!   with spread s over n keys have E[Σp²] from a fixed 256-draw average (the log-normal
//!   e^{s²}/n is poor for s ≳ 1);
//! - branch outputs add to the residual stream without correlation: C ← α²C + C_branch, where
//!   C is the covariance across positions (attention averages correlated positions; the
//!   weights themselves are independent, so a residual and its branch are uncorrelated);
//!   attention weights are treated as uniform over the prefix plus their variance on the
//!   diagonal, and SwiGLU's cross-position term keeps two Hermite orders;
//! - backward through a linear layer multiplies the variance by fan_out·σ², through RMSNorm
//!   divides it by the input's mean square; the q/k (softmax) path of the attention gradient
//!   adds 2·s²·E[Σp²(1 − 2p + Σp²)] times the value path's gain (s² the logits' variance;
//!   the factor vanishes for one-hot attention), on the diagonal;
//! - output logits z ~ N(0, s²) over V classes: E[logsumexp] ≈ ln V + s²/2, and the initial
//!   loss equals it (the target logit has mean 0).

use crate::config::ModelConfig;

/// Predicted statistics; per-layer vectors are indexed like `Model::residual_rms`
/// (2L+1 residual points) or by layer (L).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Theory {
    pub resid_rms: Vec<f64>,
    pub attn_out_rms: Vec<f64>,
    pub mlp_out_rms: Vec<f64>,
    pub attn_logit_std: Vec<f64>,
    pub logit_std: f64,
    pub logz_mean: f64,
    pub init_loss: f64,
    /// RMS of d(mean loss)/d(residual) at the 2L+1 points, for N = B·T positions.
    pub resid_grad_rms: Vec<f64>,
}

/// The σ of every weight (norm gains are 1), by role.
#[derive(Debug, Clone)]
pub struct Sigmas {
    pub embed: f64,
    pub head: f64,
    /// Per layer: q, k, v, o, gate, up, down.
    pub layers: Vec<[f64; 7]>,
}

/// What the backward pass needs of one layer's forward.
struct Back {
    /// Correlation across positions and mean squares at the attention input.
    h_attn: Vec<f64>,
    diag_attn: Vec<f64>,
    /// d σ_o² · d σ_v²: the value path's gain per unit of Pᵀ G P.
    ga_base: f64,
    /// E[Σp²] per query position (non-uniform softmax weights).
    sp2: Vec<f64>,
    /// Variance of one query's logits over its keys.
    s2: f64,
    /// E[Σp²(1 − 2p + Σp²)] per position (the q/k gradient's softmax factor).
    spqk: Vec<f64>,
    h_mlp: Vec<f64>,
    diag_mlp: Vec<f64>,
    gm: f64,
    gm_cross: [f64; 6],
}

/// For a softmax over n Gaussian logits with std `s`, n = 1..=t, a fixed 256-draw average
/// (deterministic) of E[Σp²] (the log-normal e^{s²}/n is poor for s ≳ 1) and of
/// E[Σp²(1 − 2p + Σp²)] ≈ E[Σ_s p_s² (v_s − ȳ)²]/var_v, which the q/k gradient carries.
fn softmax_moments(s: f64, t: usize) -> (Vec<f64>, Vec<f64>) {
    if s < 0.02 {
        let sp2: Vec<f64> = (1..=t).map(|n| 1.0 / n as f64).collect();
        let qk = sp2.iter().map(|&a| a - 2.0 * a * a + a * a).collect();
        return (sp2, qk);
    }
    let st = crate::init::rng::Stream::new(0x5EED, 0x50F7);
    let draws = 256;
    let (mut o2, mut oq) = (vec![0f64; t], vec![0f64; t]);
    let mut z = vec![0f64; t];
    for dr in 0..draws {
        for (i, zi) in z.iter_mut().enumerate() {
            *zi = s * st.normal_at((dr * t + i) as u64);
        }
        // running sums over the first n keys give every n in one pass
        let (mut s1, mut s2, mut s3) = (0f64, 0f64, 0f64);
        let zmax = z.iter().fold(f64::MIN, |a, &b| a.max(b));
        for n in 0..t {
            let e = (z[n] - zmax).exp();
            s1 += e;
            s2 += e * e;
            s3 += e * e * e;
            let p2 = s2 / (s1 * s1);
            let p3 = s3 / (s1 * s1 * s1);
            o2[n] += p2;
            oq[n] += (p2 - 2.0 * p3 + p2 * p2).max(0.0);
        }
    }
    let k = draws as f64;
    (
        o2.iter().map(|x| x / k).collect(),
        oq.iter().map(|x| x / k).collect(),
    )
}

/// E[f(g)] for g ~ N(0, var), by Simpson's rule over ±10σ.
fn gauss_expect(var: f64, f: impl Fn(f64) -> f64) -> f64 {
    let s = var.sqrt();
    if s == 0.0 {
        return f(0.0);
    }
    let n = 800;
    let (a, b) = (-10.0 * s, 10.0 * s);
    let h = (b - a) / n as f64;
    let dens = |x: f64| (-x * x / (2.0 * var)).exp() / (s * (2.0 * std::f64::consts::PI).sqrt());
    let mut acc = 0.0;
    for i in 0..=n {
        let x = a + i as f64 * h;
        let w = if i == 0 || i == n {
            1.0
        } else if i % 2 == 1 {
            4.0
        } else {
            2.0
        };
        acc += w * f(x) * dens(x);
    }
    acc * h / 3.0
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn silu_prime(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// Predict the statistics of `cfg` with weights of σ `sig`, for sequences of length `t` and
/// `n` positions per batch (the loss is a mean over them).
pub fn predict(cfg: &ModelConfig, sig: &Sigmas, t: usize, n: usize) -> Theory {
    let (d, f, v) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.vocab_size as f64,
    );
    let hd = cfg.head_dim() as f64;
    let scale = cfg.attn_scale.unwrap_or(1.0 / hd.sqrt());
    let alpha2 = cfg.residual_scale * cfg.residual_scale;
    let mut th = Theory::default();
    // Covariance across positions of one residual coordinate (T×T): attention mixes
    // positions, so after layer 0 they are correlated and an average over the prefix no longer
    // shrinks the variance by 1/n. Tokens are independent at the input.
    let tt = t.max(1);
    let mut c = vec![0f64; tt * tt];
    for i in 0..tt {
        c[i * tt + i] = sig.embed * sig.embed;
    }
    let mean_diag = |c: &[f64]| (0..tt).map(|i| c[i * tt + i]).sum::<f64>() / tt as f64;
    let corr = |c: &[f64]| {
        let mut h = vec![0f64; tt * tt];
        for i in 0..tt {
            for j in 0..tt {
                let den = (c[i * tt + i] * c[j * tt + j]).sqrt();
                h[i * tt + j] = if den > 0.0 { c[i * tt + j] / den } else { 0.0 };
            }
        }
        h
    };
    let mut r2 = mean_diag(&c);
    th.resid_rms.push(r2.sqrt());
    let mut back: Vec<Back> = Vec::with_capacity(cfg.num_layers);
    let mut x = vec![0f64; tt * tt];
    for w in &sig.layers {
        let [q, k, vv, o, g, u, dn] = *w;
        let (var_q, var_k, var_v) = (d * q * q, d * k * k, d * vv * vv);
        // keys share the positions' common component: the spread of one query's logits over
        // its keys is √(1 − ρ̄) of the logit std, ρ̄ the mean correlation between positions
        let h = corr(&c);
        let mut rho = 0.0;
        for i in 1..tt {
            rho += h[i * tt..i * tt + i].iter().sum::<f64>() / i as f64;
        }
        let rho = if tt > 1 { rho / (tt - 1) as f64 } else { 0.0 };
        let s = scale * (hd * var_q * var_k * (1.0 - rho).max(0.0)).sqrt();
        // y = P v with P the causal average (P_ts = 1/(t+1), s ≤ t): Cov_y = P Cov_v Pᵀ,
        // plus the diagonal excess of non-uniform weights: (E[Σp²] − 1/n)·var_v
        let diag_attn: Vec<f64> = (0..tt).map(|i| c[i * tt + i]).collect();
        for j in 0..tt {
            let mut acc = 0.0;
            for i in 0..tt {
                acc += h[i * tt + j];
                x[i * tt + j] = acc / (i + 1) as f64;
            }
        }
        let (sp2, spqk) = softmax_moments(s, tt);
        let mut a2 = 0.0;
        for i in 0..tt {
            let mut acc = 0.0;
            let row = &x[i * tt..(i + 1) * tt];
            for j in 0..tt {
                acc += row[j];
                let mut cy = acc / (j + 1) as f64;
                if i == j {
                    let n = (i + 1) as f64;
                    cy += sp2[i] - 1.0 / n;
                }
                let ca = d * o * o * var_v * cy;
                c[i * tt + j] = alpha2 * c[i * tt + j] + ca;
                if i == j {
                    a2 += ca / tt as f64;
                }
            }
        }
        r2 = mean_diag(&c);
        th.resid_rms.push(r2.sqrt());
        th.attn_out_rms.push(a2.sqrt());
        th.attn_logit_std.push(s);
        // SwiGLU, position-wise: Cov(m_t, m_s) = F σ_d² var_u ρ E[silu(g_t) silu(g_s)], with the
        // first two Hermite terms off the diagonal (a0² + ρ a1²)
        let (var_g, var_u) = (d * g * g, d * u * u);
        let e_silu2 = gauss_expect(var_g, |x| silu(x).powi(2));
        let e_dsilu2 = gauss_expect(var_g, |x| silu_prime(x).powi(2));
        let a0 = gauss_expect(var_g, silu);
        let a1 = if var_g > 0.0 {
            gauss_expect(var_g, |x| x * silu(x)) / var_g.sqrt()
        } else {
            0.0
        };
        let h_attn = h;
        let h = corr(&c);
        let diag_mlp: Vec<f64> = (0..tt).map(|i| c[i * tt + i]).collect();
        let scale_m = f * dn * dn * var_u;
        for i in 0..tt {
            for j in 0..tt {
                let rho = h[i * tt + j];
                let e = if i == j {
                    e_silu2
                } else {
                    a0 * a0 + rho * a1 * a1
                };
                c[i * tt + j] = alpha2 * c[i * tt + j] + scale_m * rho * e;
            }
        }
        let m2 = scale_m * e_silu2;
        let b0 = gauss_expect(var_g, silu_prime);
        let b1 = if var_g > 0.0 {
            gauss_expect(var_g, |x| x * silu_prime(x)) / var_g.sqrt()
        } else {
            0.0
        };
        let gm = d * dn * dn * f * (g * g * e_dsilu2 * var_u + u * u * e_silu2);
        // off the diagonal, as a function of the input correlation ρ
        let gm_cross = [
            d * dn * dn * f * g * g * var_u,
            b0 * b0,
            b1 * b1,
            d * dn * dn * f * u * u,
            a0 * a0,
            a1 * a1,
        ];
        r2 = mean_diag(&c);
        th.resid_rms.push(r2.sqrt());
        th.mlp_out_rms.push(m2.sqrt());
        back.push(Back {
            h_attn,
            diag_attn,
            ga_base: d * o * o * d * vv * vv,
            sp2,
            s2: s * s,
            spqk,
            h_mlp: h,
            diag_mlp,
            gm,
            gm_cross,
        });
    }
    let ls = cfg.logit_scale;
    let zvar = d * sig.head * sig.head * ls * ls;
    th.logit_std = zvar.sqrt();
    th.logz_mean = v.ln() + zvar / 2.0;
    th.init_loss = th.logz_mean;
    // backward: d(logits) per position has squared norm ≈ 1 − 2p_y + Σp² ≈ 1 + e^{s²}/V,
    // over V entries, times logit_scale/N
    let nn = n as f64;
    let dz2 = (1.0 + zvar.min(50.0).exp() / v) / v * ls * ls / (nn * nn);
    let dh2 = v * sig.head * sig.head * dz2;
    // Backward with the covariance across positions G (T×T): independent at the top (each
    // position has its own target), mixed by the attention backward (Pᵀ G P).
    let mut gcov = vec![0f64; tt * tt];
    for i in 0..tt {
        gcov[i * tt + i] = dh2 / r2 * (1.0 - 1.0 / d);
    }
    let mut grads = vec![0.0; 2 * cfg.num_layers + 1];
    grads[2 * cfg.num_layers] = mean_diag(&gcov).sqrt();
    let mut xg = vec![0f64; tt * tt];
    for (l, bk) in back.iter().enumerate().rev() {
        // MLP (position-wise): gain gm on the diagonal, the Hermite terms off it
        let [cg, b0s, b1s, cu, a0s, a1s] = bk.gm_cross;
        for i in 0..tt {
            for j in 0..tt {
                let den = (bk.diag_mlp[i] * bk.diag_mlp[j]).sqrt().max(1e-300);
                let rho = bk.h_mlp[i * tt + j];
                let gain = if i == j {
                    bk.gm
                } else {
                    cg * (b0s + rho * b1s) * rho + cu * (a0s + rho * a1s)
                };
                let gij = gcov[i * tt + j];
                gcov[i * tt + j] = alpha2 * gij + gain * gij / den;
            }
        }
        grads[2 * l + 1] = mean_diag(&gcov).sqrt();
        // attention value path: d v = Pᵀ d y, so Cov = Pᵀ G P (+ the diagonal excess of
        // non-uniform weights), then through the norm (÷ r_s r_s')
        // (Pᵀ G)[s][u] = Σ_{t≥s} G[t][u] / (t+1)
        for u in 0..tt {
            let mut acc = 0.0;
            for s_ in (0..tt).rev() {
                acc += gcov[s_ * tt + u] / (s_ + 1) as f64;
                xg[s_ * tt + u] = acc;
            }
        }
        let mut next = vec![0f64; tt * tt];
        for s_ in 0..tt {
            let mut acc = 0.0;
            for u in (0..tt).rev() {
                acc += xg[s_ * tt + u] / (u + 1) as f64;
                next[s_ * tt + u] = acc;
            }
        }
        for s_ in 0..tt {
            let mut extra = 0.0;
            for t_ in s_..tt {
                let n = (t_ + 1) as f64;
                extra += (bk.sp2[t_] - 1.0 / n) / n * gcov[t_ * tt + t_];
            }
            // the q/k (softmax) path: dz_ts = p_ts dy_t·(v_s − ȳ_t) reaches q_t and k_s,
            // 2·s²·Σp² times the value path's gain (s: the logits' spread)
            next[s_ * tt + s_] += extra + 2.0 * bk.s2 * bk.spqk[s_] * gcov[s_ * tt + s_];
        }
        for i in 0..tt {
            for j in 0..tt {
                let den = (bk.diag_attn[i] * bk.diag_attn[j]).sqrt().max(1e-300);
                gcov[i * tt + j] = alpha2 * gcov[i * tt + j] + bk.ga_base * next[i * tt + j] / den;
            }
        }
        let _ = &bk.h_attn;
        grads[2 * l] = mean_diag(&gcov).sqrt();
    }
    th.resid_grad_rms = grads;
    th
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_moments() {
        assert!((gauss_expect(2.0, |x| x * x) - 2.0).abs() < 1e-9);
        // E[silu(g)²] → var/4 for small var (silu ≈ g/2)
        let v = 1e-4;
        assert!((gauss_expect(v, |x| silu(x).powi(2)) / (v / 4.0) - 1.0).abs() < 1e-3);
    }
}
