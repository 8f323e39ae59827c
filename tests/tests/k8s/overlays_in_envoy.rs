//! The overlays' filters in a real Envoy shaped like an Istio sidecar: they load and serve, the prod
//! overrides apply with the metric labels of docs/metrics.md, and a broken config is refused with
//! the field named.

use super::*;

use super::rendered_filter::{filter_config, sidecar_filter};
use super::sidecar::{cluster, trip, Sidecar};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_filters_load_into_a_sidecar() {
    for dir in ["staging", "staging-envoyfilter"] {
        let overlay = Overlay::find(dir);
        let filter = sidecar_filter(&kustomize(&overlay.path()), Side::Caller, overlay.loader);
        let sidecar = Sidecar::start(&format!("k8s-{dir}"), &filter).await;
        sidecar.serves_one_call().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_envoy_filter_loads_and_answers_health() {
    let overlay = Overlay::find("dev-envoyfilter");
    let filter = sidecar_filter(&kustomize(&overlay.path()), Side::Caller, overlay.loader);
    let sidecar = Sidecar::start("k8s-dev-envoyfilter", &filter).await;
    sidecar.serves_one_call().await;
    // The dev overlay turns the health endpoint on.
    let health = sidecar.envoy.get("/health/circuit-breakers").await.unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    let body = health.json().unwrap();
    assert_eq!(body["status"], "healthy", "{body}");
    assert!(
        body["circuit_breakers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["upstream"] == cluster(ServiceKind::User)),
        "{body}"
    );
}

/// In the prod sidecar (both wasm ways of loading it): auth-service opens after 3 failures, the
/// default after 5, media-service after 5 and for 60s, and the metrics carry exactly the labels of
/// docs/metrics.md under Istio's stats settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prod_overrides_and_metric_labels_in_a_sidecar() {
    for dir in ["prod", "prod-envoyfilter"] {
        let overlay = Overlay::find(dir);
        let filter = sidecar_filter(&kustomize(&overlay.path()), Side::Caller, overlay.loader);
        let sidecar = Sidecar::start(&format!("k8s-{dir}"), &filter).await;
        prod_overrides_and_metric_labels(&sidecar, dir).await;
    }
}

/// The prod overlay's behaviour in `sidecar`, loaded by `dir`: auth-service opens after 3 failures,
/// the default after 5, media-service after 5 and for 60s; the metrics carry exactly the names and
/// labels of docs/metrics.md.
pub(super) async fn prod_overrides_and_metric_labels(sidecar: &Sidecar, dir: &str) {
    {
        sidecar.serves_one_call().await;
        let envoy = &sidecar.envoy;

        for (service, threshold) in [
            (&sidecar.auth, 3),
            (&sidecar.user, 5),
            (&sidecar.content, 5),
        ] {
            service.set_fault(Fault::Unavailable).await.unwrap();
            let (rejection, reached) = trip(envoy, service, 10).await;
            assert_eq!(
                reached,
                threshold,
                "{dir}: calls that reached {} before its breaker opened",
                cluster(service.kind())
            );
            assert!(
                rejection.message().contains(&format!(
                    "circuit breaker open for {}",
                    cluster(service.kind())
                )),
                "{rejection:?}"
            );
            if service.kind() == ServiceKind::Content {
                // media-service waits 60s before probing, not the default 30s. The hint counts down
                // from 60000 ms; it is read right after opening, so it is far above 30000.
                let pushback: u64 = rejection
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no grpc-retry-pushback-ms: {rejection:?}"));
                assert!(
                    (30_001..=60_000).contains(&pushback),
                    "{dir}: media-service open_timeout is 60s, pushback {pushback} ms"
                );
            }
        }

        // Istio's stats tags (extraStatTags) give exactly the documented labels, and nothing else:
        // `value` matches only a sample with exactly these labels.
        let metrics = envoy.metrics().await.unwrap();
        let dump = metrics.dump("circuit_breaker");
        let auth = cluster(ServiceKind::Auth);
        let expect = [
            ("circuit_breaker_state", vec![("upstream", auth)], 1.0),
            (
                "circuit_breaker_calls_total",
                vec![("upstream", auth), ("result", "failure")],
                3.0,
            ),
            (
                "circuit_breaker_rejected_calls_total",
                vec![("upstream", auth)],
                1.0,
            ),
            (
                "circuit_breaker_state_changes_total",
                vec![
                    ("upstream", auth),
                    ("from_state", "closed"),
                    ("to_state", "open"),
                ],
                1.0,
            ),
            (
                "circuit_breaker_open_total",
                vec![("upstream", auth), ("reason", "consecutive_failures")],
                1.0,
            ),
        ];
        for (name, labels, value) in expect {
            assert_eq!(
                metrics.value(name, &labels),
                Some(value),
                "{dir}: {name}{labels:?} in the sidecar's /stats/prometheus:\n{dump}"
            );
        }
        for sample in metrics
            .samples
            .iter()
            // Envoy's own stats about the VM (envoy_wasm_istio_system_circuit_breaker_...) aside.
            .filter(|s| s.name.contains("circuit_breaker") && !s.name.starts_with("envoy_"))
        {
            assert!(
                sample.name.starts_with("circuit_breaker_")
                    && sample
                        .name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_')
                    && !sample.name.ends_with('_'),
                "{dir}: a label left in the metric name: {}",
                sample.name
            );
            let allowed = ["upstream", "result", "from_state", "to_state", "reason"];
            assert!(
                sample.labels.keys().all(|k| allowed.contains(&k.as_str())),
                "{dir}: unexpected labels on {} {:?}",
                sample.name,
                sample.labels
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_overlay_config_is_refused_with_the_field_named() {
    let mut config = filter_config(
        &kustomize("overlays/prod"),
        Side::Caller,
        Loader::WasmPlugin,
    );
    // A typo in an override, as someone editing the prod overlay might make.
    rename(
        &mut config["upstreams"]["outbound|*||auth-service.*"],
        "failure_threshold",
        "failure_treshold",
    );

    let log = Envoy::start_expecting_failure("k8s-broken", &config.to_string())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let line = log
        .lines()
        .find(|l| l.contains("circuit breaker configuration rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
    assert!(
        line.contains("outbound|*||auth-service.*") && line.contains("failure_treshold"),
        "the rejection names the misspelt field: {line}"
    );

    // With the typo fixed, a duration the filter cannot read.
    rename(
        &mut config["upstreams"]["outbound|*||auth-service.*"],
        "failure_treshold",
        "failure_threshold",
    );
    config["upstreams"]["*media-service*"]["open_timeout"] = json!("a minute");
    let log = Envoy::start_expecting_failure("k8s-broken", &config.to_string())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let line = log
        .lines()
        .find(|l| l.contains("circuit breaker configuration rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
    assert!(
        line.contains("upstreams.\"*media-service*\".open_timeout") && line.contains("a minute"),
        "the rejection names the field and the value: {line}"
    );
}

fn rename(object: &mut Value, from: &str, to: &str) {
    let object = object.as_object_mut().expect("an object");
    let value = object.remove(from).unwrap_or_else(|| panic!("no {from}"));
    object.insert(to.to_string(), value);
}
