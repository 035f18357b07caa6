//! `taper plot`: one line chart that compares metric curves of several training runs, read from
//! their `metrics.jsonl`.
//!
//! The chart is written as PNG or SVG, chosen by the extension of the output path. Text is drawn with DejaVu Sans,
//! embedded into the binary through [`FONT_BYTES`] (Bitstream Vera license, see `fonts/DejaVuSans-LICENSE.txt`), so
//! no system font library (fontconfig, freetype) is needed on the machine that draws. When this file moves, only the
//! `include_bytes!` path in [`FONT_BYTES`] has to follow the font.
//!
//! Data handling, in order: points whose x or y is NaN or infinite are dropped, each series is sorted by x, the
//! optional trailing moving average is taken (on series of at least 4N points), and on a log-scale y axis points with y <= 0 are dropped. With
//! smoothing on, the raw curve is still drawn, faintly (25% opacity, 1 px), in the series' colour under the smoothed
//! one, so spikes that the average hides stay visible; the axis ranges cover both, the legend shows the smoothed line.
//!
//! Layout: legend entries are "run", or "run: metric" when the series do not all share one metric; the y axis is
//! titled with that metric, or "value". The legend goes to the corner the curves cross least.

use std::error::Error;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, ScaleFont};
use plotters::coord::ranged1d::{BoldPoints, DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};

/// The font every label is drawn with. The path is relative to this source file; change it when the file or the
/// font moves. `include_bytes!` only takes a literal, which is why this is the single place to edit.
pub const FONT_BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// Registered under the generic family name so that an SVG viewer without DejaVu installed still falls back to a
/// sans-serif face instead of its default serif one (SVG text is stored as text, not outlines).
const FONT_FAMILY: &str = "sans-serif";

/// Tableau 10: distinct for the first ten runs and still readable for the common forms of colour blindness.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Below this the fixed margins and label areas leave no room for the plot itself.
const MIN_SIZE: (u32, u32) = (200, 150);
/// The bitmap backend keeps the whole image in memory (3 bytes a pixel); this bounds it to about 800 MB.
const MAX_SIDE: u32 = 16_384;
/// Requested number of labelled ticks per axis; the y label area is sized from the labels this produces.
const X_LABELS: usize = 8;
/// Smoothing over N points applies to series of at least this many times N points.
const SPARSE: usize = 4;
const Y_LABELS: usize = 8;

/// One curve: the values of one metric of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub run: String,
    pub metric: String,
    /// `(x, y)`: x is the step or the token count, as [`PlotOptions::x`] says.
    pub points: Vec<(f64, f64)>,
}

/// What the x values of the series count; it only changes the axis label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XAxis {
    #[default]
    Step,
    Tokens,
}

/// How to draw; [`Default`] gives a 1200x700 linear, unsmoothed, untitled chart over steps.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    pub x: XAxis,
    pub log_y: bool,
    /// 0 or 1: no smoothing; N: trailing moving average over the last N points (fewer at the start).
    pub smooth: usize,
    pub title: Option<String>,
    pub width: u32,
    pub height: u32,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions { x: XAxis::Step, log_y: false, smooth: 0, title: None, width: 1200, height: 700 }
    }
}

/// Why [`plot`] drew nothing; the `Display` text is meant for the command line as it is.
#[derive(Debug, Clone, PartialEq)]
pub enum PlotError {
    /// No series (`series == 0`), or none of the `series` has a point with finite x and y.
    NothingToPlot {
        series: usize,
    },
    /// `log_y` was asked for but no finite point has y > 0.
    NoPositiveValues,
    /// The output extension is neither `.png` nor `.svg`; `None` when the path has no extension.
    UnsupportedFormat {
        extension: Option<String>,
    },
    InvalidSize {
        width: u32,
        height: u32,
    },
    /// The embedded font could not be parsed (a wrong or truncated file behind [`FONT_BYTES`]).
    Font,
    /// A run or metric that cannot be read.
    Input(String),
    /// The backend failed, most often while writing the file.
    Draw {
        path: String,
        message: String,
    },
}

impl fmt::Display for PlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlotError::NothingToPlot { series: 0 } => write!(f, "nothing to plot: no series were given"),
            PlotError::NothingToPlot { series } => {
                write!(f, "nothing to plot: all {series} series are empty or hold only NaN/infinite values")
            }
            PlotError::NoPositiveValues => {
                write!(f, "nothing to plot on a log-scale y axis: no series has a finite value above 0")
            }
            PlotError::UnsupportedFormat { extension: Some(ext) } => {
                write!(f, "unsupported output format '.{ext}': use a path ending in .png or .svg")
            }
            PlotError::UnsupportedFormat { extension: None } => {
                write!(f, "the output path has no extension: use a path ending in .png or .svg")
            }
            PlotError::InvalidSize { width, height } => write!(
                f,
                "invalid image size {width}x{height}: width must be {}..={MAX_SIDE} and height {}..={MAX_SIDE} pixels",
                MIN_SIZE.0, MIN_SIZE.1
            ),
            PlotError::Font => write!(f, "the embedded font is not a valid TrueType/OpenType font"),
            PlotError::Input(what) => write!(f, "{what}"),
            PlotError::Draw { path, message } => write!(f, "failed to draw {path}: {message}"),
        }
    }
}

impl Error for PlotError {}

/// The curves of `metrics` in each run dir's `metrics.jsonl`: one series per (run, metric),
/// named by the run dir's last component (the whole path when two runs share it), x the step
/// or the tokens seen. A metric no run logged, a run dir without `metrics.jsonl` or a line that
/// is not JSON is an error naming it.
pub fn read_runs(runs: &[PathBuf], metrics: &[String], x: XAxis) -> Result<Vec<Series>, PlotError> {
    let short = |p: &Path| p.file_name().map_or(p.display().to_string(), |n| n.to_string_lossy().into_owned());
    let mut series = Vec::new();
    for run in runs {
        let path = run.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|e| PlotError::Input(format!("{}: {e}", path.display())))?;
        let unique = runs.iter().filter(|r| short(r) == short(run)).count() == 1;
        let name = if unique { short(run) } else { run.display().to_string() };
        let mut points: Vec<Vec<(f64, f64)>> = vec![Vec::new(); metrics.len()];
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| PlotError::Input(format!("{}:{}: not JSON: {e}", path.display(), n + 1)))?;
            let at = match x {
                XAxis::Step => v["step"].as_f64(),
                XAxis::Tokens => v["tokens"].as_f64(),
            };
            let Some(at) = at else { continue };
            for (m, pts) in metrics.iter().zip(&mut points) {
                if let Some(y) = v.get(m).and_then(serde_json::Value::as_f64) {
                    pts.push((at, y));
                }
            }
        }
        for (m, pts) in metrics.iter().zip(points) {
            if !pts.is_empty() {
                series.push(Series { run: name.clone(), metric: m.clone(), points: pts });
            }
        }
    }
    for m in metrics {
        if !series.iter().any(|s| &s.metric == m) {
            return Err(PlotError::Input(format!("no run logged the metric {m:?}")));
        }
    }
    Ok(series)
}

/// Draws all `series` on one chart and writes it to `out` as PNG or SVG (by extension, case-insensitive).
pub fn plot(series: &[Series], out: &Path, opts: &PlotOptions) -> Result<(), PlotError> {
    let format = Format::from_path(out)?;
    if !(MIN_SIZE.0..=MAX_SIDE).contains(&opts.width) || !(MIN_SIZE.1..=MAX_SIDE).contains(&opts.height) {
        return Err(PlotError::InvalidSize { width: opts.width, height: opts.height });
    }
    let chart = prepare(series, opts)?;
    register_font()?;

    let size = (opts.width, opts.height);
    let draw_err = |message: String| PlotError::Draw { path: out.display().to_string(), message };
    match format {
        Format::Png => {
            let root = GlyphFix { inner: BitMapBackend::new(out, size), font: font()? }.into_drawing_area();
            render(&root, &chart, opts).map_err(|e| draw_err(e.to_string()))?;
            root.present().map_err(|e| draw_err(e.to_string()))
        }
        Format::Svg => {
            let root = SVGBackend::new(out, size).into_drawing_area();
            render(&root, &chart, opts).map_err(|e| draw_err(e.to_string()))?;
            root.present().map_err(|e| draw_err(e.to_string()))
        }
    }
}

/// Trailing moving average: element i is the mean of `ys[i+1-window ..= i]`, or of all earlier values while fewer
/// than `window` exist, so the output has the input's length and starts at the first raw value.
pub fn moving_average(ys: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
    let mut out = Vec::with_capacity(ys.len());
    let mut sum = 0.0;
    for (i, &y) in ys.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= ys[i - window];
        }
        out.push(sum / (i + 1).min(window) as f64);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Svg,
}

impl Format {
    fn from_path(path: &Path) -> Result<Format, PlotError> {
        let ext = path.extension().map(|e| e.to_string_lossy().into_owned());
        match ext.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => Err(PlotError::UnsupportedFormat { extension: ext }),
        }
    }
}

/// plotters keeps fonts in a process-wide table, so registering once is enough and avoids re-parsing on every plot.
fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok =
        *REGISTERED.get_or_init(|| plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES).is_ok());
    ok.then_some(()).ok_or(PlotError::Font)
}

/// The same font for [`GlyphFix`], which rasterizes bitmap text itself.
fn font() -> Result<&'static FontRef<'static>, PlotError> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).ok()).as_ref().ok_or(PlotError::Font)
}

/// plotters 0.3.7 draws ab_glyph text without each glyph's left side bearing, so a bitmap shows "small" as
/// "sm all". This wrapper rasterizes text itself and hands every other call to the wrapped backend unchanged. SVG
/// needs no such fix: it stores text as text and the viewer lays it out.
struct GlyphFix<B> {
    inner: B,
    font: &'static FontRef<'static>,
}

impl<B: DrawingBackend> DrawingBackend for GlyphFix<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<B::ErrorType>> {
        self.inner.estimate_text_size(text, style)
    }

    /// Places the text in the box plotters measured (advances plus kerning, `size / 1.24` high, as plotters'
    /// ab_glyph layout does), so anchors line up, with capitals and digits centred vertically in that box: tick
    /// labels then sit on their grid lines.
    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let (width, height) = self.estimate_text_size(text, style)?;
        let (width, height) = (width as i32, height as i32);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Center => -width / 2,
            HPos::Right => -width,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };

        let font = self.font.as_scaled(style.size() as f32);
        let cap_height = font.outline_glyph(font.scaled_glyph('H')).map_or(font.ascent(), |g| -g.px_bounds().min.y);
        let baseline = (height as f32 + cap_height) / 2.0;
        let mut pixels = Vec::new();
        let mut pen = 0.0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                pen += font.kern(p, id);
            }
            let glyph = id.with_scale_and_position(font.scale(), ab_glyph::point(pen, baseline));
            if let Some(outline) = font.outline_glyph(glyph) {
                let min = outline.px_bounds().min;
                outline
                    .draw(|x, y, coverage| pixels.push((min.x as i32 + x as i32, min.y as i32 + y as i32, coverage)));
            }
            pen += font.h_advance(id);
            prev = Some(id);
        }

        let transform = style.transform();
        let (w, h) = self.get_size();
        for (x, y, coverage) in pixels {
            let (x, y) = transform.transform(x + dx, y + dy);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if coverage > 0.0 && x >= 0 && y >= 0 && x < w as i32 && y < h as i32 {
                let alpha = color.alpha * f64::from(coverage.min(1.0));
                self.inner.draw_pixel((x, y), BackendColor { alpha, rgb: color.rgb })?;
            }
        }
        Ok(())
    }
}

/// One curve ready to draw: `raw` is what survived filtering, `smoothed` is present when smoothing is on.
struct Line {
    label: String,
    color: RGBColor,
    raw: Vec<(f64, f64)>,
    smoothed: Option<Vec<(f64, f64)>>,
}

impl Line {
    /// The curve that carries the legend entry and the full-strength colour.
    fn main(&self) -> &[(f64, f64)] {
        self.smoothed.as_deref().unwrap_or(&self.raw)
    }
}

struct Chart {
    lines: Vec<Line>,
    x: Range<f64>,
    y: ValueAxis,
    y_desc: String,
    legend: SeriesLabelPosition,
}

fn prepare(series: &[Series], opts: &PlotOptions) -> Result<Chart, PlotError> {
    let mut had_finite = false;
    let mut kept: Vec<(&Series, Line)> = Vec::new();
    for (i, s) in series.iter().enumerate() {
        let mut raw: Vec<(f64, f64)> =
            s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        had_finite |= !raw.is_empty();
        // Logs of resumed runs can arrive out of order; the average and the line both assume x order.
        raw.sort_by(|a, b| a.0.total_cmp(&b.0));
        // A sparse series (an eval metric beside per-step losses) is drawn as it is: averaging
        // a handful of evaluations over N of them would pull its end far from its last value.
        let mut smoothed = (opts.smooth > 1 && raw.len() >= SPARSE * opts.smooth).then(|| {
            let ys: Vec<f64> = raw.iter().map(|p| p.1).collect();
            raw.iter().zip(moving_average(&ys, opts.smooth)).map(|(p, y)| (p.0, y)).collect::<Vec<_>>()
        });
        if opts.log_y {
            raw.retain(|p| p.1 > 0.0);
            if let Some(sm) = smoothed.as_mut() {
                sm.retain(|p| p.1 > 0.0);
            }
        }
        if !raw.is_empty() {
            // Colour by input position so a run keeps its colour when another series drops out as empty.
            let color = PALETTE[i % PALETTE.len()];
            kept.push((s, Line { label: String::new(), color, raw, smoothed }));
        }
    }
    if kept.is_empty() {
        return Err(if opts.log_y && had_finite {
            PlotError::NoPositiveValues
        } else {
            PlotError::NothingToPlot { series: series.len() }
        });
    }

    let one_metric = kept.iter().all(|(s, _)| s.metric == kept[0].0.metric);
    let y_desc = if one_metric { kept[0].0.metric.clone() } else { "value".to_string() };
    let lines: Vec<Line> = kept
        .into_iter()
        .map(|(s, line)| Line {
            label: if one_metric { s.run.clone() } else { format!("{}: {}", s.run, s.metric) },
            ..line
        })
        .collect();

    // Smoothed points count too: on a log axis they may average in values that were then dropped as non-positive,
    // and so fall below every remaining raw point.
    let all = || lines.iter().flat_map(|l| l.raw.iter().chain(l.smoothed.iter().flatten()));
    let (xmin, xmax) = min_max(all().map(|p| p.0));
    let (ymin, ymax) = min_max(all().map(|p| p.1));
    let x = pad_linear(xmin, xmax, 0.02, xmin >= 0.0);
    let y = if opts.log_y { ValueAxis::log(ymin, ymax) } else { ValueAxis::linear(ymin, ymax) };
    let legend = legend_corner(&lines, &x, &y);
    Ok(Chart { lines, x, y, y_desc, legend })
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// Widens `[lo, hi]` by `frac` of its span on both sides; a zero span (a single point, a flat line) gets a margin
/// from the value itself so the point is not drawn on the frame. `floor_at_zero` keeps step/token axes from showing
/// meaningless negative counts.
fn pad_linear(lo: f64, hi: f64, frac: f64, floor_at_zero: bool) -> Range<f64> {
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * frac
    } else if lo != 0.0 {
        lo.abs() * 0.1
    } else {
        1.0
    };
    let start = if floor_at_zero { (lo - pad).max(0.0) } else { lo - pad };
    start..hi + pad
}

/// The y axis. plotters' own log axis puts ticks only on powers of ten (none at all when the data stays inside one
/// decade, as a late-training loss does) and its linear one cannot switch at run time without making the drawing
/// code generic, so one small axis type covers both.
#[derive(Debug, Clone, PartialEq)]
struct ValueAxis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl ValueAxis {
    fn linear(lo: f64, hi: f64) -> ValueAxis {
        let r = pad_linear(lo, hi, 0.05, false);
        ValueAxis { lo: r.start, hi: r.end, log: false }
    }

    /// Both bounds must be > 0; the margin is taken in log space so it looks the same at both ends.
    fn log(lo: f64, hi: f64) -> ValueAxis {
        let r = pad_linear(lo.log10(), hi.log10(), 0.05, false);
        let r = if hi == lo { lo.log10() - 0.1..lo.log10() + 0.1 } else { r };
        ValueAxis { lo: 10f64.powf(r.start), hi: 10f64.powf(r.end), log: true }
    }

    /// Position of `v` on the axis, 0 at `lo` and 1 at `hi`.
    fn fraction(&self, v: f64) -> f64 {
        if self.log {
            (v.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn log_ticks(&self, max_points: usize) -> Vec<f64> {
        let first = self.lo.log10().floor() as i32;
        let last = self.hi.log10().ceil() as i32;
        let in_range = |v: &f64| *v >= self.lo * (1.0 - 1e-9) && *v <= self.hi * (1.0 + 1e-9);
        let with = |mantissas: &[f64], every: i32| -> Vec<f64> {
            (first..=last)
                .filter(|e| e.rem_euclid(every) == 0)
                .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
                .filter(in_range)
                .collect()
        };
        const ALL: [f64; 9] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        let mut candidates = vec![
            with(&ALL, 1),
            with(&[1.0, 2.0, 3.0, 5.0], 1),
            with(&[1.0, 2.0, 5.0], 1),
            with(&[1.0, 3.0], 1),
            with(&[1.0], 1),
        ];
        let mut every = 2;
        while every <= last - first {
            candidates.push(with(&[1.0], every));
            every *= 2;
        }
        let fallback = candidates.last().cloned().unwrap_or_default();
        let ticks = candidates.into_iter().find(|t| t.len() <= max_points).unwrap_or(fallback);
        if ticks.len() >= 3 {
            ticks
        } else {
            // A range narrower than about a factor of three has too few round log ticks; plain round numbers read
            // fine there because the scale is nearly linear over so small a range.
            RangedCoordf64::from(self.lo..self.hi).key_points(max_points)
        }
    }
}

impl Ranged for ValueAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let frac = self.fraction(*value);
        (f64::from(limit.0) + frac * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if self.log {
            self.log_ticks(hint.max_num_points())
        } else {
            RangedCoordf64::from(self.lo..self.hi).key_points(hint)
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

/// Puts the legend in the corner that the curves cross least (loss curves fall, accuracy curves rise).
fn legend_corner(lines: &[Line], x: &Range<f64>, y: &ValueAxis) -> SeriesLabelPosition {
    // Top first: a legend there is where readers look, and ties keep the usual upper-right spot.
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let counts: Vec<usize> = corners
        .iter()
        .map(|&(_, right, top)| {
            lines
                .iter()
                .flat_map(|l| l.main().iter())
                .filter(|(px, py)| {
                    let fx = (px - x.start) / (x.end - x.start);
                    let fy = y.fraction(*py);
                    (if right { fx > 0.6 } else { fx < 0.4 }) && (if top { fy > 0.65 } else { fy < 0.35 })
                })
                .count()
        })
        .collect();
    let best = (0..corners.len()).min_by_key(|&i| counts[i]).unwrap_or(0);
    corners[best].0.clone()
}

/// Tick labels: SI suffixes for large counts (token axes reach billions), plain decimals otherwise, scientific
/// notation for tiny values such as learning rates. `axis_max` is the largest magnitude on the axis: it makes every
/// label of one axis use the same notation ("8k, 10k", not "8000, 10k").
fn format_tick(v: f64, axis_max: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".to_string();
    }
    if a >= 1e4 || (axis_max >= 1e4 && a >= 1e3) {
        let (div, suffix) =
            [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")].into_iter().find(|(d, _)| a >= *d).unwrap_or((1.0, ""));
        return format!("{}{suffix}", trim_zeros(format!("{:.2}", v / div)));
    }
    if a < 1e-3 || axis_max < 1e-2 {
        let s = format!("{v:.2e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{exp}", trim_zeros(mantissa.to_string()));
    }
    // Four significant digits; the ticks are round numbers, so trimming removes float noise such as 0.30000000004.
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    trim_zeros(format!("{v:.decimals$}"))
}

fn trim_zeros(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn render<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
    opts: &PlotOptions,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    // Sizes follow the image height, but only by its square root: text shrunk in proportion to a small image becomes
    // unreadable long before the plot area gets too cramped.
    let scale = (f64::from(opts.height) / 700.0).sqrt().clamp(0.6, 3.0);
    let px = |v: f64| (v * scale).round();
    let tick_font = TextStyle::from((FONT_FAMILY, px(17.0)).into_font());
    let desc_font = TextStyle::from((FONT_FAMILY, px(20.0)).into_font());

    root.fill(&WHITE)?;

    let x_max = chart.x.start.abs().max(chart.x.end.abs());
    let y_max = chart.y.lo.abs().max(chart.y.hi.abs());
    // plotters sizes label areas by hand; the y area must fit the widest tick label plus the rotated axis title.
    let widest = chart
        .y
        .key_points(BoldPoints(Y_LABELS))
        .into_iter()
        .map(|v| root.estimate_text_size(&format_tick(v, y_max), &tick_font).map(|(w, _)| w))
        .try_fold(0, |acc, w| w.map(|w| acc.max(w)))?;
    let y_area = f64::from(widest) + px(20.0) * 1.2 + px(20.0);

    let mut builder = ChartBuilder::on(root);
    builder.margin(px(20.0) as u32).x_label_area_size(px(55.0) as u32).y_label_area_size(y_area as u32);
    if let Some(title) = &opts.title {
        builder.caption(title, (FONT_FAMILY, px(28.0)));
    }
    let mut ctx = builder.build_cartesian_2d(chart.x.clone(), chart.y.clone())?;

    let x_desc = match opts.x {
        XAxis::Step => "step",
        XAxis::Tokens => "tokens",
    };
    ctx.configure_mesh()
        .x_desc(x_desc)
        .y_desc(chart.y_desc.as_str())
        .x_labels(X_LABELS)
        .y_labels(Y_LABELS)
        .x_label_formatter(&|v| format_tick(*v, x_max))
        .y_label_formatter(&|v| format_tick(*v, y_max))
        .label_style(tick_font)
        .axis_desc_style(desc_font)
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(BLACK.mix(0.04))
        .draw()?;

    // Raw curves first, so that every smoothed curve lies on top of all the faint ones.
    for line in chart.lines.iter().filter(|l| l.smoothed.is_some()) {
        ctx.draw_series(LineSeries::new(line.raw.iter().copied(), line.color.mix(0.25).stroke_width(1)))?;
    }
    let stroke = px(2.0).max(1.0) as u32;
    for line in &chart.lines {
        let color = line.color;
        let points = line.main();
        let style = color.stroke_width(stroke);
        let series = if points.len() == 1 {
            // A path through one point draws nothing; a dot keeps a single logged value visible.
            ctx.draw_series(std::iter::once(Circle::new(points[0], stroke + 3, color.filled())))?
        } else {
            ctx.draw_series(LineSeries::new(points.iter().copied(), style))?
        };
        series.label(line.label.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }

    ctx.configure_series_labels()
        .position(chart.legend.clone())
        .label_font((FONT_FAMILY, px(17.0)))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .margin(px(12.0) as u32)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop, so tests need no extra crate.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("taper-plot-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn loss_curve(run: &str, scale: f64, noise: f64) -> Series {
        let points = (0..200)
            .map(|i| {
                let step = f64::from(i) * 10.0;
                // Deterministic wiggle instead of a random generator: the tests must not depend on a seed crate.
                let wiggle = noise * ((f64::from(i) * 1.7).sin() + (f64::from(i) * 0.37).cos()) / 2.0;
                (step, 0.8 + scale * (-step / 500.0).exp() + wiggle)
            })
            .collect();
        Series { run: run.to_string(), metric: "loss".to_string(), points }
    }

    /// The contents of the `<text>` elements; plotters writes each on its own line between the tags.
    fn svg_texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>')?.1.split_once("</text>"))
            .map(|(t, _)| t.trim())
            .collect()
    }

    fn two_runs() -> Vec<Series> {
        vec![loss_curve("run-a", 3.0, 0.05), loss_curve("run-b", 2.2, 0.08)]
    }

    #[test]
    fn writes_png_that_decodes_and_is_not_blank() {
        let dir = TempDir::new("png");
        let out = dir.0.join("chart.png");
        let opts = PlotOptions { title: Some("loss by step".into()), smooth: 5, ..PlotOptions::default() };
        plot(&two_runs(), &out, &opts).unwrap();

        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 10_000, "PNG is only {} bytes", bytes.len());
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (opts.width, opts.height));
        let non_white = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(non_white > 5_000, "only {non_white} non-white pixels");
        // Both run colours must appear at full strength somewhere (the smoothed lines and legend samples).
        for c in &PALETTE[..2] {
            assert!(img.pixels().any(|p| p.0 == [c.0, c.1, c.2]), "colour {c:?} missing");
        }
    }

    #[test]
    fn writes_svg_with_legend_and_axis_labels() {
        let dir = TempDir::new("svg");
        let out = dir.0.join("chart.SVG");
        let opts = PlotOptions { x: XAxis::Tokens, ..PlotOptions::default() };
        plot(&two_runs(), &out, &opts).unwrap();

        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.contains("<svg"));
        let texts = svg_texts(&svg);
        for text in ["run-a", "run-b", "tokens", "loss"] {
            assert!(texts.contains(&text), "{text} missing from the SVG texts {texts:?}");
        }
    }

    #[test]
    fn several_metrics_label_legend_with_metric_and_y_axis_as_value() {
        let dir = TempDir::new("metrics");
        let out = dir.0.join("chart.svg");
        let mut series = two_runs();
        series[1].metric = "eval_loss".into();
        plot(&series, &out, &PlotOptions::default()).unwrap();

        let svg = std::fs::read_to_string(&out).unwrap();
        let texts = svg_texts(&svg);
        for text in ["run-a: loss", "run-b: eval_loss", "value", "step"] {
            assert!(texts.contains(&text), "{text} missing from the SVG texts {texts:?}");
        }
    }

    #[test]
    fn moving_average_is_trailing_and_keeps_length() {
        let ys = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(moving_average(&ys, 3), vec![1.0, 1.5, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(moving_average(&ys, 1), ys.to_vec());
        assert_eq!(moving_average(&ys, 0), ys.to_vec());
        assert_eq!(moving_average(&ys, 100), vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
        assert!(moving_average(&[], 4).is_empty());
    }

    #[test]
    fn smoothing_runs_in_x_order_after_dropping_non_finite_points() {
        let s = Series {
            run: "r".into(),
            metric: "loss".into(),
            points: vec![(2.0, 3.0), (0.0, 1.0), (1.0, f64::NAN), (1.5, 2.0), (f64::INFINITY, 9.0)]
                .into_iter()
                .chain((3..8).map(|x| (f64::from(x), f64::from(x) + 1.0)))
                .collect(),
        };
        let chart = prepare(std::slice::from_ref(&s), &PlotOptions { smooth: 2, ..PlotOptions::default() }).unwrap();
        let line = &chart.lines[0];
        let xs = [0.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        assert_eq!(line.raw, xs.iter().zip(1..).map(|(&x, y)| (x, f64::from(y))).collect::<Vec<_>>());
        let want: Vec<(f64, f64)> =
            xs.iter().zip([1.0, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5]).map(|(&x, y)| (x, y)).collect();
        assert_eq!(line.smoothed.as_deref(), Some(&want[..]));
        // Fewer than 4N points (evaluations beside per-step losses): drawn unsmoothed.
        let sparse = Series { points: s.points[..5].to_vec(), ..s };
        let chart = prepare(&[sparse], &PlotOptions { smooth: 2, ..PlotOptions::default() }).unwrap();
        assert_eq!(chart.lines[0].smoothed, None);
    }

    #[test]
    fn log_scale_skips_non_positive_values() {
        let s = Series {
            run: "r".into(),
            metric: "loss".into(),
            points: vec![(0.0, -1.0), (1.0, 0.0), (2.0, 0.5), (3.0, 0.05), (4.0, f64::NAN)],
        };
        let opts = PlotOptions { log_y: true, ..PlotOptions::default() };
        let chart = prepare(std::slice::from_ref(&s), &opts).unwrap();
        assert_eq!(chart.lines[0].raw, vec![(2.0, 0.5), (3.0, 0.05)]);
        assert!(chart.y.log && chart.y.lo > 0.0 && chart.y.lo < 0.05 && chart.y.hi > 0.5);

        let dir = TempDir::new("log");
        plot(&[s], &dir.0.join("log.png"), &opts).unwrap();
    }

    #[test]
    fn log_scale_without_positive_values_is_an_error() {
        let s = Series { run: "r".into(), metric: "reward".into(), points: vec![(0.0, -1.0), (1.0, 0.0)] };
        let err = prepare(&[s], &PlotOptions { log_y: true, ..PlotOptions::default() }).err().unwrap();
        assert_eq!(err, PlotError::NoPositiveValues);
        assert!(err.to_string().contains("log-scale"));
    }

    #[test]
    fn log_ticks_exist_inside_one_decade_and_thin_out_over_many() {
        let narrow = ValueAxis::log(1.6, 2.4);
        let ticks = narrow.key_points(BoldPoints(8));
        assert!(ticks.len() >= 3 && ticks.iter().all(|t| (narrow.lo..=narrow.hi).contains(t)), "{ticks:?}");

        let decade = ValueAxis::log(1.2, 9.0);
        assert_eq!(decade.key_points(BoldPoints(8)), vec![2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);

        let wide = ValueAxis::log(1e-12, 1e3);
        let ticks = wide.key_points(BoldPoints(8));
        assert!((3..=8).contains(&ticks.len()), "{ticks:?}");
    }

    #[test]
    fn single_point_and_flat_series_get_a_nonempty_range() {
        let s = Series { run: "r".into(), metric: "loss".into(), points: vec![(5.0, 2.0)] };
        let chart = prepare(std::slice::from_ref(&s), &PlotOptions::default()).unwrap();
        assert!(chart.x.start < 5.0 && chart.x.end > 5.0);
        assert!(chart.y.lo < 2.0 && chart.y.hi > 2.0);
        let dir = TempDir::new("single");
        plot(&[s], &dir.0.join("one.png"), &PlotOptions::default()).unwrap();
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let dir = TempDir::new("empty");
        let out = dir.0.join("x.png");
        let err = plot(&[], &out, &PlotOptions::default()).unwrap_err();
        assert_eq!(err, PlotError::NothingToPlot { series: 0 });
        assert!(err.to_string().contains("nothing to plot"));

        let empty = Series { run: "r".into(), metric: "loss".into(), points: vec![(f64::NAN, 1.0), (1.0, f64::NAN)] };
        let err =
            plot(&[empty.clone(), Series { points: vec![], ..empty }], &out, &PlotOptions::default()).unwrap_err();
        assert_eq!(err, PlotError::NothingToPlot { series: 2 });
        assert!(err.to_string().contains("nothing to plot"));
        assert!(!out.exists());
    }

    #[test]
    fn unsupported_extension_is_an_error_naming_it() {
        let err = plot(&two_runs(), Path::new("chart.jpg"), &PlotOptions::default()).unwrap_err();
        assert_eq!(err, PlotError::UnsupportedFormat { extension: Some("jpg".into()) });
        let msg = err.to_string();
        assert!(msg.contains(".jpg") && msg.contains(".png") && msg.contains(".svg"), "{msg}");

        let err = plot(&two_runs(), Path::new("chart"), &PlotOptions::default()).unwrap_err();
        assert!(err.to_string().contains("no extension"));
    }

    #[test]
    fn bad_size_and_unwritable_path_are_errors() {
        let opts = PlotOptions { width: 10, ..PlotOptions::default() };
        assert!(matches!(plot(&two_runs(), Path::new("x.png"), &opts), Err(PlotError::InvalidSize { .. })));

        let dir = TempDir::new("unwritable");
        let out = dir.0.join("missing-dir").join("x.png");
        let err = plot(&two_runs(), &out, &PlotOptions::default()).unwrap_err();
        assert!(matches!(err, PlotError::Draw { .. }), "{err:?}");
        assert!(err.to_string().contains("missing-dir"));
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(format_tick(0.0, 10.0), "0");
        assert_eq!(format_tick(0.30000000000000004, 1.0), "0.3");
        assert_eq!(format_tick(2.5, 10.0), "2.5");
        assert_eq!(format_tick(1500.0, 2000.0), "1500");
        assert_eq!(format_tick(8000.0, 10_000.0), "8k");
        assert_eq!(format_tick(500.0, 10_000.0), "500");
        assert_eq!(format_tick(25_000.0, 30_000.0), "25k");
        assert_eq!(format_tick(1.25e9, 2e9), "1.25B");
        assert_eq!(format_tick(0.0001, 1.0), "1e-4");
        assert_eq!(format_tick(0.0015, 0.003), "1.5e-3");
        assert_eq!(format_tick(0.005, 0.02), "0.005");
        assert_eq!(format_tick(-3.0, 4.0), "-3");
    }
}
