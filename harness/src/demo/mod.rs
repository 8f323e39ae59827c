//! `harness demo`, what `make demo` runs: the story this project exists for, told live.
//!
//! On loopback it starts the four services of a small social app (user, content, feed, auth), one Envoy
//! with the filter in front of them, and a client playing the API gateway: a steady stream of concurrent
//! gRPC calls to all four. Then content-service hangs (the worst kind of outage: every call to it holds
//! its caller for the full route timeout), and later comes back. A line a second shows calls, upstream
//! failures, rejections, each breaker's state (from the health endpoint) and the latency callers see.
//!
//! The same outage is then replayed with the filter in `disabled` mode, and a side-by-side table shows
//! what the breaker saved: the total time callers spent waiting, the calls that reached the dead
//! service, p99 latency. The timeline of the first run is written as an SVG.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cb_core::breaker::StateKind;
use tonic::transport::Channel;

use crate::envoy::{workspace_root, Envoy};
use crate::services::pb::auth_service_client::AuthServiceClient;
use crate::services::pb::content_service_client::ContentServiceClient;
use crate::services::pb::feed_service_client::FeedServiceClient;
use crate::services::pb::user_service_client::UserServiceClient;
use crate::services::pb::{CheckRequest, GetFeedRequest, GetPostRequest, GetUserRequest};
use crate::services::{Fault, ServiceKind, Upstreams};
use crate::svg;

/// The filter configuration of the demo: trips fast, probes after a few seconds.
const DEMO_CONFIG: &str = r#"{
  "failure_threshold": 5,
  "error_rate_threshold": 0.5,
  "window_size": 20,
  "minimum_requests": 10,
  "open_timeout": "3s",
  "success_threshold": 2,
  "half_open_max_requests": 1,
  "health_path": "/health/circuit-breakers"
}"#;

/// Concurrent gateway workers: enough that a hanging service ties most of them up without a breaker.
const WORKERS: usize = 12;
/// Pause between two calls of one worker: about 12 × 20 calls a second in all when healthy.
const THINK_TIME: Duration = Duration::from_millis(50);
/// The gateway's own deadline on a call; Envoy's route timeout (2s in envoy/demo.yaml) fires first.
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);

/// Phases of one run, in seconds.
#[derive(Debug, Clone, Copy)]
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

/// How one call ended, as the gateway sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Ok,
    /// The upstream (or Envoy on its behalf: timeout, reset) failed the call.
    UpstreamFailure,
    /// The breaker answered at once.
    Rejected,
}

#[derive(Debug, Clone, Copy)]
struct CallRecord {
    /// When the call ended, since the start of the run: a call is counted in the second its caller got
    /// the answer, which is when a hanging upstream hurts.
    at_ms: u64,
    service: ServiceKind,
    latency_ms: f64,
    ending: Ending,
}

/// What one run measured.
#[derive(Debug, Default)]
struct RunReport {
    calls: Vec<CallRecord>,
    /// Per second, the state of each breaker as the health endpoint told it.
    states: Vec<(u64, HashMap<String, StateKind>)>,
    /// Requests content-service received during the outage.
    reached_dead_service: u64,
}

/// Runs the subcommand: `harness demo [--healthy S] [--outage S] [--recovery S]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let phases = parse_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("demo: cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        tokio::select! {
            result = demo(phases) => result,
            _ = tokio::signal::ctrl_c() => {
                // Dropping the demo future drops Envoy and the services, which stops them.
                eprintln!("\ninterrupted: stopping Envoy and the services");
                Err("demo interrupted".to_string())
            }
        }
    })
}

fn parse_args(args: &[String]) -> Result<Phases, String> {
    let mut phases = Phases {
        healthy: 6,
        outage: 16,
        recovery: 12,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--healthy" => &mut phases.healthy,
            "--outage" => &mut phases.outage,
            "--recovery" => &mut phases.recovery,
            other => {
                return Err(format!(
                "demo: unknown option {other:?} (allowed: --healthy S, --outage S, --recovery S)"
            ))
            }
        };
        *slot = it
            .next()
            .and_then(|v| v.parse().ok())
            .filter(|v| (1..=300).contains(v))
            .ok_or_else(|| format!("demo: {flag} takes a number of seconds from 1 to 300"))?;
    }
    Ok(phases)
}

async fn demo(phases: Phases) -> Result<(), String> {
    println!("circuit breaker demo: a social app's API gateway calling four gRPC services through Envoy.");
    println!(
        "content-service will hang from t={}s to t={}s. First with the breaker (enforce), then without (disabled).\n",
        phases.healthy,
        phases.healthy + phases.outage
    );
    let with = one_run("with breaker", DEMO_CONFIG, phases).await?;
    let without = one_run("without breaker", r#"{"mode": "disabled"}"#, phases).await?;

    let out_dir = workspace_root().join("target/demo");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("demo: cannot create {}: {e}", out_dir.display()))?;
    let svg_path = out_dir.join("timeline.svg");
    std::fs::write(&svg_path, svg::render(&timeline(&with, phases)))
        .map_err(|e| format!("demo: cannot write {}: {e}", svg_path.display()))?;

    println!("\n{}", summary_table(&with, &without));
    println!("timeline: {}", display_path(&svg_path));
    Ok(())
}

fn display_path(p: &std::path::Path) -> String {
    let root = workspace_root();
    p.strip_prefix(&root)
        .map_or_else(|_| p.display().to_string(), |r| r.display().to_string())
}

/// One run: services, Envoy with `config`, the gateway's load, the outage, the live timeline.
async fn one_run(label: &str, config: &str, phases: Phases) -> Result<RunReport, String> {
    let upstreams = Upstreams::start()
        .await
        .map_err(|e| format!("demo: cannot start the services: {e}"))?;
    let envoy = Envoy::start_from("demo", "envoy/demo.yaml", &upstreams.ports(), config)
        .await
        .map_err(|e| format!("demo: {e}"))?;
    let channel = envoy.channel().await.map_err(|e| format!("demo: {e}"))?;
    let content = &upstreams.content;

    println!(
        "== {label}: Envoy on {} (log: {})",
        envoy.listener(),
        display_path(envoy.log_path())
    );
    println!("{}", header_line());

    let start = Instant::now();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(gateway_worker(
                w,
                channel.clone(),
                start,
                calls.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let mut report = RunReport::default();
    let mut reached_before = 0;
    for second in 1..=phases.total() {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            start + Duration::from_secs(second),
        ))
        .await;
        if second == phases.healthy {
            reached_before = content.requests();
            content
                .set_fault(Fault::Hang)
                .await
                .map_err(|e| format!("demo: {e}"))?;
            println!("-- t={second}s: content-service hangs");
        }
        if second == phases.healthy + phases.outage {
            report.reached_dead_service = content.requests().saturating_sub(reached_before);
            content
                .set_fault(Fault::Ok)
                .await
                .map_err(|e| format!("demo: {e}"))?;
            println!("-- t={second}s: content-service is back");
        }
        let states = breaker_states(&envoy).await;
        let snapshot: Vec<CallRecord> = lock(&calls).clone();
        println!("{}", second_line(second, &snapshot, &states));
        report.states.push((second * 1000, states));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(CLIENT_DEADLINE, w).await;
    }
    report.calls = lock(&calls).clone();
    Ok(report)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One gateway worker: calls the four services in turn until told to stop.
async fn gateway_worker(
    worker: usize,
    channel: Channel,
    start: Instant,
    calls: Arc<Mutex<Vec<CallRecord>>>,
    stop: Arc<AtomicBool>,
) {
    let mut n = worker;
    while !stop.load(Ordering::Relaxed) {
        let service = ServiceKind::ALL
            .get(n % 4)
            .copied()
            .unwrap_or(ServiceKind::User);
        n += 1;
        let began = Instant::now();
        let ending = call(&channel, service, n).await;
        let record = CallRecord {
            at_ms: start.elapsed().as_millis() as u64,
            service,
            latency_ms: began.elapsed().as_secs_f64() * 1000.0,
            ending,
        };
        lock(&calls).push(record);
        tokio::time::sleep(THINK_TIME).await;
    }
}

async fn call(channel: &Channel, service: ServiceKind, n: usize) -> Ending {
    let id = format!("{}", n % 100);
    let result = match service {
        ServiceKind::User => UserServiceClient::new(channel.clone())
            .get_user(request(GetUserRequest { user_id: id }))
            .await
            .map(|_| ()),
        ServiceKind::Content => ContentServiceClient::new(channel.clone())
            .get_post(request(GetPostRequest { post_id: id }))
            .await
            .map(|_| ()),
        ServiceKind::Feed => FeedServiceClient::new(channel.clone())
            .get_feed(request(GetFeedRequest {
                user_id: id,
                ..Default::default()
            }))
            .await
            .map(|_| ()),
        ServiceKind::Auth => AuthServiceClient::new(channel.clone())
            .check(request(CheckRequest { token: id }))
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => Ending::Ok,
        Err(status) if status.metadata().get("x-circuit-breaker").is_some() => Ending::Rejected,
        Err(_) => Ending::UpstreamFailure,
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(CLIENT_DEADLINE);
    r
}

/// Breaker states from the health endpoint (empty when the filter is disabled).
async fn breaker_states(envoy: &Envoy) -> HashMap<String, StateKind> {
    let Ok(response) = envoy.get("/health/circuit-breakers").await else {
        return HashMap::new();
    };
    let Ok(json) = response.json() else {
        return HashMap::new();
    };
    let breakers = json
        .get("circuit_breakers")
        .and_then(|b| b.as_array())
        .cloned()
        .unwrap_or_default();
    breakers
        .iter()
        .filter_map(|b| {
            let name = b.get("upstream")?.as_str()?.to_string();
            let state = match b.get("state")?.as_str()? {
                "open" => StateKind::Open,
                "half_open" => StateKind::HalfOpen,
                _ => StateKind::Closed,
            };
            Some((name, state))
        })
        .collect()
}

fn header_line() -> String {
    format!(
        "{:>4}  {:>5} {:>5} {:>6} {:>6}  {:>7} {:>7}  {:<9} {:<9} {:<9} {:<9}",
        "t",
        "calls",
        "ok",
        "failed",
        "reject",
        "p50 ms",
        "p99 ms",
        "user",
        "content",
        "feed",
        "auth"
    )
}

/// The timeline line for the second that just ended.
fn second_line(second: u64, calls: &[CallRecord], states: &HashMap<String, StateKind>) -> String {
    let lo = (second - 1) * 1000;
    let hi = second * 1000;
    let window: Vec<&CallRecord> = calls
        .iter()
        .filter(|c| c.at_ms >= lo && c.at_ms < hi)
        .collect();
    let count = |e: Ending| window.iter().filter(|c| c.ending == e).count();
    let mut latencies: Vec<f64> = window.iter().map(|c| c.latency_ms).collect();
    let mut line = format!(
        "{:>3}s  {:>5} {:>5} {:>6} {:>6}  {:>7.1} {:>7.1} ",
        second,
        window.len(),
        count(Ending::Ok),
        count(Ending::UpstreamFailure),
        count(Ending::Rejected),
        percentile(&mut latencies, 0.50),
        percentile(&mut latencies, 0.99),
    );
    for kind in ServiceKind::ALL {
        let state = states.get(kind.cluster()).map_or("-", |s| match s {
            StateKind::Closed => "closed",
            StateKind::Open => "OPEN",
            StateKind::HalfOpen => "half-open",
        });
        let _ = write!(line, " {state:<9}");
    }
    line
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values.get(rank - 1).copied().unwrap_or(0.0)
}

fn summary_table(with: &RunReport, without: &RunReport) -> String {
    let waited = |r: &RunReport| r.calls.iter().map(|c| c.latency_ms).sum::<f64>() / 1000.0;
    let p99 = |r: &RunReport| {
        percentile(
            &mut r.calls.iter().map(|c| c.latency_ms).collect::<Vec<_>>(),
            0.99,
        )
    };
    let ok = |r: &RunReport| r.calls.iter().filter(|c| c.ending == Ending::Ok).count();
    let others_p99 = |r: &RunReport| {
        percentile(
            &mut r
                .calls
                .iter()
                .filter(|c| c.service != ServiceKind::Content)
                .map(|c| c.latency_ms)
                .collect::<Vec<_>>(),
            0.99,
        )
    };
    let others_ok = |r: &RunReport| {
        r.calls
            .iter()
            .filter(|c| c.service != ServiceKind::Content && c.ending == Ending::Ok)
            .count()
    };
    let rows = [
        (
            "calls made",
            r(with.calls.len() as f64, 0),
            r(without.calls.len() as f64, 0),
        ),
        (
            "calls to the healthy services answered",
            r(others_ok(with) as f64, 0),
            r(others_ok(without) as f64, 0),
        ),
        (
            "calls answered OK",
            r(ok(with) as f64, 0),
            r(ok(without) as f64, 0),
        ),
        (
            "total time callers waited (s)",
            r(waited(with), 1),
            r(waited(without), 1),
        ),
        (
            "calls that reached the dead service",
            r(with.reached_dead_service as f64, 0),
            r(without.reached_dead_service as f64, 0),
        ),
        (
            "p99 latency, all calls (ms)",
            r(p99(with), 1),
            r(p99(without), 1),
        ),
        (
            "p99 latency, other services (ms)",
            r(others_p99(with), 1),
            r(others_p99(without), 1),
        ),
    ];
    let mut out = format!(
        "| {:<40} | {:>14} | {:>17} |\n",
        "", "with breaker", "without breaker"
    );
    let _ = writeln!(out, "|{:-<42}|{:->16}|{:->19}|", "", "", "");
    for (name, a, b) in rows {
        let _ = writeln!(out, "| {name:<40} | {a:>14} | {b:>17} |");
    }
    out
}

fn r(x: f64, decimals: usize) -> String {
    format!("{x:.decimals$}")
}

/// The first run as an SVG timeline: state bands, error rate, p99 latency per service and second.
fn timeline(report: &RunReport, phases: Phases) -> svg::Timeline {
    let end_ms = phases.total() * 1000;
    let series = ServiceKind::ALL
        .iter()
        .map(|&kind| {
            let mut states = vec![(0, StateKind::Closed)];
            for (at, s) in &report.states {
                let state = s.get(kind.cluster()).copied().unwrap_or(StateKind::Closed);
                if states.last().map(|(_, last)| *last) != Some(state) {
                    // The health endpoint was read at the end of the second: the change happened in it.
                    states.push((at.saturating_sub(1000), state));
                }
            }
            let mut error_rate = Vec::new();
            let mut latency_ms = Vec::new();
            for second in 0..phases.total() {
                let mut lat: Vec<f64> = Vec::new();
                let mut bad = 0usize;
                for c in report
                    .calls
                    .iter()
                    .filter(|c| c.service == kind && c.at_ms / 1000 == second)
                {
                    lat.push(c.latency_ms);
                    bad += usize::from(c.ending != Ending::Ok);
                }
                if !lat.is_empty() {
                    error_rate.push((second * 1000 + 500, bad as f64 / lat.len() as f64));
                    latency_ms.push((second * 1000 + 500, percentile(&mut lat, 0.99)));
                }
            }
            svg::Series {
                name: format!("{kind}-service"),
                states,
                error_rate,
                latency_ms,
            }
        })
        .collect();
    svg::Timeline {
        title: format!(
            "circuit breaker demo: content-service hangs from {}s to {}s",
            phases.healthy,
            phases.healthy + phases.outage
        ),
        start_ms: 0,
        end_ms,
        series,
    }
}

/// Where the demo writes its files (for tests and the README).
pub fn output_dir() -> PathBuf {
    workspace_root().join("target/demo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.99), 5.0);
        assert_eq!(percentile(&mut [], 0.99), 0.0);
    }

    #[test]
    fn options() {
        let args: Vec<String> = ["--outage", "5"].iter().map(|s| s.to_string()).collect();
        assert_eq!(parse_args(&args).map(|p| p.outage), Ok(5));
        assert!(parse_args(&["--outage".to_string(), "0".to_string()]).is_err());
        assert!(parse_args(&["--bogus".to_string()]).is_err());
    }
}
