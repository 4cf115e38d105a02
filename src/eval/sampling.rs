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
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, p) in probs {
        mass += p / total;
        kept.push((i, p));
        if mass >= top_p {
            break;
        }
    }
    let kept_total: f64 = kept.iter().map(|p| p.1).sum();
    let mut draw = rng.next_f64() * kept_total;
    for (i, p) in &kept {
        draw -= p;
        if draw <= 0.0 {
            return *i as u32;
        }
    }
    kept.last().map(|(i, _)| *i as u32).unwrap_or_else(argmax)
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
}
