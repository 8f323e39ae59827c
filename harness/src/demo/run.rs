//! One run of the demo: the services, Envoy with the filter, the gateway's load, the outage, the live
//! timeline; and what it measured.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cb_core::breaker::StateKind;

use super::load::{CallRecord, Gateway, ARRIVAL_EVERY};
use super::report::{header_line, second_line};
use super::{display_path, output_dir, Phases, TEMPLATE};
use crate::envoy::{http_request, Build, Envoy, Launch, Metrics, RunFiles};
use crate::services::{Fault, ServiceKind, Upstreams};

/// How often the admin interface is read for the breaker opening: the time to open is measured to
/// within this (plus one admin request, about a millisecond on loopback).
const OPEN_POLL: Duration = Duration::from_millis(20);

/// What one run measured.
#[derive(Debug, Default, Clone)]
pub(super) struct RunReport {
    /// Every request, in the order they ended.
    pub(super) calls: Vec<CallRecord>,
    /// Per second, the state of each breaker as the health endpoint told it.
    pub(super) states: Vec<(u64, HashMap<String, StateKind>)>,
    /// Requests content-service received during the outage.
    pub(super) reached_dead_service: u64,
    /// When the hang began (ms since the start of the run).
    pub(super) hang_ms: u64,
    /// When content-service answered again (ms since the start of the run).
    pub(super) back_ms: u64,
    /// When the content breaker first opened during the outage (ms since the start of the run), as
    /// `circuit_breaker_open_total{upstream="content"}` told it; `None` if it never did.
    pub(super) opened_ms: Option<u64>,
    /// When the arrivals stopped (ms since the start of the run).
    pub(super) end_ms: u64,
    /// The furthest behind schedule a request arrived (ms): a stall of the harness itself.
    pub(super) max_lag_ms: f64,
}

/// One run: services, Envoy from `build`'s bootstrap with `config`, the gateway's load, the outage.
/// `name` names Envoy's files in `target/demo/`.
pub(super) async fn one_run(
    label: &str,
    name: &str,
    config: &str,
    phases: Phases,
    build: Build,
) -> Result<RunReport, String> {
    let upstreams = Upstreams::start()
        .await
        .map_err(|e| format!("demo: cannot start the services: {e}"))?;
    let envoy = Launch::new(name)
        .template(&build.template(TEMPLATE))
        .ports(upstreams.ports())
        .filter_config(config)
        .files(RunFiles::Fixed(output_dir()))
        // The filter logs its state changes at info; the access log is not configured.
        .log_args(&["--log-level", "info", "--file-flush-interval-msec", "100"])
        .start()
        .await
        .map_err(|e| format!("demo: {e}"))?;
    let channel = envoy.channel().await.map_err(|e| format!("demo: {e}"))?;

    println!(
        "== {label}: Envoy on {} (log: {})",
        envoy.listener(),
        display_path(envoy.log_path())
    );
    println!("{}", header_line());

    let start = Instant::now();
    let gateway = Gateway::new(channel, tokio::time::Instant::from_std(start));
    // The arrivals end at the run's planned end, whatever the timeline's reads of Envoy cost; the
    // count bound holds should the clock misbehave.
    let load_ms = phases.total() * 1000;
    let until = tokio::time::Instant::from_std(start + Duration::from_millis(load_ms));
    let per_second = Duration::from_secs(1).as_millis() / ARRIVAL_EVERY.as_millis().max(1);
    let max_requests = (phases.total() + 1) * u64::try_from(per_second).unwrap_or(1000);
    let arrivals = tokio::spawn(gateway.clone().arrivals(until, max_requests));

    let mut report = RunReport::default();
    let mut opening = None;
    let mut reached_before = 0;
    let content = &upstreams.content;
    for second in 1..=phases.total() {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            start + Duration::from_secs(second),
        ))
        .await;
        if second == phases.healthy {
            let opened_before = opened_total(envoy.admin()).await;
            reached_before = content.requests();
            content
                .set_fault(Fault::Hang)
                .await
                .map_err(|e| format!("demo: {e}"))?;
            report.hang_ms = ms_since(start);
            let until = start + Duration::from_secs(phases.healthy + phases.outage);
            opening = Some(tokio::spawn(watch_opening(
                envoy.admin(),
                opened_before,
                until,
            )));
            println!("-- t={second}s: content-service hangs: it takes calls and never answers");
        }
        if second == phases.healthy + phases.outage {
            report.reached_dead_service = content.requests().saturating_sub(reached_before);
            content
                .set_fault(Fault::Ok)
                .await
                .map_err(|e| format!("demo: {e}"))?;
            report.back_ms = ms_since(start);
            println!("-- t={second}s: content-service is back");
        }
        let states = breaker_states(&envoy).await;
        let snapshot: Vec<CallRecord> = gateway.calls();
        println!(
            "{}",
            second_line(second, &snapshot, gateway.in_flight(), &states)
        );
        report.states.push((second * 1000, states));
    }
    report.end_ms = load_ms;
    let _ = tokio::time::timeout_at(until + Duration::from_secs(1), arrivals).await;
    gateway.drain().await;
    report.max_lag_ms = gateway.max_lag_ms();
    if let Some(task) = opening {
        report.opened_ms = task
            .await
            .ok()
            .flatten()
            .map(|at| at.saturating_duration_since(start).as_millis() as u64);
    }
    report.calls = gateway.calls();
    Ok(report)
}

fn ms_since(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// `circuit_breaker_open_total{upstream="content"}` summed over its reasons; 0 when Envoy has no such
/// counter yet (or the filter is disabled, or the admin interface did not answer). A name with a
/// prefix Envoy kept (`envoy_dynamicmodulescustom_...` when a bootstrap does not strip it) counts too.
async fn opened_total(admin: SocketAddr) -> f64 {
    // `filter` keeps Envoy from rendering every stat it has, fifty times a second.
    let path = "/stats/prometheus?filter=circuit_breaker_open_total";
    let Ok(response) = http_request(admin, "GET", path, &[]).await else {
        return 0.0;
    };
    if response.status != 200 {
        return 0.0;
    }
    let content = ServiceKind::Content.cluster();
    Metrics::parse(&response.body)
        .samples
        .iter()
        .filter(|s| s.name.ends_with("circuit_breaker_open_total"))
        .filter(|s| s.labels.get("upstream").map(String::as_str) == Some(content))
        .map(|s| s.value)
        .sum()
}

/// Polls until the content breaker has opened once more than `before`, or until `until`. Returns when
/// it was first seen open.
async fn watch_opening(admin: SocketAddr, before: f64, until: Instant) -> Option<Instant> {
    while Instant::now() < until {
        if opened_total(admin).await > before {
            return Some(Instant::now());
        }
        tokio::time::sleep(OPEN_POLL).await;
    }
    None
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
