//! Logistic noise for the Gumbel-sigmoid relaxation, as a pure function of
//! (seed, step, micro-batch, rank): a resumed run draws exactly the noise it would have drawn.

use half::bf16;

/// Identifies one draw of noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoiseKey {
    pub seed: u64,
    pub step: u64,
    pub micro_batch: u64,
    pub rank: u64,
}

/// SplitMix64 finaliser: a cheap, well-mixed bijection on u64.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl NoiseKey {
    fn stream(&self) -> u64 {
        [self.step, self.micro_batch, self.rank]
            .iter()
            .fold(mix(self.seed ^ 0x9e37_79b9_7f4a_7c15), |acc, &v| {
                mix(acc ^ mix(v.wrapping_add(0x632b_e59b_d9b4_e019)))
            })
    }

    /// `count` samples of Logistic(0, 1) = Gumbel - Gumbel, rounded through bf16 as the official
    /// implementation samples them. Sample `i` depends only on the key and `i`.
    pub fn logistic(&self, count: usize) -> Vec<f32> {
        let stream = self.stream();
        let uniform = |counter: u64| {
            // 53 random bits -> (0, 1), never exactly 0 or 1.
            ((mix(stream ^ mix(counter)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..count as u64)
            .map(|i| {
                let gumbel = |u: f64| -(-u.ln()).ln();
                let noise = gumbel(uniform(2 * i)) - gumbel(uniform(2 * i + 1));
                bf16::from_f64(noise).to_f32()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_deterministic_and_logistic() {
        let key = NoiseKey {
            seed: 7,
            step: 3,
            micro_batch: 1,
            rank: 0,
        };
        let a = key.logistic(50_000);
        assert_eq!(a, key.logistic(50_000));
        assert_ne!(
            a[..100],
            NoiseKey { step: 4, ..key }.logistic(100)[..],
            "different steps draw different noise"
        );
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        // Logistic(0,1): mean 0, variance pi^2/3 = 3.29.
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 3.29).abs() < 0.1, "variance {var}");
    }
}
