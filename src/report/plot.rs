//! Plot primitives shared by `keel check`, `keel sweep` and `keel report`: line plots (log or
//! linear axes, markers, event lines) and heatmaps with a colour bar. Each picture is written
//! as SVG and PNG from the same drawing code; text uses the bundled DejaVu Sans (no system
//! fonts needed).

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

pub use plotters::style::RGBColor;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
    });
}

/// Tableau 20 (the 10 strong colours first): distinct, colour-blind friendlier than
/// plotters' default palette.
pub const PALETTE: [(u8, u8, u8); 20] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
];

pub fn color(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// Point markers of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Marker {
    #[default]
    None,
    Dot,
    Cross,
}

#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Draw markers only, no line.
    pub no_line: bool,
    pub marker: Marker,
    pub color: usize,
}

/// A vertical line at `x` (an event), labelled at the top.
#[derive(Debug, Clone)]
pub struct VLine {
    pub x: f64,
    pub label: String,
    pub color: RGBColor,
}

#[derive(Debug, Clone, Default)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_x: bool,
    pub log_y: bool,
    pub vlines: Vec<VLine>,
    pub legend: Legend,
    /// Picture size (default 900×560).
    pub size: Option<(u32, u32)>,
}

/// Where the legend goes (inside the plot area).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Legend {
    /// In a column right of the plot: never covers data.
    #[default]
    Outside,
    UpperRight,
    UpperLeft,
    LowerLeft,
    LowerRight,
}

type DrawErr<DB> = DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>;

fn draw_err<DB: DrawingBackend>(e: DrawErr<DB>) -> anyhow::Error
where
    DB::ErrorType: 'static,
{
    anyhow::anyhow!("plot: {e:?}")
}

/// Values a chart can place: plotters' axis code loops or allocates without bound on ranges
/// near f64's limits (a loss of 1e308, or losses of 1e-300 on a log axis), so magnitudes
/// beyond 1e30 (or below 1e-30 on a log axis) are left out, with a note in the title.
const PLOTTABLE: f64 = 1e30;

fn in_range(v: f64, log: bool) -> bool {
    v.is_finite() && v.abs() <= PLOTTABLE && (!log || v >= 1.0 / PLOTTABLE)
}

fn usable(p: &Plot, x: f64, y: f64) -> bool {
    in_range(x, p.log_x) && in_range(y, p.log_y)
}

/// Axis tick text: on a log axis decades only (1e-3, 0.01 … 1000, 1e5), the ticks between
/// unlabelled; on a linear axis up to four decimals, trailing zeros trimmed.
fn tick(v: f64, log: bool) -> String {
    if log {
        let e = v.log10();
        if !e.is_finite() || (e - e.round()).abs() > 1e-6 {
            return String::new();
        }
        let e = e.round() as i32;
        return if (-3..=4).contains(&e) {
            format!("{}", 10f64.powi(e))
        } else {
            format!("1e{e}")
        };
    }
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() >= 1e5 || v.abs() < 1e-3 {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A row for each event label so that none overprints another: a label goes one row down
/// (at most four) when it would overlap the last label of a row; past that it is left off
/// (the dashed line stays, and the events table lists it). Rows are in order of `vlines`.
fn label_rows(vlines: &[VLine], x0: f64, x1: f64, log_x: bool, plot_w: f64) -> Vec<Option<usize>> {
    const ROWS: usize = 4;
    let px = |x: f64| {
        let f = if log_x {
            (x.ln() - x0.ln()) / (x1.ln() - x0.ln())
        } else {
            (x - x0) / (x1 - x0)
        };
        f * plot_w
    };
    let mut order: Vec<usize> = (0..vlines.len()).collect();
    order.sort_by(|&a, &b| vlines[a].x.total_cmp(&vlines[b].x));
    let mut ends = [f64::NEG_INFINITY; ROWS];
    let mut out = vec![None; vlines.len()];
    for i in order {
        let v = &vlines[i];
        if v.label.is_empty() {
            continue;
        }
        let start = px(v.x);
        let width = 7.5 * v.label.chars().count() as f64 + 6.0;
        if let Some(r) = (0..ROWS).find(|&r| start >= ends[r]) {
            ends[r] = start + width;
            out[i] = Some(r);
        }
    }
    out
}

/// Data range with some room around it (multiplicative on log axes).
fn padded(lo: f64, hi: f64, log: bool) -> (f64, f64) {
    if log {
        if hi / lo < 1.0001 {
            (lo / 2.0, hi * 2.0)
        } else {
            let r = (hi / lo).powf(0.06);
            (lo / r, hi * r)
        }
    } else if hi - lo < 1e-12 * hi.abs().max(1.0) {
        (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0))
    } else {
        let m = (hi - lo) * 0.06;
        (lo - m, hi + m)
    }
}

fn draw_lines<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, p: &Plot) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = draw_err::<DB>;
    root.fill(&WHITE).map_err(err)?;
    let named: Vec<&Series> = p.series.iter().filter(|s| !s.name.is_empty()).collect();
    let root = if p.legend == Legend::Outside && !named.is_empty() {
        let chars = named
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0) as u32;
        let lw = (52 + 7 * chars).clamp(120, 340);
        let (w, _) = root.dim_in_pixel();
        let (main, side) = root.split_horizontally(w.saturating_sub(lw));
        draw_legend(&side, &named).map_err(err)?;
        main
    } else {
        root
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut dropped = 0usize;
    for &(x, y) in p.series.iter().flat_map(|s| s.points.iter()) {
        if usable(p, x, y) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        } else if x.is_finite() && y.is_finite() {
            dropped += 1;
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (1.0, 2.0, 1.0, 2.0);
    }
    // a log axis spanning less than a decade gets no tick labels from plotters: go linear
    let mut p = p.clone();
    if dropped > 0 {
        p.title = format!(
            "{} ({dropped} value{} beyond ±1e30{} not drawn)",
            p.title,
            if dropped == 1 { "" } else { "s" },
            if p.log_y || p.log_x {
                " or below 1e-30"
            } else {
                ""
            }
        );
    }
    p.log_x &= x1 / x0 >= 10.0;
    p.log_y &= y1 / y0 >= 10.0;
    let p = &p;
    let (x0, x1) = padded(x0, x1, p.log_x);
    let (y0, y1) = padded(y0, y1, p.log_y);
    let plot_w = root.dim_in_pixel().0.saturating_sub(78 + 28).max(100) as f64;
    let mut b = ChartBuilder::on(&root);
    b.caption(&p.title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(78);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_label_formatter(&|v| tick(*v, p.log_x))
                .y_label_formatter(&|v| tick(*v, p.log_y))
                .x_desc(p.x_label.as_str())
                .y_desc(p.y_label.as_str())
                .label_style(("sans-serif", 14))
                .axis_desc_style(("sans-serif", 15))
                .light_line_style(RGBColor(238, 238, 238))
                .bold_line_style(RGBColor(215, 215, 215))
                .draw()
                .map_err(err)?;
            let rows = label_rows(&p.vlines, x0, x1, p.log_x, plot_w);
            for (v, row) in p.vlines.iter().zip(rows) {
                let c = v.color;
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(v.x, y0), (v.x, y1)],
                        4,
                        4,
                        c.mix(0.75).stroke_width(1),
                    ))
                    .map_err(err)?;
                if let (false, Some(row)) = (v.label.is_empty(), row) {
                    // each row down is 6% of the plot's height
                    let y = if p.log_y {
                        y1 / (y1 / y0).powf(0.06 * row as f64)
                    } else {
                        y1 - (y1 - y0) * 0.06 * row as f64
                    };
                    chart
                        .draw_series(std::iter::once(Text::new(
                            v.label.clone(),
                            (v.x, y),
                            ("sans-serif", 13).into_font().color(&c),
                        )))
                        .map_err(err)?;
                }
            }
            for s in &p.series {
                let c = color(s.color);
                let data: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|&(x, y)| usable(p, x, y))
                    .collect();
                let style = c.stroke_width(2);
                let named = !s.name.is_empty();
                if !s.no_line {
                    let a = if s.dashed {
                        chart
                            .draw_series(DashedLineSeries::new(data.clone(), 6, 4, style))
                            .map_err(err)?
                    } else {
                        chart
                            .draw_series(LineSeries::new(data.clone(), style))
                            .map_err(err)?
                    };
                    if named {
                        a.label(s.name.as_str()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                        });
                    }
                }
                let label_markers = named && s.no_line;
                match s.marker {
                    Marker::None => {}
                    Marker::Dot => {
                        let a = chart
                            .draw_series(data.iter().map(|&pt| Circle::new(pt, 4, c.filled())))
                            .map_err(err)?;
                        if label_markers {
                            a.label(s.name.as_str())
                                .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled()));
                        }
                    }
                    Marker::Cross => {
                        let a = chart
                            .draw_series(
                                data.iter().map(|&pt| Cross::new(pt, 6, c.stroke_width(3))),
                            )
                            .map_err(err)?;
                        if label_markers {
                            a.label(s.name.as_str())
                                .legend(move |(x, y)| Cross::new((x + 9, y), 5, c.stroke_width(3)));
                        }
                    }
                }
            }
            if p.legend != Legend::Outside && p.series.iter().any(|s| !s.name.is_empty()) {
                chart
                    .configure_series_labels()
                    .label_font(("sans-serif", 12))
                    .background_style(WHITE.mix(0.88))
                    .border_style(RGBColor(180, 180, 180))
                    .position(match p.legend {
                        Legend::UpperRight | Legend::Outside => SeriesLabelPosition::UpperRight,
                        Legend::UpperLeft => SeriesLabelPosition::UpperLeft,
                        Legend::LowerLeft => SeriesLabelPosition::LowerLeft,
                        Legend::LowerRight => SeriesLabelPosition::LowerRight,
                    })
                    .draw()
                    .map_err(err)?;
            }
        }};
    }
    match (p.log_x, p.log_y) {
        (true, true) => body!(b
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(err)?),
        (true, false) => body!(b
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
            .map_err(err)?),
        (false, true) => body!(b
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(err)?),
        (false, false) => body!(b.build_cartesian_2d(x0..x1, y0..y1).map_err(err)?),
    }
    root.present().map_err(err)?;
    Ok(())
}

/// The legend as a column: a line/marker sample and the name per series.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    named: &[&Series],
) -> std::result::Result<(), DrawErr<DB>> {
    let font = ("sans-serif", 14).into_font();
    for (k, s) in named.iter().enumerate() {
        let y = 56 + 24 * k as i32;
        let c = color(s.color);
        if !s.no_line {
            if s.dashed {
                for x in [4, 13, 22] {
                    area.draw(&PathElement::new(
                        vec![(x, y), (x + 6, y)],
                        c.stroke_width(2),
                    ))?;
                }
            } else {
                area.draw(&PathElement::new(vec![(4, y), (28, y)], c.stroke_width(2)))?;
            }
        }
        match s.marker {
            Marker::Dot => area.draw(&Circle::new((16, y), 4, c.filled()))?,
            Marker::Cross => area.draw(&Cross::new((16, y), 5, c.stroke_width(3)))?,
            Marker::None => {}
        }
        area.draw(&Text::new(
            s.name.clone(),
            (36, y),
            font.clone()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

/// Write `base.svg` and `base.png` (900×560 unless `p.size`).
pub fn save(p: &Plot, base: &Path) -> Result<()> {
    save_with(
        base,
        p.size.unwrap_or((900, 560)),
        |r| draw_lines(r, p),
        |r| draw_lines(r, p),
    )
}

fn save_with(
    base: &Path,
    size: (u32, u32),
    svg_draw: impl Fn(DrawingArea<SVGBackend, Shift>) -> Result<()>,
    png_draw: impl Fn(DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    ensure_font();
    if let Some(dir) = base.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    // appended, not with_extension: names may hold dots (lr=3.16e-4)
    let name = |ext: &str| std::path::PathBuf::from(format!("{}{ext}", base.display()));
    let (svg, png) = (name(".svg"), name(".png"));
    // draw to a temporary name, then rename: a reader never sees half a picture
    let pid = std::process::id();
    let (tmp_svg, tmp_png) = (
        name(&format!(".{pid}.svg.tmp")),
        name(&format!(".{pid}.tmp.png")),
    );
    svg_draw(SVGBackend::new(&tmp_svg, size).into_drawing_area())
        .with_context(|| format!("{}: cannot draw", svg.display()))?;
    png_draw(BitMapBackend::new(&tmp_png, size).into_drawing_area())
        .with_context(|| format!("{}: cannot draw", png.display()))?;
    std::fs::rename(&tmp_svg, &svg).with_context(|| format!("{}: cannot write", svg.display()))?;
    std::fs::rename(&tmp_png, &png).with_context(|| format!("{}: cannot write", png.display()))?;
    Ok(())
}

/// Viridis, from 9 anchors (linear in between): 0 → dark purple, 1 → yellow.
pub fn viridis(t: f64) -> RGBColor {
    const A: [(f64, f64, f64); 9] = [
        (68.0, 1.0, 84.0),
        (71.0, 44.0, 122.0),
        (59.0, 81.0, 139.0),
        (44.0, 113.0, 142.0),
        (33.0, 144.0, 141.0),
        (39.0, 173.0, 129.0),
        (92.0, 200.0, 99.0),
        (170.0, 220.0, 50.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let f = t * (A.len() - 1) as f64;
    let i = (f.floor() as usize).min(A.len() - 2);
    let u = f - i as f64;
    let mix = |a: f64, b: f64| (a + (b - a) * u).round() as u8;
    RGBColor(
        mix(A[i].0, A[i + 1].0),
        mix(A[i].1, A[i + 1].1),
        mix(A[i].2, A[i + 1].2),
    )
}

/// A grid of values: `values[row][col]`; `None` cells are drawn grey with their text (e.g.
/// "diverged @12"). Rows are drawn top to bottom in the given order.
#[derive(Debug, Clone, Default)]
pub struct Heatmap {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub cols: Vec<String>,
    pub rows: Vec<String>,
    pub values: Vec<Vec<Option<f64>>>,
    /// Text per cell (empty: the value with 3 decimals).
    pub text: Vec<Vec<String>>,
    /// Colour-bar label.
    pub value_label: String,
    /// Low values are good: the colour bar says so.
    pub low_is_good: bool,
    /// No text in the cells (dense grids such as layer × step).
    pub no_text: bool,
    /// Picture size; default grows with the grid.
    pub size: Option<(u32, u32)>,
    /// Values above this get the top colour (the scale resolves the range below it).
    pub clip_high: Option<f64>,
}

fn draw_heatmap<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, h: &Heatmap) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = draw_err::<DB>;
    root.fill(&WHITE).map_err(err)?;
    let (w, _) = root.dim_in_pixel();
    let (main, bar) = root.split_horizontally(w.saturating_sub(120));
    let finite = h
        .values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .filter(|&v| in_range(v, false));
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for v in finite {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        (lo, hi) = (0.0, 1.0);
    }
    let clipped = h.clip_high.is_some_and(|c| c < hi && c > lo);
    if clipped {
        hi = h.clip_high.unwrap_or(hi);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1e-12;
    }
    let (nr, nc) = (h.rows.len(), h.cols.len());
    let left = 16 + 8 * h.rows.iter().map(|r| r.chars().count()).max().unwrap_or(4) as u32;
    let mut chart = ChartBuilder::on(&main)
        .caption(&h.title, ("sans-serif", 19))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(left.clamp(60, 220))
        // a segmented 0..n-1 has n segments
        .build_cartesian_2d(
            (0..(nc as i32 - 1).max(0)).into_segmented(),
            (0..(nr as i32 - 1).max(0)).into_segmented(),
        )
        .map_err(err)?;
    let cols = h.cols.clone();
    let rows = h.rows.clone();
    // at most ~14 column labels
    let every = nc.div_ceil(14).max(1);
    let xf = move |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) if (*i as usize).is_multiple_of(every) => {
            cols.get(*i as usize).cloned().unwrap_or_default()
        }
        _ => String::new(),
    };
    let yf = move |v: &SegmentValue<i32>| match v {
        // row 0 at the top
        SegmentValue::CenterOf(i) => rows
            .get(nr.wrapping_sub(1).wrapping_sub(*i as usize))
            .cloned()
            .unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(nc + 1)
        .y_labels(nr + 1)
        .x_label_formatter(&xf)
        .y_label_formatter(&yf)
        .x_desc(h.x_label.as_str())
        .y_desc(h.y_label.as_str())
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let center = Pos::new(HPos::Center, VPos::Center);
    for (r, row) in h.values.iter().enumerate() {
        let y = (nr - 1 - r) as i32;
        for (c, v) in row.iter().enumerate() {
            let x = c as i32;
            let (fill, ink) = match v {
                Some(v) if v.is_finite() => {
                    let t = (v - lo) / (hi - lo);
                    let col = viridis(t);
                    let ink = if t > 0.55 { BLACK } else { WHITE };
                    (col, ink)
                }
                _ => (RGBColor(236, 236, 236), RGBColor(190, 30, 30)),
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                    ],
                    fill.filled(),
                )))
                .map_err(err)?;
            if h.no_text {
                continue;
            }
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                    ],
                    WHITE.stroke_width(2),
                )))
                .map_err(err)?;
            let text = h
                .text
                .get(r)
                .and_then(|t| t.get(c))
                .filter(|t| !t.is_empty())
                .cloned()
                .unwrap_or_else(|| v.map_or(String::new(), |v| format!("{v:.3}")));
            chart
                .draw_series(std::iter::once(Text::new(
                    text,
                    (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                    ("sans-serif", 13).into_font().color(&ink).pos(center),
                )))
                .map_err(err)?;
        }
    }
    // colour bar
    let (bw, bh) = bar.dim_in_pixel();
    let (top, bottom) = (50i32, bh as i32 - 70);
    let x0 = 20i32;
    let steps = 64;
    for k in 0..steps {
        let t = k as f64 / (steps - 1) as f64;
        let y_hi = bottom - ((bottom - top) as f64 * (k + 1) as f64 / steps as f64) as i32;
        let y_lo = bottom - ((bottom - top) as f64 * k as f64 / steps as f64) as i32;
        bar.draw(&Rectangle::new(
            [(x0, y_hi), (x0 + 22, y_lo)],
            viridis(t).filled(),
        ))
        .map_err(err)?;
    }
    let font = ("sans-serif", 12).into_font();
    let lbl = |v: f64| format!("{v:.3}");
    let top_label = if clipped {
        format!("≥ {}", lbl(hi))
    } else {
        lbl(hi)
    };
    bar.draw(&Text::new(top_label, (x0 + 28, top), font.clone()))
        .map_err(err)?;
    bar.draw(&Text::new(lbl(lo), (x0 + 28, bottom - 12), font.clone()))
        .map_err(err)?;
    bar.draw(&Text::new(
        h.value_label.clone(),
        (4, top - 30),
        font.clone(),
    ))
    .map_err(err)?;
    if h.low_is_good {
        bar.draw(&Text::new(
            "(lower is better)",
            (4, bottom + 14),
            font.clone(),
        ))
        .map_err(err)?;
    }
    let _ = bw;
    root.present().map_err(err)?;
    Ok(())
}

/// Write `base.svg` and `base.png`; the size grows with the grid.
pub fn save_heatmap(h: &Heatmap, base: &Path) -> Result<()> {
    let w = (260 + 120 + 96 * h.cols.len() as u32).clamp(700, 1800);
    let hgt = (170 + 58 * h.rows.len() as u32).clamp(320, 1200);
    let (w, hgt) = h.size.unwrap_or((w, hgt));
    save_with(
        base,
        (w, hgt),
        |r| draw_heatmap(r, h),
        |r| draw_heatmap(r, h),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viridis_ends_and_clamps() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(7.0), viridis(1.0));
        assert_eq!(viridis(f64::NAN), viridis(0.0));
    }

    #[test]
    fn log_ticks_label_decades_only_and_event_labels_never_overlap() {
        assert_eq!(tick(100.0, true), "100");
        assert_eq!(tick(200.0, true), "");
        assert_eq!(tick(1e-5, true), "1e-5");
        assert_eq!(tick(2.5, false), "2.5");
        let vl = |x: f64, l: &str| VLine {
            x,
            label: l.into(),
            color: RGBColor(0, 0, 0),
        };
        // three events at nearly the same step: stacked, not printed on each other
        let v = vec![
            vl(100.0, "spike"),
            vl(101.0, "skip"),
            vl(102.0, "rollback"),
            vl(900.0, "skip"),
        ];
        let rows = label_rows(&v, 0.0, 1000.0, false, 600.0);
        assert_eq!(rows, vec![Some(0), Some(1), Some(2), Some(0)]);
        let many: Vec<VLine> = (0..6).map(|i| vl(100.0 + i as f64, "lr_backoff")).collect();
        let rows = label_rows(&many, 0.0, 1000.0, false, 600.0);
        assert_eq!(rows.iter().filter(|r| r.is_some()).count(), 4);
    }

    #[test]
    fn heatmap_and_lines_write_both_formats() {
        let dir = std::env::temp_dir().join(format!("keel-plot-{}", std::process::id()));
        let h = Heatmap {
            title: "t".into(),
            cols: vec!["1e-3".into(), "1e-2".into()],
            rows: vec!["a".into(), "b".into()],
            values: vec![vec![Some(1.0), None], vec![Some(2.0), Some(3.0)]],
            text: vec![vec![String::new(), "diverged @5".into()], vec![]],
            ..Default::default()
        };
        save_heatmap(&h, &dir.join("h")).unwrap();
        let svg = std::fs::read_to_string(dir.join("h.svg")).unwrap();
        assert!(svg.contains("diverged @5") && svg.contains("1.000"));
        let p = Plot {
            series: vec![Series {
                name: "s".into(),
                points: vec![(1.0, 2.0), (10.0, 1.0)],
                marker: Marker::Cross,
                ..Default::default()
            }],
            log_x: true,
            ..Default::default()
        };
        save(&p, &dir.join("l")).unwrap();
        assert!(std::fs::metadata(dir.join("l.png")).unwrap().len() > 1000);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
