//! A layer x KV-head heatmap of measured compression ratios (SVG).

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

/// Draws `grid[layer][head]` as coloured cells labelled with their value.
pub fn write_heatmap(grid: &[Vec<f64>], out: &Path, title: &str) -> Result<()> {
    let layers = grid.len();
    let heads = grid.first().map_or(0, Vec::len);
    let cell = 36u32;
    let width = 160 + cell * heads.max(1) as u32;
    let height = 90 + cell * layers.max(1) as u32;
    let max = grid.iter().flatten().cloned().fold(1.0f64, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width.max(420), height)).into_drawing_area();
        root.fill(&WHITE)?;
        root.draw(&Text::new(title.to_string(), (10, 10), ("sans-serif", 15)))?;
        for (l, row) in grid.iter().enumerate() {
            let y = 50 + cell as i32 * l as i32;
            root.draw(&Text::new(
                format!("layer {l}"),
                (10, y + 12),
                ("sans-serif", 12),
            ))?;
            for (h, &cr) in row.iter().enumerate() {
                let x = 80 + cell as i32 * h as i32;
                // White (CR 1) to dark blue (the largest CR).
                let t = ((cr - 1.0) / (max - 1.0).max(1e-9)).clamp(0.0, 1.0);
                let colour = RGBColor(
                    (255.0 * (1.0 - 0.85 * t)) as u8,
                    (255.0 * (1.0 - 0.7 * t)) as u8,
                    255,
                );
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell as i32 - 2, y + cell as i32 - 2)],
                    colour.filled(),
                ))?;
                root.draw(&Text::new(
                    format!("{cr:.1}"),
                    (x + 4, y + 11),
                    ("sans-serif", 11),
                ))?;
            }
        }
        let y = 55 + cell as i32 * layers as i32;
        root.draw(&Text::new(
            format!(
                "KV head 0..{} left to right; darker = more compressed (max {max:.1})",
                heads.saturating_sub(1)
            ),
            (10, y),
            ("sans-serif", 11),
        ))?;
        root.present()?;
    }
    crate::atomic::write_file(out, svg.as_bytes())
}
