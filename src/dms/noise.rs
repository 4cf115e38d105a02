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
    ///
    /// Large draws are split over the CPU's threads (same values): a step's noise is one sample
    /// per layer, KV head and token (917K for Qwen3-1.7B at 4K tokens), four logarithms each, and
    /// drawn serially it took ~35 ms of host time ahead of every step's teacher pass.
    pub fn logistic(&self, count: usize) -> Vec<f32> {
        const PER_THREAD_MIN: usize = 1 << 16;
        let stream = self.stream();
        let mut out = vec![0f32; count];
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(count.div_ceil(PER_THREAD_MIN))
            .max(1);
        if threads == 1 {
            fill_logistic(stream, 0, &mut out);
            return out;
        }
        let chunk = count.div_ceil(threads);
        std::thread::scope(|scope| {
            for (index, part) in out.chunks_mut(chunk).enumerate() {
                scope.spawn(move || fill_logistic(stream, (index * chunk) as u64, part));
            }
        });
        out
    }
}

/// Samples `first ..` of the stream into `out`.
fn fill_logistic(stream: u64, first: u64, out: &mut [f32]) {
    let uniform = |counter: u64| {
        // 53 random bits -> (0, 1), never exactly 0 or 1.
        ((mix(stream ^ mix(counter)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let gumbel = |u: f64| -(-u.ln()).ln();
    for (i, slot) in (first..).zip(out.iter_mut()) {
        let noise = gumbel(uniform(2 * i)) - gumbel(uniform(2 * i + 1));
        *slot = bf16::from_f64(noise).to_f32();
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

    /// The threaded draw is the serial one, sample for sample, at every split.
    #[test]
    fn threaded_draw_equals_the_serial_one() {
        let key = NoiseKey {
            seed: 1,
            step: 9,
            micro_batch: 2,
            rank: 0,
        };
        for count in [1, 65_536, 65_537, 300_001] {
            let mut serial = vec![0f32; count];
            fill_logistic(key.stream(), 0, &mut serial);
            assert_eq!(key.logistic(count), serial, "count {count}");
        }
    }
}
