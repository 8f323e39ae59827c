//! `harness demo`, what `make demo` runs: the story this project exists for, told live.
//!
//! On loopback it starts the four services of a small social app (user, content, feed, auth), one Envoy
//! with the filter in front of them, and a client playing the API gateway for many independent
//! clients: requests arrive at a fixed rate (200 a second, to the four services in turn) whatever
//! became of the earlier ones, each a gRPC call with a 2 s deadline, as gateways set them. Then
//! content-service becomes a dead host: it takes every call and never answers. Envoy's route timeout is
//! long (10 s, like Envoy's own default of 15 s), so only the callers' deadlines end those calls. Later
//! the service comes back. A line a second shows how the requests that ended that second ended (OK,
//! upstream failure, rejection, given up at the deadline, shed by the gateway), the calls still
//! waiting, the latency callers saw and each breaker's state (from the health endpoint).
//!
//! The same outage is then replayed with the filter in `disabled` mode, and a side-by-side table shows
//! what the breaker saved: the calls left waiting and the time callers spent waiting, the calls that
//! reached the dead service, p99 latency, how soon the breaker opened and the longest the callers of
//! content-service (and the gateway as a whole) went without any answer. `target/demo/timeline.svg`
//! draws the two runs against each other.
//!
//! Files: `load.rs` (the gateway's open-loop arrivals and how a call ended), `run.rs` (one run and what
//! it measured), `report.rs` (the lines and the table), `picture.rs` (the SVG).
//!
//! `--native` runs the native build of the filter (`dist/libcircuit_breaker.so`, or `CB_NATIVE`,
//! loaded by Envoy's dynamic modules from `envoy/demo-native.yaml`) instead of the `.wasm` one.

use std::path::{Path, PathBuf};

use crate::envoy::{native_path, workspace_root, Build};
use crate::svg;

mod load;
mod picture;
mod replica;
mod replica_report;
mod report;
mod run;

/// The filter configuration of the demo: trips fast, probes after a few seconds, and counts a call
/// still unanswered after 500 ms as failed (the demo's calls take a few milliseconds when healthy), so
/// the breaker learns about the dead host while the first calls to it still hang.
const DEMO_CONFIG: &str = r#"{
  "failure_threshold": 5,
  "error_rate_threshold": 0.5,
  "window_size": 20,
  "minimum_requests": 10,
  "stuck_call_duration": "500ms",
  "open_timeout": "3s",
  "success_threshold": 2,
  "half_open_max_requests": 1,
  "health_path": "/health/circuit-breakers"
}"#;

/// Phases of one run, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Phases {
    healthy: u64,
    outage: u64,
    recovery: u64,
}

impl Phases {
    fn total(&self) -> u64 {
        self.healthy + self.outage + self.recovery
    }
}

/// The wasm demo's bootstrap; [`Build::template`] names the native build's twin.
const TEMPLATE: &str = "envoy/demo.yaml";

/// Checks that `build` can run `scenario`: its bootstrap templates are there and, for the native
/// build, the module ([`native_path`]: `CB_NATIVE`, else `dist/libcircuit_breaker.so`). The launcher
/// points Envoy's `ENVOY_DYNAMIC_MODULES_SEARCH_PATH` at the module's directory.
fn check(build: Build, scenario: Scenario) -> Result<(), String> {
    let templates: &[&str] = match scenario {
        Scenario::Service => &[TEMPLATE],
        Scenario::Replica => &["envoy/outbound.yaml", "envoy/inbound.yaml"],
    };
    for template in templates {
        let template = workspace_root().join(build.template(template));
        if !template.is_file() {
            return Err(format!(
                "demo: {} not found: the {} build of the filter needs it as its bootstrap template",
                display_path(&template),
                build.name()
            ));
        }
    }
    if build == Build::Native {
        native_path().map_err(|e| format!("demo: the native build: {e}"))?;
    }
    Ok(())
}

/// What breaks, and what is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// content-service hangs, behind one Envoy; with the breaker and without (`make demo`).
    Service,
    /// One of content-service's three replicas hangs, behind sidecars; no breaker, the caller's side,
    /// both sides (`make demo SCENARIO=replica`, `replica.rs`).
    Replica,
}

/// The parsed command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    phases: Phases,
    build: Build,
    scenario: Scenario,
}

/// Runs the subcommand: `harness demo [--healthy S] [--outage S] [--recovery S] [--native]
/// [--scenario service|replica]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let options = parse_args(args)?;
    check(options.build, options.scenario)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("demo: cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        tokio::select! {
            result = scenario(options) => result,
            _ = tokio::signal::ctrl_c() => {
                // Dropping the demo future drops Envoy and the services, which stops them.
                eprintln!("\ninterrupted: stopping Envoy and the services");
                Err("demo interrupted".to_string())
            }
        }
    })
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut phases = Phases {
        healthy: 6,
        outage: 16,
        recovery: 12,
    };
    let mut build = Build::Wasm;
    let mut scenario = Scenario::Service;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--scenario" => {
                scenario = match it.next().map(String::as_str) {
                    Some("service") => Scenario::Service,
                    Some("replica") => Scenario::Replica,
                    other => {
                        return Err(format!(
                            "demo: --scenario takes `service` (the default: content-service hangs) or \
                             `replica` (one of its three replicas hangs), got {other:?}"
                        ))
                    }
                };
                continue;
            }
            "--healthy" => &mut phases.healthy,
            "--outage" => &mut phases.outage,
            "--recovery" => &mut phases.recovery,
            "--native" => {
                build = Build::Native;
                continue;
            }
            other => {
                return Err(format!(
                "demo: unknown option {other:?} (allowed: --healthy S, --outage S, --recovery S, --native, --scenario service|replica)"
            ))
            }
        };
        *slot = it
            .next()
            .and_then(|v| v.parse().ok())
            .filter(|v| (1..=300).contains(v))
            .ok_or_else(|| format!("demo: {flag} takes a number of seconds from 1 to 300"))?;
    }
    Ok(Options {
        phases,
        build,
        scenario,
    })
}

async fn scenario(options: Options) -> Result<(), String> {
    match options.scenario {
        Scenario::Service => demo(options.phases, options.build).await,
        Scenario::Replica => replica::demo(options.phases, options.build).await,
    }
}

async fn demo(phases: Phases, build: Build) -> Result<(), String> {
    println!("circuit breaker demo: a social app's API gateway calling four gRPC services through Envoy.");
    println!(
        "The gateway gives every call a {}s deadline; Envoy's route timeout is 10s. content-service will \
         take calls and never answer from t={}s to t={}s.",
        load::CLIENT_DEADLINE.as_secs(),
        phases.healthy,
        phases.healthy + phases.outage
    );
    println!(
        "First with the breaker (the {} build, enforce), then without (disabled).\n",
        build.name()
    );
    let with = run::one_run("with breaker", "with-breaker", DEMO_CONFIG, phases, build).await?;
    let without = run::one_run(
        "without breaker",
        "without-breaker",
        r#"{"mode": "disabled"}"#,
        phases,
        build,
    )
    .await?;

    let out_dir = output_dir();
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("demo: cannot create {}: {e}", out_dir.display()))?;
    let svg_path = out_dir.join("timeline.svg");
    let drawing = picture::picture(&with, &without, phases);
    std::fs::write(&svg_path, svg::render_comparison(&drawing))
        .map_err(|e| format!("demo: cannot write {}: {e}", svg_path.display()))?;

    println!("\n{}", report::summary_table(&with, &without));
    println!("timeline: {}", display_path(&svg_path));
    Ok(())
}

fn display_path(p: &Path) -> String {
    let root = workspace_root();
    p.strip_prefix(&root)
        .map_or_else(|_| p.display().to_string(), |r| r.display().to_string())
}

/// Where the demo writes its files (Envoy's logs and bootstraps, the picture).
pub fn output_dir() -> PathBuf {
    workspace_root().join("target/demo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let args: Vec<String> = ["--outage", "5"].iter().map(|s| s.to_string()).collect();
        assert_eq!(parse_args(&args).map(|o| o.phases.outage), Ok(5));
        assert_eq!(parse_args(&args).map(|o| o.build), Ok(Build::Wasm));
        assert!(parse_args(&["--outage".to_string(), "0".to_string()]).is_err());
        assert!(parse_args(&["--bogus".to_string()]).is_err());
        let native = parse_args(&["--native".to_string(), "--healthy".into(), "3".into()]).unwrap();
        assert_eq!((native.build, native.phases.healthy), (Build::Native, 3));
        assert_eq!(native.scenario, Scenario::Service);
        let replica = parse_args(&["--scenario".to_string(), "replica".into()]).unwrap();
        assert_eq!(replica.scenario, Scenario::Replica);
        assert!(parse_args(&["--scenario".to_string(), "zone".into()]).is_err());
        assert!(parse_args(&["--scenario".to_string()]).is_err());
    }

    #[test]
    fn each_build_has_its_bootstrap() {
        assert_eq!(Build::Native.template(TEMPLATE), "envoy/demo-native.yaml");
        assert_eq!(
            check(Build::Wasm, Scenario::Service),
            Ok(()),
            "envoy/demo.yaml ships"
        );
        assert_eq!(check(Build::Wasm, Scenario::Replica), Ok(()));
        assert!(workspace_root().join("envoy/demo-native.yaml").is_file());
        // The native module may not be built yet; then the error says how to get it.
        if let Err(e) = check(Build::Native, Scenario::Replica) {
            assert!(
                e.contains("libcircuit_breaker.so") && e.contains("make build"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_demo_config_is_one_the_filter_accepts() {
        let config = cb_core::config::FilterConfig::from_json(DEMO_CONFIG.as_bytes());
        assert!(config.is_ok_and(|c| c.tracks_stuck_calls()));
    }
}
