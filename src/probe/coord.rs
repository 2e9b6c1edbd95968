//! The μP coordinate check (Yang et al., microsoft/mup): train the same small model at
//! several widths for a few Adam steps and plot each layer's activation size against width.
//! Under μP the curves are flat; under the standard parametrisation they grow with width,
//! the sign that the best LR will shift as the model widens.

use crate::config::RunConfig;
use crate::init::rng::Stream;
use crate::model::Model;
use crate::optim::AdamW;
use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CoordSeries {
    pub parametrisation: String,
    pub widths: Vec<usize>,
    /// [step][width]: RMS of the output logits after `step` updates (step 0: init).
    pub logits: Vec<Vec<f64>>,
    /// [step][width]: RMS of the last layer's residual stream.
    pub resid: Vec<Vec<f64>>,
    /// Slope of log(logit RMS) against log(width) at the last step (0: flat).
    pub logit_slope: f64,
    pub resid_slope: f64,
}

/// A slope of log(RMS) against log(width) in words: under μP every coordinate should be
/// flat (|slope| < 0.25); one that shrinks is as wrong as one that grows.
pub fn slope_word(s: f64) -> &'static str {
    if !s.is_finite() {
        "not measurable"
    } else if s.abs() < 0.25 {
        "flat"
    } else if s > 0.0 {
        "grows with width"
    } else {
        "shrinks with width"
    }
}

/// Least-squares slope of log y against log x.
pub fn log_slope(x: &[usize], y: &[f64]) -> f64 {
    let pts: Vec<(f64, f64)> = x
        .iter()
        .zip(y)
        .filter(|(_, &y)| y > 0.0)
        .map(|(&x, &y)| ((x as f64).ln(), y.ln()))
        .collect();
    let n = pts.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    sxy / sxx
}

/// One parametrisation over `widths`: the micro shape (2 layers, 4 heads, vocab 256)
/// widened (head size = width/4), `steps` AdamW steps at `lr` on random tokens (the same at every width).
pub fn run(
    scheme: &str,
    widths: &[usize],
    steps: usize,
    lr: f64,
    extra_sets: &[String],
) -> Result<CoordSeries> {
    let (b, t) = (4usize, 64usize);
    let base = widths.iter().copied().min().unwrap_or(64);
    let mut logits = vec![vec![0.0; widths.len()]; steps + 1];
    let mut resid = vec![vec![0.0; widths.len()]; steps + 1];
    for (wi, &w) in widths.iter().enumerate() {
        if w % 8 != 0 || w < 32 {
            anyhow::bail!("--widths: {w} must be a multiple of 8 and at least 32");
        }
        let mut sets = vec![
            "model.preset=\"micro\"".to_string(),
            format!("model.hidden_size={w}"),
            // 4 heads whose size grows with width: μP's 1/d attention scale is about head size
            "model.num_heads=4".to_string(),
            "model.num_kv_heads=2".to_string(),
            format!("model.intermediate_size={}", (w * 172).div_ceil(64)),
            format!("init.scheme=\"{scheme}\""),
            format!("init.base_width={base}"),
            format!("optim.lr={lr}"),
            "optim.weight_decay=0.0".to_string(),
        ];
        sets.extend(extra_sets.iter().cloned());
        let rc = RunConfig::parse(None, &sets).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mc = rc.model_config().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut model = Model::new(&mc, b, t);
        crate::init::initialize(&mut model, &rc.init).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut opt = AdamW::new(rc.optim.clone(), &model.layout)
            .with_lr_multipliers(&model.layout, |r| {
                crate::init::lr_multiplier(&rc.init, &mc, r)
            });
        let st = Stream::new(7, 0xC00D);
        let v = mc.vocab_size as u64;
        let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
        for k in 0..=steps {
            for i in 0..b * t {
                let j = (k * b * t + i) as u64;
                x[i] = (st.u64_at(2 * j) % v) as u32;
                y[i] = (st.u64_at(2 * j + 1) % v) as u32;
            }
            model.zero_grad();
            model.forward(&x, &y)?;
            let lg = model.logits().unwrap_or(&[]);
            logits[k][wi] = (lg.iter().map(|&z| (z as f64).powi(2)).sum::<f64>()
                / lg.len().max(1) as f64)
                .sqrt();
            resid[k][wi] = *model.residual_rms().last().unwrap_or(&0.0);
            if k < steps {
                model.backward(1.0)?;
                crate::optim::clip_grad_norm(&mut model.grads, rc.optim.grad_clip);
                opt.update(&mut model.params, &model.grads, lr);
            }
        }
    }
    Ok(CoordSeries {
        parametrisation: scheme.to_string(),
        widths: widths.to_vec(),
        logit_slope: log_slope(widths, &logits[steps]),
        resid_slope: log_slope(widths, &resid[steps]),
        logits,
        resid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_words_name_the_direction() {
        assert_eq!(slope_word(0.1), "flat");
        assert_eq!(slope_word(-0.61), "shrinks with width");
        assert_eq!(slope_word(0.5), "grows with width");
    }

    #[test]
    fn slope_of_a_power_law() {
        let w = [64, 128, 256];
        let y: Vec<f64> = w.iter().map(|&x| 3.0 * (x as f64).powf(0.5)).collect();
        assert!((log_slope(&w, &y) - 0.5).abs() < 1e-12);
    }
}
