//! Seeded sampling: greedy, temperature and nucleus (top-p).

/// SplitMix64: a small deterministic generator (reproducible across platforms and versions).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token: argmax when `temperature == 0`, else a draw from the softmax at
/// `temperature`, restricted to the smallest set of tokens whose probability reaches `top_p`.
///
/// The nucleus is found among the most likely tokens only (a partial selection that widens until
/// it holds `top_p` of the mass), not by sorting the vocabulary: with 49K-entry vocabularies and a
/// batch of hundreds of rows, a full sort per row per step was most of `gen-data`'s time. Ties are
/// broken by token id, so the draw is the one a stable full sort would give.
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .expect("non-empty logits")
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let kept = nucleus(&mut probs, total, top_p);
    let kept_total: f64 = kept.iter().map(|p| p.1).sum();
    let mut draw = rng.next_f64() * kept_total;
    for (i, p) in kept {
        draw -= p;
        if draw <= 0.0 {
            return *i as u32;
        }
    }
    kept.last().map(|(i, _)| *i as u32).unwrap_or_else(argmax)
}

/// The smallest prefix of `probs` in descending order (ties by ascending index) whose mass
/// reaches `top_p` of `total`. Reorders `probs`; only the prefix it returns is sorted.
fn nucleus(probs: &mut [(usize, f64)], total: f64, top_p: f64) -> &[(usize, f64)] {
    let order = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut head = 64.min(probs.len());
    loop {
        if head < probs.len() {
            probs.select_nth_unstable_by(head, order);
        }
        probs[..head].sort_unstable_by(order);
        let mut mass = 0.0;
        for (taken, (_, p)) in probs[..head].iter().enumerate() {
            mass += p / total;
            if mass >= top_p {
                return &probs[..=taken];
            }
        }
        if head == probs.len() {
            // Rounding kept the sum under top_p: everything is in the nucleus.
            return probs;
        }
        head = (head * 4).min(probs.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_p_and_seeds() {
        let logits = [0.0, 5.0, 1.0, 4.9];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, 0.0, 1.0, &mut rng), 1);
        // top_p small: only the best token survives.
        for _ in 0..20 {
            assert_eq!(sample(&logits, 1.0, 0.1, &mut rng), 1);
        }
        let draws = |seed| {
            let mut rng = Rng::new(seed);
            (0..30)
                .map(|_| sample(&logits, 1.0, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert!(
            draws(7).contains(&3),
            "a close second token is sampled sometimes"
        );
    }

    /// The partial selection keeps exactly the nucleus a stable full sort gives, ties included.
    #[test]
    fn nucleus_matches_a_full_sort() {
        let mut rng = Rng::new(3);
        for case in 0..200 {
            let len = [1, 5, 63, 64, 65, 300, 5000][case % 7];
            // Coarse values make ties common; some cases are near-flat so the nucleus is wide.
            let flat = case % 3 == 0;
            let probs: Vec<(usize, f64)> = (0..len)
                .map(|i| {
                    let r = (rng.next_f64() * 8.0).floor();
                    (
                        i,
                        if flat {
                            1.0 + r * 1e-3
                        } else {
                            (r * 1.7).exp()
                        },
                    )
                })
                .collect();
            let total: f64 = probs.iter().map(|p| p.1).sum();
            let top_p = [0.1, 0.5, 0.9, 0.999, 1.0][case % 5];
            let mut reference = probs.clone();
            reference.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut mass = 0.0;
            let mut expected = Vec::new();
            for p in reference {
                mass += p.1 / total;
                expected.push(p);
                if mass >= top_p {
                    break;
                }
            }
            let mut work = probs.clone();
            assert_eq!(
                nucleus(&mut work, total, top_p),
                &expected[..],
                "case {case}"
            );
        }
    }
}
