//! Phase 5: memory, shared-data bytes per upstream and Envoy's RSS with one and with many upstream
//! keys (the wasm build).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use cb_core::breaker::Breaker;
use cb_core::codec;
use cb_core::config::BreakerConfig;

use super::super::machine::rss_kib;
use super::super::{content_at, port, prometheus, start, Ctx, Result};
use crate::envoy::channel_to;
use crate::services::pb::content_service_client::ContentServiceClient;
use crate::services::pb::GetPostRequest;

/// Distinct upstream keys of the memory measurement.
pub(in crate::bench) const MANY_KEYS: usize = 1000;

pub(in crate::bench) struct Memory {
    pub(in crate::bench) wasm_bytes: u64,
    pub(in crate::bench) native_bytes: u64,
    pub(in crate::bench) state_bytes: usize,
    pub(in crate::bench) state_key_bytes: usize,
    pub(in crate::bench) index_bytes_1: usize,
    pub(in crate::bench) index_bytes_many: usize,
    pub(in crate::bench) rss_idle_kib: Option<u64>,
    pub(in crate::bench) rss_one_kib: Option<u64>,
    pub(in crate::bench) rss_many_kib: Option<u64>,
    pub(in crate::bench) tracked_keys: usize,
    pub(in crate::bench) untracked: u64,
    pub(in crate::bench) workers: u32,
}

pub(in crate::bench) fn tenant(i: usize) -> String {
    format!("tenant-{i:04}")
}

pub(in crate::bench) async fn memory_phase(ctx: &mut Ctx, upstream_port: u16) -> Result<Memory> {
    let wasm_bytes = fs::metadata(&ctx.wasm).map(|m| m.len()).unwrap_or(0);
    let native_bytes = fs::metadata(&ctx.native).map(|m| m.len()).unwrap_or(0);
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
        native_bytes,
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
pub(in crate::bench) async fn tenant_call(
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
