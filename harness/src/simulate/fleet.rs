//! `simulate --fleet N`: the traffic of one failing upstream spread over N proxies, each with its own
//! breaker, and what the fleet did to that upstream while it failed and as it recovered.
//!
//! Every Envoy keeps its own breakers (no mesh shares breaker state). So a fleet of N caller proxies
//! meets an outage N times over: each proxy sees a share of the traffic, opens on its own failures,
//! and probes and closes on its own clock. This module replays that: the calls to the upstream go to
//! the proxies in turn (call `i` of the log to proxy `i mod N`: an even spread, the same on every run),
//! each proxy is a [`Proxy`] of its own (the core's worker over its own breaker table, seeded with
//! [`proxy_seed`] of `--seed` and its number), and one [`Fleet`] observer gathers what reached the
//! upstream. Proxies share nothing, so running them one after the other is the same as at once.
//!
//! The failure is the upstream's longest failure episode in the log (as `--tune` measures them: every
//! call as if let through, against the upstream's noise). The run is made twice: with the
//! configuration as given, and with `open_timeout_jitter` and `recovery_ramp` taken out of it
//! everywhere, so that what they change is seen side by side.
//!
//! A log holds no retries: a call the breaker rejects is not sent again later. So the traffic after
//! the recovery can never exceed the log's own; what the fleet changes is how suddenly it comes back,
//! which `max_recovery_step` measures.

use std::sync::Arc;

use cb_core::breaker::StateKind;
use cb_core::config::FilterConfig;
use cb_core::telemetry::Event;
use serde::Serialize;
use serde_json::Value;

use super::episodes::Episode;
use super::log::{format_rfc3339_ms, Call};
use super::proxy::{judge_all, Admit, Proxy};
use super::replay::proxy_seed;
use super::run::{run, Observer};
use super::tune::{by_key, episodes_of};

/// What `--help` says about `--fleet`.
pub const HELP: &str = "\
--fleet N: the calls to the upstream with the longest failure episode (measured as for --tune) go to
N proxies in turn, each with its own breaker (its own seed, from --seed), as N Envoys would see them.
The run is made with --config as given, and again with open_timeout_jitter and recovery_ramp taken out
of it. Figures, per run:
  - time_to_open_all_ms: from the failure's start until every proxy's breaker has opened;
  - calls_to_failed_upstream: calls that reached the upstream while it failed, all proxies together;
  - max_probes_in_100ms: the most HalfOpen probes that reached it in any 100 ms;
  - peak_recovery_ratio: the most calls it received in any second after it recovered, over its rate
    per second before the failure (a log holds no retries, so this stays near 1);
  - max_recovery_step: the largest rise of its traffic from one second to the next after it
    recovered, over the same rate (1.0: all of it came back at once).
With --json: one object, the figures with --config as given at the top level and without jitter and
ramp in \"without_jitter_or_ramp\".";

/// Most proxies `--fleet` simulates.
pub const MAX_FLEET: u32 = 10_000;
/// The width of the windows probes are counted in, ms.
pub const PROBE_WINDOW_MS: u64 = 100;
/// The recovery's traffic is counted in buckets this wide, ms, and summed over one second.
const BUCKET_MS: u64 = 100;
const BUCKETS_PER_S: usize = 10;

/// What one fleet did to the failing upstream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetFigures {
    /// From the failure's start until every proxy's breaker had left Closed (Open, or already
    /// probing), ms; `None` when some proxy never opened while the upstream failed.
    pub time_to_open_all_ms: Option<u64>,
    /// Proxies whose breaker opened while the upstream failed (or was open when it began).
    pub proxies_opened: u32,
    /// Calls that reached the upstream while it failed, summed over the proxies.
    pub calls_to_failed_upstream: u64,
    /// HalfOpen probes that reached the upstream, in the whole run.
    pub probes: u64,
    /// The most probes that reached it in any 100 ms.
    pub max_probes_in_100ms: u64,
    /// The most calls that reached it in any one second after it recovered, over its rate per
    /// second before the failure; `None` when no traffic came before the failure.
    pub peak_recovery_ratio: Option<f64>,
    /// The largest rise of its traffic from one second to the next after it recovered (calls in a
    /// second minus calls in the second before), over its rate per second before the failure: 1.0
    /// means all its traffic came back at once.
    pub max_recovery_step: Option<f64>,
}

/// `simulate --fleet N`: the figures with the configuration as given, and without jitter and ramp.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetReport {
    /// Where the calls came from.
    pub source: String,
    /// The upstream whose failure the fleet meets.
    pub upstream: String,
    /// Proxies in the fleet.
    pub proxies: u32,
    /// `--seed`.
    pub seed: u64,
    /// The failure: the start of its first bad second (ms since the epoch).
    pub failure_start_ms: u64,
    /// RFC 3339 of `failure_start_ms`.
    pub failure_start: String,
    /// End of its last bad second (ms since the epoch).
    pub failure_end_ms: u64,
    /// The upstream's calls per second before the failure, all proxies together.
    pub rate_before_per_s: Option<f64>,
    /// The upstream's `open_timeout_jitter` as configured.
    pub open_timeout_jitter: f64,
    /// The upstream's `recovery_ramp` as configured, ms.
    pub recovery_ramp_ms: Option<u64>,
    /// With the configuration as given.
    #[serde(flatten)]
    pub figures: FleetFigures,
    /// With `open_timeout_jitter` and `recovery_ramp` taken out of the configuration.
    pub without_jitter_or_ramp: FleetFigures,
}

/// What a fleet run needs.
pub struct FleetOptions {
    /// Where the calls came from, for the report.
    pub source: String,
    /// Proxies in the fleet, 1 to [`MAX_FLEET`].
    pub proxies: u32,
    /// `--seed`: proxy `n` draws from [`proxy_seed`] of it and `n`.
    pub seed: u64,
}

/// The configuration `text` with `open_timeout_jitter` and `recovery_ramp` taken out, at the top and
/// in every `upstreams` entry.
pub fn without_jitter_or_ramp(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Ok(String::new());
    }
    let mut v: Value =
        serde_json::from_str(text).map_err(|e| format!("circuit breaker configuration: {e}"))?;
    let strip = |o: &mut serde_json::Map<String, Value>| {
        o.remove("open_timeout_jitter");
        o.remove("recovery_ramp");
    };
    if let Some(top) = v.as_object_mut() {
        strip(top);
        if let Some(Value::Object(ups)) = top.get_mut("upstreams") {
            ups.values_mut()
                .filter_map(Value::as_object_mut)
                .for_each(strip);
        }
    }
    Ok(v.to_string())
}

/// The upstream of `calls` with the longest failure episode, its calls, and that episode.
fn failing_upstream(
    calls: &[Call],
    config: &FilterConfig,
) -> Result<(String, Vec<Call>, Episode), String> {
    let mut best: Option<(String, Vec<Call>, Episode)> = None;
    for (key, calls) in by_key(calls, config) {
        let episodes = episodes_of(&judge_all(config, &calls));
        let longest = episodes.episodes.into_iter().max_by_key(Episode::len_ms);
        if let Some(e) = longest {
            if best.as_ref().is_none_or(|b| e.len_ms() > b.2.len_ms()) {
                best = Some((key, calls, e));
            }
        }
    }
    best.ok_or_else(|| {
        "no upstream of the input has a failure episode (see --help of --tune): nothing for a fleet \
         to meet"
            .to_string()
    })
}

/// Runs the fleet under `config` and under `without` (the same configuration without jitter and
/// ramp) against the longest failure in `calls`.
pub fn fleet(
    calls: &[Call],
    config: &FilterConfig,
    without: &FilterConfig,
    opts: &FleetOptions,
) -> Result<FleetReport, String> {
    if !(1..=MAX_FLEET).contains(&opts.proxies) {
        return Err(format!(
            "--fleet must be 1 to {MAX_FLEET} proxies, got {}",
            opts.proxies
        ));
    }
    let (upstream, calls, failure) = failing_upstream(calls, config)?;
    let rate_before = rate_before(&calls, failure.start_ms);
    let cfg = config.breaker_for(&upstream);
    let run = |config: &FilterConfig| {
        let mut fleet = Fleet::new(&calls, &failure, opts.proxies);
        let shared = Arc::new(config.clone());
        for n in 0..opts.proxies {
            let mut proxy = Proxy::new(Arc::clone(&shared), proxy_seed(opts.seed, n.into()));
            fleet.opened.push(None);
            let picked = (n as usize..calls.len()).step_by(opts.proxies as usize);
            run(&calls, picked, &mut proxy, &config.upstream_key, &mut fleet);
        }
        fleet.figures(rate_before)
    };
    Ok(FleetReport {
        source: opts.source.clone(),
        upstream: upstream.clone(),
        proxies: opts.proxies,
        seed: opts.seed,
        failure_start_ms: failure.start_ms,
        failure_start: format_rfc3339_ms(failure.start_ms),
        failure_end_ms: failure.end_ms,
        rate_before_per_s: rate_before,
        open_timeout_jitter: f64::from(cfg.open_timeout_jitter_ppm) / 1e6,
        recovery_ramp_ms: cfg.recovery_ramp_ms,
        figures: run(config),
        without_jitter_or_ramp: run(without),
    })
}

/// Calls per second from the first call to `until`; `None` with less than a second of it.
fn rate_before(calls: &[Call], until: u64) -> Option<f64> {
    let first = calls.iter().map(|c| c.start_ms).min()?;
    let span_ms = until.checked_sub(first).filter(|ms| *ms >= 1_000)?;
    let n = calls.iter().filter(|c| c.start_ms < until).count();
    Some(n as f64 * 1000.0 / span_ms as f64)
}

/// What reached the upstream, and when each proxy opened, as the proxies run one after the other.
struct Fleet {
    start_ms: u64,
    end_ms: u64,
    /// Per proxy run so far: when its breaker first left Closed during the failure (the failure's
    /// start if it was not Closed then).
    opened: Vec<Option<u64>>,
    calls_to_failed: u64,
    probes: Vec<u64>,
    /// Calls that reached the upstream, per [`BUCKET_MS`] from one second before the recovery.
    after: Vec<u64>,
}

impl Fleet {
    fn new(calls: &[Call], failure: &Episode, proxies: u32) -> Self {
        let last = calls.iter().map(|c| c.start_ms).max().unwrap_or(0);
        let from = failure.end_ms.saturating_sub(1_000);
        let buckets = last.saturating_sub(from) / BUCKET_MS + 1;
        Self {
            start_ms: failure.start_ms,
            end_ms: failure.end_ms,
            opened: Vec::with_capacity(proxies as usize),
            calls_to_failed: 0,
            probes: Vec::new(),
            after: vec![0; usize::try_from(buckets).unwrap_or(0)],
        }
    }

    fn heard(&mut self, at_ms: u64, event: &Event) {
        let Event::Transition(t) = event else {
            return;
        };
        let Some(opened) = self.opened.last_mut() else {
            return;
        };
        match t.to {
            // A breaker that opened before the failure, and was not Closed when it began, had
            // opened by its start.
            StateKind::Open | StateKind::HalfOpen if opened.is_none() && at_ms < self.end_ms => {
                *opened = Some(at_ms.max(self.start_ms));
            }
            StateKind::Closed if at_ms < self.start_ms => *opened = None,
            _ => {}
        }
    }

    fn reached(&mut self, at_ms: u64) {
        if (self.start_ms..self.end_ms).contains(&at_ms) {
            self.calls_to_failed += 1;
        }
        let from = self.end_ms.saturating_sub(1_000);
        if let Some(ms) = at_ms.checked_sub(from) {
            let i = usize::try_from(ms / BUCKET_MS).unwrap_or(usize::MAX);
            if let Some(b) = self.after.get_mut(i) {
                *b += 1;
            }
        }
    }

    fn figures(mut self, rate_before: Option<f64>) -> FleetFigures {
        let all_opened = self.opened.iter().all(Option::is_some);
        let last_open = self.opened.iter().flatten().max().copied();
        self.probes.sort_unstable();
        // Per second (ten buckets) from the recovery on, and the second before each.
        let seconds: Vec<u64> = self
            .after
            .windows(BUCKETS_PER_S)
            .map(|w| w.iter().sum())
            .collect();
        let peak = seconds.iter().skip(BUCKETS_PER_S).max().copied();
        let step = seconds
            .iter()
            .zip(seconds.iter().skip(BUCKETS_PER_S))
            .map(|(before, now)| now.saturating_sub(*before))
            .max();
        let ratio = |n: Option<u64>| Some(n? as f64 / rate_before.filter(|r| *r > 0.0)?);
        FleetFigures {
            time_to_open_all_ms: last_open.filter(|_| all_opened).map(|t| t - self.start_ms),
            proxies_opened: self.opened.iter().flatten().count() as u32,
            calls_to_failed_upstream: self.calls_to_failed,
            probes: self.probes.len() as u64,
            max_probes_in_100ms: most_within(&self.probes, PROBE_WINDOW_MS),
            peak_recovery_ratio: ratio(peak),
            max_recovery_step: ratio(step),
        }
    }
}

/// The most of the sorted times `t` that fall in any `width` ms.
fn most_within(t: &[u64], width: u64) -> u64 {
    let mut from = 0;
    let mut most = 0;
    for (i, &x) in t.iter().enumerate() {
        while t.get(from).is_some_and(|f| *f + width <= x) {
            from += 1;
        }
        most = most.max(i + 1 - from);
    }
    most as u64
}

impl Observer for Fleet {
    fn admitted(&mut self, at_ms: u64, _: usize, admit: Admit, events: &[Event]) {
        for e in events {
            self.heard(at_ms, e);
            if matches!(e, Event::Admitted { probe: true }) {
                self.probes.push(at_ms);
            }
        }
        if admit.reached_upstream() {
            self.reached(at_ms);
        }
    }

    fn settled(&mut self, at_ms: u64, _: usize, events: &[Event]) {
        events.iter().for_each(|e| self.heard(at_ms, e));
    }

    fn stuck(&mut self, at_ms: u64, events: &[(String, Event)]) {
        events.iter().for_each(|(_, e)| self.heard(at_ms, e));
    }
}

/// The report as a table: one row with the configuration as given, one without jitter and ramp.
pub fn render_fleet(r: &FleetReport) -> String {
    let ramp = r
        .recovery_ramp_ms
        .map_or("none".into(), super::tune::duration);
    let mut out = format!(
        "{} proxies against {} failing from {} for {:.1}s ({}; --seed {})\n\n",
        r.proxies,
        r.upstream,
        r.failure_start,
        (r.failure_end_ms - r.failure_start_ms) as f64 / 1000.0,
        r.source,
        r.seed
    );
    out += "                                      time to open all  calls to failed  max probes/100ms  peak recovery  max 1s step\n";
    let row = |name: &str, f: &FleetFigures| {
        let ratio = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
        format!(
            "{name:<38}{:>16}  {:>15}  {:>16}  {:>13}  {:>11}\n",
            f.time_to_open_all_ms.map_or(
                format!("never ({}/{})", f.proxies_opened, r.proxies),
                super::tune::duration
            ),
            f.calls_to_failed_upstream,
            f.max_probes_in_100ms,
            ratio(f.peak_recovery_ratio),
            ratio(f.max_recovery_step),
        )
    };
    out += &row("without jitter or ramp", &r.without_jitter_or_ramp);
    out += &row(
        &format!("jitter {}, ramp {ramp}", r.open_timeout_jitter),
        &r.figures,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_counted_in_any_100ms_not_in_fixed_buckets() {
        assert_eq!(most_within(&[], 100), 0);
        // 50 and 140 are 90 ms apart, in no one fixed bucket of 100 ms.
        assert_eq!(most_within(&[0, 50, 140, 149, 300], 100), 3);
        assert_eq!(most_within(&[0, 100, 200], 100), 1);
    }

    #[test]
    fn jitter_and_ramp_come_out_everywhere_and_nothing_else() {
        let text = r#"{"open_timeout_jitter": 0.2, "recovery_ramp": "10s", "open_timeout": "5s",
            "upstreams": {"a": {"recovery_ramp": "3s", "failure_threshold": 3}}}"#;
        let v: Value = serde_json::from_str(&without_jitter_or_ramp(text).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"open_timeout": "5s", "upstreams": {"a": {"failure_threshold": 3}}})
        );
        assert_eq!(without_jitter_or_ramp(" ").unwrap(), "");
    }
}
