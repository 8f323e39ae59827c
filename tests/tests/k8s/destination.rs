//! The destination's side (`k8s/components/inbound*`, docs/placement.md): set up as documented, and in
//! the sidecar's inbound chain it keeps apart from the caller's side, sits after RBAC, and guards the
//! pod when its workload hangs.

use super::*;

use super::rendered_filter::{
    envoy_filter_http_filter, filter_config, inbound_sidecar_filter, istio_filter_from_wasm_plugin,
    sidecar_filter,
};
use super::sidecar::{
    call, CallResult, InboundFilter, InboundPlace, ProxySettings, Sidecar, INBOUND_CLUSTER,
};

/// The destination's side in its three forms: a WasmPlugin with `match: [{mode: SERVER}]` in
/// `UNSPECIFIED_PHASE` (after RBAC), and SIDECAR_INBOUND EnvoyFilters before the router for both
/// builds, each the caller's side's filter but for its name and configuration; the same
/// configuration in all three, with `stuck_call_duration`, `cut_stuck_calls` and a table of its own.
#[test]
fn destination_side_is_set_up_as_documented() {
    let docs = kustomize("overlays/prod-inbound");
    let plugin = &named(&docs, "WasmPlugin", Side::Destination.object_name())["spec"];
    let caller = &named(&docs, "WasmPlugin", Side::Caller.object_name())["spec"];
    assert_eq!(plugin["match"], json!([{"mode": "SERVER"}]));
    assert_eq!(caller["match"], json!([{"mode": "CLIENT"}]));
    assert_eq!(plugin["phase"], "UNSPECIFIED_PHASE");
    assert_eq!(plugin["failStrategy"], "FAIL_OPEN");
    for field in ["url", "sha256", "imagePullPolicy"] {
        assert_eq!(
            plugin[field], caller[field],
            "{field}: one image for both sides"
        );
    }
    let config = filter_config(&docs, Side::Destination, Loader::WasmPlugin);

    for (dir, loader) in [
        ("overlays/prod-inbound-envoyfilter", Loader::EnvoyFilter),
        ("overlays/prod-inbound-native", Loader::Native),
    ] {
        let docs = kustomize(dir);
        assert_eq!(
            filter_config(&docs, Side::Destination, loader),
            config,
            "{dir}: the destination's side's configuration differs from \
             k8s/components/inbound/wasmplugin.yaml's"
        );
        let inbound = loading_object(&docs, Side::Destination, loader);
        let outbound = loading_object(&docs, Side::Caller, loader);
        assert_eq!(
            InboundPlace::of_envoy_filter(inbound),
            InboundPlace::BeforeRouter
        );
        assert_eq!(
            inbound["spec"]["workloadSelector"], outbound["spec"]["workloadSelector"],
            "{dir}: both sides reach the same sidecars"
        );
        // The caller's side's filter, but for the name and the configuration: the same module, VM
        // and failure policy.
        let without_config = |object: &Value| {
            let mut filter = envoy_filter_http_filter(object).clone();
            let typed = filter["typed_config"].as_object_mut().unwrap();
            match loader {
                Loader::EnvoyFilter => {
                    let config = typed["config"].as_object_mut().unwrap();
                    config.remove("configuration");
                    config.remove("name");
                }
                _ => {
                    typed.remove("filter_config");
                }
            }
            filter
        };
        assert_eq!(without_config(inbound), without_config(outbound), "{dir}");
    }

    assert_eq!(config["upstream_key"], "cluster");
    assert!(config["stuck_call_duration"].is_string(), "{config}");
    assert_eq!(config["cut_stuck_calls"], true);
    // Its own table in both builds: another max_upstreams than the caller's side (default 1024).
    let caller_max = filter_config(&docs, Side::Caller, Loader::WasmPlugin)["max_upstreams"]
        .as_u64()
        .unwrap_or(1024);
    assert!(
        config["max_upstreams"]
            .as_u64()
            .is_some_and(|m| m != caller_max),
        "{config}"
    );
}

/// docs/placement.md recommends what k8s/ renders: its first JSON block is the caller's side of
/// `k8s/base`, its second the destination's side of `k8s/components/inbound`.
#[test]
fn placement_doc_recommends_what_k8s_renders() {
    let text = fs::read_to_string(root().join("docs/placement.md")).unwrap();
    let blocks: Vec<Value> = text
        .split("```json\n")
        .skip(1)
        .map(|rest| {
            let block = rest.split("```").next().unwrap();
            serde_json::from_str(block)
                .unwrap_or_else(|e| panic!("docs/placement.md: a JSON block is not JSON ({e})"))
        })
        .collect();
    assert_eq!(blocks.len(), 2, "docs/placement.md: two JSON blocks");
    assert_eq!(
        blocks[0],
        filter_config(&kustomize("base"), Side::Caller, Loader::WasmPlugin),
        "docs/placement.md's caller-side configuration and k8s/base's differ"
    );
    assert_eq!(
        blocks[1],
        filter_config(
            &kustomize("overlays/prod-inbound"),
            Side::Destination,
            Loader::WasmPlugin
        ),
        "docs/placement.md's destination-side configuration and k8s/components/inbound's differ"
    );
}

/// The prod-inbound overlays' wasm forms in an Istio-like sidecar, both sides at once: the WasmPlugins
/// as Istio builds and places them, the EnvoyFilters verbatim. The calls a hung workload held are
/// cut when its breaker opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_side_guards_the_pod_in_a_sidecar() {
    for dir in ["prod-inbound", "prod-inbound-envoyfilter"] {
        let overlay = Overlay::find(dir);
        let docs = kustomize(&overlay.path());
        let outbound = sidecar_filter(&docs, Side::Caller, overlay.loader);
        let inbound = inbound_sidecar_filter(&docs, overlay.loader);
        let config = filter_config(&docs, Side::Destination, overlay.loader);
        let sidecar = Sidecar::start_both_sides(
            &format!("k8s-{dir}"),
            &outbound,
            Some(&inbound),
            &ProxySettings::mesh(),
        )
        .await
        .unwrap_or_else(|e| panic!("Envoy refused the {dir} filters:\n{e}"));
        let held = destination_side_guards_the_pod(&sidecar, dir, &config).await;
        held_calls_were_cut(&sidecar, dir, held).await;
    }
}

/// Why `phase: UNSPECIFIED_PHASE`: the same WasmPlugin in the AUTHZ phase, before RBAC, takes a call
/// an AuthorizationPolicy denies for the workload's success. As shipped, after RBAC, it never sees
/// one (`destination_side_guards_the_pod`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_rbac_the_destination_side_would_count_denied_calls() {
    let docs = kustomize("overlays/prod-inbound");
    let mut plugin = named(&docs, "WasmPlugin", Side::Destination.object_name()).clone();
    plugin["spec"]["phase"] = json!("AUTHZ");
    let inbound = InboundFilter {
        place: InboundPlace::of_wasm_plugin(&plugin),
        filter: istio_filter_from_wasm_plugin(
            &plugin,
            &envoy::wasm_path().unwrap_or_else(|e| panic!("{e}")),
        ),
    };
    assert_eq!(inbound.place, InboundPlace::AuthzPhase);
    let outbound = sidecar_filter(&docs, Side::Caller, Loader::WasmPlugin);
    let sidecar = Sidecar::start_both_sides(
        "k8s-inbound-authz",
        &outbound,
        Some(&inbound),
        &ProxySettings::mesh(),
    )
    .await
    .unwrap_or_else(|e| panic!("Envoy refused the AUTHZ-phase filter:\n{e}"));
    let denied = get_post(
        sidecar.inbound_channel().await,
        Some("blocked"),
        CALL_DEADLINE,
    )
    .await;
    assert_eq!(
        denied.map_err(|s| s.code()),
        Err(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        sidecar
            .metric(
                "circuit_breaker_calls_total",
                &[("upstream", INBOUND_CLUSTER), ("result", "success")]
            )
            .await,
        1.0,
        "before RBAC, the denied call counts as a success of the workload"
    );
}

/// The configuration rule on the destination side's configuration: `cut_stuck_calls` without
/// `stuck_call_duration` is refused, and the refusal names both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_config_without_stuck_call_duration_is_refused() {
    let mut config = filter_config(
        &kustomize("overlays/prod-inbound"),
        Side::Destination,
        Loader::WasmPlugin,
    );
    config
        .as_object_mut()
        .unwrap()
        .remove("stuck_call_duration")
        .expect("stuck_call_duration");
    let log = Envoy::start_expecting_failure("k8s-inbound-broken", &config.to_string())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let line = log
        .lines()
        .find(|l| l.contains("circuit breaker configuration rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
    assert!(
        line.contains("cut_stuck_calls") && line.contains("stuck_call_duration"),
        "the rejection names both fields: {line}"
    );
}

/// The deadline of the test's calls to the pod: far beyond `stuck_call_duration`.
const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// `ContentService/GetPost` on `channel` with a deadline (the `grpc-timeout` header) and, if given,
/// an `x-tenant` header (the inbound RBAC policy denies `blocked`).
async fn get_post(
    channel: tonic::transport::Channel,
    tenant: Option<&'static str>,
    deadline: Duration,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(pb::GetPostRequest {
        post_id: "p1".into(),
    });
    request.set_timeout(deadline);
    if let Some(tenant) = tenant {
        request
            .metadata_mut()
            .insert("x-tenant", tenant.parse().unwrap());
    }
    pb::content_service_client::ContentServiceClient::new(channel)
        .get_post(request)
        .await
        .map(drop)
}

/// A duration of the filter's configuration (`"2s"`, `"250ms"`).
fn config_duration(value: &Value) -> Duration {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a duration: {value}"));
    let (number, unit) = match text.strip_suffix("ms") {
        Some(ms) => (ms, 0.001),
        None => (text.strip_suffix('s').expect("a duration in s or ms"), 1.0),
    };
    Duration::from_secs_f64(number.parse::<f64>().unwrap() * unit)
}

/// What the destination's side does in `sidecar` (loaded by `form`, with `config`), in front of the
/// pod's workload (ContentService):
/// - a call to the pod is counted under the inbound cluster, and a call the pod makes under its
///   outbound cluster: the two sides keep apart in one sidecar;
/// - a call RBAC denies never reaches the breaker, which sits after RBAC;
/// - when the workload hangs, `failure_threshold` stuck calls open the breaker
///   `stuck_call_duration` after they came; then a new call gets UNAVAILABLE at once, and a call
///   RBAC denies still gets PERMISSION_DENIED (which a caller does not retry).
pub(super) async fn destination_side_guards_the_pod(
    sidecar: &Sidecar,
    form: &str,
    config: &Value,
) -> HeldCalls {
    let inbound = [("upstream", INBOUND_CLUSTER)];
    let counted = |result: &'static str| [("upstream", INBOUND_CLUSTER), ("result", result)];
    sidecar.serves_one_call().await;
    let channel = sidecar.inbound_channel().await;
    get_post(channel.clone(), None, CALL_DEADLINE)
        .await
        .unwrap_or_else(|s| panic!("{form}: a call to the pod failed: {s:?}"));
    assert_eq!(
        sidecar
            .metric("circuit_breaker_calls_total", &counted("success"))
            .await,
        1.0,
        "{form}: the call to the pod, under {INBOUND_CLUSTER}:\n{}",
        sidecar
            .envoy
            .metrics()
            .await
            .unwrap()
            .dump("circuit_breaker")
    );

    let denied = get_post(channel.clone(), Some("blocked"), CALL_DEADLINE).await;
    assert_eq!(
        denied.map_err(|s| s.code()),
        Err(tonic::Code::PermissionDenied),
        "{form}: RBAC denies x-tenant: blocked"
    );
    assert_eq!(
        sidecar
            .metric("circuit_breaker_calls_total", &counted("success"))
            .await,
        1.0,
        "{form}: a call RBAC denied reached the breaker"
    );

    // The workload hangs: the calls it holds get no response headers.
    let threshold = config["failure_threshold"]
        .as_u64()
        .expect("failure_threshold");
    let stuck_after = config_duration(&config["stuck_call_duration"]);
    sidecar.content.set_fault(Fault::Hang).await.unwrap();
    let hung_at = Instant::now();
    let held: Vec<_> = (0..threshold)
        .map(|_| tokio::spawn(get_post(channel.clone(), None, CALL_DEADLINE)))
        .collect();
    let opened_after = loop {
        if sidecar.metric("circuit_breaker_state", &inbound).await == 1.0 {
            break hung_at.elapsed();
        }
        assert!(
            hung_at.elapsed() < stuck_after + Duration::from_secs(15),
            "{form}: {threshold} stuck calls did not open {INBOUND_CLUSTER}:\n{}",
            sidecar
                .envoy
                .metrics()
                .await
                .unwrap()
                .dump("circuit_breaker")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        opened_after >= stuck_after,
        "{form}: opened {opened_after:?} after the hang, before any call was stuck"
    );
    let metrics = sidecar.envoy.metrics().await.unwrap();
    let dump = metrics.dump("circuit_breaker");
    for (name, labels, value) in [
        (
            "circuit_breaker_stuck_calls_total",
            inbound.to_vec(),
            threshold,
        ),
        (
            "circuit_breaker_calls_total",
            counted("failure").to_vec(),
            threshold,
        ),
        (
            "circuit_breaker_open_total",
            vec![
                ("upstream", INBOUND_CLUSTER),
                ("reason", "consecutive_failures"),
            ],
            1,
        ),
    ] {
        assert_eq!(
            metrics.value(name, &labels),
            Some(value as f64),
            "{form}: {name}{labels:?}:\n{dump}"
        );
    }

    // Open: a new call is answered at once, by the pod's own sidecar.
    let asked = Instant::now();
    let rejected = get_post(channel.clone(), None, CALL_DEADLINE)
        .await
        .expect_err("a call to an open breaker");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{form}: the rejection took {:?}",
        asked.elapsed()
    );
    assert_eq!(rejected.code(), tonic::Code::Unavailable, "{rejected:?}");
    assert_eq!(
        rejected
            .metadata()
            .get("x-circuit-breaker")
            .and_then(|v| v.to_str().ok()),
        Some("open"),
        "{rejected:?}"
    );
    assert!(
        rejected
            .message()
            .contains(&format!("circuit breaker open for {INBOUND_CLUSTER}")),
        "{rejected:?}"
    );
    // RBAC still answers first: a denied caller is told so, not asked to retry elsewhere.
    let denied = get_post(channel.clone(), Some("blocked"), CALL_DEADLINE).await;
    assert_eq!(
        denied.map_err(|s| s.code()),
        Err(tonic::Code::PermissionDenied),
        "{form}: a denied call while open"
    );
    // The pod's own calls keep their breaker: the caller's side is not the destination's.
    assert!(
        matches!(
            call(&sidecar.envoy, ServiceKind::User).await,
            CallResult::Passed(Ok(()))
        ),
        "{form}: the pod's outbound breaker opened with its inbound one"
    );
    HeldCalls {
        calls: held,
        hung_at,
        stuck_after,
        threshold,
    }
}

/// The calls a hung workload held when its breaker opened (`destination_side_guards_the_pod`).
pub(super) struct HeldCalls {
    calls: Vec<tokio::task::JoinHandle<Result<(), tonic::Status>>>,
    hung_at: Instant,
    stuck_after: Duration,
    threshold: u64,
}

impl Drop for HeldCalls {
    fn drop(&mut self) {
        for call in &self.calls {
            call.abort();
        }
    }
}

/// `cut_stuck_calls`: the calls the workload held were cut when the breaker opened. Each caller has
/// its answer, marked `cut` (the call reached the workload), at about `stuck_call_duration` rather
/// than at its deadline, and each is counted once in `circuit_breaker_cut_calls_total`.
async fn held_calls_were_cut(sidecar: &Sidecar, form: &str, mut held: HeldCalls) {
    let HeldCalls {
        hung_at,
        stuck_after,
        threshold,
        ..
    } = held;
    let inbound = [("upstream", INBOUND_CLUSTER)];
    for call in std::mem::take(&mut held.calls) {
        let answer = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .unwrap_or_else(|_| panic!("{form}: a held call was not cut when the breaker opened"))
            .unwrap();
        let status = answer.expect_err("a call the hung workload held");
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "{form}: {status:?}"
        );
        assert_eq!(
            status
                .metadata()
                .get("x-circuit-breaker")
                .and_then(|v| v.to_str().ok()),
            Some("cut"),
            "{form}: {status:?}"
        );
    }
    assert!(
        hung_at.elapsed() < stuck_after + Duration::from_secs(5),
        "{form}: the held calls waited {:?}",
        hung_at.elapsed()
    );
    assert_eq!(
        sidecar
            .metric("circuit_breaker_cut_calls_total", &inbound)
            .await,
        threshold as f64,
        "{form}: every held call cut, and counted once:\n{}",
        sidecar
            .envoy
            .metrics()
            .await
            .unwrap()
            .dump("circuit_breaker")
    );
}
