//! Every shipped recipe parses and validates; the big-model recipes keep the official DMS
//! settings, with the trainable set and lr the SmolLM2 campaign supports (docs/quality.md).

use std::path::PathBuf;

use dms_retrofit::dms::{Granularity, Variant};
use dms_retrofit::recipe::{Recipe, Trainable};

fn recipe(name: &str) -> Recipe {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("recipes")
        .join(name);
    Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

#[test]
fn all_shipped_recipes_validate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 7, "expected the seven shipped recipes, found {n}");
}

#[test]
fn official_recipes_keep_the_official_settings() {
    for (name, lr) in [
        ("qwen3-8b.toml", 1e-5),
        ("llama3-8b.toml", 1e-5),
        ("llama3.2-1b.toml", 2e-5),
        ("qwen2.5-7b.toml", 1e-5),
    ] {
        let r = recipe(name);
        assert_eq!(r.dms.variant, Variant::Adapter, "{name}");
        assert_eq!(r.dms.granularity, Granularity::Head, "{name}");
        assert_eq!(r.dms.window, 512, "{name}");
        assert_eq!(r.train.lr, lr, "{name}");
        assert_eq!(r.train.betas, [0.9, 0.95], "{name}");
        assert_eq!(r.train.trainable, Trainable::AdapterAndAttention, "{name}");
        let s = r.dms.schedule();
        assert_eq!(
            (s.cr_start, s.cr_final, s.final_step),
            (1.0, 16.0, 510),
            "{name}"
        );
    }
}

#[test]
fn smollm2_recipes_are_the_campaign_winners() {
    for (name, cr) in [("smollm2-135m.toml", 8.0), ("smollm2-135m-cr4.toml", 4.0)] {
        let r = recipe(name);
        assert_eq!(r.train.trainable, Trainable::AdapterAndAttention, "{name}");
        assert_eq!(r.train.lr, 1e-4, "{name}");
        assert_eq!((r.data.seq_len, r.dms.window), (2048, 256), "{name}");
        assert_eq!(r.train.max_steps, 360, "{name}");
        let s = r.dms.schedule();
        assert_eq!(
            (s.cr_final, s.final_step),
            (cr, (35.0 * (cr - 1.0)) as u64),
            "{name}"
        );
    }
}

#[test]
fn compression_loss_key_parses_and_names_its_values() {
    use dms_retrofit::dms::losses::CompressionLoss;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes/tiny.toml");
    let r = Recipe::load(&path, &["dms.compression_loss=\"two_sided\"".to_string()]).unwrap();
    assert_eq!(r.dms.compression_loss, CompressionLoss::TwoSided);
    assert_eq!(
        recipe("tiny.toml").dms.compression_loss,
        CompressionLoss::Hinge
    );
    let err = format!(
        "{:#}",
        Recipe::load(&path, &["dms.compression_loss=\"both\"".to_string()]).unwrap_err()
    );
    assert!(
        err.contains("compression_loss") && err.contains("two_sided"),
        "{err}"
    );
}
