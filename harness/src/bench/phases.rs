//! The measurements: what each phase starts (Envoys, upstreams) and runs. The numbers follow the
//! report's sections.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cb_core::breaker::Breaker;
use cb_core::codec;
use cb_core::config::BreakerConfig;

use super::load::{
    loads, measure, rounds, rounds_of, saturating, warm_up, LoadSpec, Loads, Run, Variant,
};
use super::machine::rss_kib;
use super::stats::{differences, stat, Spread};
use super::{content_at, path_str, port, prometheus, shorten, start, Ctx, Options, Result};
use crate::envoy::{channel_to, workspace_root};
use crate::services::pb::content_service_client::ContentServiceClient;
use crate::services::pb::GetPostRequest;
use crate::services::{Fault, GrpcService, ServiceKind};

/// Route timeout of the `hanging` listener: what a caller without a breaker waits for (a protobuf
/// Duration, which takes seconds only).
pub(super) const HANG_TIMEOUT: &str = "0.25s";
/// Distinct upstream keys of the memory measurement.
pub(super) const MANY_KEYS: usize = 1000;

// ---- phase 1: closed -----------------------------------------------------------------------------

pub(super) const CLOSED_LISTENERS: [&str; 3] = ["baseline", "filter_disabled", "ingress"];

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
    let proxy = start(
        ctx.launch("bench-closed", "envoy/bench.yaml")
            .ports(content_at(upstream_port))
            .filter_config(&filter_config)
            .cpus(ctx.proxy_cpus.as_deref()),
    )
    .await?;
    ctx.commands
        .insert("proxy Envoy (closed)".into(), shorten(proxy.command()));
    let Loads {
        throughput,
        latency,
        unloaded,
        rate,
    } = loads(ctx, &proxy, &CLOSED_LISTENERS, opts, "closed").await?;
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

pub(super) struct Open {
    pub(super) throughput: BTreeMap<String, Vec<Run>>,
    pub(super) latency: BTreeMap<String, Vec<Run>>,
    pub(super) unloaded: BTreeMap<String, Vec<Run>>,
    pub(super) hanging: Run,
    pub(super) hanging_requests: u64,
    pub(super) rate: f64,
    /// Requests that reached the guarded cluster (must be 0).
    pub(super) guarded_upstream_rq: u64,
    /// Requests the hanging upstream saw from the `hanging` listener.
    pub(super) hang_upstream_rq: u64,
    pub(super) rejected_total: u64,
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
    let filter_config = r#"{"mode": "forced_open"}"#.to_string();
    let proxy = start(
        ctx.launch("bench-open", "envoy/bench-open.yaml")
            .var("HANG_PORT", hang.port().to_string())
            .var("HANG_TIMEOUT", HANG_TIMEOUT)
            .filter_config(&filter_config)
            .cpus(ctx.proxy_cpus.as_deref()),
    )
    .await?;
    ctx.commands
        .insert("proxy Envoy (open)".into(), shorten(proxy.command()));

    // What a client sees from each listener, checked once with a real gRPC client.
    let mut sanity = Vec::new();
    for listener in ["rejected", "floor", "hanging"] {
        let port = port(&proxy, listener)?;
        sanity.push(format!("`{listener}`: {}", grpc_probe(port).await));
    }

    let Loads {
        throughput,
        latency,
        unloaded,
        rate,
    } = loads(ctx, &proxy, &OPEN_LISTENERS, opts, "open").await?;

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
    let hanging = measure(ctx, &proxy, "hanging", &hanging_spec).await?;
    eprintln!(
        "bench: hanging upstream: {:.0} req/s, p50 {:?} µs",
        hanging.rps, hanging.p50_us
    );
    let guarded_upstream_rq = stat(&proxy, "cluster.guarded.upstream_rq_total").await?;
    let hang_upstream_rq = stat(&proxy, "cluster.hang.upstream_rq_total").await?;
    let rejected_total = prometheus(&proxy)
        .await?
        .sum("circuit_breaker_rejected_calls_total", &[]) as u64;
    Ok(Open {
        throughput,
        latency,
        unloaded,
        hanging,
        hanging_requests,
        rate,
        guarded_upstream_rq,
        hang_upstream_rq,
        rejected_total,
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

// ---- phase 6: host calls ------------------------------------------------------------------------

/// Calls of each kind per probe request: enough that their cost stands well clear of the noise of a
/// shared machine (a few µs per request).
pub(super) const PROBE_TIMES: u32 = 20;

/// The probe's calls, and how many of each the filter makes for one gRPC call through a Closed breaker
/// (trailers-only response): (`x-probe`, what it is, calls per filtered request (fewest, most), hands
/// data back).
pub(super) const PROBES: [(&str, &str, (f64, f64), bool); 8] = [
    (
        "property_cluster",
        "`get_property(xds.cluster_name)`: the upstream key",
        (1.0, 1.0),
        true,
    ),
    (
        "property_flags",
        "`get_property(response.flags)` (not read when the status is already a failure)",
        (1.0, 1.0),
        true,
    ),
    (
        "request_header",
        "`get_header_map_value`: `content-type`; `:status` and `grpc-status` of the response",
        (3.0, 3.0),
        true,
    ),
    (
        "shared_get",
        "`get_shared_data` (64 bytes): the admit's read, and the record's unless it can start from the latest read",
        (1.0, 2.0),
        true,
    ),
    ("shared_set", "`set_shared_data` (64 bytes)", (1.0, 1.0), false),
    ("clock", "`get_current_time`", (2.0, 2.0), false),
    ("metric", "`increment_metric`", (1.0, 1.0), false),
    (
        "core",
        "no host call: the core's admit + record in the VM (decode, decide, encode, on an in-VM store)",
        (1.0, 1.0),
        false,
    ),
];

/// The probe kinds that make up the shared-data work of a call.
pub(super) const SHARED_DATA_PROBES: [&str; 3] = ["shared_get", "shared_set", "core"];

pub(super) struct HostCalls {
    pub(super) runs: BTreeMap<String, Vec<Run>>,
    pub(super) times: u32,
}

/// Where `make bench` builds the probe: `CB_PROBE_WASM`, else target/fixtures/.
pub(super) fn probe_wasm() -> Option<PathBuf> {
    let path = std::env::var_os("CB_PROBE_WASM")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || workspace_root().join("target/fixtures/wasm32-wasip1/release/hostcall_probe.wasm"),
            PathBuf::from,
        );
    path.is_file().then_some(path)
}

pub(super) async fn hostcalls_phase(
    ctx: &mut Ctx,
    opts: &Options,
    upstream_port: u16,
    probe: &Path,
) -> Result<HostCalls> {
    let proxy = start(
        ctx.launch("bench-hostcalls", "envoy/bench-hostcalls.yaml")
            .ports(content_at(upstream_port))
            .var("PROBE_WASM", path_str(probe)?)
            .var("PROBE_TIMES", PROBE_TIMES.to_string())
            .cpus(ctx.proxy_cpus.as_deref()),
    )
    .await?;
    let mut variants = vec![Variant {
        name: "none".into(),
        listener: "probe".into(),
        headers: vec!["x-probe: none".into()],
    }];
    variants.extend(PROBES.iter().map(|(probe, ..)| Variant {
        name: probe.to_string(),
        listener: "probe".into(),
        headers: vec![format!("x-probe: {probe}")],
    }));
    variants.push(Variant {
        name: "baseline".into(),
        listener: "baseline".into(),
        headers: Vec::new(),
    });
    warm_up(ctx, &proxy, &["probe", "baseline"]).await?;
    // The cost sought is a difference of CPU per request, so the runs need not be long, only many.
    let secs = (opts.secs * 0.7).max(1.5);
    let runs = rounds_of(
        ctx,
        &proxy,
        &variants,
        &saturating(secs, 4),
        opts.rounds.div_ceil(2).max(2),
        "host calls",
    )
    .await?;
    Ok(HostCalls {
        runs,
        times: PROBE_TIMES,
    })
}

// ---- phase 4: contention -------------------------------------------------------------------------

pub(super) const CONTENTION_LISTENERS: [&str; 2] = ["baseline", "ingress"];

pub(super) struct Contention {
    pub(super) workers: u32,
    pub(super) throughput: BTreeMap<String, Vec<Run>>,
    pub(super) calls: u64,
    pub(super) cas_retries: u64,
    pub(super) give_ups: u64,
}

pub(super) async fn contention_phase(
    ctx: &mut Ctx,
    opts: &Options,
    upstream_port: u16,
) -> Result<Vec<Contention>> {
    let mut out = Vec::new();
    for workers in [1u32, 2, 4] {
        // Not pinned: the workers get every core there is (shared with the load generator).
        let proxy = start(
            ctx.launch(&format!("bench-contention-{workers}"), "envoy/bench.yaml")
                .ports(content_at(upstream_port))
                .filter_config("{}")
                .concurrency(workers),
        )
        .await?;
        warm_up(ctx, &proxy, &CONTENTION_LISTENERS).await?;
        let before = prometheus(&proxy).await?;
        // Eight connections, spread over the workers by the listeners' exact balance.
        let throughput = rounds(
            ctx,
            &proxy,
            &CONTENTION_LISTENERS,
            &saturating(opts.secs, 8),
            opts.rounds.div_ceil(2).max(2),
            &format!("contention {workers} workers"),
        )
        .await?;
        let after = prometheus(&proxy).await?;
        let delta = |name: &str| (after.sum(name, &[]) - before.sum(name, &[])).max(0.0) as u64;
        out.push(Contention {
            workers,
            throughput,
            calls: delta("circuit_breaker_calls_total"),
            cas_retries: delta("circuit_breaker_cas_retries_total"),
            give_ups: delta("circuit_breaker_cas_give_ups_total"),
        });
    }
    Ok(out)
}

// ---- phase 5: memory -----------------------------------------------------------------------------

pub(super) struct Memory {
    pub(super) wasm_bytes: u64,
    pub(super) state_bytes: usize,
    pub(super) state_key_bytes: usize,
    pub(super) index_bytes_1: usize,
    pub(super) index_bytes_many: usize,
    pub(super) rss_idle_kib: Option<u64>,
    pub(super) rss_one_kib: Option<u64>,
    pub(super) rss_many_kib: Option<u64>,
    pub(super) tracked_keys: usize,
    pub(super) untracked: u64,
    pub(super) workers: u32,
}

pub(super) fn tenant(i: usize) -> String {
    format!("tenant-{i:04}")
}

pub(super) async fn memory_phase(ctx: &mut Ctx, upstream_port: u16) -> Result<Memory> {
    let wasm_bytes = fs::metadata(&ctx.wasm).map(|m| m.len()).unwrap_or(0);
    // Shared-data bytes, from the slot encoding the filter uses: one key per slot of the table,
    // created empty when a worker is configured, holding key and breaker once an upstream takes it.
    let slot = cb_core::store::Slot {
        key: tenant(0),
        last_call_ms: 0,
        shaped_ms: 0,
        breaker: Breaker::new(&BreakerConfig::default()),
    };
    let state_bytes = codec::encode_slot(Some(&slot)).len();
    let capacity = (MANY_KEYS * 2) as u32;
    let state_key_bytes =
        cb_core::store::SharedData::new(cb_core::store::MemoryStore::new(), capacity)
            .slot_key(capacity - 1)
            .len();
    let index_bytes_1 = codec::encode_slot(None).len();
    let index_bytes_many = (index_bytes_1 + state_key_bytes) * capacity as usize;
    let keys: Vec<String> = (0..MANY_KEYS).map(tenant).collect();

    let workers = 2;
    let config = format!(
        r#"{{"upstream_key": "header:x-tenant", "max_upstreams": {}}}"#,
        MANY_KEYS * 2
    );
    let proxy = start(
        ctx.launch("bench-memory", "envoy/bench.yaml")
            .ports(content_at(upstream_port))
            .filter_config(&config)
            .concurrency(workers),
    )
    .await?;
    let settle = Duration::from_millis(1500);
    tokio::time::sleep(settle).await;
    let rss_idle_kib = rss_kib(proxy.pid());
    // One channel per worker (the listener balances connections exactly), so both workers meet every
    // key, as they would under real traffic.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port(&proxy, "ingress")?));
    let mut clients = Vec::new();
    for _ in 0..workers {
        clients.push(ContentServiceClient::new(
            channel_to(addr, None).await.map_err(|e| e.to_string())?,
        ));
    }
    // The same number of calls both times, so the difference is the keys, not the traffic.
    let calls_per_client = MANY_KEYS;
    for client in clients.iter_mut() {
        for _ in 0..calls_per_client {
            tenant_call(client, &tenant(0)).await;
        }
    }
    tokio::time::sleep(settle).await;
    let rss_one_kib = rss_kib(proxy.pid());
    for client in clients.iter_mut() {
        for key in &keys {
            tenant_call(client, key).await;
        }
    }
    tokio::time::sleep(settle).await;
    let rss_many_kib = rss_kib(proxy.pid());
    let metrics = prometheus(&proxy).await?;
    let tracked_keys = metrics
        .samples
        .iter()
        .filter(|s| s.name == "circuit_breaker_calls_total")
        .filter_map(|s| s.labels.get("upstream"))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let untracked = metrics.sum("circuit_breaker_untracked_calls_total", &[]) as u64;
    Ok(Memory {
        wasm_bytes,
        state_bytes,
        state_key_bytes,
        index_bytes_1,
        index_bytes_many,
        rss_idle_kib,
        rss_one_kib,
        rss_many_kib,
        tracked_keys,
        untracked,
        workers,
    })
}

/// One call with `x-tenant: key`; the answer does not matter (the upstream's trailers-only OK has no
/// message, which tonic reports as an error), only that the filter saw the key.
pub(super) async fn tenant_call(
    client: &mut ContentServiceClient<tonic::transport::Channel>,
    key: &str,
) {
    let mut request = tonic::Request::new(GetPostRequest {
        post_id: "bench".into(),
    });
    if let Ok(v) = key.parse() {
        request.metadata_mut().insert("x-tenant", v);
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.get_post(request)).await;
}

impl HostCalls {
    /// µs per call of one probe kind, per round: (kind − none) / times.
    pub(super) fn price(&self, kind: &str) -> Option<Spread> {
        let per_request = differences(&self.runs, kind, "none", |r| r.cpu_us)?;
        let t = f64::from(self.times);
        Some(Spread {
            median: per_request.median / t,
            min: per_request.min / t,
            max: per_request.max / t,
        })
    }

    /// The filter's host calls and core work for one call, priced: (fewest, most) calls.
    pub(super) fn estimate(&self, only: Option<&[&str]>) -> (Option<f64>, Option<f64>) {
        let mut low = Some(0.0);
        let mut high = Some(0.0);
        for (kind, _, (fewest, most), _) in PROBES {
            if only.is_some_and(|o| !o.contains(&kind)) {
                continue;
            }
            let price = self.price(kind).map(|p| p.median.max(0.0));
            low = low.zip(price).map(|(sum, p)| sum + p * fewest);
            high = high.zip(price).map(|(sum, p)| sum + p * most);
        }
        (low, high)
    }

    pub(super) fn shared_data_work(&self) -> (Option<f64>, Option<f64>) {
        self.estimate(Some(&SHARED_DATA_PROBES))
    }
}
