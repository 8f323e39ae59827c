//! The native build (`dist/libcircuit_breaker.so`) in a real Envoy, loaded from `envoy/e2e-native.yaml`:
//! Envoy accepts the module's ABI, a gRPC call goes through the filter to the demo service, the metrics
//! appear under the contract's names (no `envoy_` or namespace prefix), and a bad configuration is
//! refused in the wasm build's words. The breaker's behaviour itself is the shared e2e suite's.
//!
//! Run with `make test-e2e`, or `ENVOY=/path/to/envoy cargo test -p circuit-breaker-e2e --test
//! native_smoke` after `make build`.

use std::time::Duration;

use cb_core::config::FilterConfig;
use cb_core::telemetry::Metric;
use e2e::pb::content_service_client::ContentServiceClient;
use e2e::{native_path, Envoy, Upstreams};
use serde_json::json;

const TEMPLATE: &str = "envoy/e2e-native.yaml";

/// Bound on one call through Envoy, so a broken module fails the test instead of hanging it.
const CALL_BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_loads_serves_grpc_and_shows_its_metrics_by_their_contract_names() {
    native_path().unwrap();
    let upstreams = Upstreams::start().await.unwrap();
    let config = json!({"failure_threshold": 5}).to_string();
    let envoy = Envoy::start_from("native_smoke", TEMPLATE, &upstreams.ports(), &config)
        .await
        .unwrap();
    let log = envoy.log();
    assert!(
        log.contains("Dynamic module ABI version v0.2.0 matched."),
        "Envoy did not match the module's ABI version; log:\n{log}"
    );
    assert!(
        log.contains("circuit breaker configured: upstream_key=cluster mode=enforce"),
        "{log}"
    );

    let mut client = ContentServiceClient::new(envoy.channel().await.unwrap());
    let request = e2e::pb::GetPostRequest {
        post_id: "1".into(),
    };
    let post = tokio::time::timeout(CALL_BOUND, client.get_post(request))
        .await
        .expect("GetPost through Envoy timed out")
        .expect("GetPost through the native filter failed")
        .into_inner();
    assert_eq!(post.post_id, "1");
    assert_eq!(
        upstreams.content.requests(),
        1,
        "the call reached the service"
    );

    let metrics = envoy.metrics().await.unwrap();
    // Metrics without labels exist from `config_new` on; the others once the filter first counts one.
    for metric in Metric::ALL.iter().filter(|m| m.labels().is_empty()) {
        assert_eq!(
            metrics.value(metric.name(), &[]),
            Some(0.0),
            "{} is not exported under its contract name:\n{}",
            metric.name(),
            metrics.dump("circuit_breaker")
        );
    }
    let prefixed: Vec<_> = metrics
        .samples
        .iter()
        .filter(|s| {
            s.name.contains("dynamicmodulescustom") || s.name.starts_with("envoy_circuit_breaker")
        })
        .map(|s| s.name.as_str())
        .collect();
    assert!(prefixed.is_empty(), "metrics still prefixed: {prefixed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_is_refused_in_the_wasm_builds_words() {
    native_path().unwrap();
    let upstreams = Upstreams::start().await.unwrap();
    let bad = r#"{"failure_threshold": -1}"#;
    let refused = Envoy::start_from("native_bad_config", TEMPLATE, &upstreams.ports(), bad).await;
    let Err(e) = refused else {
        panic!("Envoy accepted {bad}");
    };
    let e = e.to_string();
    assert!(e.contains("Envoy exited during start-up"), "{e}");
    // The wasm build logs exactly this (filter/wasm/src/root.rs).
    let expected = format!(
        "circuit breaker configuration rejected: {}",
        FilterConfig::from_json(bad.as_bytes()).unwrap_err()
    );
    assert!(e.contains(&expected), "no line {expected:?} in:\n{e}");
    assert!(
        e.contains("Failed to initialize dynamic module"),
        "Envoy did not refuse the filter config:\n{e}"
    );
}
