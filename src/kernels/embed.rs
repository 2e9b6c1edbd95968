//! Token embedding lookup.

use rayon::prelude::*;

/// Forward. tokens (N), table (V, C) → out (N, C). Token ids are checked by the caller.
pub fn embed_fwd(out: &mut [f32], tokens: &[u32], table: &[f32], c: usize) {
    out.par_chunks_mut(c)
        .zip(tokens.par_iter())
        .for_each(|(o, &tok)| {
            o.copy_from_slice(&table[tok as usize * c..(tok as usize + 1) * c]);
        });
}

/// Backward. dout (N, C) → dtable (V, C) accumulated at the looked-up rows. Sequential over
/// tokens so repeated ids sum in a fixed order.
pub fn embed_bwd(dtable: &mut [f32], tokens: &[u32], dout: &[f32], c: usize) {
    for (n, &tok) in tokens.iter().enumerate() {
        super::add_inplace(
            &mut dtable[tok as usize * c..(tok as usize + 1) * c],
            &dout[n * c..(n + 1) * c],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_grad, rand_vec};

    #[test]
    fn backward_matches_finite_differences() {
        let (v, c) = (7, 4);
        let tokens = [3u32, 1, 3, 6, 0];
        let table = rand_vec(v * c, 1);
        let g = rand_vec(tokens.len() * c, 2);
        let loss = |t: &[f32]| -> f64 {
            let mut out = vec![0f32; tokens.len() * c];
            embed_fwd(&mut out, &tokens, t, c);
            out.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut dt = vec![0f32; v * c];
        embed_bwd(&mut dt, &tokens, &g, c);
        check_grad("dtable", &mut table.clone(), &dt, loss, 1e-2, 1e-3);
        assert!(
            dt[2 * c..3 * c].iter().all(|x| *x == 0.0),
            "unused row stays zero"
        );
    }
}
