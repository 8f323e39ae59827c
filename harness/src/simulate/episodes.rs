//! Failure episodes measured on the log: stretches of time in which an upstream failed, whatever the
//! breaker did. They are the ground truth a replay is judged against: the report's blip measure
//! ([`failure_episode_ms`], against the upstream's own `error_rate_threshold`), and `--tune`'s outages
//! and blips ([`find_episodes`], against the upstream's normal noise, so that the thing being tuned does
//! not decide what counts as an outage).

use std::collections::BTreeMap;

use cb_core::classify::{Classification, Outcome};
use cb_core::config::{BreakerConfig, WindowConfig};
use cb_core::window::Window;
use serde::Serialize;

/// Judged calls, failures and slow calls per second of end time (ignored calls say nothing).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SecondBucket {
    pub(crate) judged: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

pub(crate) fn second_buckets(
    samples: &[(u64, Classification, u64)],
) -> BTreeMap<u64, SecondBucket> {
    let mut buckets: BTreeMap<u64, SecondBucket> = BTreeMap::new();
    for (end, verdict, _) in samples {
        if verdict.outcome == Outcome::Ignored {
            continue;
        }
        let b = buckets.entry(end / 1000).or_default();
        b.judged += 1;
        b.failures += u64::from(verdict.outcome == Outcome::Failure);
        b.slow += u64::from(verdict.slow);
    }
    buckets
}

/// The failure episode behind a trip at `trip_ms`, as the module docs define it.
pub(crate) fn failure_episode_ms(
    buckets: &BTreeMap<u64, SecondBucket>,
    cfg: &BreakerConfig,
    trip_ms: u64,
) -> u64 {
    // Exact integer comparison, like the core's window: failures / judged >= ppm / 1e6.
    let reaches = |part: u64, whole: u64, ppm: u32| {
        part.saturating_mul(1_000_000) >= u64::from(ppm).saturating_mul(whole)
    };
    let bad = |b: &SecondBucket| {
        b.judged > 0
            && (reaches(b.failures, b.judged, cfg.error_rate_threshold_ppm)
                || (cfg.slow_call_duration_ms.is_some()
                    && reaches(b.slow, b.judged, cfg.slow_call_rate_threshold_ppm)))
    };
    let Some((&at, bucket)) = buckets.range(..=trip_ms / 1000).next_back() else {
        return 0;
    };
    if !bad(bucket) {
        return 0;
    }
    let first = buckets
        .range(..at)
        .rev()
        .take_while(|(_, b)| bad(b))
        .last()
        .map_or(at, |(s, _)| *s);
    let last = buckets
        .range(at + 1..)
        .take_while(|(_, b)| bad(b))
        .last()
        .map_or(at, |(s, _)| *s);
    (last + 1 - first) * 1000
}

/// Width of the buckets whose median error rate is an upstream's noise, seconds.
pub const NOISE_BUCKET_S: u64 = 10;
/// Good seconds (with calls, below the threshold) an episode bridges between two bad ones: a partial
/// outage at 50 % errors has the odd second below it, and is still one outage.
///
/// More of them, up to [`MAX_SILENT_GAP_S`], are bridged when the episode, with them, still fails at
/// the threshold rate: at a few calls a second, a partial outage has runs of lucky seconds, and each
/// split would make the search time its catch from a later start than the failures'. Lone noise
/// failures seconds apart never add up to that rate across the good seconds between them.
pub const MAX_GOOD_GAP_S: u64 = 2;
/// Seconds without calls an episode bridges between two bad ones: they say nothing either way.
pub const MAX_SILENT_GAP_S: u64 = 10;

/// Failures a run of bad seconds needs to be an episode: one or two lone failures are noise.
pub const MIN_EPISODE_FAILURES: u64 = 3;

/// A stretch in which an upstream's error rate stood well above its normal noise (see
/// [`find_episodes`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Episode {
    /// Start of its first bad second (ms since the epoch).
    pub start_ms: u64,
    /// End of its last bad second (ms).
    pub end_ms: u64,
    /// Judged calls that ended inside it (bridged seconds included).
    pub calls: u64,
    /// Failures among them.
    pub failures: u64,
}

impl Episode {
    /// How long it lasted, ms.
    pub fn len_ms(&self) -> u64 {
        self.end_ms.saturating_sub(self.start_ms)
    }

    /// Its failure fraction.
    pub fn error_rate(&self) -> f64 {
        self.failures as f64 / self.calls.max(1) as f64
    }
}

/// An upstream's noise and failure episodes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Episodes {
    /// The median error rate of its 10 s buckets outside episodes.
    pub noise: f64,
    /// The error rate a second must reach to be bad: `max(3 × noise, noise + 0.2)`, at most 1.
    pub threshold: f64,
    /// In time order.
    pub episodes: Vec<Episode>,
    /// The outcomes they were found in.
    #[serde(skip)]
    pub outcomes: Outcomes,
}

/// An upstream's judged outcomes in end-time order, with running counts, so that what a breaker's
/// window would have held at any outcome is a subtraction.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcomes {
    ends: Vec<u64>,
    /// Failures among the first `i` outcomes (one more entry than `ends`).
    failures_before: Vec<u32>,
    /// Failures in a row ending with outcome `i`.
    run: Vec<u32>,
}

/// What a window would have held at its worst over a stretch of time (see [`Outcomes::peak`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Peak {
    /// The highest failure rate over the window, among windows with at least `minimum_requests`.
    pub rate: f64,
    /// The most failures in a row.
    pub run: u32,
}

impl Outcomes {
    /// From `(end time ms, failed)`, in any order (equal end times keep theirs).
    pub fn new(mut v: Vec<(u64, bool)>) -> Self {
        v.sort_by_key(|(end, _)| *end);
        let mut out = Self {
            ends: Vec::with_capacity(v.len()),
            failures_before: Vec::with_capacity(v.len() + 1),
            run: Vec::with_capacity(v.len()),
        };
        let (mut failures, mut run) = (0u32, 0u32);
        out.failures_before.push(0);
        for (end, failed) in v {
            failures += u32::from(failed);
            run = if failed { run + 1 } else { 0 };
            out.ends.push(end);
            out.failures_before.push(failures);
            out.run.push(run);
        }
        out
    }

    /// `(end time, failed)` of each, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.ends
            .iter()
            .zip(self.failures_before.windows(2))
            .map(|(end, w)| (*end, matches!(w, [a, b] if b > a)))
    }

    /// When the outcomes up to `t` will all have left `window`: `t` plus its duration, or the end of
    /// the `n`-th outcome after `t` for a window of the last `n` (the last outcome's end if fewer
    /// follow).
    pub fn reach_end(&self, window: WindowConfig, t: u64) -> u64 {
        match window {
            WindowConfig::Time { duration_ms } => t.saturating_add(duration_ms),
            WindowConfig::Count(n) => {
                let next = self.ends.partition_point(|e| *e <= t);
                let at = (next + usize::from(n)).saturating_sub(1);
                self.ends
                    .get(at)
                    .or(self.ends.last())
                    .copied()
                    .unwrap_or(t)
                    .max(t)
            }
        }
    }

    /// What `window` holds just after each outcome, as if every call had been let through: `f` gets
    /// the outcome's time, and the window's failure rate (0 while it holds fewer than
    /// `minimum_requests` calls) with the run of failures ending there. The window is the core's own
    /// ([`Window`], fed each outcome as the breaker records it), so that what the search judges a
    /// candidate by is what the replay's breaker would have seen: a time window forgets in tenths of
    /// its length, not call by call.
    pub fn each(&self, window: WindowConfig, minimum_requests: u32, mut f: impl FnMut(u64, Peak)) {
        let mut w = Window::new(window);
        for ((t, failed), run) in self.iter().zip(&self.run) {
            w.record(t, failed, false);
            let stats = w.stats(t);
            let rate = if stats.calls >= minimum_requests {
                stats.failure_rate()
            } else {
                0.0
            };
            f(t, Peak { rate, run: *run });
        }
    }

    /// The worst `window` would have shown (see [`Outcomes::each`]) at the outcomes whose time
    /// `inside` accepts: the highest failure rate and the longest run of failures.
    pub fn peak(
        &self,
        window: WindowConfig,
        minimum_requests: u32,
        inside: impl Fn(u64) -> bool,
    ) -> Peak {
        let mut peak = Peak::default();
        self.each(window, minimum_requests, |t, p| {
            if inside(t) {
                peak.rate = peak.rate.max(p.rate);
                peak.run = peak.run.max(p.run);
            }
        });
        peak
    }
}

/// The error rate that makes a second bad, for an upstream whose noise is `noise`.
pub fn episode_threshold(noise: f64) -> f64 {
    (3.0 * noise).max(noise + 0.2).min(1.0)
}

/// An upstream's failure episodes, from the outcomes of its judged calls (ignored calls left out).
///
/// A second (of the times outcomes are recorded) is *bad* when its error rate reaches the threshold
/// [`episode_threshold`] of the upstream's noise. An episode is a run of bad seconds, where two bad
/// seconds with at most [`MAX_SILENT_GAP_S`] seconds without calls between them belong to the same
/// run when the good seconds between them are at most [`MAX_GOOD_GAP_S`], or at most
/// [`MAX_SILENT_GAP_S`] with the run, them and the second after them failing together at least at
/// the threshold rate (the failures had not stopped); a run with fewer than
/// [`MIN_EPISODE_FAILURES`] failures is not an episode. The noise is the median (the lower middle of an
/// even count) of the error rates of the [`NOISE_BUCKET_S`] buckets with calls that overlap no
/// episode; as episodes depend on it, it starts as the median of all buckets and is refined until it
/// settles (at most 5 rounds).
pub fn find_episodes(outcomes: Outcomes) -> Episodes {
    let mut seconds: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for (end_ms, failed) in outcomes.iter() {
        let s = seconds.entry(end_ms / 1000).or_default();
        s.0 += 1;
        s.1 += u64::from(failed);
    }
    let mut buckets: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for (s, (calls, failures)) in &seconds {
        let b = buckets.entry(s / NOISE_BUCKET_S).or_default();
        b.0 += calls;
        b.1 += failures;
    }
    let rate = |(calls, failures): &(u64, u64)| *failures as f64 / (*calls).max(1) as f64;
    let mut noise = median(buckets.values().map(rate));
    let mut episodes = runs(&seconds, episode_threshold(noise));
    for _ in 0..5 {
        let span_ms = NOISE_BUCKET_S * 1000;
        let outside = buckets
            .iter()
            .filter(|(b, _)| {
                let (from, to) = (*b * span_ms, (*b + 1) * span_ms);
                !episodes.iter().any(|e| e.start_ms < to && from < e.end_ms)
            })
            .map(|(_, v)| rate(v));
        let next = if buckets.is_empty() {
            0.0
        } else {
            median(outside)
        };
        if next == noise {
            break;
        }
        noise = next;
        episodes = runs(&seconds, episode_threshold(noise));
    }
    Episodes {
        noise,
        threshold: episode_threshold(noise),
        episodes,
        outcomes,
    }
}

fn median(rates: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = rates.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
}

/// The runs of bad seconds at `threshold`, as [`find_episodes`] defines them.
fn runs(seconds: &BTreeMap<u64, (u64, u64)>, threshold: f64) -> Vec<Episode> {
    let mut out = Vec::new();
    let mut current: Option<Episode> = None;
    // Since the last bad second: good seconds, and their calls and failures (counted in the episode
    // only if a later bad second bridges them).
    let (mut good, mut pending) = (0u64, (0u64, 0u64));
    let mut last_bad = 0u64;
    for (&s, &(calls, failures)) in seconds {
        if calls == 0 {
            continue;
        }
        let bad = failures as f64 >= threshold * calls as f64 - 1e-9;
        if !bad {
            good += 1;
            pending = (pending.0 + calls, pending.1 + failures);
            continue;
        }
        let silent = s.saturating_sub(last_bad + 1).saturating_sub(good);
        let still_failing = |e: &Episode| {
            let (all, failed) = (
                e.calls + pending.0 + calls,
                e.failures + pending.1 + failures,
            );
            failed as f64 >= threshold * all as f64 - 1e-9
        };
        let bridged =
            |e: &Episode| good <= MAX_GOOD_GAP_S || (good <= MAX_SILENT_GAP_S && still_failing(e));
        match current.as_mut() {
            Some(e) if bridged(e) && silent <= MAX_SILENT_GAP_S => {
                e.end_ms = (s + 1) * 1000;
                e.calls += pending.0 + calls;
                e.failures += pending.1 + failures;
            }
            _ => {
                out.extend(current.take());
                current = Some(Episode {
                    start_ms: s * 1000,
                    end_ms: (s + 1) * 1000,
                    calls,
                    failures,
                });
            }
        }
        last_bad = s;
        good = 0;
        pending = (0, 0);
    }
    out.extend(current);
    out.retain(|e| e.failures >= MIN_EPISODE_FAILURES);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_episode_spans_bad_seconds_and_bridges_silence() {
        let cfg = BreakerConfig::default();
        let mut b = BTreeMap::new();
        let bucket = |judged, failures| SecondBucket {
            judged,
            failures,
            slow: 0,
        };
        b.insert(1, bucket(10, 0));
        b.insert(2, bucket(10, 6));
        b.insert(3, bucket(4, 4));
        b.insert(6, bucket(1, 1)); // 4 and 5 had no calls
        b.insert(7, bucket(10, 1));
        assert_eq!(failure_episode_ms(&b, &cfg, 3_500), 5_000, "seconds 2 to 6");
        assert_eq!(
            failure_episode_ms(&b, &cfg, 4_500),
            5_000,
            "the last second with calls counts"
        );
        assert_eq!(
            failure_episode_ms(&b, &cfg, 7_200),
            0,
            "a good second: no episode"
        );
        assert_eq!(failure_episode_ms(&b, &cfg, 500), 0);
    }

    /// `(end ms, failed)` for `per_s` calls a second from `from_s` to `to_s`, failing every
    /// `1 / fail_every`-th one (0: none).
    fn calls(from_s: u64, to_s: u64, per_s: u64, fail_every: u64) -> Vec<(u64, bool)> {
        (from_s * per_s..to_s * per_s)
            .map(|i| (i * 1000 / per_s, fail_every > 0 && i % fail_every == 0))
            .collect()
    }

    #[test]
    fn episodes_stand_out_from_the_noise_and_bridge_short_gaps() {
        // 5 % noise (1 in 20), a full outage of 40s, a 3s blip, a 50 % partial outage of 40s.
        let mut c = calls(0, 100, 20, 20);
        c.extend(calls(100, 140, 20, 1));
        c.extend(calls(140, 200, 20, 20));
        c.extend(calls(200, 203, 20, 1));
        c.extend(calls(203, 300, 20, 20));
        c.extend(calls(300, 340, 20, 2));
        c.extend(calls(340, 400, 20, 20));
        let e = find_episodes(Outcomes::new(c));
        assert!((e.noise - 0.05).abs() < 1e-9, "{e:?}");
        assert!(
            (e.threshold - 0.25).abs() < 1e-9,
            "max(3 x 5 %, 5 % + 20 %)"
        );
        let spans: Vec<(u64, u64)> = e
            .episodes
            .iter()
            .map(|x| (x.start_ms, x.len_ms()))
            .collect();
        assert_eq!(
            spans,
            [(100_000, 40_000), (200_000, 3_000), (300_000, 40_000)]
        );
        assert!((e.episodes[2].error_rate() - 0.5).abs() < 1e-9);

        // Two good seconds inside are bridged; three are too, as the episode still fails at the
        // threshold rate across them; ten (20 failures in 120 calls, below 0.2) are not. Ten silent
        // seconds are bridged, eleven not.
        let mut c = calls(0, 100, 10, 0);
        for (from, to) in [(100, 110), (112, 120), (123, 130)] {
            c.extend(calls(from, to, 10, 1));
        }
        c.extend(calls(110, 112, 10, 0));
        c.extend(calls(120, 123, 10, 0));
        c.extend(calls(130, 200, 10, 0));
        c.extend(calls(200, 205, 10, 1));
        c.extend(calls(215, 220, 10, 1));
        c.extend(calls(231, 235, 10, 1));
        c.extend(calls(235, 250, 10, 0));
        c.extend(calls(250, 251, 10, 1));
        c.extend(calls(251, 261, 10, 0));
        c.extend(calls(261, 262, 10, 1));
        c.extend(calls(262, 300, 10, 0));
        c.sort_by_key(|x| x.0);
        let spans: Vec<(u64, u64)> = find_episodes(Outcomes::new(c))
            .episodes
            .iter()
            .map(|x| (x.start_ms / 1000, x.end_ms / 1000))
            .collect();
        assert_eq!(
            spans,
            [(100, 130), (200, 220), (231, 235), (250, 251), (261, 262)]
        );
        assert!(find_episodes(Outcomes::default()).episodes.is_empty());
    }

    #[test]
    fn peaks_are_what_the_window_would_have_held() {
        // One call every 100 ms; calls 50..=59 fail (a 1s burst of ten in a row).
        let o = Outcomes::new(
            (0..200u64)
                .map(|i| (i * 100, (50..60).contains(&i)))
                .collect(),
        );
        let burst = |t: u64| (5_000..6_000).contains(&t);
        let count = o.peak(WindowConfig::Count(20), 5, burst);
        assert_eq!((count.rate, count.run), (0.5, 10));
        let time = o.peak(WindowConfig::Time { duration_ms: 4_000 }, 5, burst);
        assert_eq!(time.rate, 0.25, "ten of the forty calls in 4s");
        let quiet = o.peak(WindowConfig::Count(20), 5, |t| t < 5_000);
        assert_eq!((quiet.rate, quiet.run), (0.0, 0));
        assert_eq!(
            o.peak(WindowConfig::Count(20), 50, burst).rate,
            0.0,
            "never 50 calls in it"
        );
        // The burst's last failure ends at 5.9s: twenty calls later, or 4s later, it is out.
        assert_eq!(o.reach_end(WindowConfig::Count(20), 5_900), 7_900);
        assert_eq!(
            o.reach_end(WindowConfig::Time { duration_ms: 4_000 }, 5_900),
            9_900
        );
        assert_eq!(
            o.reach_end(WindowConfig::Count(20), 19_850),
            19_900,
            "the log's end"
        );
    }
}
