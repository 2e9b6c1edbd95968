//! Rotary position embedding, HF "rotate-half" convention: for head dim D and i < D/2,
//! (x[i], x[i+D/2]) is rotated by angle pos · θ^(−2i/D).

use rayon::prelude::*;

/// Cos/sin tables (T_max, D/2), computed in f64 and rounded once.
pub struct RopeTables {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTables {
    pub fn new(max_seq: usize, head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let mut cos = vec![0f32; max_seq * half];
        let mut sin = vec![0f32; max_seq * half];
        for p in 0..max_seq {
            for i in 0..half {
                // HF computes inv_freq and the angle in f32; round the same way so long
                // positions agree with transformers to the last few ulps.
                let expo = (2 * i) as f32 / head_dim as f32;
                let inv = 1.0f32 / (theta.powf(expo as f64) as f32);
                let ang = (p as f32 * inv) as f64;
                cos[p * half + i] = ang.cos() as f32;
                sin[p * half + i] = ang.sin() as f32;
            }
        }
        RopeTables { half, cos, sin }
    }
}

/// Forward, in place. Row r of x (B·T rows, `stride` floats apart) starts with H heads of D
/// (e.g. the query or key columns of a fused qkv buffer); row r is at position r mod T.
pub fn rope_fwd(x: &mut [f32], stride: usize, tab: &RopeTables, t: usize, heads: usize) {
    rotate(x, stride, tab, t, heads, 1.0);
}

/// Backward, in place: dx = Rᵀ·dout (rotation by the negative angle), same layout.
pub fn rope_bwd(dx: &mut [f32], stride: usize, tab: &RopeTables, t: usize, heads: usize) {
    rotate(dx, stride, tab, t, heads, -1.0);
}

fn rotate(x: &mut [f32], stride: usize, tab: &RopeTables, t: usize, heads: usize, sign: f32) {
    let half = tab.half;
    let d = 2 * half;
    // A chunk may run into the next row's other columns; only its first H·D floats are ours.
    x.par_chunks_mut(stride).enumerate().for_each(|(r, row)| {
        let pos = r % t;
        let c = &tab.cos[pos * half..(pos + 1) * half];
        let s = &tab.sin[pos * half..(pos + 1) * half];
        for h in row[..heads * d].chunks_mut(d) {
            let (a, b) = h.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                let si = sign * s[i];
                a[i] = x1 * c[i] - x2 * si;
                b[i] = x2 * c[i] + x1 * si;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_grad, rand_vec};

    #[test]
    fn position_zero_is_identity_and_norm_preserved() {
        let (t, h, d) = (4, 2, 8);
        let tab = RopeTables::new(t, d, 10000.0);
        let x0 = rand_vec(t * h * d, 1);
        let mut x = x0.clone();
        rope_fwd(&mut x, h * d, &tab, t, h);
        assert_eq!(&x[..h * d], &x0[..h * d]);
        let n0: f32 = x0.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        assert_ne!(&x[h * d..], &x0[h * d..]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let tab = RopeTables::new(t, d, 500000.0);
        let x = rand_vec(b * t * h * d, 2);
        let g = rand_vec(b * t * h * d, 3);
        let loss = |x: &[f32]| -> f64 {
            let mut y = x.to_vec();
            rope_fwd(&mut y, h * d, &tab, t, h);
            y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut dx = g.clone();
        rope_bwd(&mut dx, h * d, &tab, t, h);
        check_grad("dx", &mut x.clone(), &dx, loss, 1e-2, 1e-3);
        // strided: heads at column 3 of rows 4 wider; the other columns are untouched
        let stride = h * d + 4;
        let mut wide = vec![7f32; b * t * stride + 3];
        for r in 0..b * t {
            wide[3 + r * stride..3 + r * stride + h * d]
                .copy_from_slice(&x[r * h * d..(r + 1) * h * d]);
        }
        rope_fwd(&mut wide[3..], stride, &tab, t, h);
        let mut y = x.clone();
        rope_fwd(&mut y, h * d, &tab, t, h);
        for r in 0..b * t {
            assert_eq!(
                &wide[3 + r * stride..3 + r * stride + h * d],
                &y[r * h * d..(r + 1) * h * d]
            );
            assert!(wide[3 + r * stride + h * d..3 + (r + 1) * stride]
                .iter()
                .all(|&v| v == 7.0));
        }
    }
}
