//! Line charts of experiment results, drawn with `plotters` as SVG and PNG.
//!
//! Text in a chart needs a TrueType font: the first of `DSSGD_PLOT_FONT`
//! and a list of common system font files that exists is used.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// Font files tried, in order, after `DSSGD_PLOT_FONT`.
const FONT_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
];

/// Width and height of a chart, in pixels.
const SIZE: (u32, u32) = (900, 560);

/// Colours that stay distinct for readers with the common colour-vision
/// deficiencies (the Okabe and Ito palette), then black.
const COLOURS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];

/// Style of a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// A solid line, for measured series.
    Solid,
    /// Long dashes, for one kind of reference.
    Dashed,
    /// Short dots, for another kind of reference.
    Dotted,
}

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Style of the line.
    pub line: Line,
    /// Index into the palette.
    pub colour: usize,
    /// Mark each point with a dot.
    pub markers: bool,
    /// Give the series an entry in the legend.
    pub legend: bool,
}

/// A line chart.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title above the chart.
    pub title: String,
    /// Text under the x axis.
    pub x_label: String,
    /// Text beside the y axis.
    pub y_label: String,
    /// Use a logarithmic x axis (every x must be positive).
    pub log_x: bool,
    /// Label the x axis with whole numbers only.
    pub integer_x: bool,
    /// The lines.
    pub series: Vec<Series>,
}

fn font_file() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("DSSGD_PLOT_FONT") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(format!(
            "DSSGD_PLOT_FONT is {}, which is not a file; point it at a TrueType font (.ttf)",
            path.display()
        ));
    }
    FONT_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .ok_or_else(|| {
            format!(
                "no TrueType font found for the plots' text (looked for {}); install one \
                 (Debian: apt install fonts-dejavu-core) or set DSSGD_PLOT_FONT to a .ttf file",
                FONT_CANDIDATES.join(", ")
            )
        })
}

/// Registers the font with plotters, once per process.
fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = font_file()?;
            let bytes = std::fs::read(&path)
                .map_err(|error| format!("failed to read the font {}: {error}", path.display()))?;
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{} is not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(|message| anyhow!(message))
}

/// Writes `chart` to `stem.svg` and `stem.png`.
pub fn render(chart: &Chart, stem: &Path) -> anyhow::Result<()> {
    ensure_font()?;
    let points = chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in points {
        if !x.is_finite() || !y.is_finite() {
            continue;
        }
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !x_min.is_finite() {
        bail!("the chart {:?} has no finite points", chart.title);
    }
    if chart.log_x && x_min <= 0.0 {
        bail!(
            "the chart {:?} has a logarithmic x axis but a point at x = {x_min}",
            chart.title
        );
    }
    // Accuracy charts read best from a round floor up to 1.
    let y_low = ((y_min - 0.02) * 20.0).floor() / 20.0;
    let y_high = (y_max + 0.02).min(1.0).max(y_low + 0.05);
    let (x_low, x_high) = if chart.log_x {
        (x_min / 1.5, x_max * 1.5)
    } else if x_max > x_min {
        let pad = (x_max - x_min) * 0.03;
        (x_min - pad, x_max + pad)
    } else {
        (x_min - 1.0, x_max + 1.0)
    };
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    if chart.log_x {
        let x = (x_low..x_high).log_scale();
        draw(
            SVGBackend::new(&svg, SIZE).into_drawing_area(),
            chart,
            x.clone(),
            y_low..y_high,
        )?;
        draw(
            BitMapBackend::new(&png, SIZE).into_drawing_area(),
            chart,
            x,
            y_low..y_high,
        )?;
    } else {
        let x = x_low..x_high;
        draw(
            SVGBackend::new(&svg, SIZE).into_drawing_area(),
            chart,
            x.clone(),
            y_low..y_high,
        )?;
        draw(
            BitMapBackend::new(&png, SIZE).into_drawing_area(),
            chart,
            x,
            y_low..y_high,
        )?;
    }
    Ok(())
}

fn draw<DB, X>(
    area: DrawingArea<DB, Shift>,
    chart: &Chart,
    x: X,
    y: std::ops::Range<f64>,
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let fail = |error: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {error:?}");
    area.fill(&WHITE).map_err(fail)?;
    let mut plot = ChartBuilder::on(&area)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(58)
        .build_cartesian_2d(x, y)
        .map_err(fail)?;
    let integer_x = chart.integer_x;
    let ticks = move |value: &f64| {
        if integer_x && value.fract().abs() > 1e-9 {
            String::new()
        } else {
            crate::metrics::significant(*value, 3).to_string()
        }
    };
    plot.configure_mesh()
        .x_label_formatter(&ticks)
        .max_light_lines(2)
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(fail)?;
    for series in &chart.series {
        let colour = COLOURS[series.colour % COLOURS.len()];
        let style = colour.stroke_width(if series.line == Line::Solid { 3 } else { 2 });
        let points = series.points.iter().copied();
        let drawn = match series.line {
            Line::Solid => plot
                .draw_series(LineSeries::new(points, style))
                .map_err(fail)?,
            Line::Dashed => plot
                .draw_series(DashedLineSeries::new(points, 9, 5, style))
                .map_err(fail)?,
            Line::Dotted => plot
                .draw_series(DashedLineSeries::new(points, 3, 4, style))
                .map_err(fail)?,
        };
        if series.legend {
            drawn.label(&series.label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        }
        if series.markers {
            plot.draw_series(
                series
                    .points
                    .iter()
                    .map(|&point| Circle::new(point, 4, colour.filled())),
            )
            .map_err(fail)?;
        }
    }
    plot.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(fail)?;
    area.present().map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(log_x: bool) -> Chart {
        Chart {
            title: "accuracy".into(),
            x_label: "theta_u".into(),
            y_label: "test accuracy".into(),
            log_x,
            integer_x: false,
            series: vec![
                Series {
                    label: "collaborative".into(),
                    points: vec![(0.001, 0.9), (0.01, 0.95), (0.1, 0.96), (1.0, 0.97)],
                    line: Line::Solid,
                    colour: 0,
                    markers: true,
                    legend: true,
                },
                Series {
                    label: "standalone".into(),
                    points: vec![(0.001, 0.88), (1.0, 0.88)],
                    line: Line::Dashed,
                    colour: 1,
                    markers: false,
                    legend: true,
                },
            ],
        }
    }

    #[test]
    fn chart_writes_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        for log_x in [true, false] {
            let stem = dir.path().join(format!("chart-{log_x}"));
            render(&chart(log_x), &stem).unwrap();
            let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
            assert!(svg.starts_with("<svg"));
            assert!(svg.contains("collaborative"));
            let png = std::fs::read(stem.with_extension("png")).unwrap();
            assert_eq!(&png[1..4], b"PNG");
        }
    }

    #[test]
    fn log_axis_rejects_zero() {
        let mut bad = chart(true);
        bad.series[0].points[0].0 = 0.0;
        let dir = tempfile::tempdir().unwrap();
        let error = render(&bad, &dir.path().join("bad"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("x = 0"), "{error}");
    }
}
