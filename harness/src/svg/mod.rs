//! A small, dependency-free SVG timeline of breaker states, shared by `harness simulate --svg` and the
//! demo.
//!
//! [`Timeline`] ([`render`]): one row per upstream: a band coloured by the breaker state (closed green,
//! open red, half-open amber), and under it a plot of the error rate (0 to 100 %) and, when there is
//! data, the p99 latency (scaled to the row's own maximum, labelled on the right). A shared time axis in
//! seconds runs along the bottom, and a legend along the top. The output is a standalone document (XML
//! declaration-free, with the SVG namespace and a `viewBox`), so a browser opens it directly and it
//! scales to the window.
//!
//! [`Comparison`] ([`render_comparison`], in `compare.rs`): several runs drawn against each other on
//! one time axis (line panels), above one run's rows as [`Timeline`] draws them. The demo draws the run
//! without the breaker beside the run with it this way.
//!
//! Everything is computed in floating point and written with one decimal: the files stay small and
//! diff-able, and sub-pixel precision would not be visible anyway.

use std::fmt::Write as _;

use cb_core::breaker::StateKind;

mod compare;

pub use compare::{render_comparison, Comparison, Line, Marker, Panel, Span};

/// What to draw: a time range and one row per upstream.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Timeline {
    /// Heading at the top of the picture.
    pub title: String,
    /// Left edge of the time axis (ms, any epoch; the axis shows seconds from here).
    pub start_ms: u64,
    /// Right edge of the time axis (ms, same epoch).
    pub end_ms: u64,
    /// One row each, drawn top to bottom in this order.
    pub series: Vec<Series>,
}

/// One upstream's row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// The upstream key, written above the row.
    pub name: String,
    /// State changes in time order: each entry is the state from that time on. Before the first entry
    /// the breaker is taken to be closed (a breaker starts closed).
    pub states: Vec<(u64, StateKind)>,
    /// Failure fraction (0.0 to 1.0) at sample times, in time order.
    pub error_rate: Vec<(u64, f64)>,
    /// p99 latency in ms at sample times, in time order; may be empty (then no latency line is drawn).
    pub latency_ms: Vec<(u64, f64)>,
}

const WIDTH: f64 = 1100.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 84.0;
const TOP: f64 = 70.0;
/// Space for the upstream name above each row.
const LABEL_H: f64 = 20.0;
const BAND_H: f64 = 12.0;
const PLOT_H: f64 = 64.0;
const ROW_GAP: f64 = 22.0;
const ROW_H: f64 = LABEL_H + BAND_H + PLOT_H + ROW_GAP;
const AXIS_H: f64 = 48.0;

const CLOSED: &str = "#43a047";
const OPEN: &str = "#e53935";
const HALF_OPEN: &str = "#ffb300";
const ERROR_LINE: &str = "#212121";
const LATENCY_LINE: &str = "#1e88e5";

/// Renders the timeline as a standalone SVG document.
pub fn render(t: &Timeline) -> String {
    let rows = t.series.len().max(1) as f64;
    let height = TOP + rows * ROW_H + AXIS_H;
    let scale = Scale::new(t.start_ms, t.end_ms);
    let mut out = String::with_capacity(4096 + t.series.len() * 8192);
    // `write!` into a String cannot fail; the results are ignored on purpose throughout.
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#,
        w = WIDTH,
        h = fmt1(height)
    );
    out.push('\n');
    let _ = writeln!(out, "<title>{}</title>", escape(&t.title));
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{}" fill="#ffffff"/>"##,
        fmt1(height)
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="26" font-size="16" font-weight="bold">{}</text>"#,
        escape(&t.title)
    );
    legend(&mut out, 46.0);

    let plot_bottom = TOP + rows * ROW_H - ROW_GAP;
    axis(&mut out, &scale, TOP, plot_bottom);
    for (i, s) in t.series.iter().enumerate() {
        row(&mut out, &scale, s, TOP + i as f64 * ROW_H);
    }
    out.push_str("</svg>\n");
    out
}

/// Maps times to x coordinates.
struct Scale {
    start_ms: u64,
    end_ms: u64,
    span_ms: f64,
}

impl Scale {
    fn new(start_ms: u64, end_ms: u64) -> Self {
        // An empty or inverted range still draws (as one second) rather than divide by zero.
        let end_ms = end_ms.max(start_ms.saturating_add(1_000));
        Self {
            start_ms,
            end_ms,
            span_ms: (end_ms - start_ms) as f64,
        }
    }

    fn x(&self, at_ms: u64) -> f64 {
        let at = at_ms.clamp(self.start_ms, self.end_ms);
        LEFT + (at - self.start_ms) as f64 / self.span_ms * (WIDTH - LEFT - RIGHT)
    }
}

/// The state colours and the two line styles of a row, on one line at `y`.
fn legend(out: &mut String, y: f64) {
    let mut x = LEFT;
    for (label, colour) in [("closed", CLOSED), ("open", OPEN), ("half-open", HALF_OPEN)] {
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="14" height="10" fill="{colour}"/><text x="{}" y="{}">{label}</text>"#,
            fmt1(x),
            fmt1(y - 9.0),
            fmt1(x + 18.0),
            fmt1(y)
        );
        x += 96.0;
    }
    for (label, colour, dash) in [
        ("error rate (0-100%)", ERROR_LINE, ""),
        (
            "p99 latency (right scale)",
            LATENCY_LINE,
            r#" stroke-dasharray="5 3""#,
        ),
    ] {
        let _ = writeln!(
            out,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{label}</text>"#,
            fmt1(x),
            fmt1(y - 4.0),
            fmt1(x + 22.0),
            fmt1(y - 4.0),
            fmt1(x + 28.0),
            fmt1(y)
        );
        x += 200.0;
    }
}

/// Vertical grid lines from `top` through every row, and second labels along the bottom.
fn axis(out: &mut String, scale: &Scale, top: f64, plot_bottom: f64) {
    let span_s = scale.span_ms / 1000.0;
    let step_s = tick_step_s(span_s);
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="#616161"/>"##,
        b = fmt1(plot_bottom),
        r = fmt1(WIDTH - RIGHT)
    );
    let mut tick = 0u64;
    loop {
        let offset_ms = tick.saturating_mul(step_s).saturating_mul(1000);
        if offset_ms as f64 > scale.span_ms {
            break;
        }
        let x = fmt1(scale.x(scale.start_ms.saturating_add(offset_ms)));
        let _ = writeln!(
            out,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{b}" stroke="#e0e0e0"/><line x1="{x}" y1="{b}" x2="{x}" y2="{b5}" stroke="#616161"/><text x="{x}" y="{ty}" text-anchor="middle">{s}s</text>"##,
            top = fmt1(top),
            b = fmt1(plot_bottom),
            b5 = fmt1(plot_bottom + 5.0),
            ty = fmt1(plot_bottom + 18.0),
            s = tick.saturating_mul(step_s)
        );
        tick += 1;
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#616161">time (s)</text>"##,
        fmt1((LEFT + WIDTH - RIGHT) / 2.0),
        fmt1(plot_bottom + 38.0)
    );
}

/// A tick step (whole seconds) giving at most about a dozen ticks.
fn tick_step_s(span_s: f64) -> u64 {
    const STEPS: [u64; 14] = [
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200,
    ];
    STEPS
        .iter()
        .copied()
        .find(|s| span_s / *s as f64 <= 12.0)
        .unwrap_or_else(|| ((span_s / 12.0 / 3600.0).ceil() as u64).max(1) * 3600)
}

fn row(out: &mut String, scale: &Scale, s: &Series, y0: f64) {
    let band_y = y0 + LABEL_H;
    let plot_y = band_y + BAND_H;
    let plot_w = WIDTH - LEFT - RIGHT;
    let _ = writeln!(out, r#"<g class="upstream">"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#,
        fmt1(band_y - 6.0),
        escape(&s.name)
    );
    // The state band, and a pale wash of the same colour behind the plot, so an open period can be
    // followed down to the error-rate line that caused it.
    for (from, to, state) in segments(scale, &s.states) {
        let (x1, x2) = (scale.x(from), scale.x(to));
        let colour = state_colour(state);
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="{}" height="{BAND_H}" fill="{colour}"><title>{}</title></rect><rect x="{}" y="{}" width="{}" height="{PLOT_H}" fill="{colour}" fill-opacity="0.12"/>"#,
            fmt1(x1),
            fmt1(band_y),
            fmt1((x2 - x1).max(0.5)),
            state.as_str(),
            fmt1(x1),
            fmt1(plot_y),
            fmt1((x2 - x1).max(0.5))
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{}" height="{PLOT_H}" fill="none" stroke="#bdbdbd"/>"##,
        fmt1(plot_y),
        fmt1(plot_w)
    );
    for (frac, label) in [(0.0, "0%"), (0.5, "50%"), (1.0, "100%")] {
        let y = plot_y + PLOT_H * (1.0 - frac);
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end" font-size="10" fill="#616161">{label}</text>"##,
            fmt1(LEFT - 4.0),
            fmt1(y + 3.5)
        );
    }
    let rate_y = |v: f64| plot_y + PLOT_H * (1.0 - v.clamp(0.0, 1.0));
    polyline(out, scale, &s.error_rate, rate_y, ERROR_LINE, "");

    let max_latency = s.latency_ms.iter().map(|(_, v)| *v).fold(0.0_f64, f64::max);
    if !s.latency_ms.is_empty() {
        let top = nice_ceiling(max_latency);
        let latency_y = |v: f64| plot_y + PLOT_H * (1.0 - (v / top).clamp(0.0, 1.0));
        polyline(
            out,
            scale,
            &s.latency_ms,
            latency_y,
            LATENCY_LINE,
            r#" stroke-dasharray="5 3""#,
        );
        for (y, label) in [
            (plot_y + 3.5, format!("{}ms", fmt_ms(top))),
            (plot_y + PLOT_H + 3.5, "0ms".to_string()),
        ] {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" font-size="10" fill="{LATENCY_LINE}">{label}</text>"#,
                fmt1(WIDTH - RIGHT + 4.0),
                fmt1(y)
            );
        }
    }
    out.push_str("</g>\n");
}

/// The state intervals within the time range: `(from, to, state)`, closed before the first change.
fn segments(scale: &Scale, states: &[(u64, StateKind)]) -> Vec<(u64, u64, StateKind)> {
    let mut out = Vec::with_capacity(states.len() + 1);
    let mut from = scale.start_ms;
    let mut current = StateKind::Closed;
    for &(at, state) in states {
        let at = at.clamp(scale.start_ms, scale.end_ms);
        if at > from {
            out.push((from, at, current));
            from = at;
        }
        current = state;
    }
    if scale.end_ms > from {
        out.push((from, scale.end_ms, current));
    }
    out
}

fn polyline(
    out: &mut String,
    scale: &Scale,
    points: &[(u64, f64)],
    y: impl Fn(f64) -> f64,
    colour: &str,
    extra: &str,
) {
    let finite: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|&(t, v)| (scale.x(t), y(v)))
        .collect();
    match finite.as_slice() {
        [] => {}
        [(x, y)] => {
            let _ = writeln!(
                out,
                r#"<circle cx="{}" cy="{}" r="2" fill="{colour}"/>"#,
                fmt1(*x),
                fmt1(*y)
            );
        }
        many => {
            let mut coords = String::with_capacity(many.len() * 12);
            for (x, y) in many {
                let _ = write!(coords, "{},{} ", fmt1(*x), fmt1(*y));
            }
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5" stroke-linejoin="round"{extra}/>"#,
                coords.trim_end()
            );
        }
    }
}

fn state_colour(state: StateKind) -> &'static str {
    match state {
        StateKind::Closed => CLOSED,
        StateKind::Open => OPEN,
        StateKind::HalfOpen => HALF_OPEN,
    }
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v` (at least 1), for a latency scale that
/// reads well.
fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 1.0 {
        return 1.0;
    }
    let mut base = 1.0;
    while base * 10.0 < v {
        base *= 10.0;
    }
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * base)
        .find(|c| *c >= v)
        .unwrap_or(base * 10.0)
}

fn fmt_ms(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn fmt1(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_string)
}

/// Escapes text for XML character data and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab and newline are not allowed in XML 1.0 at all.
            c if c.is_control() && c != '\t' && c != '\n' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Timeline {
        Timeline {
            title: "replay <test> & more".into(),
            start_ms: 1_000,
            end_ms: 61_000,
            series: vec![
                Series {
                    name: "outbound|8080||content".into(),
                    states: vec![
                        (11_000, StateKind::Open),
                        (21_000, StateKind::HalfOpen),
                        (21_500, StateKind::Closed),
                    ],
                    error_rate: vec![(1_000, 0.0), (11_000, 1.0), (31_000, 0.0)],
                    latency_ms: vec![(1_000, 20.0), (11_000, 480.0)],
                },
                Series {
                    name: "user".into(),
                    states: vec![],
                    error_rate: vec![],
                    latency_ms: vec![],
                },
            ],
        }
    }

    #[test]
    fn renders_a_standalone_document_with_every_row() {
        let svg = render(&sample());
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("outbound|8080||content") && svg.contains(">user<"));
        assert!(svg.contains("replay &lt;test&gt; &amp; more"));
        assert!(!svg.contains("<test>"), "text is escaped");
        assert_eq!(svg.matches("<g class=\"upstream\">").count(), 2);
        assert!(svg.contains(OPEN) && svg.contains(HALF_OPEN) && svg.contains(CLOSED));
        assert!(
            svg.contains("500ms"),
            "latency scale rounds 480 up to 500: {svg}"
        );
        assert!(svg.contains(">60s<"), "axis reaches the end in seconds");
    }

    #[test]
    fn segments_start_closed_and_clip_to_the_range() {
        let scale = Scale::new(1_000, 10_000);
        let segs = segments(
            &scale,
            &[
                (0, StateKind::Open),
                (5_000, StateKind::Closed),
                (20_000, StateKind::Open),
            ],
        );
        assert_eq!(
            segs,
            vec![
                (1_000, 5_000, StateKind::Open),
                (5_000, 10_000, StateKind::Closed)
            ]
        );
        assert_eq!(
            segments(&scale, &[]),
            vec![(1_000, 10_000, StateKind::Closed)]
        );
    }

    #[test]
    fn degenerate_ranges_and_values_still_render() {
        let t = Timeline {
            title: String::new(),
            start_ms: 5,
            end_ms: 5,
            series: vec![Series {
                name: "a".into(),
                states: vec![],
                error_rate: vec![(5, f64::NAN), (5, 0.5)],
                latency_ms: vec![(5, 0.0)],
            }],
        };
        let svg = render(&t);
        assert!(svg.contains("<circle"), "{svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert_eq!(tick_step_s(300.0), 30);
        assert_eq!(tick_step_s(5.0), 1);
        assert_eq!(nice_ceiling(480.0), 500.0);
        assert_eq!(nice_ceiling(1500.0), 2000.0);
    }
}
