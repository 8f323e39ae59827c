//! One run of the demo: the gateway's load through an Envoy, the outage, the live timeline; and what
//! it measured. [`drive`] runs it on whatever [`Stage`] a scenario set up; [`one_run`] sets up
//! today's (the services behind one Envoy).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cb_core::breaker::StateKind;

use super::load::{CallRecord, Gateway, ARRIVAL_EVERY};
use super::report::{header_line, second_line};
use super::{display_path, output_dir, Phases, TEMPLATE};
use crate::envoy::{http_request, Build, Envoy, Launch, Metrics, RunFiles};
use crate::services::{Fault, GrpcService, ServiceKind, Upstreams};

/// Bound on one read of a health endpoint: the filter answers it at once.
const HEALTH_READ: Duration = Duration::from_millis(300);
/// How often the admin interface is read for the breaker opening: the time to open is measured to
/// within this (plus one admin request, about a millisecond on loopback).
const OPEN_POLL: Duration = Duration::from_millis(20);

/// What one run measured.
#[derive(Debug, Default, Clone)]
pub(super) struct RunReport {
    /// Every request, in the order they ended.
    pub(super) calls: Vec<CallRecord>,
    /// Per second, the state of each breaker the timeline shows, by column ([`Column::name`]), as
    /// the health endpoints told it.
    pub(super) states: Vec<(u64, HashMap<String, StateKind>)>,
    /// Requests the service (or replica) that hung received during the outage.
    pub(super) reached_dead_service: u64,
    /// When the hang began (ms since the start of the run).
    pub(super) hang_ms: u64,
    /// When content-service answered again (ms since the start of the run).
    pub(super) back_ms: u64,
    /// When the watched breaker ([`Stage::watched`]) first opened during the outage (ms since the
    /// start of the run), as its `circuit_breaker_open_total` told it; `None` if it never did.
    pub(super) opened_ms: Option<u64>,
    /// The column of [`RunReport::states`] that shows the watched breaker.
    pub(super) watched_column: String,
    /// When the arrivals stopped (ms since the start of the run).
    pub(super) end_ms: u64,
    /// The furthest behind schedule a request arrived (ms): a stall of the harness itself.
    pub(super) max_lag_ms: f64,
}

/// A breaker of some Envoy, and where the timeline shows it: its state is read once a second from
/// that Envoy's health endpoint.
pub(super) struct Column<'a> {
    /// The timeline's column heading, and the key of [`RunReport::states`].
    pub(super) name: String,
    /// The Envoy whose health endpoint tells the state.
    pub(super) envoy: &'a Envoy,
    /// The breaker's key there.
    pub(super) key: String,
}

/// A breaker whose first opening is timed: the admin interface of its Envoy, its key, and the
/// timeline's column that shows it.
pub(super) struct Watched {
    pub(super) admin: SocketAddr,
    pub(super) key: String,
    pub(super) column: String,
}

/// What one run drives: the Envoy the gateway calls, what hangs, which breaker's opening is timed,
/// and which breakers the timeline shows.
pub(super) struct Stage<'a> {
    /// Names the run in the lines it prints.
    pub(super) label: &'a str,
    /// The gateway's Envoy: its listener takes every call.
    pub(super) front: &'a Envoy,
    /// The service, or the one replica, that hangs during the outage.
    pub(super) hangs: &'a GrpcService,
    /// What the timeline calls it: `content-service`.
    pub(super) hangs_name: &'a str,
    /// The breaker whose first opening during the outage is timed ([`RunReport::opened_ms`]).
    pub(super) watched: Watched,
    /// The timeline's breaker columns.
    pub(super) columns: Vec<Column<'a>>,
}

/// One run of today's scenario: the services, one Envoy from `build`'s bootstrap with `config` in
/// front of them, the gateway's load, the outage of content-service. `name` names Envoy's files in
/// `target/demo/`.
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
        .log_args(&DEMO_LOG_ARGS)
        .start()
        .await
        .map_err(|e| format!("demo: {e}"))?;
    let columns = ServiceKind::ALL
        .iter()
        .map(|kind| Column {
            name: kind.cluster().to_string(),
            envoy: &envoy,
            key: kind.cluster().to_string(),
        })
        .collect();
    let stage = Stage {
        label,
        front: &envoy,
        hangs: &upstreams.content,
        hangs_name: "content-service",
        watched: Watched {
            admin: envoy.admin(),
            key: ServiceKind::Content.cluster().to_string(),
            column: ServiceKind::Content.cluster().to_string(),
        },
        columns,
    };
    drive(&stage, phases).await
}

/// The demo's Envoy logging: the filter logs its state changes at info; the access log, where a
/// bootstrap has one, is flushed often.
pub(super) const DEMO_LOG_ARGS: [&str; 4] =
    ["--log-level", "info", "--file-flush-interval-msec", "100"];

/// Runs the gateway's load through `stage.front` for the whole of `phases`, hangs `stage.hangs` for
/// the outage, prints a line a second, and returns what it measured.
pub(super) async fn drive(stage: &Stage<'_>, phases: Phases) -> Result<RunReport, String> {
    let channel = stage
        .front
        .channel()
        .await
        .map_err(|e| format!("demo: {e}"))?;
    println!(
        "== {}: the gateway calls Envoy on {} (log: {})",
        stage.label,
        stage.front.listener(),
        display_path(stage.front.log_path())
    );
    let names: Vec<&str> = stage.columns.iter().map(|c| c.name.as_str()).collect();
    println!("{}", header_line(&names));

    let start = Instant::now();
    let gateway = Gateway::new(channel, tokio::time::Instant::from_std(start));
    // The arrivals end at the run's planned end, whatever the timeline's reads of Envoy cost; the
    // count bound holds should the clock misbehave.
    let load_ms = phases.total() * 1000;
    let until = tokio::time::Instant::from_std(start + Duration::from_millis(load_ms));
    let per_second = Duration::from_secs(1).as_millis() / ARRIVAL_EVERY.as_millis().max(1);
    let max_requests = (phases.total() + 1) * u64::try_from(per_second).unwrap_or(1000);
    let arrivals = tokio::spawn(gateway.clone().arrivals(until, max_requests));

    let mut report = RunReport {
        watched_column: stage.watched.column.clone(),
        ..RunReport::default()
    };
    let mut opening = None;
    let mut reached_before = 0;
    let Watched {
        admin: watched_admin,
        key: watched_key,
        ..
    } = &stage.watched;
    for second in 1..=phases.total() {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            start + Duration::from_secs(second),
        ))
        .await;
        if second == phases.healthy {
            let opened_before = opened_total(*watched_admin, watched_key).await;
            reached_before = stage.hangs.requests();
            stage
                .hangs
                .set_fault(Fault::Hang)
                .await
                .map_err(|e| format!("demo: {e}"))?;
            report.hang_ms = ms_since(start);
            let until = start + Duration::from_secs(phases.healthy + phases.outage);
            opening = Some(tokio::spawn(watch_opening(
                *watched_admin,
                watched_key.clone(),
                opened_before,
                until,
            )));
            println!(
                "-- t={second}s: {} hangs: it takes calls and never answers",
                stage.hangs_name
            );
        }
        if second == phases.healthy + phases.outage {
            report.reached_dead_service = stage.hangs.requests().saturating_sub(reached_before);
            stage
                .hangs
                .set_fault(Fault::Ok)
                .await
                .map_err(|e| format!("demo: {e}"))?;
            report.back_ms = ms_since(start);
            println!("-- t={second}s: {} is back", stage.hangs_name);
        }
        let states = breaker_states(&stage.columns).await;
        let snapshot: Vec<CallRecord> = gateway.calls();
        println!(
            "{}",
            second_line(second, &snapshot, gateway.in_flight(), &states, &names)
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

/// `circuit_breaker_open_total{upstream=key}` summed over its reasons; 0 when Envoy has no such
/// counter yet (or the filter is disabled, or the admin interface did not answer). A name with a
/// prefix Envoy kept (`envoy_dynamicmodulescustom_...` when a bootstrap does not strip it) counts too.
pub(super) async fn opened_total(admin: SocketAddr, key: &str) -> f64 {
    // `filter` keeps Envoy from rendering every stat it has, fifty times a second.
    let path = "/stats/prometheus?filter=circuit_breaker_open_total";
    let Ok(response) = http_request(admin, "GET", path, &[]).await else {
        return 0.0;
    };
    if response.status != 200 {
        return 0.0;
    }
    Metrics::parse(&response.body)
        .samples
        .iter()
        .filter(|s| s.name.ends_with("circuit_breaker_open_total"))
        .filter(|s| s.labels.get("upstream").map(String::as_str) == Some(key))
        .map(|s| s.value)
        .sum()
}

/// Polls until the breaker `key` has opened once more than `before`, or until `until`. Returns when
/// it was first seen open.
async fn watch_opening(
    admin: SocketAddr,
    key: String,
    before: f64,
    until: Instant,
) -> Option<Instant> {
    while Instant::now() < until {
        if opened_total(admin, &key).await > before {
            return Some(Instant::now());
        }
        tokio::time::sleep(OPEN_POLL).await;
    }
    None
}

/// Each column's breaker state, from its Envoy's health endpoint (read once per Envoy); a column
/// whose Envoy has no health endpoint (its filter disabled) or does not list its key is left out.
async fn breaker_states(columns: &[Column<'_>]) -> HashMap<String, StateKind> {
    let mut read: Vec<(SocketAddr, HashMap<String, StateKind>)> = Vec::new();
    let mut states = HashMap::new();
    for column in columns {
        let at = column.envoy.listener();
        let index = match read.iter().position(|(addr, _)| *addr == at) {
            Some(i) => i,
            None => {
                read.push((at, health_states(column.envoy).await));
                read.len() - 1
            }
        };
        if let Some(state) = read.get(index).and_then(|(_, s)| s.get(&column.key)) {
            states.insert(column.name.clone(), *state);
        }
    }
    states
}

/// Breaker states by key from `envoy`'s health endpoint (empty when the filter is disabled, or when
/// no answer came within [`HEALTH_READ`]: without a health endpoint the request goes upstream, to a
/// service that may be hanging, and the timeline must not wait for it).
async fn health_states(envoy: &Envoy) -> HashMap<String, StateKind> {
    let read = tokio::time::timeout(HEALTH_READ, envoy.get("/health/circuit-breakers")).await;
    let Ok(Ok(response)) = read else {
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
