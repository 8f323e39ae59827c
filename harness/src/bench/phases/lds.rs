//! Phase 7: an LDS update of 20 listeners, with and without `stuck_call_duration` (issue 18, item 2).
//!
//! The native module used to give each filter configuration a ticker thread of its own, sleeping 50
//! ms, and dropping a configuration joined it: an update replacing N listeners whose configurations
//! track stuck calls kept Envoy's main thread waiting for N sleeps in a row. One module-wide clock
//! now ticks every configuration (`filter/native/src/ticker.rs`) and dropping one waits for no sleep,
//! so both variants should cost the same.
//!
//! One native Envoy (`envoy/bench-lds.yaml`, `--drain-time-s 0`, pinned like the other proxies) reads
//! 20 listeners from a file (`envoy/bench-lds-listener-native.yaml`, rendered 20 times), each with
//! its own filter configuration. An update renames a new file over it in which every listener's
//! filter configuration differs (`open_timeout` alternates), so Envoy builds 20 new configurations
//! and, the old filter chains drained at once, destroys the 20 old ones, all on its main thread. It
//! is timed from the rename until the admin's stats show it applied (`lds.update_success` counted)
//! and finished (nothing warming, no listener and no filter chain draining), polled every
//! [`POLL`]. Every poll is an admin request, which the main thread serves, so the longest poll
//! answer says how long the update kept the main thread from anything else.
//!
//! The variants run in interleaved rounds, the order alternating. Before each measured update, an
//! unmeasured one puts the variant's configurations in place and lets them tick for [`SETTLE`]: the
//! measured update tears down configurations of its own variant, as an update to a fleet does.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::super::stats::{spread, Spread};
use super::super::{path_str, port, shorten, start, Ctx, Envoy, Options, Result};
use crate::envoy::{render_config_with, UpstreamPorts};

/// Listeners in the file, each with the filter.
pub(in crate::bench) const LDS_LISTENERS: usize = 20;

/// The variants, by name: whether the filter configurations set `stuck_call_duration` (which needs
/// the module's clock every 50 ms).
pub(in crate::bench) const LDS_VARIANTS: [(&str, bool); 2] = [("without", false), ("with", true)];

/// The `stuck_call_duration` of the `with` variant.
pub(in crate::bench) const STUCK_CALL_DURATION: &str = "1s";

/// The period of the old per-configuration ticker thread, whose sleep a dropped configuration used
/// to wait out; for the report's reckoning of what the old teardown cost.
pub(in crate::bench) const OLD_TICK_MS: f64 = 50.0;

const LISTENER_TEMPLATE: &str = "envoy/bench-lds-listener-native.yaml";

/// How often the admin is asked whether the update is done: the figure's resolution, along with one
/// admin answer. Finer would load the main thread being measured with admin requests.
const POLL: Duration = Duration::from_millis(2);

/// How long the variant's configurations run before the measured update tears them down: several
/// 50 ms ticks.
const SETTLE: Duration = Duration::from_millis(300);

/// Bound on one update.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(10);

/// The stats an update is read from, in one admin request (a regex, percent-encoded):
/// `^listener_manager\.(lds\.update_(success|rejected)|total_(listeners_warming|listeners_draining|filter_chains_draining))$`.
const STATS_PATH: &str = "/stats?filter=%5Elistener_manager%5C.%28lds%5C.update_%28success%7Crejected%29%7Ctotal_%28listeners_warming%7Clisteners_draining%7Cfilter_chains_draining%29%29%24";

/// One timed update.
#[derive(Debug, Clone, Copy, Default)]
pub(in crate::bench) struct Update {
    /// From the rename until the stats showed the update applied and finished.
    pub(in crate::bench) ms: f64,
    /// The longest admin answer while waiting: how long the main thread kept it waiting.
    pub(in crate::bench) admin_max_ms: f64,
    /// The admin's answer just before the rename, Envoy idle.
    pub(in crate::bench) admin_idle_ms: f64,
    /// The most filter chains, and listeners, seen draining at once: which kind of update Envoy made.
    pub(in crate::bench) chains_draining: u64,
    pub(in crate::bench) listeners_draining: u64,
    pub(in crate::bench) polls: u32,
}

pub(in crate::bench) struct Lds {
    /// By variant name, one measured update per round, rounds in order.
    pub(in crate::bench) updates: BTreeMap<&'static str, Vec<Update>>,
    /// The filter configuration of each variant (of the first update; `open_timeout` alternates).
    pub(in crate::bench) configs: Vec<(&'static str, String)>,
}

impl Lds {
    /// `field` of `variant`'s updates, over the rounds.
    pub(in crate::bench) fn of(&self, variant: &str, field: fn(&Update) -> f64) -> Option<Spread> {
        spread(self.updates.get(variant)?.iter().map(field))
    }

    /// Per round, `with` / `without` of `field`.
    pub(in crate::bench) fn ratio(&self, field: fn(&Update) -> f64) -> Option<Spread> {
        let (with, without) = (self.updates.get("with")?, self.updates.get("without")?);
        spread(
            with.iter()
                .zip(without)
                .filter(|(_, b)| field(b) > 0.0)
                .map(|(a, b)| field(a) / field(b)),
        )
    }
}

/// The filter configuration of `version` of the file: `open_timeout` alternates, so that every
/// update changes every listener's configuration.
pub(in crate::bench) fn lds_filter_config(stuck: bool, version: u32) -> String {
    let stuck = if stuck {
        format!(r#", "stuck_call_duration": "{STUCK_CALL_DURATION}""#)
    } else {
        String::new()
    };
    format!(r#"{{"open_timeout": "{}s"{stuck}}}"#, 30 + version % 2)
}

fn listener_name(i: usize) -> String {
    format!("listener_{i:02}")
}

/// The file Envoy watches and what it holds.
struct ListenerFile {
    path: PathBuf,
    wasm: PathBuf,
    version: u32,
}

impl ListenerFile {
    /// The resources of the next version, every listener with the filter configured for `stuck`.
    fn render(&mut self, stuck: bool) -> Result<String> {
        self.version += 1;
        listeners_yaml(
            self.version,
            &lds_filter_config(stuck, self.version),
            &self.wasm,
        )
    }

    /// Writes `text` beside the file; [`Self::swap`] renames it over the file.
    fn stage(&self, text: &str) -> Result<PathBuf> {
        let tmp = self.path.with_extension("yaml.tmp");
        fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        Ok(tmp)
    }

    /// The atomic swap Envoy watches for.
    fn swap(&self, staged: &Path) -> Result<()> {
        fs::rename(staged, &self.path).map_err(|e| format!("cannot rename over the LDS file: {e}"))
    }
}

/// The resource file: `version_info`, then each listener rendered from [`LISTENER_TEMPLATE`], without
/// its comments.
fn listeners_yaml(version: u32, filter_config: &str, wasm: &Path) -> Result<String> {
    let mut text = format!("version_info: \"{version}\"\nresources:\n");
    for i in 0..LDS_LISTENERS {
        let name = listener_name(i);
        let listener = render_config_with(
            LISTENER_TEMPLATE,
            &UpstreamPorts::default(),
            wasm,
            filter_config,
            &[("NAME", &name)],
        )
        .map_err(|e| e.to_string())?;
        // The template's own comments (which name its placeholders) once would do; not 20 times.
        for line in listener
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
        {
            text.push_str(line);
            text.push('\n');
        }
    }
    Ok(text)
}

/// The listener manager's counters and gauges, as [`STATS_PATH`] answers them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ListenerStats {
    success: u64,
    rejected: u64,
    warming: u64,
    listeners_draining: u64,
    chains_draining: u64,
}

impl ListenerStats {
    fn parse(body: &str) -> Self {
        let mut s = Self::default();
        for (name, value) in body.lines().filter_map(|l| l.split_once(": ")) {
            let value = value.trim().parse().unwrap_or(0);
            match name.strip_prefix("listener_manager.") {
                Some("lds.update_success") => s.success = value,
                Some("lds.update_rejected") => s.rejected = value,
                Some("total_listeners_warming") => s.warming = value,
                Some("total_listeners_draining") => s.listeners_draining = value,
                Some("total_filter_chains_draining") => s.chains_draining = value,
                _ => {}
            }
        }
        s
    }

    /// Whether an update counted after `before` has been applied and finished.
    fn done_after(&self, before: &Self) -> bool {
        self.success > before.success
            && self.warming == 0
            && self.listeners_draining == 0
            && self.chains_draining == 0
    }
}

/// The stats, and how long the admin took to answer, in ms.
async fn read_stats(envoy: &Envoy) -> Result<(ListenerStats, f64)> {
    let asked = Instant::now();
    let r = envoy
        .admin_get(STATS_PATH)
        .await
        .map_err(|e| e.to_string())?;
    let ms = asked.elapsed().as_secs_f64() * 1e3;
    Ok((ListenerStats::parse(&r.body), ms))
}

/// Publishes the next version for `stuck` and times it until done.
async fn update(envoy: &Envoy, file: &mut ListenerFile, stuck: bool) -> Result<Update> {
    let text = file.render(stuck)?;
    let staged = file.stage(&text)?;
    let (before, admin_idle_ms) = read_stats(envoy).await?;
    let started = Instant::now();
    file.swap(&staged)?;
    let mut u = Update {
        admin_idle_ms,
        ..Update::default()
    };
    loop {
        let (now, admin_ms) = read_stats(envoy).await?;
        u.polls += 1;
        u.admin_max_ms = u.admin_max_ms.max(admin_ms);
        u.chains_draining = u.chains_draining.max(now.chains_draining);
        u.listeners_draining = u.listeners_draining.max(now.listeners_draining);
        if now.rejected > before.rejected {
            return Err(format!(
                "Envoy refused version {} of the listeners; log {}",
                file.version,
                envoy.log_path().display()
            ));
        }
        if now.done_after(&before) {
            u.ms = started.elapsed().as_secs_f64() * 1e3;
            return Ok(u);
        }
        if started.elapsed() > UPDATE_TIMEOUT {
            return Err(format!(
                "version {} of the listeners not done after {UPDATE_TIMEOUT:?}: {now:?}",
                file.version
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The Envoy of the phase, serving the first version of the file.
async fn start_envoy(ctx: &mut Ctx, file: &mut ListenerFile) -> Result<Envoy> {
    let first = file.render(false)?;
    file.swap(&file.stage(&first)?)?;
    let envoy = start(
        ctx.launch("bench-lds", "envoy/bench-lds.yaml")
            .var("LDS_PATH", path_str(&file.path)?)
            .args(&["--drain-time-s", "0"])
            .cpus(ctx.proxy_cpus.as_deref()),
    )
    .await?;
    // Every listener bound: the file is what Envoy serves.
    port(&envoy, &listener_name(LDS_LISTENERS - 1))?;
    ctx.commands
        .insert("proxy Envoy (lds, native)".into(), shorten(envoy.command()));
    Ok(envoy)
}

pub(in crate::bench) async fn lds_phase(ctx: &mut Ctx, opts: &Options) -> Result<Lds> {
    let mut file = ListenerFile {
        path: ctx.dir.join("bench-lds-listeners.yaml"),
        wasm: ctx.wasm.clone(),
        version: 0,
    };
    let envoy = start_envoy(ctx, &mut file).await?;
    // Each update takes well under a second: twice the other phases' rounds.
    let rounds = opts.rounds * 2;
    let mut updates: BTreeMap<&'static str, Vec<Update>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order = LDS_VARIANTS;
        order.rotate_left(round % LDS_VARIANTS.len());
        for (name, stuck) in order {
            update(&envoy, &mut file, stuck).await?;
            tokio::time::sleep(SETTLE).await;
            let u = update(&envoy, &mut file, stuck).await?;
            eprintln!(
                "bench: lds round {}/{rounds} {name}: {:.1} ms, longest admin answer {:.1} ms, {} polls",
                round + 1,
                u.ms,
                u.admin_max_ms,
                u.polls
            );
            updates.entry(name).or_default().push(u);
        }
    }
    let configs = LDS_VARIANTS
        .iter()
        .map(|(name, stuck)| (*name, lds_filter_config(*stuck, 0)))
        .collect();
    Ok(Lds { updates, configs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cb_core::config::FilterConfig;

    #[test]
    fn the_variants_differ_in_stuck_call_duration_and_every_version_changes_the_config() {
        for (_, stuck) in LDS_VARIANTS {
            let (a, b) = (lds_filter_config(stuck, 1), lds_filter_config(stuck, 2));
            assert_ne!(
                a, b,
                "an update must give every listener a new configuration"
            );
            for json in [a, b] {
                let config = FilterConfig::from_json(json.as_bytes()).unwrap();
                assert_eq!(config.tracks_stuck_calls(), stuck, "{json}");
            }
        }
    }

    #[test]
    fn the_file_holds_every_listener_with_the_filter_configuration() {
        let config = lds_filter_config(true, 3);
        let yaml = listeners_yaml(3, &config, Path::new("/x/cb.wasm")).unwrap();
        assert!(
            yaml.starts_with("version_info: \"3\"\nresources:\n"),
            "{yaml}"
        );
        let quoted = serde_json::Value::String(config).to_string();
        assert_eq!(yaml.matches(&quoted).count(), LDS_LISTENERS);
        for i in 0..LDS_LISTENERS {
            assert!(yaml.contains(&format!("name: {}\n", listener_name(i))));
        }
        assert_eq!(yaml.matches("- \"@type\"").count(), LDS_LISTENERS);
    }

    #[test]
    fn an_update_is_done_once_counted_and_nothing_drains_or_warms() {
        let before = ListenerStats::parse("listener_manager.lds.update_success: 4\n");
        let body = "listener_manager.lds.update_rejected: 0\nlistener_manager.lds.update_success: 5\n\
                    listener_manager.total_filter_chains_draining: 20\n\
                    listener_manager.total_listeners_draining: 0\nlistener_manager.total_listeners_warming: 0\n";
        let draining = ListenerStats::parse(body);
        assert_eq!(draining.chains_draining, 20);
        assert!(
            !draining.done_after(&before),
            "old filter chains still draining"
        );
        let done = ListenerStats::parse(&body.replace("draining: 20", "draining: 0"));
        assert!(done.done_after(&before));
        assert!(!done.done_after(&done), "not counted after itself");
    }
}
