//! Training curves: read `metrics.jsonl` and render it as one SVG.
//!
//! The training loop appends one JSON object per line to `metrics.jsonl`, either
//! `{"kind":"train","step":N,"loss":..,"kl":..,...}` or `{"kind":"eval","step":N,"eval_kl":..,...}`
//! ([`MetricLine`] serialises to exactly that). [`read_metrics`] reads such a file tolerantly:
//! unknown keys are ignored, unknown `kind`s are skipped, a missing or `null` number (serde_json
//! writes a NaN as `null`) reads as NaN, and a line that does not parse — a run killed mid-write
//! leaves a partial last line — is skipped with a warning naming `file:line`.
//!
//! [`plot_metrics`] draws three stacked panels over one shared step axis: loss / KL / compression
//! loss (log scale when they span more than two decades) with eval KL points, compression ratio
//! (train, target, eval), and the fraction of KV entries closed (train, eval). The SVG needs no
//! font files: text is left to the viewer's sans-serif font.

use std::fs;
use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result, bail};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Deserializer, Serialize};

/// One `kind: "train"` line of `metrics.jsonl`. Numbers that were missing or `null` are NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
    pub step: u64,
    /// Total loss (KL + compression loss).
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub loss: f64,
    /// Distillation KL(teacher || student), per token.
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub kl: f64,
    /// The compression hinge term.
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub compression_loss: f64,
    /// Fraction of KV entries the eviction decisions closed, in [0, 1].
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub frac_closed: f64,
    /// Compression ratio implied by `frac_closed` on this batch.
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub train_cr: f64,
    /// The schedule's compression-ratio target at this step.
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub target_cr: f64,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub lr: f64,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub grad_norm: f64,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub tokens_per_s: f64,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub elapsed_s: f64,
}

/// One `kind: "eval"` line of `metrics.jsonl`. Numbers that were missing or `null` are NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: u64,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_kl: f64,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_frac_closed: f64,
    /// Compression ratio measured at inference on held-out data.
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_cr: f64,
}

/// One line of `metrics.jsonl`; `serde_json::to_string` of it is the line format
/// (`{"kind":"train","step":..,...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricLine {
    Train(TrainMetrics),
    Eval(EvalMetrics),
}

impl MetricLine {
    pub fn step(&self) -> u64 {
        match self {
            MetricLine::Train(t) => t.step,
            MetricLine::Eval(e) => e.step,
        }
    }
}

/// What [`plot_metrics`] drew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlotSummary {
    /// Training steps plotted (after a resumed run's repeated steps replaced the old ones).
    pub train_points: usize,
    /// Evaluations plotted (same rule).
    pub eval_points: usize,
    /// The highest step of any plotted line, train or eval.
    pub last_step: Option<u64>,
}

/// The parse target: like [`MetricLine`] but tolerating kinds this version does not know.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum RawLine {
    Train(TrainMetrics),
    Eval(EvalMetrics),
    #[serde(other)]
    Other,
}

fn nan() -> f64 {
    f64::NAN
}

fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Reads every train and eval line of a `metrics.jsonl`, in file order. Blank lines and unknown
/// kinds are skipped silently, unparsable lines with a warning naming `file:line`.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricLine>> {
    let bytes =
        fs::read(path).with_context(|| format!("reading metrics file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let lineno = i + 1;
        let Ok(text) = std::str::from_utf8(raw) else {
            tracing::warn!(
                "{}:{lineno}: skipping a line that is not UTF-8",
                path.display()
            );
            continue;
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<RawLine>(text) {
            Ok(RawLine::Train(t)) => out.push(MetricLine::Train(t)),
            Ok(RawLine::Eval(e)) => out.push(MetricLine::Eval(e)),
            Ok(RawLine::Other) => {
                tracing::debug!(
                    "{}:{lineno}: skipping a line of unknown kind",
                    path.display()
                );
            }
            Err(e) => {
                tracing::warn!(
                    "{}:{lineno}: skipping unparsable metrics line: {e}",
                    path.display()
                );
            }
        }
    }
    Ok(out)
}

/// Renders `metrics` as one SVG at `out` (written atomically: a temporary file in the same folder,
/// then a rename). Errors when the file is missing or holds no training step yet.
///
/// When a step repeats (a run resumed from an earlier checkpoint appends to the same file), the
/// later lines win: every earlier point at or after that step is dropped.
pub fn plot_metrics(metrics: &Path, out: &Path, title: &str) -> Result<PlotSummary> {
    let lines = read_metrics(metrics)?;
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for line in lines {
        match line {
            MetricLine::Train(t) => train.push(t),
            MetricLine::Eval(e) => eval.push(e),
        }
    }
    let train = latest_run(train, |t| t.step);
    let eval = latest_run(eval, |e| e.step);
    if train.is_empty() {
        bail!("no training steps in {} yet", metrics.display());
    }

    let svg = render_svg(&train, &eval, title)?;
    crate::atomic::write_file(out, svg.as_bytes())?;

    let last_step = train
        .iter()
        .map(|t| t.step)
        .chain(eval.iter().map(|e| e.step))
        .max();
    Ok(PlotSummary {
        train_points: train.len(),
        eval_points: eval.len(),
        last_step,
    })
}

/// Keeps the last run of a file with resumed runs: a step at or below one already kept drops every
/// kept item from that step on.
pub(crate) fn latest_run<T>(items: Vec<T>, step: impl Fn(&T) -> u64) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        let s = step(&item);
        while out.last().is_some_and(|last| step(last) >= s) {
            out.pop();
        }
        out.push(item);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 900;
/// More training points than this are averaged in buckets of consecutive steps.
const MAX_LINE_POINTS: usize = 2000;
/// A log axis shows at most this many decades below its maximum.
const MAX_DECADES: f64 = 8.0;
const FONT: &str = "sans-serif";
/// Each panel's legend sits in a column right of its plot, so it never hides a curve.
const LEGEND_WIDTH: u32 = 250;

// Matplotlib's "tab10" colours: distinct and readable on white.
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const GREY: RGBColor = RGBColor(90, 90, 90);

/// A line series; it is drawn split at points the axis cannot show (non-finite, or <= 0 on a log
/// axis), so gaps stay gaps.
struct Line {
    label: &'static str,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// A scatter series (evaluations).
struct Dots {
    label: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

enum YAxis {
    Linear(Range<f64>),
    Log(Range<f64>),
}

struct Panel {
    y_desc: String,
    y: YAxis,
    lines: Vec<Line>,
    dots: Vec<Dots>,
}

fn render_svg(train: &[TrainMetrics], eval: &[EvalMetrics], title: &str) -> Result<String> {
    let steps = || {
        train
            .iter()
            .map(|t| t.step)
            .chain(eval.iter().map(|e| e.step))
    };
    let x_lo = steps().min().unwrap_or(0) as f64;
    let mut x_hi = steps().max().unwrap_or(0) as f64;
    if x_hi <= x_lo {
        x_hi = x_lo + 1.0;
    }
    let x = x_lo..x_hi;
    let series = Series {
        train,
        eval,
        bucket: train.len().div_ceil(MAX_LINE_POINTS).max(1),
    };
    let panels = [loss_panel(&series), cr_panel(&series), frac_panel(&series)];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 30).into_font().color(&BLACK))?;
        // The bottom panel also carries the "step" axis description.
        let h = body.dim_in_pixel().1 as i32;
        let panel_h = (h - 30) / 3;
        let areas = body.split_by_breakpoints::<i32, i32, _, _>([], [panel_h, 2 * panel_h]);
        let last = areas.len() - 1;
        for (i, (area, panel)) in areas.iter().zip(panels).enumerate() {
            let (plot_area, legend_area) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
            draw_panel(&plot_area, x.clone(), &panel, i == last)?;
            draw_legend(&legend_area, &panel)?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// The metrics as plot points: training lines (bucketed) and evaluation dots.
struct Series<'a> {
    train: &'a [TrainMetrics],
    eval: &'a [EvalMetrics],
    bucket: usize,
}

impl Series<'_> {
    fn line(&self, f: fn(&TrainMetrics) -> f64) -> Vec<(f64, f64)> {
        bucketed(self.train, self.bucket, f)
    }

    fn dots(&self, f: fn(&EvalMetrics) -> f64) -> Vec<(f64, f64)> {
        self.eval
            .iter()
            .map(|e| (e.step as f64, f(e)))
            .filter(|p| p.1.is_finite())
            .collect()
    }
}

/// Losses: total, KL, compression, held-out KL.
fn loss_panel(series: &Series) -> Panel {
    let loss = series.line(|t| t.loss);
    let kl = series.line(|t| t.kl);
    let comp = series.line(|t| t.compression_loss);
    let eval_kl = series.dots(|e| e.eval_kl);
    let all = loss
        .iter()
        .chain(&kl)
        .chain(&comp)
        .chain(&eval_kl)
        .map(|p| p.1);
    let y1 = loss_axis(all);
    Panel {
        y_desc: match y1 {
            YAxis::Log(_) => "loss, KL (log scale)".into(),
            YAxis::Linear(_) => "loss, KL".into(),
        },
        lines: vec![
            Line {
                label: "loss",
                color: BLUE,
                dashed: false,
                points: loss,
            },
            Line {
                label: "KL",
                color: ORANGE,
                dashed: false,
                points: kl,
            },
            Line {
                label: "compression loss",
                color: GREEN_,
                dashed: false,
                points: comp,
            },
        ],
        dots: vec![Dots {
            label: "eval KL",
            color: RED_,
            points: eval_kl,
        }],
        y: y1,
    }
}

/// The compression ratio: achieved in training, scheduled, measured on held-out text.
fn cr_panel(series: &Series) -> Panel {
    let train_cr = series.line(|t| t.train_cr);
    let target_cr = series.line(|t| t.target_cr);
    let eval_cr = series.dots(|e| e.eval_cr);
    let cr_max = train_cr
        .iter()
        .chain(&target_cr)
        .chain(&eval_cr)
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    let cr_min = train_cr
        .iter()
        .chain(&target_cr)
        .chain(&eval_cr)
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min);
    let cr_lo = if cr_min.is_finite() {
        cr_min.min(1.0)
    } else {
        1.0
    };
    let cr_hi = if cr_max.is_finite() {
        cr_max.max(cr_lo)
    } else {
        cr_lo
    };
    let cr_pad = ((cr_hi - cr_lo) * 0.08).max(0.25);
    Panel {
        y_desc: "compression ratio".into(),
        y: YAxis::Linear((cr_lo - if cr_lo < 1.0 { cr_pad } else { 0.0 })..(cr_hi + cr_pad)),
        lines: vec![
            Line {
                label: "train CR",
                color: BLUE,
                dashed: false,
                points: train_cr,
            },
            Line {
                label: "target CR",
                color: GREY,
                dashed: true,
                points: target_cr,
            },
        ],
        dots: vec![Dots {
            label: "eval CR",
            color: RED_,
            points: eval_cr,
        }],
    }
}

/// The fraction of KV entries closed.
fn frac_panel(series: &Series) -> Panel {
    Panel {
        y_desc: "fraction closed".into(),
        y: YAxis::Linear(0.0..1.0),
        lines: vec![Line {
            label: "frac closed",
            color: PURPLE,
            dashed: false,
            points: series.line(|t| t.frac_closed),
        }],
        dots: vec![Dots {
            label: "eval frac closed",
            color: RED_,
            points: series.dots(|e| e.eval_frac_closed),
        }],
    }
}

/// Averages consecutive training points in buckets of `bucket` (1 = every point); a bucket's step
/// is its last step, its value the mean of its finite values (NaN if none).
fn bucketed(train: &[TrainMetrics], bucket: usize, f: fn(&TrainMetrics) -> f64) -> Vec<(f64, f64)> {
    train
        .chunks(bucket)
        .map(|c| {
            let step = c.last().map_or(0, |t| t.step) as f64;
            let (sum, n) = c
                .iter()
                .map(f)
                .filter(|v| v.is_finite())
                .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
            (step, if n == 0 { f64::NAN } else { sum / n as f64 })
        })
        .collect()
}

/// Log scale when the positive values span more than two decades, else linear from
/// min(0, lowest) to the highest value.
fn loss_axis(values: impl Iterator<Item = f64>) -> YAxis {
    let finite: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    let pos_max = finite
        .iter()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(f64::NEG_INFINITY, f64::max);
    let pos_min = finite
        .iter()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min);
    if pos_max.is_finite() && pos_min.is_finite() && pos_max / pos_min > 100.0 {
        // A little headroom past the extremes, but no empty decade.
        let hi = pos_max.log10() + 0.1;
        let lo = (pos_min.log10() - 0.1).max(hi - MAX_DECADES);
        return YAxis::Log(10f64.powf(lo)..10f64.powf(hi));
    }
    let lo = finite.iter().copied().fold(0.0, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let hi = if hi.is_finite() && hi > lo {
        hi
    } else {
        lo + 1.0
    };
    YAxis::Linear(lo..hi + (hi - lo) * 0.05)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    x: Range<f64>,
    panel: &Panel,
    bottom: bool,
) -> Result<()> {
    match &panel.y {
        YAxis::Linear(r) => {
            let keep = |v: f64| v.is_finite();
            draw_panel_on(area, x, r.clone(), panel, bottom, keep, r.clone())
        }
        YAxis::Log(r) => {
            let lo = r.start;
            let keep = move |v: f64| v.is_finite() && v >= lo;
            draw_panel_on(
                area,
                x,
                r.clone().log_scale(),
                panel,
                bottom,
                keep,
                r.clone(),
            )
        }
    }
}

/// Splits a line at the points `keep` rejects, so gaps stay gaps.
fn segments(points: &[(f64, f64)], keep: impl Fn(f64) -> bool) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut cur = Vec::new();
    for &p in points {
        if keep(p.1) {
            cur.push(p);
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn draw_panel_on<Y>(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    x: Range<f64>,
    y: Y,
    panel: &Panel,
    bottom: bool,
    keep: impl Fn(f64) -> bool + Copy,
    y_range: Range<f64>,
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let log = matches!(panel.y, YAxis::Log(_));
    let mut chart = ChartBuilder::on(area)
        .margin_top(8)
        .margin_bottom(4)
        .margin_left(10)
        .margin_right(24)
        .x_label_area_size(if bottom { 50 } else { 24 })
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)?;

    let x_fmt = |v: &f64| format_step(*v);
    let y_fmt = |v: &f64| format_value(*v, log);
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(12)
        .y_labels(6)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(200, 200, 200))
        .y_desc(panel.y_desc.as_str());
    if bottom {
        mesh.x_desc("step");
    }
    mesh.draw()?;

    let in_range = |v: f64| keep(v) && v <= y_range.end * 1.0001;
    for l in &panel.lines {
        let style = l.color.stroke_width(2);
        let segs = segments(&l.points, keep);
        // Lone points would not show as a path: mark them.
        let singles: Vec<(f64, f64)> = segs.iter().filter(|s| s.len() == 1).map(|s| s[0]).collect();
        if l.dashed {
            chart.draw_series(
                segs.into_iter()
                    .map(|s| DashedPathElement::new(s, 8, 5, style)),
            )?;
        } else {
            chart.draw_series(segs.into_iter().map(|s| PathElement::new(s, style)))?;
        }
        chart.draw_series(
            singles
                .into_iter()
                .filter(|p| in_range(p.1))
                .map(|p| Circle::new(p, 2, l.color.filled())),
        )?;
    }
    for d in &panel.dots {
        let color = d.color.filled();
        chart.draw_series(
            d.points
                .iter()
                .copied()
                .filter(|p| in_range(p.1))
                .map(|p| Circle::new(p, 5, color)),
        )?;
    }
    Ok(())
}

/// The legend column: a sample of each series, its name, and its latest value.
fn draw_legend(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: &Panel) -> Result<()> {
    let name_style = (FONT, 17)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let value_style = (FONT, 17)
        .into_font()
        .color(&GREY)
        .pos(Pos::new(HPos::Right, VPos::Center));
    let last = |pts: &[(f64, f64)]| pts.iter().rev().map(|p| p.1).find(|v| v.is_finite());
    // (colour, Some(dashed) for a line / None for dots, name, latest value)
    let rows = panel
        .lines
        .iter()
        .map(|l| (l.color, Some(l.dashed), l.label, last(&l.points)))
        .chain(
            panel
                .dots
                .iter()
                .map(|d| (d.color, None, d.label, last(&d.points))),
        );
    for (i, (color, dashed, name, value)) in rows.enumerate() {
        let y = 22 + 26 * i as i32;
        let style = color.stroke_width(2);
        let sample = vec![(8, y), (36, y)];
        match dashed {
            Some(true) => area.draw(&DashedPathElement::new(sample, 6, 3, style))?,
            Some(false) => area.draw(&PathElement::new(sample, style))?,
            None => area.draw(&Circle::new((22, y), 5, color.filled()))?,
        }
        area.draw(&Text::new(name, (44, y), name_style.clone()))?;
        if let Some(v) = value {
            let right = LEGEND_WIDTH as i32 - 12;
            area.draw(&Text::new(
                format_value(v, false),
                (right, y),
                value_style.clone(),
            ))?;
        }
    }
    Ok(())
}

/// Step tick labels: integers, with k / M for large ones.
fn format_step(v: f64) -> String {
    let v = v.round();
    if v.abs() >= 1e6 {
        trim_float(format!("{:.2}", v / 1e6)) + "M"
    } else if v.abs() >= 1e4 {
        trim_float(format!("{:.1}", v / 1e3)) + "k"
    } else {
        format!("{v:.0}")
    }
}

/// Value tick labels: short decimals, or `1e-3` style for very small/large values and log axes.
fn format_value(v: f64, log: bool) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if log && !(0.01..1000.0).contains(&a) || !log && !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        // "1.0e-3" -> "1e-3"
        return s.replace(".0e", "e");
    }
    trim_float(format!("{v:.3}"))
}

fn trim_float(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn train_line(step: u64, loss: f64, kl: f64, frac: f64, target: f64) -> String {
        let cr = 1.0 / (1.0 - frac);
        format!(
            r#"{{"kind":"train","step":{step},"loss":{loss},"kl":{kl},"compression_loss":{c},"frac_closed":{frac},"train_cr":{cr},"target_cr":{target},"lr":0.0001,"grad_norm":1.5,"tokens_per_s":1234.5,"elapsed_s":{e},"future_key":"ignored"}}"#,
            c = loss - kl,
            e = step as f64 * 0.5,
        )
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    /// A synthetic run: steps 0..n, an eval every 25 steps, a partial final line.
    fn synthetic(n: u64) -> String {
        let mut s = String::new();
        for step in 0..n {
            let t = step as f64 / n as f64;
            let kl = 1e-4 + 0.3 * t * (1.0 + 0.2 * (step as f64 * 0.7).sin());
            let comp = 2.0 * (1.0 - t).powi(2) + 1e-3;
            let frac = 0.875 * t.min(0.9) / 0.9 * (0.97 + 0.03 * (step as f64).cos());
            let target = 1.0 + 7.0 * t.min(0.9) / 0.9;
            s += &train_line(step, kl + comp, kl, frac, target);
            s.push('\n');
            if step % 25 == 24 {
                s += &format!(
                    r#"{{"kind":"eval","step":{step},"eval_kl":{},"eval_frac_closed":{},"eval_cr":{}}}"#,
                    kl * 1.1,
                    frac * 0.98,
                    1.0 / (1.0 - frac * 0.98)
                );
                s.push('\n');
            }
        }
        s += r#"{"kind":"train","step":99999,"loss":0.5,"kl":0."#; // killed mid-write
        s
    }

    #[test]
    fn plots_a_synthetic_run() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = write(dir.path(), "metrics.jsonl", &synthetic(200));
        let out = dir.path().join("plots/curves.svg");
        let summary = plot_metrics(&metrics, &out, "SmolLM2-135M → DMS CR 8").unwrap();
        assert_eq!(
            summary,
            PlotSummary {
                train_points: 200,
                eval_points: 8,
                last_step: Some(199)
            }
        );
        let svg = fs::read_to_string(&out).unwrap();
        assert!(svg.contains("<svg"), "not an SVG");
        for name in [
            "loss",
            "KL",
            "compression loss",
            "eval KL",
            "train CR",
            "target CR",
            "eval CR",
            "frac closed",
            "eval frac closed",
            "step",
            "compression ratio",
            "SmolLM2-135M → DMS CR 8",
        ] {
            assert!(
                svg.contains(&format!(">\n{name}\n</text>")),
                "legend/label {name:?} missing"
            );
        }
        assert!(
            svg.contains("(log scale)"),
            "losses spanning 4 decades should be on a log axis"
        );
        // No temporary file left behind.
        let left: Vec<_> = fs::read_dir(out.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn reads_lines_tolerantly() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}\n\n{}\n{}\nnot json\n{}\n{{\"kind\":\"eval\",\"step\":3,\"eval_kl\":0.01,\"eval_frac_closed\":0.5,\"eval_cr\":2.0,\"extra\":[1,2]}}\n{}",
            train_line(1, 1.0, 0.1, 0.0, 1.0),
            r#"{"kind":"train","step":2,"loss":null,"kl":0.2}"#,
            r#"{"kind":"header","model":"x"}"#,
            train_line(3, 0.9, 0.2, 0.5, 2.0),
            r#"{"kind":"eval","step":4,"eval_kl":0.0"#,
        );
        let lines = read_metrics(&write(dir.path(), "m.jsonl", &text)).unwrap();
        assert_eq!(lines.len(), 4);
        let MetricLine::Train(t2) = &lines[1] else {
            panic!("{:?}", lines[1])
        };
        assert_eq!(t2.step, 2);
        assert!(
            t2.loss.is_nan() && t2.frac_closed.is_nan(),
            "null and missing read as NaN"
        );
        assert_eq!(t2.kl, 0.2);
        let MetricLine::Eval(e) = &lines[3] else {
            panic!("{:?}", lines[3])
        };
        assert_eq!((e.step, e.eval_cr), (3, 2.0));
        assert_eq!(
            lines.iter().map(MetricLine::step).collect::<Vec<_>>(),
            [1, 2, 3, 3]
        );
    }

    #[test]
    fn metric_line_round_trips_as_the_line_format() {
        let line = MetricLine::Eval(EvalMetrics {
            step: 7,
            eval_kl: 0.5,
            eval_frac_closed: 0.75,
            eval_cr: 4.0,
        });
        let s = serde_json::to_string(&line).unwrap();
        assert!(s.starts_with(r#"{"kind":"eval","step":7"#), "{s}");
        assert_eq!(serde_json::from_str::<MetricLine>(&s).unwrap(), line);
    }

    #[test]
    fn resumed_run_replaces_repeated_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for step in [0, 1, 2, 3, 4, 2, 3, 4, 5] {
            text += &train_line(step, 1.0, 0.5, 0.1, 1.0);
            text.push('\n');
        }
        let metrics = write(dir.path(), "metrics.jsonl", &text);
        let s = plot_metrics(&metrics, &dir.path().join("p.svg"), "resumed").unwrap();
        assert_eq!(
            s,
            PlotSummary {
                train_points: 6,
                eval_points: 0,
                last_step: Some(5)
            }
        );
    }

    #[test]
    fn single_step_and_linear_scale_plot() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = write(
            dir.path(),
            "m.jsonl",
            &(train_line(0, 1.0, 0.5, 0.0, 1.0) + "\n"),
        );
        let out = dir.path().join("p.svg");
        let s = plot_metrics(&metrics, &out, "one step").unwrap();
        assert_eq!(
            s,
            PlotSummary {
                train_points: 1,
                eval_points: 0,
                last_step: Some(0)
            }
        );
        let svg = fs::read_to_string(&out).unwrap();
        assert!(svg.contains("<svg") && !svg.contains("(log scale)"));
        assert!(svg.contains("<circle"), "a lone point is marked");
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/metrics.jsonl");
        let err = plot_metrics(&missing, &dir.path().join("p.svg"), "t").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(!dir.path().join("p.svg").exists());
    }

    #[test]
    fn no_training_steps_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.svg");
        for (name, text) in [
            ("empty.jsonl", String::new()),
            (
                "partial.jsonl",
                r#"{"kind":"train","step":0,"lo"#.to_string(),
            ),
            (
                "eval-only.jsonl",
                r#"{"kind":"eval","step":0,"eval_kl":0.1,"eval_frac_closed":0,"eval_cr":1}"#
                    .to_string(),
            ),
        ] {
            let metrics = write(dir.path(), name, &text);
            let msg = format!("{:#}", plot_metrics(&metrics, &out, "t").unwrap_err());
            assert_eq!(
                msg,
                format!("no training steps in {} yet", metrics.display())
            );
        }
        assert!(!out.exists());
    }

    #[test]
    fn many_points_are_bucketed() {
        let train: Vec<TrainMetrics> = (0..10_001)
            .map(|s| TrainMetrics {
                step: s,
                loss: s as f64,
                kl: f64::NAN,
                compression_loss: 0.0,
                frac_closed: 0.0,
                train_cr: 1.0,
                target_cr: 1.0,
                lr: 0.0,
                grad_norm: 0.0,
                tokens_per_s: 0.0,
                elapsed_s: 0.0,
            })
            .collect();
        let bucket = train.len().div_ceil(MAX_LINE_POINTS);
        let pts = bucketed(&train, bucket, |t| t.loss);
        assert!(pts.len() <= MAX_LINE_POINTS);
        assert_eq!(pts[0], (5.0, 2.5));
        assert_eq!(pts.last().unwrap().0, 10_000.0);
        assert!(
            bucketed(&train, bucket, |t| t.kl)
                .iter()
                .all(|p| p.1.is_nan())
        );
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(format_step(12_000.0), "12k");
        assert_eq!(format_step(950.0), "950");
        assert_eq!(format_step(2_500_000.0), "2.5M");
        assert_eq!(format_value(0.001, true), "1e-3");
        assert_eq!(format_value(0.25, false), "0.25");
        assert_eq!(format_value(8.0, false), "8");
        assert_eq!(format_value(0.0, true), "0");
    }
}
