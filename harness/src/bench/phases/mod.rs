//! The measurements: what each phase starts (Envoys, upstreams) and runs. The numbers follow the
//! report's sections.
//!
//! Both builds of the filter are measured side by side: each phase that runs the filter in Envoy
//! starts one Envoy per build from its bootstrap (`envoy/<name>.yaml` and its native twin
//! `envoy/<name>-native.yaml`, identical but for the filter), pinned to the same core, and runs the
//! variants of both in the same interleaved rounds. Each build is compared with the floor listener of
//! its own Envoy, measured in the same round; the two floors' ratio shows how far the two Envoys agree
//! when they do the same thing.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::load::{loads, measure, LoadSpec, Loads, Run, Variant};
use super::stats::stat;
use super::{port, prometheus, shorten, start, Ctx, Envoy, Options, Result};
use crate::envoy::{channel_to, Build, Launch};
use crate::services::pb::content_service_client::ContentServiceClient;
use crate::services::pb::GetPostRequest;
use crate::services::{Fault, GrpcService, ServiceKind};

mod contention;
mod hostcalls;
mod lds;
mod memory;

pub(super) use contention::{contention_phase, Contention};
pub(super) use hostcalls::{hostcalls_phase, probe_wasm, HostCalls, PROBES};
pub(super) use lds::{
    lds_phase, Lds, LDS_LISTENERS, LDS_VARIANTS, OLD_TICK_MS, STUCK_CALL_DURATION,
};
pub(super) use memory::{memory_phase, tenant, Memory, MANY_KEYS};

/// The builds side by side; a phase's proxies are started in this order, so proxy `i` runs
/// `BUILDS[i]`.
pub(super) const BUILDS: [Build; 2] = [Build::Wasm, Build::Native];

/// The name of `listener` of `build`'s Envoy among a phase's results: `wasm/ingress`.
pub(super) fn vname(build: Build, listener: &str) -> String {
    format!("{}/{listener}", build.name())
}

/// Each listener in each build's Envoy, listener by listener: the two builds' runs of a listener sit
/// next to each other in a round.
pub(super) fn side_by_side(listeners: &[&str]) -> Vec<Variant> {
    listeners
        .iter()
        .flat_map(|l| {
            BUILDS
                .iter()
                .enumerate()
                .map(move |(i, b)| Variant::new(vname(*b, l), i, l))
        })
        .collect()
}

/// One Envoy per build from `template` (its native twin for the native build), each configured by
/// `launch`, named `<name>-<build>`; their command lines go in the report as `proxy Envoy (<what>,
/// <build>)`.
pub(super) async fn start_builds(
    ctx: &mut Ctx,
    name: &str,
    template: &str,
    what: &str,
    launch: impl Fn(Launch) -> Launch,
) -> Result<Vec<Envoy>> {
    let mut proxies = Vec::new();
    for build in BUILDS {
        let proxy = start(launch(ctx.launch(
            &format!("{name}-{}", build.name()),
            &build.template(template),
        )))
        .await?;
        ctx.commands.insert(
            format!("proxy Envoy ({what}, {})", build.name()),
            shorten(proxy.command()),
        );
        proxies.push(proxy);
    }
    Ok(proxies)
}

/// Route timeout of the `hanging` listener: what a caller without a breaker waits for (a protobuf
/// Duration, which takes seconds only).
pub(super) const HANG_TIMEOUT: &str = "0.25s";

// ---- phase 1: closed -----------------------------------------------------------------------------

pub(super) const CLOSED_LISTENERS: [&str; 3] = ["baseline", "filter_disabled", "ingress"];

/// Runs by [`vname`].
pub(super) struct Closed {
    pub(super) throughput: BTreeMap<String, Vec<Run>>,
    pub(super) latency: BTreeMap<String, Vec<Run>>,
    pub(super) unloaded: BTreeMap<String, Vec<Run>>,
    pub(super) rate: f64,
    pub(super) filter_config: String,
}

pub(super) async fn closed_phase(
    ctx: &mut Ctx,
    opts: &Options,
    upstream_port: u16,
) -> Result<Closed> {
    let filter_config = "{}".to_string();
    let cpus = ctx.proxy_cpus.clone();
    let proxies = start_builds(ctx, "bench-closed", "envoy/bench.yaml", "closed", |l| {
        l.ports(super::content_at(upstream_port))
            .filter_config(&filter_config)
            .cpus(cpus.as_deref())
    })
    .await?;
    let proxies: Vec<&Envoy> = proxies.iter().collect();
    let Loads {
        throughput,
        latency,
        unloaded,
        rate,
    } = loads(
        ctx,
        &proxies,
        &side_by_side(&CLOSED_LISTENERS),
        opts,
        "closed",
    )
    .await?;
    Ok(Closed {
        throughput,
        latency,
        unloaded,
        rate,
        filter_config,
    })
}

// ---- phase 2: open -------------------------------------------------------------------------------

pub(super) const OPEN_LISTENERS: [&str; 2] = ["floor", "rejected"];

/// The filter of the open phase: one failure opens the breaker, for longer than the phase lasts, so
/// every measured call meets a breaker Open as an outage leaves it, with the reply an outage gives
/// (`retry-after` or `grpc-retry-pushback-ms`), not `forced_open`'s.
pub(super) const OPEN_FILTER_CONFIG: &str = r#"{"failure_threshold": 1, "open_timeout": "1h"}"#;

/// What one build's Envoy counted in the open phase.
pub(super) struct OpenCounts {
    pub(super) build: Build,
    /// Requests that reached the guarded cluster while the breaker was Open (must be 0).
    pub(super) guarded_upstream_rq: u64,
    /// Requests that reached it before: the call that opened the breaker.
    pub(super) tripping_rq: u64,
    /// `circuit_breaker_rejected_calls_total`.
    pub(super) rejected_total: u64,
}

/// Runs by [`vname`], but `hanging` (the wasm Envoy's, which no filter touches).
pub(super) struct Open {
    pub(super) throughput: BTreeMap<String, Vec<Run>>,
    pub(super) latency: BTreeMap<String, Vec<Run>>,
    pub(super) unloaded: BTreeMap<String, Vec<Run>>,
    pub(super) hanging: Run,
    pub(super) hanging_requests: u64,
    pub(super) rate: f64,
    pub(super) counts: Vec<OpenCounts>,
    /// Requests the hanging upstream saw from the `hanging` listener.
    pub(super) hang_upstream_rq: u64,
    pub(super) sanity: Vec<String>,
    pub(super) filter_config: String,
}

pub(super) async fn open_phase(ctx: &mut Ctx, opts: &Options) -> Result<Open> {
    let hang = GrpcService::start(ServiceKind::Content)
        .await
        .map_err(|e| format!("cannot start the hanging upstream: {e}"))?;
    hang.set_fault(Fault::Hang)
        .await
        .map_err(|e| format!("cannot make the upstream hang: {e}"))?;
    let filter_config = OPEN_FILTER_CONFIG.to_string();
    let cpus = ctx.proxy_cpus.clone();
    let proxies = start_builds(ctx, "bench-open", "envoy/bench-open.yaml", "open", |l| {
        l.var("HANG_PORT", hang.port().to_string())
            .var("HANG_TIMEOUT", HANG_TIMEOUT)
            .filter_config(&filter_config)
            .cpus(cpus.as_deref())
    })
    .await?;
    let (Some(wasm), Some(native)) = (proxies.first(), proxies.get(1)) else {
        return Err("the open phase needs both builds' Envoys".into());
    };

    // One call through each build's filter to the hanging upstream opens its breaker.
    let mut sanity = Vec::new();
    let mut tripped = Vec::new();
    for (build, proxy) in BUILDS.into_iter().zip(&proxies) {
        let answer = grpc_probe(port(proxy, "rejected")?).await;
        let opened = prometheus(proxy)
            .await?
            .sum("circuit_breaker_open_total", &[]);
        if opened < 1.0 {
            return Err(format!(
                "the {} breaker did not open after one failing call ({answer})",
                build.name()
            ));
        }
        sanity.push(format!(
            "the call that opened the breaker ({}): {answer}",
            build.name()
        ));
        tripped.push(stat(proxy, "cluster.guarded.upstream_rq_total").await?);
    }
    // What a client sees from each listener, checked once with a real gRPC client.
    for (proxy, listener, what) in [
        (wasm, "rejected", "`rejected` (wasm)"),
        (native, "rejected", "`rejected` (native)"),
        (wasm, "floor", "`floor`"),
        (wasm, "hanging", "`hanging`"),
    ] {
        let port = port(proxy, listener)?;
        sanity.push(format!("{what}: {}", grpc_probe(port).await));
    }

    let refs: Vec<&Envoy> = proxies.iter().collect();
    let Loads {
        throughput,
        latency,
        unloaded,
        rate,
    } = loads(ctx, &refs, &side_by_side(&OPEN_LISTENERS), opts, "open").await?;

    // No breaker in front of the hung upstream: 100 calls in flight, each held until the route
    // timeout; a fixed count, so the run ends after a few timeouts.
    let hanging_requests = 400;
    let hanging_spec = LoadSpec {
        clients: 4,
        streams: 25,
        secs: 0.0,
        warmup: 0.0,
        rps_per_client: None,
        requests: Some(hanging_requests),
        latencies: true,
        headers: Vec::new(),
    };
    let hanging = measure(ctx, wasm, "hanging", &hanging_spec).await?;
    eprintln!(
        "bench: hanging upstream: {:.0} req/s, p50 {:?} µs",
        hanging.rps, hanging.p50_us
    );
    let mut counts = Vec::new();
    for ((build, proxy), tripping_rq) in BUILDS.into_iter().zip(&proxies).zip(tripped) {
        let guarded = stat(proxy, "cluster.guarded.upstream_rq_total").await?;
        counts.push(OpenCounts {
            build,
            guarded_upstream_rq: guarded.saturating_sub(tripping_rq),
            tripping_rq,
            rejected_total: prometheus(proxy)
                .await?
                .sum("circuit_breaker_rejected_calls_total", &[])
                as u64,
        });
    }
    let hang_upstream_rq = stat(wasm, "cluster.hang.upstream_rq_total").await?;
    Ok(Open {
        throughput,
        latency,
        unloaded,
        hanging,
        hanging_requests,
        rate,
        counts,
        hang_upstream_rq,
        sanity,
        filter_config,
    })
}

/// One `GetPost` through `port`: the gRPC status and the `x-circuit-breaker` header.
pub(super) async fn grpc_probe(port: u16) -> String {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let channel = match channel_to(addr, None).await {
        Ok(c) => c,
        Err(e) => return format!("cannot connect: {e}"),
    };
    let mut client = ContentServiceClient::new(channel);
    let started = Instant::now();
    let call = client.get_post(GetPostRequest {
        post_id: "bench".into(),
    });
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Err(_) => "no answer in 10 s".into(),
        Ok(Ok(_)) => format!("OK in {:.1} ms", started.elapsed().as_secs_f64() * 1e3),
        Ok(Err(status)) => format!(
            "grpc-status {} ({:?}), x-circuit-breaker: {}, in {:.1} ms",
            status.code() as i32,
            status.code(),
            status
                .metadata()
                .get("x-circuit-breaker")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            started.elapsed().as_secs_f64() * 1e3
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_listener_runs_in_each_builds_envoy_side_by_side() {
        let v = side_by_side(&["baseline", "ingress"]);
        let got: Vec<(&str, usize, &str)> = v
            .iter()
            .map(|v| (v.name.as_str(), v.proxy, v.listener.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("wasm/baseline", 0, "baseline"),
                ("native/baseline", 1, "baseline"),
                ("wasm/ingress", 0, "ingress"),
                ("native/ingress", 1, "ingress"),
            ]
        );
        // Proxy i is started for BUILDS[i]: the names must follow the same order.
        assert_eq!(BUILDS.map(|b| b.name()), ["wasm", "native"]);
    }
}
