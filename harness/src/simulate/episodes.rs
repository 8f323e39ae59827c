//! Failure episodes measured on the log: stretches of time in which an upstream failed, whatever the
//! breaker did. They are the ground truth a replay is judged against.

use std::collections::BTreeMap;

use cb_core::classify::{Classification, Outcome};
use cb_core::config::BreakerConfig;

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
}
