//! `harness simulate`: replays an Envoy access log (or a synthetic scenario) through the breaker core,
//! offline, and reports what the breaker would have done to that traffic.
//!
//! ```text
//! harness simulate --log access.jsonl --config filter.json [--svg out.svg] [--json] [--blip 10s]
//! harness simulate --scenario scenario.json --config filter.json ...
//! ```
//!
//!
//! - [`log`]: the access log and its timestamps;
//! - [`scenario`]: synthetic traffic;
//! - [`replay`]: the calls run through the breaker core, and the [`Report`];
//! - [`render`]: the report as a table, JSON or an SVG timeline;
//! - [`tune`]: `--tune`, a search for per-upstream thresholds.

use std::io::Write as _;

use cb_core::config::FilterConfig;
use cb_core::duration::parse_duration_ms;

mod episodes;
pub mod log;
pub mod render;
pub mod replay;
pub mod scenario;

use crate::svg;
pub use log::{
    format_rfc3339_ms, parse_log, parse_log_line, parse_rfc3339_ms, Call, Malformed, ParsedLog,
};
pub use render::{render_json, render_table, timeline};
pub use replay::{
    simulate, OpenPeriod, Options, Report, TransitionReport, UpstreamReport, DEFAULT_BLIP_MS,
};
pub use scenario::{
    generate, parse_scenario, scenario_span_ms, Phase, Scenario, XorShift, MAX_SCENARIO_CALLS,
};

const USAGE: &str = "usage: harness simulate (--log FILE | --scenario FILE) [--config FILE] [--svg OUT.svg] [--json] [--blip DURATION]

  --log FILE        Envoy access log, JSON lines (`-` reads stdin)
  --scenario FILE   synthetic traffic (JSON) instead of a log
  --config FILE     the filter configuration (JSON, as the plugin gets it); contract defaults without it
  --svg OUT.svg     also draw the breaker states, error rate and p99 latency per upstream
  --json            print the report as JSON instead of a table
  --blip DURATION   a trip whose failure episode lasted less than this is a blip (default 10s)";
// ---------------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------------

/// Parsed command-line arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Args {
    /// `--log FILE`.
    pub log: Option<String>,
    /// `--scenario FILE`.
    pub scenario: Option<String>,
    /// `--config FILE`.
    pub config: Option<String>,
    /// `--svg OUT.svg`.
    pub svg: Option<String>,
    /// `--json`.
    pub json: bool,
    /// `--blip DURATION`, in ms.
    pub blip_ms: u64,
    /// `--help`.
    pub help: bool,
}

impl Args {
    /// Parses the arguments after `simulate`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut a = Args {
            blip_ms: DEFAULT_BLIP_MS,
            ..Args::default()
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag {
                "--log" => a.log = Some(value()?),
                "--scenario" => a.scenario = Some(value()?),
                "--config" => a.config = Some(value()?),
                "--svg" => a.svg = Some(value()?),
                "--blip" => {
                    let v = value()?;
                    a.blip_ms = parse_duration_ms(&v).map_err(|why| {
                        format!("--blip must be a duration such as \"10s\" ({why}), got {v:?}")
                    })?;
                }
                "--json" => a.json = true,
                "-h" | "--help" => a.help = true,
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        if !a.help && a.log.is_some() == a.scenario.is_some() {
            return Err(format!("give exactly one of --log and --scenario\n{USAGE}"));
        }
        Ok(a)
    }
}

/// Runs `harness simulate`.
pub fn run(args: &[String]) -> Result<(), String> {
    let args = Args::parse(args)?;
    if args.help {
        return emit(&format!("{USAGE}\n"));
    }
    let config = match &args.config {
        Some(path) => load_config(&read(path)?).map_err(|e| format!("{path}: {e}"))?,
        None => FilterConfig::default(),
    };
    let (calls, source, malformed, span_ms) = if let Some(path) = &args.log {
        let parsed = parse_log(&read(path)?, &config.upstream_key);
        for m in &parsed.malformed {
            eprintln!("{path}: line {}: skipped: {}", m.line, m.error);
        }
        (parsed.calls, path.clone(), parsed.malformed.len(), None)
    } else if let Some(path) = &args.scenario {
        let scenario = parse_scenario(&read(path)?).map_err(|e| format!("{path}: {e}"))?;
        (
            generate(&scenario)?,
            path.clone(),
            0,
            Some(scenario_span_ms(&scenario)),
        )
    } else {
        return Err(USAGE.into());
    };
    if calls.is_empty() {
        return Err(format!(
            "{source}: no calls to replay ({malformed} malformed lines)"
        ));
    }
    let report = simulate(
        &calls,
        &config,
        &Options {
            source,
            malformed_lines: malformed,
            blip_ms: args.blip_ms,
            span_ms,
        },
    );
    if let Some(out) = &args.svg {
        std::fs::write(out, svg::render(&timeline(&report))).map_err(|e| format!("{out}: {e}"))?;
        eprintln!("wrote {out}");
    }
    if args.json {
        emit(&(render_json(&report)? + "\n"))
    } else {
        emit(&render_table(&report))
    }
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
        assert!(args(&["--log", "a", "--blip", "soon"])
            .unwrap_err()
            .contains("--blip"));
        assert!(args(&["--log"]).unwrap_err().contains("needs a value"));
    }
}
