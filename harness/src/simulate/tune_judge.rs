//! How `--tune` judges one replay: which outages it caught and when, which trips were needless, and
//! the margin it left (see the objective in [`super::tune::OBJECTIVE`]).

use cb_core::breaker::StateKind;
use cb_core::config::WindowConfig;
use serde::Serialize;

use super::episodes::{Episode, Episodes, Outcomes, Peak};
use super::log::format_rfc3339_ms;
use super::replay::UpstreamReport;
use super::tune::{Knobs, TuneOptions};

/// A trip this long before an episode's first bad second is still the episode's.
const TRIP_BEFORE_MS: u64 = 1_000;
/// ... and this long after its last, or as long as its failures are still in the window.
const TRIP_AFTER_MS: u64 = 2_000;
/// The margin asks a blip, and normal traffic, to come at most this close to a trip: the longest run
/// of failures at most 2/3 of `failure_threshold`, the window's failure rate at most 2/3 of
/// `error_rate_threshold`.
pub const MARGIN: f64 = 2.0 / 3.0;
/// ... and an outage, within a third of `--outage`, to go past a trigger by this much: a window
/// failure rate of 1.25 × `error_rate_threshold` (or halfway from it to 100 %, if that is lower), or
/// 1.25 × `failure_threshold` failures in a row; and that again within every third of `--outage`
/// until the outage ends.
pub const OUTAGE_MARGIN: f64 = 0.8;

/// One outage and how a candidate dealt with it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Catch {
    /// When it began (ms since the epoch).
    pub start_ms: u64,
    /// How long it lasted, ms.
    pub length_ms: u64,
    /// Its failure fraction.
    pub error_rate: f64,
    /// From its start to the breaker's first moment not Closed in it, ms; `None`: never.
    pub caught_after_ms: Option<u64>,
    /// Caught within half of `--outage`.
    pub in_time: bool,
}

/// What one candidate would have done to an upstream's traffic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Effect {
    /// Each outage, in order.
    pub outages: Vec<Catch>,
    /// Trips on a blip.
    pub blip_trips: u32,
    /// Trips outside every episode.
    pub normal_traffic_trips: u32,
    /// Trips on episodes between `--blip` and `--outage` long (neither required nor needless).
    pub other_trips: u32,
    /// Where the margin falls short, in words: outages caught after a third of `--outage`, blips and
    /// normal traffic that came closer to a trip than [`MARGIN`].
    pub short_of_margin: Vec<String>,
    /// Rejected calls that succeeded in the log.
    pub would_succeed_rejected: u64,
    /// Failures among the calls let through.
    pub failures_let_through: u64,
    /// Times of the needless trips (ms), for the report.
    #[serde(skip)]
    pub needless_at_ms: Vec<u64>,
    /// How far short of the margin, summed (ms late past a third of `--outage`, and parts per
    /// million of a threshold), so that the search can move towards it.
    #[serde(skip)]
    pub margin_shortfall: u64,
}

impl Effect {
    /// Outages not caught in time.
    pub fn missed(&self) -> usize {
        self.outages.iter().filter(|c| !c.in_time).count()
    }

    /// Blip trips and trips in normal traffic.
    pub fn needless_trips(&self) -> u32 {
        self.blip_trips + self.normal_traffic_trips
    }

    /// How far the missed outages were from being caught in time (ms; a miss with no catch at all
    /// counts its whole length plus `outage_ms`), so that the search can move towards catching them.
    pub fn lateness_ms(&self, outage_ms: u64) -> u64 {
        self.outages
            .iter()
            .filter(|c| !c.in_time)
            .map(|c| {
                c.caught_after_ms.map_or(c.length_ms + outage_ms, |ms| {
                    ms.saturating_sub(outage_ms / 2)
                })
            })
            .sum()
    }
}

/// Judges one replay of an upstream, whose settings were `knobs`, against its episodes.
pub fn judge(u: &UpstreamReport, episodes: &Episodes, knobs: &Knobs, opts: &TuneOptions) -> Effect {
    let outages: Vec<Catch> = episodes
        .episodes
        .iter()
        .filter(|e| e.len_ms() >= opts.outage_ms)
        .map(|e| catch(u, e, opts))
        .collect();
    let mut effect = Effect {
        outages,
        blip_trips: 0,
        normal_traffic_trips: 0,
        other_trips: 0,
        short_of_margin: Vec::new(),
        would_succeed_rejected: u.rejected_would_have_succeeded,
        failures_let_through: u.failures_let_through,
        needless_at_ms: Vec::new(),
        margin_shortfall: 0,
    };
    for p in u.open_periods.iter().filter(|p| p.reason != "forced") {
        let t = p.opened_at_ms;
        match episode_of(episodes, knobs.window, t).map(Episode::len_ms) {
            Some(len) if len >= opts.outage_ms => {}
            Some(len) if len < opts.blip_ms => {
                effect.blip_trips += 1;
                effect.needless_at_ms.push(t);
            }
            Some(_) => effect.other_trips += 1,
            None => {
                effect.normal_traffic_trips += 1;
                effect.needless_at_ms.push(t);
            }
        }
    }
    margin(&mut effect, episodes, knobs, opts);
    effect
}

fn catch(u: &UpstreamReport, e: &Episode, opts: &TuneOptions) -> Catch {
    let open_at_start = u
        .states
        .iter()
        .take_while(|(at, _)| *at <= e.start_ms)
        .last()
        .is_some_and(|(_, s)| *s != StateKind::Closed);
    let caught_after_ms = if open_at_start {
        Some(0)
    } else {
        u.states
            .iter()
            .find(|(at, s)| (e.start_ms..e.end_ms).contains(at) && *s != StateKind::Closed)
            .map(|(at, _)| at - e.start_ms)
    };
    Catch {
        start_ms: e.start_ms,
        length_ms: e.len_ms(),
        error_rate: e.error_rate(),
        caught_after_ms,
        in_time: caught_after_ms.is_some_and(|ms| ms <= opts.outage_ms / 2),
    }
}

/// How long an outage went, at most, without its window past a trigger by the outage margin.
struct Uncleared {
    /// The longest such stretch, ms (from the outage's start, between two outcomes that clear it,
    /// or to its end).
    longest_ms: u64,
    /// Where it began.
    from_ms: u64,
    /// The worst the window showed in the outage's first `third`.
    first_third: Peak,
    /// The failure rate that clears the rate trigger by the margin.
    rate_needed: f64,
}

/// The stretches of outage `e` in which the window (every call let through) was not past a trigger
/// by [`OUTAGE_MARGIN`]. A catch that a lucky moment made (a run of failures in a partial outage, a
/// window that reached `minimum_requests` once) leaves a long one: another day of the same traffic,
/// or a breaker that closes in the middle of the outage, would be late. So the margin asks for it
/// within every `third` of the outage, not only the first.
fn uncleared(o: &Outcomes, knobs: &Knobs, e: &Episode, third: u64) -> Uncleared {
    let thr = f64::from(knobs.error_rate_ppm) / 1e6;
    let rate_needed = (thr / OUTAGE_MARGIN).min((1.0 + thr) / 2.0);
    let run_needed = (f64::from(knobs.failure_threshold) / OUTAGE_MARGIN).ceil();
    let by = e.start_ms + third;
    let mut u = Uncleared {
        longest_ms: 0,
        from_ms: e.start_ms,
        first_third: Peak::default(),
        rate_needed,
    };
    let mut last_clear = e.start_ms;
    let stretch = |from: u64, to: u64, u: &mut Uncleared| {
        if to.saturating_sub(from) > u.longest_ms {
            u.longest_ms = to.saturating_sub(from);
            u.from_ms = from;
        }
    };
    o.each(knobs.window, knobs.minimum_requests, |t, p| {
        if !(e.start_ms..=e.end_ms).contains(&t) {
            return;
        }
        if t <= by {
            u.first_third.rate = u.first_third.rate.max(p.rate);
            u.first_third.run = u.first_third.run.max(p.run);
        }
        let clear = p.rate >= rate_needed
            || (knobs.failure_threshold > 0 && f64::from(p.run) >= run_needed);
        if clear {
            stretch(last_clear, t, &mut u);
            last_clear = t;
        }
    });
    stretch(last_clear, e.end_ms, &mut u);
    u
}

/// From 1s before an episode to when its failures have left `window` (at least 2s after it).
fn zone(episodes: &Episodes, window: WindowConfig, e: &Episode) -> (u64, u64) {
    let reach = episodes.outcomes.reach_end(window, e.end_ms);
    (
        e.start_ms.saturating_sub(TRIP_BEFORE_MS),
        reach.max(e.end_ms + TRIP_AFTER_MS),
    )
}

/// The episode a trip at `t` belongs to, for a breaker with `window`: the last one whose zone (see
/// [`zone`]) holds `t`.
pub fn episode_of(episodes: &Episodes, window: WindowConfig, t: u64) -> Option<&Episode> {
    episodes.episodes.iter().rev().find(|e| {
        let (from, to) = zone(episodes, window, e);
        (from..=to).contains(&t)
    })
}

/// Records where the candidate falls short of the margin.
fn margin(effect: &mut Effect, episodes: &Episodes, knobs: &Knobs, opts: &TuneOptions) {
    let third = opts.outage_ms / 3;
    let (o, min) = (&episodes.outcomes, knobs.minimum_requests);
    let outages = episodes
        .episodes
        .iter()
        .filter(|e| e.len_ms() >= opts.outage_ms);
    for (c, e) in effect.outages.iter().zip(outages) {
        let late = c
            .caught_after_ms
            .map_or(c.length_ms + opts.outage_ms, |ms| ms.saturating_sub(third));
        let stretch = uncleared(o, knobs, e, third);
        let clear = stretch.longest_ms <= third;
        if late == 0 && clear {
            continue;
        }
        effect.margin_shortfall += late;
        if !clear {
            effect.margin_shortfall += stretch.longest_ms - third;
            if stretch.from_ms == e.start_ms {
                let short = (stretch.rate_needed - stretch.first_third.rate).max(0.0);
                effect.margin_shortfall += (short * 1e6) as u64;
            }
        }
        let how = match c.caught_after_ms {
            Some(ms) if late > 0 => format!("caught after {}, later than the margin's {}", secs(ms), secs(third)),
            None => "not caught".into(),
            Some(_) if stretch.from_ms == e.start_ms => format!(
                "its window failure rate reached only {:.2} by {}, short of the {:.2} the margin asks",
                stretch.first_third.rate,
                secs(third),
                stretch.rate_needed
            ),
            Some(_) => format!(
                "from {} its window stayed short of a trigger by the margin for {}, longer than the margin's {}: a breaker that had just closed would have caught it late",
                clock(stretch.from_ms),
                secs(stretch.longest_ms),
                secs(third)
            ),
        };
        effect
            .short_of_margin
            .push(format!("the outage at {}: {how}", clock(c.start_ms)));
    }
    let zones: Vec<(u64, u64)> = episodes
        .episodes
        .iter()
        .map(|e| zone(episodes, knobs.window, e))
        .collect();
    // A blip (or normal traffic) that did trip is priority 2's; the margin is about coming close.
    let tripped = |from: u64, to: u64| {
        effect
            .needless_at_ms
            .iter()
            .any(|t| (from..=to).contains(t))
    };
    let mut close = Vec::new();
    for (e, (from, to)) in episodes.episodes.iter().zip(&zones) {
        if e.len_ms() < opts.blip_ms && !tripped(*from, *to) {
            let peak = o.peak(knobs.window, min, |t| (*from..=*to).contains(&t));
            close.push((peak, format!("the blip at {}", clock(e.start_ms))));
        }
    }
    if effect.normal_traffic_trips == 0 {
        let normal = o.peak(knobs.window, min, |t| {
            !zones.iter().any(|(f, to)| (*f..=*to).contains(&t))
        });
        close.push((normal, "normal traffic".into()));
    }
    for (peak, what) in close {
        close_call(effect, knobs, peak, what);
    }
}

/// Notes `what` when its peak came closer to a trip than the margin allows.
fn close_call(effect: &mut Effect, knobs: &Knobs, peak: Peak, what: String) {
    let rate_limit = f64::from(knobs.error_rate_ppm) / 1e6 * MARGIN;
    let run_limit = f64::from(knobs.failure_threshold) * MARGIN;
    let mut short = Vec::new();
    if peak.rate > rate_limit {
        effect.margin_shortfall += ((peak.rate - rate_limit) * 1e6) as u64;
        short.push(format!(
            "a window failure rate of {:.2} against error_rate_threshold {}",
            peak.rate,
            f64::from(knobs.error_rate_ppm) / 1e6
        ));
    }
    if knobs.failure_threshold > 0 && f64::from(peak.run) > run_limit {
        effect.margin_shortfall +=
            ((f64::from(peak.run) - run_limit) / f64::from(knobs.failure_threshold) * 1e6) as u64;
        short.push(format!(
            "{} failures in a row against failure_threshold {}",
            peak.run, knobs.failure_threshold
        ));
    }
    if !short.is_empty() {
        effect.short_of_margin.push(format!(
            "{what} came close to a trip ({})",
            short.join(", ")
        ));
    }
}

/// Seconds, as the report writes them.
pub fn secs(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// The time of day (UTC) of an instant, `HH:MM:SS`.
pub fn clock(ms: u64) -> String {
    let t = format_rfc3339_ms(ms);
    t.get(11..19).map_or(t.clone(), str::to_string)
}
