//! [`Comparison`]: runs drawn against each other on one time axis (the demo's picture).
//!
//! From the top: line panels, each with one line per run (calls answered per second, p99 latency...),
//! over shaded spans (the outage) and vertical markers (the breaker opening); then, optionally, the
//! per-upstream rows of one run exactly as [`super::Timeline`] draws them. Every panel and row shares
//! the same time axis, so a reader compares the runs by looking straight down.

use std::fmt::Write as _;

use super::{
    axis, escape, fmt1, fmt_ms, legend, nice_ceiling, row, Scale, Series, LEFT, RIGHT, ROW_GAP,
    ROW_H, WIDTH,
};

/// What to draw: line panels for several runs, and optionally one run's per-upstream rows under them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Comparison {
    /// Heading at the top of the picture.
    pub title: String,
    /// Left edge of the time axis (ms, any epoch; the axis shows seconds from here).
    pub start_ms: u64,
    /// Right edge of the time axis (ms, same epoch).
    pub end_ms: u64,
    /// Shaded time spans, drawn behind every panel and row.
    pub spans: Vec<Span>,
    /// Vertical lines at moments worth pointing at, drawn over every panel and row.
    pub markers: Vec<Marker>,
    /// Line panels, top to bottom.
    pub panels: Vec<Panel>,
    /// Heading above the rows (when there are any).
    pub rows_heading: String,
    /// Per-upstream rows, drawn under the panels as [`super::Timeline`] draws them.
    pub rows: Vec<Series>,
}

/// A shaded stretch of time, named in the legend.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Span {
    /// Start (ms).
    pub from_ms: u64,
    /// End (ms).
    pub to_ms: u64,
    /// Legend text.
    pub label: String,
}

/// A vertical line at one moment, with a short label beside it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Marker {
    /// When (ms).
    pub at_ms: u64,
    /// Text written next to the line, at the top of the first panel.
    pub label: String,
    /// CSS colour of the line and its label.
    pub colour: String,
}

/// One plot: a value over time, one line per run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Panel {
    /// Written above the plot.
    pub title: String,
    /// Appended to the value labels of the vertical axis (`"ms"`, `"/s"`).
    pub unit: String,
    /// A logarithmic vertical axis (for latencies that span milliseconds to seconds).
    pub log_scale: bool,
    /// The lines, drawn in this order (the last on top).
    pub lines: Vec<Line>,
}

/// One run's values in a panel.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Line {
    /// Legend text (lines with the same label and colour share one legend entry).
    pub label: String,
    /// CSS colour.
    pub colour: String,
    /// `(time ms, value)` in time order. A non-finite value (NaN) breaks the line there: no data.
    pub points: Vec<(u64, f64)>,
}

const TITLE_Y: f64 = 26.0;
const LEGEND_Y: f64 = 46.0;
const PANELS_TOP: f64 = 66.0;
const PANEL_LABEL_H: f64 = 22.0;
const PANEL_PLOT_H: f64 = 130.0;
const PANEL_GAP: f64 = 20.0;
const PANEL_H: f64 = PANEL_LABEL_H + PANEL_PLOT_H + PANEL_GAP;
/// The rows' heading and their legend, between the panels and the first row.
const ROWS_HEAD_H: f64 = 44.0;
const AXIS_H: f64 = 48.0;
const SPAN_FILL: &str = "#9e9e9e";

/// Renders the comparison as a standalone SVG document.
pub fn render_comparison(c: &Comparison) -> String {
    let scale = Scale::new(c.start_ms, c.end_ms);
    let panels_bottom = PANELS_TOP + c.panels.len() as f64 * PANEL_H;
    let rows_top = panels_bottom + if c.rows.is_empty() { 0.0 } else { ROWS_HEAD_H };
    let content_bottom = if c.rows.is_empty() {
        panels_bottom - PANEL_GAP
    } else {
        rows_top + c.rows.len() as f64 * ROW_H - ROW_GAP
    };
    let height = (content_bottom + AXIS_H).max(PANELS_TOP + AXIS_H);
    let mut out = String::with_capacity(8192 + c.rows.len() * 8192);
    // `write!` into a String cannot fail; the results are ignored on purpose throughout.
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#,
        h = fmt1(height)
    );
    let _ = writeln!(out, "<title>{}</title>", escape(&c.title));
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{}" fill="#ffffff"/>"##,
        fmt1(height)
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{TITLE_Y}" font-size="16" font-weight="bold">{}</text>"#,
        escape(&c.title)
    );
    top_legend(&mut out, c);
    let top = PANELS_TOP + PANEL_LABEL_H;
    spans(&mut out, &scale, &c.spans, top, content_bottom);
    axis(&mut out, &scale, top, content_bottom);
    for (i, p) in c.panels.iter().enumerate() {
        panel(&mut out, &scale, p, PANELS_TOP + i as f64 * PANEL_H);
    }
    if !c.rows.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
            fmt1(panels_bottom + 4.0),
            escape(&c.rows_heading)
        );
        legend(&mut out, panels_bottom + 24.0);
        for (i, s) in c.rows.iter().enumerate() {
            row(&mut out, &scale, s, rows_top + i as f64 * ROW_H);
        }
    }
    markers(&mut out, &scale, &c.markers, top, content_bottom);
    out.push_str("</svg>\n");
    out
}

/// One legend entry per distinct line, then the spans.
fn top_legend(out: &mut String, c: &Comparison) {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for line in c.panels.iter().flat_map(|p| p.lines.iter()) {
        let entry = (line.label.as_str(), line.colour.as_str());
        if !seen.contains(&entry) {
            seen.push(entry);
        }
    }
    let mut x = LEFT;
    for (label, colour) in seen {
        let _ = writeln!(
            out,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="3"/><text x="{}" y="{LEGEND_Y}">{}</text>"#,
            fmt1(x),
            fmt1(LEGEND_Y - 4.0),
            fmt1(x + 22.0),
            fmt1(LEGEND_Y - 4.0),
            escape(colour),
            fmt1(x + 28.0),
            escape(label)
        );
        x += 40.0 + label.chars().count() as f64 * 6.5;
    }
    for span in &c.spans {
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="14" height="10" fill="{SPAN_FILL}" fill-opacity="0.3"/><text x="{}" y="{LEGEND_Y}">{}</text>"#,
            fmt1(x),
            fmt1(LEGEND_Y - 9.0),
            fmt1(x + 18.0),
            escape(&span.label)
        );
        x += 34.0 + span.label.chars().count() as f64 * 6.5;
    }
}

fn spans(out: &mut String, scale: &Scale, spans: &[Span], top: f64, bottom: f64) {
    for span in spans {
        let (x1, x2) = (scale.x(span.from_ms), scale.x(span.to_ms));
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{SPAN_FILL}" fill-opacity="0.15"><title>{}</title></rect>"#,
            fmt1(x1),
            fmt1(top),
            fmt1((x2 - x1).max(0.5)),
            fmt1((bottom - top).max(0.0)),
            escape(&span.label)
        );
    }
}

fn markers(out: &mut String, scale: &Scale, markers: &[Marker], top: f64, bottom: f64) {
    for m in markers {
        let x = scale.x(m.at_ms);
        let colour = escape(&m.colour);
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{t}" x2="{x}" y2="{b}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="4 3"/><text x="{tx}" y="{ty}" font-size="11" fill="{colour}">{label}</text>"#,
            x = fmt1(x),
            t = fmt1(top),
            b = fmt1(bottom),
            tx = fmt1(x + 4.0),
            ty = fmt1(top + 12.0),
            label = escape(&m.label)
        );
    }
}

/// How values map to heights in one panel.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ValueAxis {
    /// 0 to `top`.
    Linear { top: f64 },
    /// 10^`lo` to 10^`hi`.
    Log { lo: i32, hi: i32 },
}

impl ValueAxis {
    fn for_panel(p: &Panel) -> Self {
        let values = || {
            p.lines
                .iter()
                .flat_map(|l| l.points.iter().map(|(_, v)| *v))
                .filter(|v| v.is_finite())
        };
        let max = values().fold(0.0_f64, f64::max);
        if !p.log_scale {
            return ValueAxis::Linear {
                top: nice_ceiling(max),
            };
        }
        let min = values().filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
        let lo = if min.is_finite() {
            min.log10().floor() as i32
        } else {
            0
        };
        let hi = (max.max(1.0).log10().ceil() as i32).max(lo + 1);
        ValueAxis::Log { lo, hi }
    }

    /// Fraction of the plot height, 0 at the bottom and 1 at the top, clamped.
    fn frac(self, v: f64) -> f64 {
        let f = match self {
            ValueAxis::Linear { top } => v / top,
            ValueAxis::Log { lo, hi } => {
                let lo_v = 10f64.powi(lo);
                (v.max(lo_v).log10() - f64::from(lo)) / f64::from(hi - lo)
            }
        };
        f.clamp(0.0, 1.0)
    }

    /// Values to label on the vertical axis.
    fn ticks(self) -> Vec<f64> {
        match self {
            ValueAxis::Linear { top } => vec![0.0, top / 2.0, top],
            ValueAxis::Log { lo, hi } => (lo..=hi).map(|e| 10f64.powi(e)).collect(),
        }
    }
}

fn panel(out: &mut String, scale: &Scale, p: &Panel, y0: f64) {
    let plot_y = y0 + PANEL_LABEL_H;
    let plot_w = WIDTH - LEFT - RIGHT;
    let values = ValueAxis::for_panel(p);
    let y = |v: f64| plot_y + PANEL_PLOT_H * (1.0 - values.frac(v));
    let _ = writeln!(out, r#"<g class="panel">"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
        fmt1(plot_y - 7.0),
        escape(&p.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{}" height="{PANEL_PLOT_H}" fill="none" stroke="#bdbdbd"/>"##,
        fmt1(plot_y),
        fmt1(plot_w)
    );
    for tick in values.ticks() {
        let ty = y(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{ty}" x2="{r}" y2="{ty}" stroke="#eeeeee"/><text x="{lx}" y="{ly}" text-anchor="end" font-size="10" fill="#616161">{v}{unit}</text>"##,
            ty = fmt1(ty),
            r = fmt1(WIDTH - RIGHT),
            lx = fmt1(LEFT - 4.0),
            ly = fmt1(ty + 3.5),
            v = fmt_ms(tick),
            unit = escape(&p.unit)
        );
    }
    for line in &p.lines {
        for run in finite_runs(&line.points) {
            line_run(out, scale, &run, &y, &line.colour, &line.label);
        }
    }
    out.push_str("</g>\n");
}

/// The stretches of consecutive finite points: a NaN ends one.
fn finite_runs(points: &[(u64, f64)]) -> Vec<Vec<(u64, f64)>> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for &(t, v) in points {
        if v.is_finite() {
            current.push((t, v));
        } else if !current.is_empty() {
            runs.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

fn line_run(
    out: &mut String,
    scale: &Scale,
    run: &[(u64, f64)],
    y: &impl Fn(f64) -> f64,
    colour: &str,
    label: &str,
) {
    let colour = escape(colour);
    if let [(t, v)] = run {
        let _ = writeln!(
            out,
            r#"<circle cx="{}" cy="{}" r="3.5" fill="{colour}"><title>{}</title></circle>"#,
            fmt1(scale.x(*t)),
            fmt1(y(*v)),
            escape(label)
        );
        return;
    }
    let mut coords = String::with_capacity(run.len() * 12);
    for (t, v) in run {
        let _ = write!(coords, "{},{} ", fmt1(scale.x(*t)), fmt1(y(*v)));
    }
    let _ = writeln!(
        out,
        r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"><title>{}</title></polyline>"#,
        coords.trim_end(),
        escape(label)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use cb_core::breaker::StateKind;

    fn line(label: &str, colour: &str, points: &[(u64, f64)]) -> Line {
        Line {
            label: label.into(),
            colour: colour.into(),
            points: points.to_vec(),
        }
    }

    fn sample() -> Comparison {
        Comparison {
            title: "with & without".into(),
            start_ms: 0,
            end_ms: 30_000,
            spans: vec![Span {
                from_ms: 6_000,
                to_ms: 22_000,
                label: "content hangs".into(),
            }],
            markers: vec![Marker {
                at_ms: 6_600,
                label: "opened".into(),
                colour: "#e53935".into(),
            }],
            panels: vec![
                Panel {
                    title: "answered".into(),
                    unit: "/s".into(),
                    log_scale: false,
                    lines: vec![
                        line("with", "#1e88e5", &[(500, 180.0), (1_500, 170.0)]),
                        line("without", "#d81b60", &[(500, 180.0), (1_500, 16.0)]),
                    ],
                },
                Panel {
                    title: "p99".into(),
                    unit: "ms".into(),
                    log_scale: true,
                    lines: vec![
                        line(
                            "with",
                            "#1e88e5",
                            &[(500, 3.0), (1_500, f64::NAN), (2_500, 4.0)],
                        ),
                        line("without", "#d81b60", &[(500, 3.0), (1_500, 2_000.0)]),
                    ],
                },
            ],
            rows_heading: "per service".into(),
            rows: vec![Series {
                name: "content".into(),
                states: vec![(6_600, StateKind::Open)],
                ..Series::default()
            }],
        }
    }

    #[test]
    fn draws_every_panel_line_span_marker_and_row() {
        let svg = render_comparison(&sample());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("with &amp; without"), "title escaped");
        assert_eq!(svg.matches("<g class=\"panel\">").count(), 2);
        assert_eq!(svg.matches("<g class=\"upstream\">").count(), 1);
        // Two lines in the first panel, three runs in the second (the NaN splits "with" in two).
        assert_eq!(svg.matches("<polyline").count(), 2 + 1);
        assert_eq!(svg.matches("<circle").count(), 2, "{svg}");
        assert!(svg.contains(">content hangs<") && svg.contains(">opened<"));
        // One legend entry per distinct line, although both panels have both lines.
        assert_eq!(svg.matches(">with</text>").count(), 1);
        assert!(svg.contains(">200/s<"), "linear axis rounds 180 up to 200");
        assert!(
            svg.contains(">10000ms<") && svg.contains(">1ms<"),
            "log axis"
        );
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn log_axis_spans_the_data_in_powers_of_ten() {
        let p = &sample().panels[1];
        assert_eq!(ValueAxis::for_panel(p), ValueAxis::Log { lo: 0, hi: 4 });
        let axis = ValueAxis::Log { lo: 0, hi: 4 };
        assert_eq!(axis.frac(1.0), 0.0);
        assert_eq!(axis.frac(10_000.0), 1.0);
        assert_eq!(axis.frac(100.0), 0.5);
        assert_eq!(axis.frac(0.0), 0.0, "zero sits on the floor");
        let empty = Panel {
            log_scale: true,
            ..Panel::default()
        };
        assert_eq!(
            ValueAxis::for_panel(&empty),
            ValueAxis::Log { lo: 0, hi: 1 }
        );
    }

    #[test]
    fn a_nan_breaks_a_line() {
        let runs = finite_runs(&[(0, 1.0), (1, f64::NAN), (2, f64::NAN), (3, 2.0), (4, 3.0)]);
        assert_eq!(runs, vec![vec![(0, 1.0)], vec![(3, 2.0), (4, 3.0)]]);
        assert!(finite_runs(&[(0, f64::NAN)]).is_empty());
    }

    #[test]
    fn no_rows_no_rows_heading() {
        let c = Comparison {
            rows: vec![],
            ..sample()
        };
        let svg = render_comparison(&c);
        assert!(!svg.contains("per service"));
        assert_eq!(svg.matches("<g class=\"upstream\">").count(), 0);
    }
}
