//! Counter-based random numbers: value i of a stream is a pure function of (seed, stream, i),
//! so a tensor's values do not depend on thread count or on which other tensors exist.

/// SplitMix64 finaliser: a strong 64-bit mixing function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// Stable 64-bit hash of a name (FNV-1a, then mixed): tensors are keyed by HF name.
pub fn hash_name(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    mix64(h)
}

/// One random stream: `u64_at(i)` is random access.
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    key: u64,
}

impl Stream {
    pub fn new(seed: u64, stream: u64) -> Self {
        Stream {
            key: mix64(seed ^ mix64(stream.wrapping_add(0x9E3779B97F4A7C15))),
        }
    }

    #[inline]
    pub fn u64_at(&self, i: u64) -> u64 {
        mix64(
            self.key
                ^ mix64(
                    i.wrapping_mul(0x9E3779B97F4A7C15)
                        .wrapping_add(0x632BE59BD9B4E019),
                ),
        )
    }

    /// Uniform in [0, 1) with 53 bits.
    #[inline]
    pub fn uniform_at(&self, i: u64) -> f64 {
        (self.u64_at(i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal via Box–Muller on two uniforms derived from counter i (f64 math).
    #[inline]
    pub fn normal_at(&self, i: u64) -> f64 {
        let u1 = (self.u64_at(2 * i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = self.uniform_at(2 * i + 1);
        let r = (-2.0 * (1.0 - u1).ln()).sqrt(); // 1-u1 in (0, 1]: no log(0)
        r * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments() {
        let s = Stream::new(42, 7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|i| s.normal_at(i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / var / var - 3.0;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        assert!(kurt.abs() < 0.05, "excess kurtosis {kurt}");
        let u: f64 = (0..n).map(|i| s.uniform_at(i)).sum::<f64>() / n as f64;
        assert!((u - 0.5).abs() < 0.005);
    }

    #[test]
    fn streams_differ_and_are_reproducible() {
        let a = Stream::new(1, hash_name("a"));
        let b = Stream::new(1, hash_name("b"));
        assert_ne!(a.u64_at(0), b.u64_at(0));
        assert_eq!(a.u64_at(5), Stream::new(1, hash_name("a")).u64_at(5));
        assert_ne!(a.u64_at(5), Stream::new(2, hash_name("a")).u64_at(5));
    }
}
