//! PNG charts of a benchmark's trade-offs (accuracy against cloud share).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use plotters::prelude::*;

/// The font labels are drawn with: Debian's `fonts-dejavu-core`, which
/// `scripts/install-deps test` installs.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One line or set of points on a chart.
pub struct Series {
    /// Its legend.
    pub name: String,
    /// (x, y) points, in order.
    pub points: Vec<(f64, f64)>,
    /// Joined by a line (a curve) or marks only (operating points).
    pub line: bool,
}

impl Series {
    /// A curve.
    pub fn curve(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
            line: true,
        }
    }

    /// One operating point.
    pub fn point(name: impl Into<String>, x: f64, y: f64) -> Series {
        Series {
            name: name.into(),
            points: vec![(x, y)],
            line: false,
        }
    }
}

fn register_font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| {
            format!("{FONT}: {e} (install fonts-dejavu-core: scripts/install-deps test)")
        })?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT} is not a font plotters can read"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Draws accuracy (y) against cloud share (x, 0 to 1) into a PNG.
pub fn accuracy_vs_share(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    register_font()?;
    if series.iter().all(|s| s.points.is_empty()) {
        bail!("nothing to draw");
    }
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let top = ((top * 10.0).ceil() / 10.0 + 0.1).min(1.0);
    let root = BitMapBackend::new(path, (960, 640)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0f64..1.0f64, 0.0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("cloud share")
        .y_desc("accuracy")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = ShapeStyle::from(color).stroke_width(2);
        let legend = move |(x, y): (i32, i32)| {
            EmptyElement::at((x, y))
                + Circle::new((8, 0), 5, ShapeStyle::from(color).filled())
                + PathElement::new(vec![(0, 0), (16, 0)], style)
        };
        if s.line {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(err)?
                .label(s.name.as_str())
                .legend(legend);
        } else {
            chart
                .draw_series(
                    s.points
                        .iter()
                        // Earlier points are drawn larger, so one that a
                        // later point lands on still shows around it.
                        .map(|&p| {
                            Circle::new(p, 11 - i.min(6) as i32, ShapeStyle::from(color).filled())
                        }),
                )
                .map_err(err)?
                .label(s.name.as_str())
                .legend(legend);
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_a_png_with_what_was_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        accuracy_vs_share(
            &path,
            "test",
            &[
                Series::curve("random", vec![(0.0, 0.2), (1.0, 0.6)]),
                Series::point("cascade", 0.7, 0.57),
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 5_000, "{}", bytes.len());
        assert!(accuracy_vs_share(&path, "empty", &[]).is_err());
    }
}
