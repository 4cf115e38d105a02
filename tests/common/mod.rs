//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Largest absolute difference, with a label in the failure message.
pub fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32, label: &str) -> f32 {
    assert_eq!(actual.len(), expected.len(), "{label}: length differs");
    let mut worst = 0f32;
    let mut worst_at = 0;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let diff = (a - e).abs();
        assert!(
            diff.is_finite(),
            "{label}: non-finite value at {i}: {a} vs {e}"
        );
        if diff > worst {
            worst = diff;
            worst_at = i;
        }
    }
    assert!(
        worst <= tolerance,
        "{label}: max |diff| {worst:e} at flat index {worst_at} ({} vs {}) exceeds {tolerance:e}",
        actual[worst_at],
        expected[worst_at]
    );
    worst
}
