//! Plots of training runs from their [`MetricsRecord`]s, as SVG and PNG.
//!
//! [`plot_runs`] draws four charts, each written as `<name>.svg` and
//! `<name>.png` (900×560):
//!
//! | name | what it shows |
//! |---|---|
//! | `loss` | train loss (solid) and validation loss (dashed, with markers) vs step |
//! | `grad_norm` | global gradient norm before clipping vs step (log axis when it spans more than 100×) |
//! | `composite_gain` | backward Amax gain of the full-depth composite `H_res⁽ᴸ⁾ ··· H_res⁽¹⁾`, max over tokens, vs step (log axis, reference line at 1) |
//! | `gain_vs_depth` | at each run's last record: composite backward (solid) and forward (dashed) gain, max over tokens, vs depth `d = 1..L` (log axis) — the paper's Fig. 3 |
//!
//! Colours are fixed per scheme — residual grey/black, HC red/orange, mHC
//! blue — and further runs take colours from a palette. PNG text is drawn
//! with DejaVu Sans, embedded in the binary (`assets/DejaVuSans.ttf`, licence
//! in `assets/DejaVuSans-LICENSE.txt`), so plots have text on machines with
//! no system fonts.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use crate::metrics::{MetricsRecord, drop_superseded};

/// Width and height of every chart, in pixels.
pub const PLOT_SIZE: (u32, u32) = (900, 560);

/// Errors of [`plot_runs`].
#[derive(Debug)]
pub enum PlotError {
    /// None of the runs has a record.
    NoRecords,
    /// The output directory could not be created.
    Io {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The embedded font could not be registered with plotters.
    Font,
    /// plotters failed to draw or to write a file.
    Draw {
        /// The file being written.
        path: PathBuf,
        /// plotters' message.
        message: String,
    },
}

impl fmt::Display for PlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRecords => write!(f, "nothing to plot: no run has a metrics record"),
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Font => write!(f, "the embedded DejaVu Sans font could not be loaded"),
            Self::Draw { path, message } => {
                write!(f, "{}: plotting failed: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for PlotError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Font family every text of the charts uses.
const FONT: &str = "sans-serif";

/// Registers the embedded font under [`FONT`] once per process.
fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        )
        .is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// Draws the four charts of the module documentation for `runs` (each a
/// label for the legend and that run's records, as read by
/// [`crate::metrics::read_jsonl`]) into `out_dir`, which is created if
/// missing, and returns the files written. `title_suffix`, when not empty, is
/// appended to every title after a dash (for example the model size).
///
/// Records a resumed run logged twice are de-duplicated first
/// ([`drop_superseded`]). Non-finite values (a diverged run) break a line
/// rather than stretch the axes. A chart with no data at all (no run has
/// composite gains, say) is skipped and not listed.
pub fn plot_runs(
    runs: &[(String, Vec<MetricsRecord>)],
    out_dir: &Path,
    title_suffix: &str,
) -> Result<Vec<PathBuf>, PlotError> {
    let runs: Vec<(&str, Vec<MetricsRecord>)> = runs
        .iter()
        .filter(|(_, records)| !records.is_empty())
        .map(|(label, records)| (label.as_str(), drop_superseded(records)))
        .collect();
    if runs.is_empty() {
        return Err(PlotError::NoRecords);
    }
    register_font()?;
    std::fs::create_dir_all(out_dir).map_err(|source| PlotError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let colours = assign_colours(runs.iter().map(|(_, r)| r[0].scheme.as_str()));
    let title = |base: &str| {
        if title_suffix.is_empty() {
            base.to_string()
        } else {
            format!("{base} — {title_suffix}")
        }
    };

    let mut charts = Vec::new();

    let mut loss = Chart::new("loss", title("Loss"), "step", "loss (nats/byte)");
    for ((label, records), &colour) in runs.iter().zip(&colours) {
        let train = records.iter().map(|r| (r.step as f64, r.train_loss));
        loss.series
            .push(Series::line(format!("{label} train"), colour, train));
        let val: Vec<_> = records
            .iter()
            .filter_map(|r| Some((r.step as f64, r.val_loss?)))
            .collect();
        if !val.is_empty() {
            loss.series.push(
                Series::line(format!("{label} val"), colour, val)
                    .dashed()
                    .markers(),
            );
        }
    }
    charts.push(loss);

    let mut grad = Chart::new(
        "grad_norm",
        title("Gradient norm (before clipping)"),
        "step",
        "global gradient L2 norm",
    );
    for ((label, records), &colour) in runs.iter().zip(&colours) {
        let points = records.iter().map(|r| (r.step as f64, r.grad_norm));
        grad.series
            .push(Series::line(label.to_string(), colour, points));
    }
    let (lo, hi) = positive_extent(&grad.series);
    grad.log_y = hi > 100.0 * lo;
    charts.push(grad);

    let mut composite = Chart::new(
        "composite_gain",
        title("Composite backward gain at full depth"),
        "step",
        "Amax backward gain of H_res^(L)···H_res^(1) (max over tokens)",
    );
    composite.log_y = true;
    composite.reference = Some((1.0, "gain = 1".to_string()));
    for ((label, records), &colour) in runs.iter().zip(&colours) {
        let points: Vec<_> = records
            .iter()
            .filter_map(|r| Some((r.step as f64, *r.composite_bwd_max.last()?)))
            .collect();
        if !points.is_empty() {
            composite
                .series
                .push(Series::line(label.to_string(), colour, points));
        }
    }
    charts.push(composite);

    let mut depth = Chart::new(
        "gain_vs_depth",
        title("Composite gain vs depth, last step"),
        "depth d (wrapped sublayers)",
        "Amax gain of H_res^(d)···H_res^(1) (max over tokens)",
    );
    depth.log_y = true;
    depth.integer_x = true;
    depth.reference = Some((1.0, "gain = 1".to_string()));
    for ((label, records), &colour) in runs.iter().zip(&colours) {
        let Some(last) = records
            .iter()
            .rev()
            .find(|r| !r.composite_bwd_max.is_empty())
        else {
            continue;
        };
        let by_depth = |gains: &[f64]| -> Vec<(f64, f64)> {
            gains
                .iter()
                .enumerate()
                .map(|(d, &g)| ((d + 1) as f64, g))
                .collect()
        };
        depth.series.push(
            Series::line(
                format!("{label} backward"),
                colour,
                by_depth(&last.composite_bwd_max),
            )
            .markers(),
        );
        if !last.composite_fwd_max.is_empty() {
            depth.series.push(
                Series::line(
                    format!("{label} forward"),
                    colour,
                    by_depth(&last.composite_fwd_max),
                )
                .dashed(),
            );
        }
    }
    charts.push(depth);

    let mut written = Vec::new();
    for chart in charts {
        if chart
            .series
            .iter()
            .all(|s| s.finite_points().next().is_none())
        {
            continue;
        }
        let svg = out_dir.join(format!("{}.svg", chart.name));
        draw(SVGBackend::new(&svg, PLOT_SIZE).into_drawing_area(), &chart).map_err(|message| {
            PlotError::Draw {
                path: svg.clone(),
                message,
            }
        })?;
        written.push(svg);
        let png = out_dir.join(format!("{}.png", chart.name));
        draw(
            BitMapBackend::new(&png, PLOT_SIZE).into_drawing_area(),
            &chart,
        )
        .map_err(|message| PlotError::Draw {
            path: png.clone(),
            message,
        })?;
        written.push(png);
    }
    Ok(written)
}

/// One curve.
struct Series {
    label: String,
    colour: RGBColor,
    dashed: bool,
    markers: bool,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn line(label: String, colour: RGBColor, points: impl IntoIterator<Item = (f64, f64)>) -> Self {
        Self {
            label,
            colour,
            dashed: false,
            markers: false,
            points: points.into_iter().collect(),
        }
    }

    fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    fn markers(mut self) -> Self {
        self.markers = true;
        self
    }

    fn finite_points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    }

    /// Runs of consecutive drawable points: a NaN or infinity (or, on a log
    /// axis, a value ≤ 0) ends one.
    fn segments(&self, log_y: bool) -> Vec<Vec<(f64, f64)>> {
        let mut segments = vec![Vec::new()];
        for &(x, y) in &self.points {
            if x.is_finite() && y.is_finite() && (!log_y || y > 0.0) {
                segments.last_mut().expect("never empty").push((x, y));
            } else if !segments.last().expect("never empty").is_empty() {
                segments.push(Vec::new());
            }
        }
        segments
    }
}

/// One chart: what [`draw`] needs.
struct Chart {
    name: &'static str,
    title: String,
    x_desc: &'static str,
    y_desc: &'static str,
    log_y: bool,
    /// Ticks at whole numbers only (depth).
    integer_x: bool,
    /// A horizontal reference line and its legend label.
    reference: Option<(f64, String)>,
    series: Vec<Series>,
}

impl Chart {
    fn new(name: &'static str, title: String, x_desc: &'static str, y_desc: &'static str) -> Self {
        Self {
            name,
            title,
            x_desc,
            y_desc,
            log_y: false,
            integer_x: false,
            reference: None,
            series: Vec::new(),
        }
    }

    fn x_range(&self) -> Range<f64> {
        let (lo, hi) = extent(
            self.series
                .iter()
                .flat_map(|s| s.finite_points().map(|p| p.0)),
        );
        if self.integer_x {
            return lo.min(1.0) - 0.25..hi.max(2.0) + 0.25;
        }
        if hi > lo {
            lo..hi + (hi - lo) * 0.02
        } else {
            lo - 1.0..hi + 1.0
        }
    }

    fn y_range(&self) -> Range<f64> {
        let reference = self.reference.as_ref().map(|r| r.0);
        if self.log_y {
            let (mut lo, mut hi) = positive_extent(&self.series);
            if let Some(r) = reference {
                (lo, hi) = (lo.min(r), hi.max(r));
            }
            if !(lo > 0.0 && hi.is_finite()) {
                return 0.5..2.0;
            }
            // At least a factor 2 of room, so a flat line is not on the edge.
            let pad = (hi / lo).powf(0.06).max(1.2);
            lo / pad..hi * pad
        } else {
            let ys = self
                .series
                .iter()
                .flat_map(|s| s.finite_points().map(|p| p.1));
            let (mut lo, mut hi) = extent(ys.chain(reference));
            if lo > hi {
                return 0.0..1.0;
            }
            let pad = if hi > lo {
                (hi - lo) * 0.05
            } else {
                lo.abs().max(1.0) * 0.1
            };
            (lo, hi) = (lo - pad, hi + pad);
            lo..hi
        }
    }
}

/// Min and max of the finite values (`(inf, -inf)` when there are none).
fn extent(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
}

/// [`extent`] of the positive y values of all series.
fn positive_extent(series: &[Series]) -> (f64, f64) {
    extent(
        series
            .iter()
            .flat_map(|s| s.finite_points().map(|p| p.1))
            .filter(|&y| y > 0.0),
    )
}

/// Shades per scheme family: the first run of a family takes the first.
const RESIDUAL: [RGBColor; 2] = [RGBColor(40, 40, 40), RGBColor(140, 140, 140)];
const HC: [RGBColor; 2] = [RGBColor(214, 39, 40), RGBColor(255, 127, 14)];
const MHC: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(8, 48, 107),
    RGBColor(107, 174, 214),
];
/// Colours for other schemes, and for runs beyond a family's shades.
const PALETTE: [RGBColor; 6] = [
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One colour per run, from its scheme: `residual`, `hc…` and `mhc…` take
/// their family's shades in order, everything else the palette.
fn assign_colours<'a>(schemes: impl Iterator<Item = &'a str>) -> Vec<RGBColor> {
    let (mut used, mut next_palette) = ([0usize; 3], 0usize);
    schemes
        .map(|scheme| {
            let scheme = scheme.to_ascii_lowercase();
            let (family, shades): (usize, &[RGBColor]) = if scheme == "residual" {
                (0, &RESIDUAL)
            } else if scheme.starts_with("mhc") {
                (2, &MHC)
            } else if scheme.starts_with("hc") {
                (1, &HC)
            } else {
                (usize::MAX, &[])
            };
            if let Some(&c) = shades.get(used.get(family).copied().unwrap_or(0)) {
                used[family] += 1;
                c
            } else {
                next_palette += 1;
                PALETTE[(next_palette - 1) % PALETTE.len()]
            }
        })
        .collect()
}

/// Tick label: plain digits where they are short, else `1e6` style.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if (1e-3..1e5).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    }
}

/// Tick values of a log axis over `lo..hi` (both > 0): bold (labelled) and
/// light (grid only). plotters' own log ticks are powers of ten only, which
/// leaves a range within one decade (an mHC gain of 1 to 1.6) with a single
/// label; there the ticks are evenly spaced instead.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let decades = (hi / lo).log10();
    if !(decades.is_finite() && lo > 0.0) {
        return (Vec::new(), Vec::new());
    }
    if decades < 1.0 {
        let step = nice_step((hi - lo) / 6.0);
        return (multiples(lo, hi, step), multiples(lo, hi, step / 5.0));
    }
    let mantissas: &[f64] = if decades <= 2.0 {
        &[1.0, 2.0, 5.0]
    } else if decades <= 4.0 {
        &[1.0, 3.0]
    } else {
        &[1.0]
    };
    // At most about 8 labelled decades.
    let stride = (decades / 8.0).ceil().max(1.0) as i32;
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let in_range = |v: &f64| (lo..=hi).contains(v);
    let mut bold = Vec::new();
    let mut light = Vec::new();
    for e in first..=last {
        let decade = 10f64.powi(e);
        if e.rem_euclid(stride) == 0 {
            bold.extend(mantissas.iter().map(|m| m * decade).filter(in_range));
        }
        if stride == 1 {
            light.extend((1..=9).map(|m| f64::from(m) * decade).filter(in_range));
        } else {
            light.extend(Some(decade).filter(in_range));
        }
    }
    (bold, light)
}

/// 1, 2, 2.5 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .find(|&n| n >= fraction - 1e-9)
        .unwrap_or(10.0);
    nice * magnitude
}

/// The multiples of `step` in `lo..=hi`.
fn multiples(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let (first, last) = ((lo / step).ceil() as i64, (hi / step).floor() as i64);
    (first..=last).map(|k| k as f64 * step).collect()
}

/// Step tick label: `25k`, `1.5M` for long runs.
fn step_tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", tick(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", tick(v / 1e3))
    } else {
        tick(v)
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<(), String> {
    if chart.log_y {
        let range = chart.y_range();
        let (bold, light) = log_ticks(range.start, range.end);
        let y_spec = range
            .log_scale()
            .with_key_points(bold)
            .with_light_points(light);
        draw_with(root, chart, y_spec)
    } else {
        draw_with(root, chart, chart.y_range())
    }
}

/// Where the legend goes: the corner whose box covers the fewest curve
/// points, each curve sampled densely in screen-like coordinates.
fn legend_corner(chart: &Chart, x: &Range<f64>, y: &Range<f64>) -> SeriesLabelPosition {
    let entries = chart.series.len() + usize::from(chart.reference.is_some());
    let box_h = ((entries as f64 * 24.0 + 16.0) / 440.0).min(0.95);
    let box_w = 0.36;
    let ny = |v: f64| {
        if chart.log_y {
            (v.ln() - y.start.ln()) / (y.end.ln() - y.start.ln())
        } else {
            (v - y.start) / (y.end - y.start)
        }
    };
    let nx = |v: f64| (v - x.start) / (x.end - x.start);
    let mut samples: Vec<(f64, f64)> = Vec::new();
    for s in &chart.series {
        for seg in s.segments(chart.log_y) {
            let pts: Vec<_> = seg.iter().map(|&(a, b)| (nx(a), ny(b))).collect();
            samples.extend(pts.iter().copied());
            for w in pts.windows(2) {
                for k in 1..16 {
                    let t = k as f64 / 16.0;
                    samples.push((
                        w[0].0 + t * (w[1].0 - w[0].0),
                        w[0].1 + t * (w[1].1 - w[0].1),
                    ));
                }
            }
        }
    }
    if let Some((r, _)) = chart.reference {
        samples.extend((0..=32).map(|k| (k as f64 / 32.0, ny(r))));
    }
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let covered = |right: bool, upper: bool| {
        samples
            .iter()
            .filter(|&&(px, py)| {
                let in_x = if right { px > 1.0 - box_w } else { px < box_w };
                let in_y = if upper { py > 1.0 - box_h } else { py < box_h };
                in_x && in_y
            })
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|&(_, right, upper)| covered(right, upper))
        .map(|(p, _, _)| p)
        .unwrap_or(SeriesLabelPosition::UpperRight)
}

/// The caption's font size: 22 px, smaller (down to 12) while the title is
/// wider than the plot, so that a long `--title` is not cut off at the edges.
fn caption_size<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str) -> f64 {
    let room = f64::from(root.dim_in_pixel().0).max(1.0) - 40.0;
    let mut size = 22.0;
    while size > 12.0 {
        match root.estimate_text_size(title, &(FONT, size).into_text_style(root)) {
            Ok((w, _)) if f64::from(w) > room => size -= 1.0,
            _ => break,
        }
    }
    size
}

fn draw_with<DB, Y>(root: DrawingArea<DB, Shift>, chart: &Chart, y_spec: Y) -> Result<(), String>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let x_range = chart.x_range();
    let y_range = chart.y_range();
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, (FONT, caption_size(&root, &chart.title)))
        .margin(14)
        .margin_right(24)
        .x_label_area_size(48)
        .y_label_area_size(76)
        .build_cartesian_2d(x_range.clone(), y_spec)
        .map_err(e)?;

    let integer_label = |v: &f64| {
        if (v - v.round()).abs() < 1e-9 {
            format!("{}", v.round())
        } else {
            String::new()
        }
    };
    let step_label = |v: &f64| step_tick(*v);
    let y_label = |v: &f64| tick(*v);
    let mut mesh = ctx.configure_mesh();
    mesh.x_desc(chart.x_desc)
        .y_desc(chart.y_desc)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(BLACK.mix(0.04))
        .y_label_formatter(&y_label);
    if chart.integer_x {
        let span = (x_range.end - x_range.start).round() as usize;
        mesh.x_labels(span.clamp(2, 16))
            .x_label_formatter(&integer_label);
    } else {
        mesh.x_labels(10).x_label_formatter(&step_label);
    }
    mesh.draw().map_err(e)?;

    if let Some((r, label)) = &chart.reference {
        let style = ShapeStyle::from(BLACK.mix(0.45)).stroke_width(1);
        ctx.draw_series(DashedLineSeries::new(
            [(x_range.start, *r), (x_range.end, *r)],
            3,
            3,
            style,
        ))
        .map_err(e)?
        .label(label.as_str())
        .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 24, y)], 3, 3, style));
    }

    for s in &chart.series {
        let style = ShapeStyle::from(s.colour).stroke_width(2);
        let segments = s.segments(chart.log_y);
        for (i, seg) in segments.iter().enumerate() {
            let annotation = if s.dashed {
                ctx.draw_series(DashedLineSeries::new(seg.iter().copied(), 7, 4, style))
                    .map_err(e)?
            } else {
                ctx.draw_series(LineSeries::new(seg.iter().copied(), style))
                    .map_err(e)?
            };
            if i == 0 {
                let (dashed, markers) = (s.dashed, s.markers);
                annotation.label(s.label.as_str()).legend(move |(x, y)| {
                    let line: DynElement<'static, DB, (i32, i32)> = if dashed {
                        DashedPathElement::new(vec![(x, y), (x + 24, y)], 7, 4, style).into_dyn()
                    } else {
                        PathElement::new(vec![(x, y), (x + 24, y)], style).into_dyn()
                    };
                    let marker =
                        Circle::new((x + 12, y), if markers { 3 } else { 0 }, style.filled());
                    EmptyElement::at((0, 0)) + line + marker
                });
            }
            if s.markers {
                ctx.draw_series(
                    seg.iter()
                        .map(|&p| Circle::new(p, 3, ShapeStyle::from(s.colour).filled())),
                )
                .map_err(e)?;
            }
        }
    }

    ctx.configure_series_labels()
        .position(legend_corner(chart, &x_range, &y_range))
        .margin(10)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic runs shaped like the paper's: the residual's gains are 1,
    /// HC's composite gain grows with depth and steps, mHC's stays near 1.
    fn synthetic(scheme: &str, steps: u64, layers: usize) -> Vec<MetricsRecord> {
        let (growth, loss0, loss1) = match scheme {
            "residual" => (1.0, 5.6, 1.34),
            "hc" => (1.35, 5.5, 1.29),
            _ => (1.015, 5.4, 1.22),
        };
        (0..=steps)
            .map(|i| {
                let step = i * 100;
                let t = i as f64 / steps as f64;
                let g = |d: usize, dir: f64| {
                    let per = 1.0 + (growth - 1.0) * (0.3 + 0.7 * t) * dir;
                    per.powi(d as i32)
                };
                let wobble = 0.05 * ((i as f64) * 1.7).sin();
                MetricsRecord {
                    scheme: scheme.to_string(),
                    step,
                    tokens_seen: step * 8192,
                    train_loss: loss1 + (loss0 - loss1) * (-4.0 * t).exp() + wobble,
                    val_loss: i
                        .is_multiple_of(5)
                        .then(|| loss1 + 0.04 + (loss0 - loss1) * (-4.0 * t).exp()),
                    grad_norm: match scheme {
                        "hc" => 0.5 * (1.0 + 30.0 * t * t),
                        "residual" => 1.1 - 0.5 * t + wobble,
                        _ => 0.8 - 0.3 * t + wobble,
                    },
                    lr: 3e-4,
                    tokens_per_s: 1e5,
                    elapsed_s: i as f64,
                    sk_residual: if scheme == "mhc" { 1e-6 } else { 0.0 },
                    amax_fwd: (1..=layers).map(|_| g(1, 0.9)).collect(),
                    amax_bwd: (1..=layers).map(|_| g(1, 1.0)).collect(),
                    composite_fwd_mean: (1..=layers).map(|d| g(d, 0.8)).collect(),
                    composite_fwd_max: (1..=layers).map(|d| g(d, 0.9)).collect(),
                    composite_bwd_mean: (1..=layers).map(|d| g(d, 0.9)).collect(),
                    composite_bwd_max: (1..=layers).map(|d| g(d, 1.0)).collect(),
                }
            })
            .collect()
    }

    fn three_runs() -> Vec<(String, Vec<MetricsRecord>)> {
        ["residual", "hc", "mhc"]
            .iter()
            .map(|s| (s.to_string(), synthetic(s, 40, 24)))
            .collect()
    }

    #[test]
    fn writes_svg_and_png_for_three_schemes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plots");
        let files = plot_runs(&three_runs(), &out, "synthetic, 24 sublayers").unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for chart in ["loss", "grad_norm", "composite_gain", "gain_vs_depth"] {
            for ext in ["svg", "png"] {
                assert!(names.contains(&format!("{chart}.{ext}")), "{names:?}");
            }
        }
        assert_eq!(files.len(), 8);
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            assert!(
                bytes.len() > 5_000,
                "{} is {} bytes",
                f.display(),
                bytes.len()
            );
            if f.extension().unwrap() == "png" {
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", f.display());
            } else {
                let svg = String::from_utf8(bytes).unwrap();
                assert!(svg.starts_with("<svg"), "{}", f.display());
                for label in ["residual", "hc", "mhc"] {
                    assert!(svg.contains(label), "{} lacks {label}", f.display());
                }
            }
        }
        let loss = std::fs::read_to_string(out.join("loss.svg")).unwrap();
        assert!(loss.contains("mhc val") && loss.contains("loss (nats/byte)"));
        let depth = std::fs::read_to_string(out.join("gain_vs_depth.svg")).unwrap();
        assert!(depth.contains("hc backward") && depth.contains("hc forward"));
        if let Ok(keep) = std::env::var("MHC_KEEP_PLOTS") {
            for f in &files {
                std::fs::create_dir_all(&keep).unwrap();
                std::fs::copy(f, Path::new(&keep).join(f.file_name().unwrap())).unwrap();
            }
        }
    }

    /// Bitmap text comes from the embedded font: rendering the loss chart
    /// into a buffer (what the PNG encoder receives) puts dark pixels in the
    /// title's rows, which would stay white without a usable font.
    #[test]
    fn bitmap_text_renders() {
        register_font().unwrap();
        let (w, h) = PLOT_SIZE;
        let mut buf = vec![0u8; (w * h * 3) as usize];
        let runs = three_runs();
        let colours = assign_colours(runs.iter().map(|(_, r)| r[0].scheme.as_str()));
        let mut chart = Chart::new("loss", "Loss".to_string(), "step", "loss (nats/byte)");
        for ((label, records), &c) in runs.iter().zip(&colours) {
            let points = records.iter().map(|r| (r.step as f64, r.train_loss));
            chart.series.push(Series::line(label.clone(), c, points));
        }
        draw(
            BitMapBackend::with_buffer(&mut buf, PLOT_SIZE).into_drawing_area(),
            &chart,
        )
        .unwrap();
        let title_rows = &buf[(14 * w * 3) as usize..(40 * w * 3) as usize];
        let dark = title_rows
            .chunks(3)
            .filter(|px| px.iter().all(|&c| c < 128))
            .count();
        assert!(dark > 50, "title rows have {dark} dark pixels");
    }

    /// A title too wide for the chart at 22 px is set smaller until it fits
    /// (the edges of the science run's captions were cut off); short titles keep 22 px.
    #[test]
    fn long_titles_shrink_to_fit() {
        register_font().unwrap();
        let (w, h) = PLOT_SIZE;
        let mut buf = vec![0u8; (w * h * 3) as usize];
        let root = BitMapBackend::with_buffer(&mut buf, PLOT_SIZE).into_drawing_area();
        assert_eq!(caption_size(&root, "Loss"), 22.0);
        let long = "Composite backward gain at full depth — fortunes, d = 512, 12 blocks (24 wrapped sublayers), H200";
        let size = caption_size(&root, long);
        assert!(size < 22.0, "size {size}");
        let (tw, _) = root
            .estimate_text_size(long, &(FONT, size).into_text_style(&root))
            .unwrap();
        assert!(tw + 40 <= w, "{tw} px wide at {size} px in a {w} px chart");
    }

    #[test]
    fn degenerate_inputs_do_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        // One record, NaN loss, infinite gain, no layers in one run.
        let mut diverged = synthetic("hc", 3, 4);
        diverged[2].train_loss = f64::NAN;
        diverged[2].grad_norm = f64::INFINITY;
        diverged[3].composite_bwd_max[3] = f64::INFINITY;
        let mut residual = synthetic("residual", 0, 0);
        residual[0].val_loss = None;
        let runs = vec![
            ("diverged".to_string(), diverged),
            ("single".to_string(), residual),
            ("empty".to_string(), Vec::new()),
        ];
        let files = plot_runs(&runs, dir.path(), "").unwrap();
        assert_eq!(files.len(), 8);

        // Runs without composite gains: those charts are skipped.
        let flat = vec![("residual".to_string(), synthetic("residual", 5, 0))];
        let files = plot_runs(&flat, dir.path(), "").unwrap();
        assert_eq!(files.len(), 4, "{files:?}");

        let err = plot_runs(&[("x".to_string(), Vec::new())], dir.path(), "").unwrap_err();
        assert!(matches!(err, PlotError::NoRecords));
        assert!(err.to_string().contains("nothing to plot"));
    }

    #[test]
    fn colours_follow_schemes() {
        let c = assign_colours(["mhc", "hc", "residual", "mhc", "gpt", "hc-static"].into_iter());
        assert_eq!(c[0], MHC[0]);
        assert_eq!(c[1], HC[0]);
        assert_eq!(c[2], RESIDUAL[0]);
        assert_eq!(c[3], MHC[1]);
        assert_eq!(c[4], PALETTE[0]);
        assert_eq!(c[5], HC[1]);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick(1.0), "1");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(1000.0), "1000");
        assert_eq!(tick(1e6), "1e6");
        assert_eq!(tick(2.5e-5), "2.5e-5");
        assert_eq!(step_tick(25_000.0), "25k");
        assert_eq!(step_tick(1_500_000.0), "1.5M");
        assert_eq!(step_tick(500.0), "500");
    }

    #[test]
    fn log_axis_ticks() {
        let (bold, light) = log_ticks(0.8, 1.9);
        let labels: Vec<String> = bold.iter().map(|&v| tick(v)).collect();
        assert_eq!(labels, ["0.8", "1", "1.2", "1.4", "1.6", "1.8"]);
        assert!(light.len() > bold.len());
        let (bold, _) = log_ticks(0.8, 30.0);
        assert_eq!(bold, [1.0, 2.0, 5.0, 10.0, 20.0]);
        let (bold, _) = log_ticks(0.5, 3e3);
        assert_eq!(bold, [1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0]);
        let (bold, light) = log_ticks(1e-3, 1e30);
        let labels: Vec<String> = bold.iter().map(|&v| tick(v)).collect();
        assert_eq!(labels, ["1", "1e5", "1e10", "1e15", "1e20", "1e25", "1e30"]);
        assert!(light.iter().all(|v| (1e-3..=1e30).contains(v)));
    }
}
