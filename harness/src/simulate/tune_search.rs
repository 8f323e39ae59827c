//! The search behind `--tune`: the grids, the coordinate search over them, the pick by the objective
//! and, when a priority cannot be met, why.

use cb_core::config::{FilterConfig, WindowConfig};

use super::episodes::Episodes;
use super::log::Call;
use super::proxy::Judged;
use super::tune::{duration, replay, Base, Effect, Knobs, TuneOptions, Unmet, MAX_REPLAYS};
use super::tune_judge::{clock, episode_of, secs};

/// The values each setting is tried at (besides the upstream's own).
pub const FAILURE_THRESHOLDS: [u32; 6] = [0, 3, 5, 10, 20, 50];
/// `error_rate_threshold` values, in parts per million.
pub const ERROR_RATES_PPM: [u32; 7] = [
    100_000, 200_000, 300_000, 400_000, 500_000, 700_000, 900_000,
];
/// Count windows and time windows.
pub const WINDOWS: [WindowConfig; 8] = [
    WindowConfig::Count(20),
    WindowConfig::Count(50),
    WindowConfig::Count(100),
    WindowConfig::Count(200),
    WindowConfig::Count(500),
    WindowConfig::Time {
        duration_ms: 10_000,
    },
    WindowConfig::Time {
        duration_ms: 30_000,
    },
    WindowConfig::Time {
        duration_ms: 60_000,
    },
];
/// `minimum_requests` values.
pub const MINIMUM_REQUESTS: [u32; 5] = [5, 10, 20, 50, 100];
/// `open_timeout` values, ms.
pub const OPEN_TIMEOUTS_MS: [u64; 5] = [5_000, 10_000, 15_000, 30_000, 60_000];
/// Passes over the five settings from one starting point, at most.
const MAX_PASSES: usize = 3;
/// In priorities 4 and 5, counts within this fraction of the fewest (or [`BAND_CALLS`]) are equal.
const BAND_FRACTION: f64 = 0.10;
const BAND_CALLS: u64 = 5;

/// The grids, as `--help` tells them.
pub fn grids() -> String {
    let rates: Vec<String> = ERROR_RATES_PPM
        .iter()
        .map(|p| format!("{}", f64::from(*p) / 1e6))
        .collect();
    let windows: Vec<String> = WINDOWS
        .iter()
        .map(|w| match w {
            WindowConfig::Count(n) => n.to_string(),
            WindowConfig::Time { duration_ms } => duration(*duration_ms),
        })
        .collect();
    let list = |v: Vec<String>| v.join(", ");
    format!(
        "failure_threshold {};\n  error_rate_threshold {};\n  window_size / window_duration {};\n  minimum_requests {};\n  open_timeout {}",
        list(FAILURE_THRESHOLDS.iter().map(u32::to_string).collect()),
        list(rates),
        list(windows),
        list(MINIMUM_REQUESTS.iter().map(u32::to_string).collect()),
        list(OPEN_TIMEOUTS_MS.iter().map(|ms| duration(*ms)).collect()),
    )
}

/// Where a candidate stands in the objective's order, priority by priority (lower is better).
type Rank = (usize, u64, u32, usize, u64, u64, u64, usize);

/// Every candidate replayed for one upstream, in the order they were.
#[derive(Debug, Clone)]
pub struct Tried {
    base: Knobs,
    entries: Vec<(Knobs, Effect)>,
    invalid: Vec<Knobs>,
}

impl Tried {
    /// Candidates replayed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, k: &Knobs) -> Option<&Effect> {
        self.entries.iter().find(|(c, _)| c == k).map(|(_, e)| e)
    }

    /// The order the search moves by: the objective's priorities, strictly.
    fn rank(&self, k: &Knobs, e: &Effect, opts: &TuneOptions) -> Rank {
        (
            e.missed(),
            e.lateness_ms(opts.outage_ms),
            e.needless_trips(),
            e.short_of_margin.len(),
            e.margin_shortfall,
            e.would_succeed_rejected,
            e.failures_let_through,
            k.distance(&self.base),
        )
    }

    /// The recommendation: each priority of the objective narrows the candidates in turn.
    pub fn best(&self, opts: &TuneOptions) -> Option<(Knobs, &Effect)> {
        let mut left: Vec<&(Knobs, Effect)> = self.entries.iter().collect();
        let narrow = |left: &mut Vec<&(Knobs, Effect)>,
                      score: &dyn Fn(&(Knobs, Effect)) -> u64,
                      band: bool| {
            let Some(min) = left.iter().map(|c| score(c)).min() else {
                return;
            };
            let limit = if band {
                min + BAND_CALLS.max((min as f64 * BAND_FRACTION).round() as u64)
            } else {
                min
            };
            left.retain(|c| score(c) <= limit);
        };
        narrow(&mut left, &|c| c.1.missed() as u64, false);
        narrow(&mut left, &|c| c.1.lateness_ms(opts.outage_ms), false);
        narrow(&mut left, &|c| u64::from(c.1.needless_trips()), false);
        narrow(&mut left, &|c| c.1.short_of_margin.len() as u64, false);
        narrow(&mut left, &|c| c.1.would_succeed_rejected, true);
        narrow(&mut left, &|c| c.1.failures_let_through, true);
        narrow(&mut left, &|c| c.0.distance(&self.base) as u64, false);
        left.first().map(|(k, e)| (*k, e))
    }
}

struct Search<'a> {
    key: &'a str,
    calls: &'a [Call],
    judged: &'a [Option<Judged>],
    base: &'a Base,
    episodes: &'a Episodes,
    opts: &'a TuneOptions,
    tried: Tried,
}

impl Search<'_> {
    /// Replays those of `ks` not replayed yet, side by side on the machine's cores, as long as fewer
    /// than `budget` candidates have been; then the rank of each of `ks` that has one (`None`: the
    /// filter would refuse it, or the budget ran out before it).
    fn eval_all(&mut self, ks: &[Knobs], budget: usize) -> Vec<Option<Rank>> {
        let budget = budget.min(MAX_REPLAYS);
        let mut todo: Vec<(Knobs, FilterConfig)> = Vec::new();
        for k in ks {
            let known = self.tried.get(k).is_some() || self.tried.invalid.contains(k);
            if known || todo.iter().any(|(t, _)| t == k) {
                continue;
            }
            if self.tried.len() + todo.len() >= budget {
                break;
            }
            // No override: the base's own settings, always the first replayed.
            let Some(entry) = self.base.override_for(self.key, k) else {
                continue;
            };
            match self.base.with_override(self.key, entry) {
                Ok(config) => todo.push((*k, config)),
                // minimum_requests above window_size, or open_timeout above max_open_timeout.
                Err(_) => self.tried.invalid.push(*k),
            }
        }
        let (key, calls, judged) = (self.key, self.calls, self.judged);
        let (episodes, opts) = (self.episodes, self.opts);
        let effects = parallel_map(&todo, |(_, config)| {
            replay(key, calls, judged, config, episodes, opts)
        });
        for ((k, _), effect) in todo.into_iter().zip(effects) {
            if let Some(e) = effect.flatten() {
                self.tried.entries.push((k, e));
            }
        }
        ks.iter()
            .map(|k| self.tried.get(k).map(|e| self.tried.rank(k, e, self.opts)))
            .collect()
    }

    /// Coordinate search from `start`: each setting in turn moved to the value that ranks best,
    /// until a pass changes nothing or `budget` candidates have been replayed in all.
    fn descend(&mut self, start: Knobs, budget: usize) {
        let Some(Some(mut best)) = self.eval_all(&[start], budget).first().copied() else {
            return;
        };
        let mut cur = start;
        for _ in 0..MAX_PASSES {
            let before = cur;
            for axis in AXES {
                let ks = neighbours(cur, axis);
                for (k, rank) in ks.iter().zip(self.eval_all(&ks, budget)) {
                    if let Some(rank) = rank.filter(|r| *r < best) {
                        (best, cur) = (rank, *k);
                    }
                }
                if self.tried.len() >= budget {
                    return;
                }
            }
            if cur == before {
                return;
            }
        }
    }
}

/// `f` of each item, on up to as many threads as the machine has cores, in the items' order; `None`
/// for an item whose thread failed.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<Option<R>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(items.len());
    if workers <= 1 {
        return items.iter().map(|t| Some(f(t))).collect();
    }
    let f = &f;
    let mut out: Vec<Option<R>> = items.iter().map(|_| None).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    let mine = items.iter().enumerate().skip(w).step_by(workers);
                    mine.map(|(i, t)| (i, f(t))).collect::<Vec<_>>()
                })
            })
            .collect();
        for (i, r) in handles.into_iter().filter_map(|h| h.join().ok()).flatten() {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(r);
            }
        }
    });
    out
}

/// The order the settings are moved in: the error-rate trigger first and consecutive failures late,
/// so that a start with `failure_threshold` 0 finds a rate trigger that tells blips from outages
/// before a lower priority tempts it into counting failures in a row again.
const AXES: [usize; 5] = [1, 2, 3, 0, 4];

/// `cur` with setting `axis` at each value of its grid.
fn neighbours(cur: Knobs, axis: usize) -> Vec<Knobs> {
    match axis {
        0 => FAILURE_THRESHOLDS
            .iter()
            .map(|&v| Knobs {
                failure_threshold: v,
                ..cur
            })
            .collect(),
        1 => ERROR_RATES_PPM
            .iter()
            .map(|&v| Knobs {
                error_rate_ppm: v,
                ..cur
            })
            .collect(),
        2 => WINDOWS
            .iter()
            .map(|&v| Knobs { window: v, ..cur })
            .collect(),
        3 => MINIMUM_REQUESTS
            .iter()
            .map(|&v| Knobs {
                minimum_requests: v,
                ..cur
            })
            .collect(),
        _ => OPEN_TIMEOUTS_MS
            .iter()
            .map(|&v| Knobs {
                open_timeout_ms: v,
                ..cur
            })
            .collect(),
    }
}

/// The second starting point: judged on the error rate alone (consecutive failures off), over a
/// time window, at a threshold between the noise and what makes a second bad; a blip of a few
/// seconds then weighs little, where five failures in a row would trip on it.
fn rate_start(base: Knobs, episodes: &Episodes) -> Knobs {
    let target = (episodes.noise + episodes.threshold) / 2.0 * 1e6;
    let rate = ERROR_RATES_PPM
        .iter()
        .copied()
        .min_by(|a, b| {
            (f64::from(*a) - target)
                .abs()
                .total_cmp(&(f64::from(*b) - target).abs())
        })
        .unwrap_or(base.error_rate_ppm);
    Knobs {
        failure_threshold: 0,
        error_rate_ppm: rate,
        window: WindowConfig::Time {
            duration_ms: 30_000,
        },
        minimum_requests: 10,
        ..base
    }
}

/// Every candidate the search replayed for `key`, the start (the upstream's own settings with the
/// measured `stuck_call_duration`, already replayed: `start_effect`) first. `judged`: what the filter
/// records for each call, under the start's settings.
#[allow(clippy::too_many_arguments)]
pub fn search(
    key: &str,
    calls: &[Call],
    judged: &[Option<Judged>],
    base: &Base,
    episodes: &Episodes,
    opts: &TuneOptions,
    start_knobs: Knobs,
    start_effect: Effect,
) -> Tried {
    let base_knobs = start_knobs;
    let base_effect = start_effect;
    let mut s = Search {
        key,
        calls,
        judged,
        base,
        episodes,
        opts,
        tried: Tried {
            base: base_knobs,
            entries: vec![(base_knobs, base_effect)],
            invalid: Vec::new(),
        },
    };
    // The better start first, with half the budget; the other gets what is left.
    let seeds = [base_knobs, rate_start(base_knobs, episodes)];
    let ranks = s.eval_all(&seeds, MAX_REPLAYS);
    let mut starts: Vec<(Rank, Knobs)> = ranks
        .into_iter()
        .zip(seeds)
        .filter_map(|(rank, k)| rank.map(|r| (r, k)))
        .collect();
    starts.sort_by_key(|(rank, _)| *rank);
    let budgets = [MAX_REPLAYS / 2, MAX_REPLAYS];
    for ((_, start), budget) in starts.into_iter().zip(budgets) {
        s.descend(start, budget);
    }
    s.tried
}

/// The priorities `best` does not meet, each with the reason.
pub fn unmet(
    tried: &Tried,
    (knobs, best): (Knobs, &Effect),
    episodes: &Episodes,
    opts: &TuneOptions,
) -> Vec<Unmet> {
    let mut out = Vec::new();
    let limit = opts.outage_ms / 2;
    for (i, c) in best.outages.iter().enumerate().filter(|(_, c)| !c.in_time) {
        let earliest = tried
            .entries
            .iter()
            .filter_map(|(_, e)| e.outages.get(i).and_then(|c| c.caught_after_ms))
            .min();
        let how = match earliest {
            Some(ms) => format!("the earliest any caught it was after {}", secs(ms)),
            None => "none of them opened during it".into(),
        };
        out.push(Unmet {
            priority: 1,
            why: format!(
                "the outage at {} ({}, {:.0} % errors) was caught within {} by none of the {} candidates tried: {how}",
                clock(c.start_ms),
                secs(c.length_ms),
                c.error_rate * 100.0,
                secs(limit),
                tried.len()
            ),
        });
    }
    if best.needless_trips() > 0 {
        out.push(needless(tried, (knobs, best), episodes, opts));
    }
    if !best.short_of_margin.is_empty() {
        out.push(Unmet {
            priority: 3,
            why: format!(
                "{}; no candidate tried that met the priorities before it had the whole margin",
                best.short_of_margin.join("; ")
            ),
        });
    }
    out
}

/// Why `best` trips needlessly: what the candidates that do not would have cost.
fn needless(
    tried: &Tried,
    (knobs, best): (Knobs, &Effect),
    episodes: &Episodes,
    opts: &TuneOptions,
) -> Unmet {
    let episode = |t: u64| episode_of(episodes, knobs.window, t);
    let trips: Vec<String> = best
        .needless_at_ms
        .iter()
        .map(|t| match episode(*t) {
            Some(e) => format!(
                "the blip at {} ({}, {:.0} % errors)",
                clock(e.start_ms),
                secs(e.len_ms()),
                e.error_rate() * 100.0
            ),
            None => format!(
                "normal traffic at {} (noise {:.1} %)",
                clock(*t),
                episodes.noise * 100.0
            ),
        })
        .collect();
    let avoiding = tried
        .entries
        .iter()
        .filter(|(_, e)| e.needless_trips() == 0)
        .min_by_key(|(_, e)| (e.missed(), e.lateness_ms(opts.outage_ms)));
    let why = match avoiding {
        Some((_, e)) => {
            let missed = e.outages.iter().find(|c| !c.in_time);
            let blip = best.needless_at_ms.iter().find_map(|t| episode(*t));
            let looks = match (missed, blip) {
                (Some(o), Some(b)) => format!(
                    ": to the breaker, a blip of {} at {:.0} % errors looks like the first seconds of the outage at {} ({:.0} % errors)",
                    secs(b.len_ms()),
                    b.error_rate() * 100.0,
                    clock(o.start_ms),
                    o.error_rate * 100.0
                ),
                _ => String::new(),
            };
            format!(
                "the recommendation trips on {}; each candidate tried that does not trip there misses an outage{looks}",
                trips.join(", ")
            )
        }
        None => format!(
            "every one of the {} candidates tried trips on {}",
            tried.len(),
            trips.join(", ")
        ),
    };
    Unmet { priority: 2, why }
}
