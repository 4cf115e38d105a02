//! Every shipped recipe parses and validates; the official-settings recipes keep those settings.

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
    assert!(n >= 6, "expected the six shipped recipes, found {n}");
}

#[test]
fn official_recipes_keep_the_official_settings() {
    for name in [
        "qwen3-8b.toml",
        "llama3-8b.toml",
        "llama3.2-1b.toml",
        "qwen2.5-7b.toml",
    ] {
        let r = recipe(name);
        assert_eq!(r.dms.variant, Variant::Adapter, "{name}");
        assert_eq!(r.dms.granularity, Granularity::Head, "{name}");
        assert_eq!(r.dms.window, 512, "{name}");
        assert_eq!(r.train.lr, 3e-5, "{name}");
        assert_eq!(r.train.betas, [0.9, 0.95], "{name}");
        assert_eq!(r.train.trainable, Trainable::Adapter, "{name}");
        let s = r.dms.schedule();
        assert_eq!(
            (s.cr_start, s.cr_final, s.final_step),
            (1.0, 16.0, 510),
            "{name}"
        );
    }
}
