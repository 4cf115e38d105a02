//! The compression-ratio schedule (spec §3.3): linear in the step, then flat.

use serde::{Deserialize, Serialize};

/// `CR(step) = cr_start + (cr_final - cr_start) * min(step / final_step, 1)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompressionSchedule {
    pub cr_start: f64,
    pub cr_final: f64,
    pub final_step: u64,
}

impl CompressionSchedule {
    /// A schedule given as steps per unit of CR (paper: 100; official recipe: 34).
    pub fn from_steps_per_cr(cr_start: f64, cr_final: f64, steps_per_cr: f64) -> Self {
        Self {
            cr_start,
            cr_final,
            final_step: ((cr_final - cr_start) * steps_per_cr).round().max(0.0) as u64,
        }
    }

    pub fn compression_ratio(&self, step: u64) -> f64 {
        let progress = if self.final_step == 0 {
            1.0
        } else {
            (step as f64 / self.final_step as f64).min(1.0)
        };
        self.cr_start + (self.cr_final - self.cr_start) * progress
    }

    /// The fraction of evicted (key, head) decisions the compression loss asks for: `1 - 1/CR`.
    pub fn target_fraction(&self, step: u64) -> f64 {
        1.0 - 1.0 / self.compression_ratio(step)
    }

    /// The first step at which the scheduled CR reaches `cr` (for saving a model per integer CR).
    pub fn step_reaching(&self, cr: f64) -> Option<u64> {
        if cr > self.cr_final.max(self.cr_start) {
            return None;
        }
        if cr <= self.cr_start {
            return Some(0);
        }
        let fraction = (cr - self.cr_start) / (self.cr_final - self.cr_start);
        Some((fraction * self.final_step as f64 - 1e-9).ceil() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_recipe_reaches_cr8_at_step_238() {
        let s = CompressionSchedule::from_steps_per_cr(1.0, 16.0, 34.0);
        assert_eq!(s.final_step, 510);
        assert_eq!(s.compression_ratio(0), 1.0);
        assert!((s.compression_ratio(238) - 8.0).abs() < 1e-12);
        assert_eq!(s.compression_ratio(10_000), 16.0);
        assert_eq!(s.step_reaching(8.0), Some(238));
        assert_eq!(s.step_reaching(17.0), None);
        assert!((s.target_fraction(238) - 0.875).abs() < 1e-12);
    }

    #[test]
    fn schedule_is_monotone() {
        let s = CompressionSchedule {
            cr_start: 1.0,
            cr_final: 8.0,
            final_step: 700,
        };
        let mut last = 0.0;
        for step in 0..1000 {
            let t = s.target_fraction(step);
            assert!(t >= last);
            last = t;
        }
    }
}
