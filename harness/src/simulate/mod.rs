//! `circuit-breaker simulate`: replays an Envoy access log (or a synthetic scenario) through the breaker
//! core, offline, and reports what the breaker would have done to that traffic.
//!
//! ```text
//! circuit-breaker simulate --log access.jsonl --config filter.json [--svg out.svg] [--json] [--blip 10s]
//! circuit-breaker simulate --scenario scenario.json --config filter.json ...
//! circuit-breaker simulate --scenario fleet-scenario.json --config fleet.json --fleet 100 [--json]
//! ```
//!
//! - [`log`]: the access log and its timestamps;
//! - [`scenario`]: synthetic traffic;
//! - [`replay`]: the calls run through the breaker core, and the [`Report`];
//! - [`render`]: the report as a table, JSON or an SVG timeline;
//! - [`tune`]: `--tune`, a search per upstream for the settings that would have served the traffic best;
//! - [`fleet`]: `--fleet N`, the traffic spread over N proxies with a breaker each.

use std::io::Write as _;

use cb_core::config::FilterConfig;
use cb_core::duration::parse_duration_ms;
use clap::FromArgMatches as _;

pub mod episodes;
pub mod fleet;
pub mod log;
pub mod proxy;
pub mod render;
pub mod replay;
pub mod report;
mod run;
pub mod scenario;
pub mod tune;
mod tune_judge;
mod tune_search;

use crate::svg;
pub use log::{
    format_rfc3339_ms, parse_log, parse_log_line, parse_rfc3339_ms, Call, Malformed, ParsedLog,
};
pub use proxy::{judge, judge_all, Judged};
pub use render::{render_json, render_table, timeline};
pub use replay::{
    simulate, simulate_judged, OpenPeriod, Options, Report, TransitionReport, UpstreamReport,
    DEFAULT_BLIP_MS, DEFAULT_SEED,
};
pub use scenario::{
    generate, parse_scenario, scenario_span_ms, Phase, Scenario, XorShift, MAX_SCENARIO_CALLS,
};

const ABOUT: &str = "Replay an access log or a scenario through the breaker core, offline";

const LONG_ABOUT: &str = "Replay an Envoy access log (or a synthetic scenario) through the same breaker \
core the filter runs, offline, and report per upstream when the breaker would have opened and closed, \
how many calls it would have rejected (and how many of those would have succeeded), and which trips \
were caused by short blips.

A trip is a blip when the failure episode behind it lasted less than --blip: in one-second buckets of \
call end times, a second is bad when its failure fraction reaches the upstream's error_rate_threshold; \
the episode is the run of bad seconds around the trip.

A malformed log line is reported on stderr with its line number and skipped. A bad --config gets the \
error the filter would log, and no report.";

// ---------------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------------

/// The options of `circuit-breaker simulate`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(about = ABOUT, long_about = LONG_ABOUT, after_long_help = tune_help())]
#[command(group(clap::ArgGroup::new("input").required(true).args(["log", "scenario"])))]
#[group(skip)]
pub struct Args {
    /// Envoy access log, JSON lines (`-` reads stdin)
    #[arg(long, value_name = "FILE")]
    pub log: Option<String>,
    /// Synthetic traffic (JSON) instead of a log
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<String>,
    /// The filter configuration (JSON, as the plugin gets it); the contract's defaults without it
    #[arg(long, value_name = "FILE")]
    pub config: Option<String>,
    /// Also draw the breaker states, error rate and p99 latency per upstream
    #[arg(long, value_name = "OUT.svg")]
    pub svg: Option<String>,
    /// Print the report as JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// A trip whose failure episode lasted less than this is a blip
    #[arg(long = "blip", value_name = "DURATION", default_value = "10s", value_parser = duration_ms)]
    pub blip_ms: u64,
    /// Search per upstream for the settings that would have served this traffic best (see below)
    #[arg(long, conflicts_with = "svg")]
    pub tune: bool,
    /// With --tune: an episode at least this long is an outage the breaker must catch
    #[arg(long = "outage", value_name = "DURATION", default_value = "30s", value_parser = duration_ms, requires = "tune")]
    pub outage_ms: u64,
    /// Where each proxy's random draws come from (open_timeout_jitter): the same seed, the same run
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Spread the traffic of the upstream with the longest failure over N proxies, each with its
    /// own breaker, and report what the fleet did to it, with and without open_timeout_jitter and
    /// recovery_ramp (see below)
    #[arg(long, value_name = "N", conflicts_with_all = ["tune", "svg"])]
    pub fleet: Option<u32>,
}

/// What `--help` says about `--tune`.
fn tune_help() -> String {
    format!(
        "--tune: per upstream, a search over failure_threshold, error_rate_threshold, window_size or \
window_duration, minimum_requests and open_timeout, each candidate replayed through the core.

Outages and blips are measured on the log, over every call to the upstream:
  - noise: the median error rate of its 10s buckets outside episodes;
  - a second (of call end times) is bad when its error rate is at least max(3 x noise, noise + 0.2);
  - an episode is a run of bad seconds (bridging 10s without calls, and 2 good seconds, or up to 10
    while the episode with them still fails at the bad-second rate) with at least 3 failures;
  - an outage is an episode at least --outage long (full or partial: only the rate counts);
  - a blip is an episode shorter than --blip.
A trip belongs to the episode it falls in: from 1s before its start until its failures have left the
breaker's window (at least 2s after its end); a trip in no episode is a trip in normal traffic.

{objective}

{stuck}

The search: coordinate search (each setting in turn set to the value that ranks best, until a pass
changes nothing, at most 3 passes) from the upstream's own settings and from a rate-only start, over
  {grids}
(and the upstream's own values). It is bounded: at most {max} candidates are replayed per upstream, each
a replay of that upstream's calls, so the whole search costs at most {max} replays of the log.
\"The defaults\" are an upstream's settings in --config (the contract's defaults without it). An
upstream with no outage, on which the defaults trip on nothing, keeps them (no override). Other
settings (slow calls, backoff, success_threshold...) stay as the base has them.

Output: a ready-to-paste \"upstreams\" block (the base's own entries with each recommended override
added, so it replaces the base's \"upstreams\" whole) and, per upstream, what the recommendation and the
defaults would have done. With --json: one JSON object; its \"upstreams\" member is that block, its
\"results\" the details.

{fleet}",
        objective = tune::OBJECTIVE,
        stuck = tune::STUCK_RULE,
        grids = tune_search::grids(),
        max = tune::MAX_REPLAYS,
        fleet = fleet::HELP,
    )
}

/// A duration argument (`"10s"`, `"2.5s"`, `"500ms"`) in ms, as the filter configuration spells them.
fn duration_ms(v: &str) -> Result<u64, String> {
    parse_duration_ms(v).map_err(|why| format!("a duration such as \"10s\" ({why})"))
}

impl Args {
    /// Parses the arguments after `simulate`, as the `circuit-breaker` binary does; the error is
    /// clap's message with the usage.
    pub fn parse(args: &[String]) -> Result<Self, clap::Error> {
        let command = <Self as clap::Args>::augment_args(clap::Command::new("simulate"));
        let argv = std::iter::once("simulate".to_string()).chain(args.iter().cloned());
        let matches = command.try_get_matches_from(argv)?;
        Self::from_arg_matches(&matches)
    }
}

/// Runs `simulate` with the arguments after it (`--help` prints the help).
pub fn run(args: &[String]) -> Result<(), String> {
    match Args::parse(args) {
        Ok(args) => run_args(&args),
        Err(e) if !e.use_stderr() => emit(&e.render().to_string()),
        Err(e) => Err(e.render().to_string().trim_end().to_string()),
    }
}

/// The calls to replay and where they came from.
struct Input {
    calls: Vec<Call>,
    source: String,
    malformed: usize,
    span_ms: Option<(u64, u64)>,
}

fn input(args: &Args, key: &cb_core::key::UpstreamKey) -> Result<Input, String> {
    let input = if let Some(path) = &args.log {
        let parsed = parse_log(&read(path)?, key);
        for m in &parsed.malformed {
            eprintln!("{path}: line {}: skipped: {}", m.line, m.error);
        }
        Input {
            calls: parsed.calls,
            source: path.clone(),
            malformed: parsed.malformed.len(),
            span_ms: None,
        }
    } else if let Some(path) = &args.scenario {
        let scenario = parse_scenario(&read(path)?).map_err(|e| format!("{path}: {e}"))?;
        Input {
            calls: generate(&scenario)?,
            source: path.clone(),
            malformed: 0,
            span_ms: Some(scenario_span_ms(&scenario)),
        }
    } else {
        return Err("give one of --log and --scenario".into());
    };
    if input.calls.is_empty() {
        return Err(format!(
            "{}: no calls to replay ({} malformed lines)",
            input.source, input.malformed
        ));
    }
    Ok(input)
}

/// Runs `simulate` with parsed arguments.
pub fn run_args(args: &Args) -> Result<(), String> {
    if args.tune {
        return run_tune(args);
    }
    if let Some(proxies) = args.fleet {
        return run_fleet(args, proxies);
    }
    let config = match &args.config {
        Some(path) => load_config(&read(path)?).map_err(|e| format!("{path}: {e}"))?,
        None => FilterConfig::default(),
    };
    let input = input(args, &config.upstream_key)?;
    let report = simulate(
        &input.calls,
        &config,
        &Options {
            source: input.source,
            malformed_lines: input.malformed,
            blip_ms: args.blip_ms,
            span_ms: input.span_ms,
            seed: args.seed,
        },
    );
    if let Some(out) = &args.svg {
        std::fs::write(out, svg::render(&timeline(&report))).map_err(|e| format!("{out}: {e}"))?;
        eprintln!("wrote {out}");
    }
    emit_report(args.json, &report, render_table)
}

fn run_tune(args: &Args) -> Result<(), String> {
    if args.outage_ms < args.blip_ms {
        return Err(format!(
            "--outage ({}) must be at least --blip ({})",
            tune::duration(args.outage_ms),
            tune::duration(args.blip_ms)
        ));
    }
    let base = match &args.config {
        Some(path) => tune::Base::parse(&read(path)?).map_err(|e| format!("{path}: {e}"))?,
        None => tune::Base::parse("")?,
    };
    let input = input(args, &base.config.upstream_key)?;
    let started = std::time::Instant::now();
    let opts = tune::TuneOptions {
        source: input.source,
        malformed_lines: input.malformed,
        outage_ms: args.outage_ms,
        blip_ms: args.blip_ms,
    };
    let report = tune::tune(&input.calls, &base, &opts);
    let replays: usize = report.results.iter().map(|r| r.replays).sum();
    eprintln!(
        "tune: {replays} replays of {} calls in {:.1}s",
        input.calls.len(),
        started.elapsed().as_secs_f64()
    );
    emit_report(args.json, &report, render::render_tune)
}

fn run_fleet(args: &Args, proxies: u32) -> Result<(), String> {
    let text = match &args.config {
        Some(path) => read(path)?,
        None => String::new(),
    };
    let named = |e: String| match &args.config {
        Some(path) => format!("{path}: {e}"),
        None => e,
    };
    let config = load_config(&text).map_err(named)?;
    let without =
        load_config(&fleet::without_jitter_or_ramp(&text).map_err(named)?).map_err(named)?;
    let input = input(args, &config.upstream_key)?;
    let opts = fleet::FleetOptions {
        source: input.source,
        proxies,
        seed: args.seed,
    };
    let report = fleet::fleet(&input.calls, &config, &without, &opts)?;
    emit_report(args.json, &report, fleet::render_fleet)
}

/// Validates the filter configuration exactly as the filter does; the error is the line the filter
/// logs when Envoy refuses the configuration.
pub fn load_config(text: &str) -> Result<FilterConfig, String> {
    FilterConfig::from_json(text.as_bytes())
        .map_err(|e| format!("circuit breaker configuration rejected: {e}"))
}

fn read(path: &str) -> Result<String, String> {
    if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| format!("stdin: {e}"))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
}

/// A report on stdout: as JSON with `--json`, else as `table` renders it.
fn emit_report<T: serde::Serialize>(
    json: bool,
    report: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), String> {
    if json {
        emit(&(render_json(report)? + "\n"))
    } else {
        emit(&table(report))
    }
}

fn emit(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // A reader that went away (`| head`) is not an error of ours.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("stdout: {e}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_need_one_input() {
        let args = |v: &[&str]| Args::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(args(&[]).is_err());
        assert!(args(&["--log", "a", "--scenario", "b"]).is_err());
        let a = args(&["--log=a", "--json", "--blip", "2.5s"]).unwrap();
        assert_eq!(
            (a.log.as_deref(), a.json, a.blip_ms),
            (Some("a"), true, 2_500)
        );
        assert_eq!(args(&["--log", "a"]).unwrap().blip_ms, DEFAULT_BLIP_MS);
        assert!(args(&["--log", "a", "--blip", "soon"])
            .unwrap_err()
            .to_string()
            .contains("--blip"));
        assert!(args(&["--log"])
            .unwrap_err()
            .to_string()
            .contains("a value is required"));
    }
}
