//! An Envoy shaped like an Istio sidecar (`k8s/testdata/istio-sidecar.yaml`), with the demo services
//! behind Istio-style cluster names, and the calls the tests make through it.

use super::*;

use harness::envoy::UpstreamPorts;
use harness::services::{GrpcService, HttpServer, Upstreams};

/// `outbound|<port>||<host>` cluster names of `k8s/testdata/istio-sidecar.yaml`.
pub(super) fn cluster(kind: ServiceKind) -> &'static str {
    match kind {
        ServiceKind::User => "outbound|8081||user-service.social.svc.cluster.local",
        ServiceKind::Content => "outbound|8082||media-service.social.svc.cluster.local",
        ServiceKind::Feed => "outbound|8084||feed-service.social.svc.cluster.local",
        ServiceKind::Auth => "outbound|8083||auth-service.social.svc.cluster.local",
    }
}

/// The Istio stats settings of `k8s/istio/istiod-values.yaml`: `extraStatTags` and
/// `proxyStatsMatcher.inclusionPrefixes`.
pub(super) fn istio_stats_settings(default_config: &Value) -> (Vec<String>, Vec<String>) {
    let strings = |pointer: &str| -> Vec<String> {
        default_config
            .pointer(pointer)
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("defaultConfig has no {pointer}"))
            .iter()
            .map(|v| v.as_str().expect("a string").to_string())
            .collect()
    };
    (
        strings("/extraStatTags"),
        strings("/proxyStatsMatcher/inclusionPrefixes"),
    )
}

/// What Istio writes into a sidecar's bootstrap from its ProxyConfig, for the parts the tests use.
#[derive(Debug, Clone, Default)]
pub(super) struct ProxySettings {
    /// `extraStatTags`
    tags: Vec<String>,
    /// `proxyStatsMatcher.inclusionPrefixes`
    pub(super) prefixes: Vec<String>,
    /// `runtimeValues`
    runtime: BTreeMap<String, String>,
    /// The runtime layers of a `sidecar.istio.io/bootstrapOverride` ConfigMap's custom bootstrap,
    /// which Istio merges into the generated one (a proto merge: appended after Istio's own layers).
    override_layers: Vec<Value>,
}

impl ProxySettings {
    /// The mesh-wide settings of `k8s/istio/istiod-values.yaml`.
    pub(super) fn mesh() -> Self {
        let values = yaml_file("istio/istiod-values.yaml");
        let (tags, prefixes) = istio_stats_settings(&values["meshConfig"]["defaultConfig"]);
        Self {
            tags,
            prefixes,
            runtime: BTreeMap::new(),
            override_layers: Vec::new(),
        }
    }

    /// These settings with a workload's ProxyConfig (its `proxy.istio.io/config` annotation) over
    /// them. Kept: the mesh's inclusion prefixes too, so only the workload's own can make a
    /// difference to what the test sees.
    pub(super) fn with_workload(mut self, proxy_config: &Value) -> Self {
        let strings = |pointer: &str| -> Vec<String> {
            proxy_config
                .pointer(pointer)
                .and_then(Value::as_array)
                .map(|v| {
                    v.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        self.tags.extend(strings("/extraStatTags"));
        self.prefixes
            .extend(strings("/proxyStatsMatcher/inclusionPrefixes"));
        if let Some(values) = proxy_config["runtimeValues"].as_object() {
            for (key, value) in values {
                let value = value.as_str().expect("runtimeValues are strings");
                self.runtime.insert(key.clone(), value.to_string());
            }
        }
        self
    }

    /// These settings with a custom bootstrap (the JSON of a bootstrapOverride ConfigMap) merged in.
    pub(super) fn with_bootstrap_override(mut self, custom_bootstrap: &Value) -> Self {
        if let Some(layers) = custom_bootstrap["layered_runtime"]["layers"].as_array() {
            self.override_layers.extend(layers.iter().cloned());
        }
        self
    }
}

/// The inbound cluster of `k8s/testdata/istio-sidecar.yaml`, as Istio names it for a pod serving
/// port 8080: the destination's side's breaker key.
pub(super) const INBOUND_CLUSTER: &str = "inbound|8080||";

/// The places in Istio's inbound HTTP chain where a filter can go, in chain order
/// (pilot/pkg/networking/core/listener_builder.go): WasmPlugins of `match: [{mode: SERVER}]` by
/// their `phase`, and an EnvoyFilter's `INSERT_BEFORE envoy.filters.http.router`. Each is a marker
/// line of `k8s/testdata/istio-sidecar.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InboundPlace {
    /// `phase: AUTHN`: before Istio's authentication.
    AuthnPhase,
    /// `phase: AUTHZ`: after authentication, before RBAC.
    AuthzPhase,
    /// `phase: STATS`: after RBAC.
    StatsPhase,
    /// `phase: UNSPECIFIED_PHASE` (or none): after RBAC and the STATS-phase plugins.
    UnspecifiedPhase,
    /// `INSERT_BEFORE envoy.filters.http.router`: after every other filter.
    BeforeRouter,
}

impl InboundPlace {
    const ALL: [Self; 5] = [
        Self::AuthnPhase,
        Self::AuthzPhase,
        Self::StatsPhase,
        Self::UnspecifiedPhase,
        Self::BeforeRouter,
    ];

    fn marker(self) -> &'static str {
        match self {
            Self::AuthnPhase => "@@INBOUND_AUTHN@@",
            Self::AuthzPhase => "@@INBOUND_AUTHZ@@",
            Self::StatsPhase => "@@INBOUND_STATS@@",
            Self::UnspecifiedPhase => "@@INBOUND_UNSPECIFIED@@",
            Self::BeforeRouter => "@@INBOUND_BEFORE_ROUTER@@",
        }
    }

    /// Where Istio puts a `mode: SERVER` WasmPlugin, by its `phase`.
    pub(super) fn of_wasm_plugin(plugin: &Value) -> Self {
        let spec = &plugin["spec"];
        assert_eq!(spec["match"], json!([{"mode": "SERVER"}]), "{plugin}");
        match spec["phase"].as_str() {
            Some("AUTHN") => Self::AuthnPhase,
            Some("AUTHZ") => Self::AuthzPhase,
            Some("STATS") => Self::StatsPhase,
            None | Some("UNSPECIFIED_PHASE") => Self::UnspecifiedPhase,
            Some(other) => panic!("no WasmPlugin phase {other}"),
        }
    }

    /// Where an EnvoyFilter's patch goes: the test knows `INSERT_BEFORE` the router only.
    pub(super) fn of_envoy_filter(envoy_filter: &Value) -> Self {
        let patch = &envoy_filter["spec"]["configPatches"][0];
        assert_eq!(
            patch["match"]["context"], "SIDECAR_INBOUND",
            "{envoy_filter}"
        );
        assert_eq!(
            patch["patch"]["operation"], "INSERT_BEFORE",
            "{envoy_filter}"
        );
        assert_eq!(
            patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
            "envoy.filters.http.router",
            "{envoy_filter}"
        );
        Self::BeforeRouter
    }
}

/// A filter for the sidecar's inbound chain, and its place there.
#[derive(Debug, Clone)]
pub(super) struct InboundFilter {
    pub(super) place: InboundPlace,
    pub(super) filter: Value,
}

/// `k8s/testdata/istio-sidecar.yaml` with `settings`, `filter` in the outbound chain and `inbound`
/// (if any) in the inbound chain filled in, written where Envoy's runner can read it.
fn sidecar_bootstrap(
    name: &str,
    filter: &Value,
    inbound: Option<&InboundFilter>,
    settings: &ProxySettings,
) -> tempfile::NamedTempFile {
    let template = fs::read_to_string(k8s("testdata/istio-sidecar.yaml")).unwrap();
    // What Istio's bootstrap template makes of each extraStatTags entry.
    let tag_rules: Vec<String> = settings
        .tags
        .iter()
        .map(|t| format!("  - {{ tag_name: {t}, regex: '({t}=\\.=(.*?);\\.;)' }}"))
        .collect();
    let prefix_rules: Vec<String> = settings
        .prefixes
        .iter()
        .map(|p| format!("      - prefix: {}", json!(p)))
        .collect();
    let runtime: Vec<String> = settings
        .runtime
        .iter()
        .map(|(k, v)| format!("      {}: {}", json!(k), json!(v)))
        .collect();
    let mut rendered = template
        .replace("@@EXTRA_STATS_TAGS@@", &tag_rules.join("\n"))
        .replace("@@INCLUSION_PREFIXES@@", &prefix_rules.join("\n"))
        .replace("@@RUNTIME_VALUES@@", &runtime.join("\n"))
        .replace(
            "@@OVERRIDE_LAYERS@@",
            &settings
                .override_layers
                .iter()
                .map(|l| format!("  - {l}"))
                .collect::<Vec<_>>()
                .join("\n"),
        )
        // JSON is YAML: the filter goes in as one flow mapping.
        .replace("@@HTTP_FILTER@@", &filter.to_string());
    for place in InboundPlace::ALL {
        let line = match inbound {
            Some(f) if f.place == place => format!("          - {}", f.filter),
            _ => String::new(),
        };
        rendered = rendered.replace(place.marker(), &line);
    }
    temp_config(name, &rendered)
}

/// `config` in a temporary file named after `name`.
pub(super) fn temp_config(name: &str, config: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix(&format!("k8s-{name}-"))
        .suffix(".yaml")
        .tempfile()
        .unwrap();
    std::io::Write::write_all(&mut file, config.as_bytes()).unwrap();
    file
}

/// The demo services behind an Istio-like sidecar (or another proxy shaped bootstrap).
pub(super) struct Sidecar {
    pub(super) user: GrpcService,
    pub(super) content: GrpcService,
    _feed: GrpcService,
    pub(super) auth: GrpcService,
    _web: HttpServer,
    pub(super) envoy: Envoy,
    /// The cluster (so the breaker key) the bootstrap routes UserService to.
    user_upstream: String,
}

impl Sidecar {
    /// An Istio-like sidecar with the mesh's settings and `filter`.
    pub(super) async fn start(name: &str, filter: &Value) -> Self {
        Self::start_istio(name, filter, &ProxySettings::mesh())
            .await
            .unwrap_or_else(|e| panic!("Envoy refused the {name} filter:\n{e}"))
    }

    /// An Istio-like sidecar with `settings` and `filter`; Envoy's refusal, with its log, if it
    /// does not start.
    pub(super) async fn start_istio(
        name: &str,
        filter: &Value,
        settings: &ProxySettings,
    ) -> Result<Self, String> {
        Self::start_both_sides(name, filter, None, settings).await
    }

    /// An Istio-like sidecar with `settings`, `filter` on the caller's side (outbound) and
    /// `inbound` on the destination's side, in front of ContentService; Envoy's refusal, with its
    /// log, if it does not start.
    pub(super) async fn start_both_sides(
        name: &str,
        filter: &Value,
        inbound: Option<&InboundFilter>,
        settings: &ProxySettings,
    ) -> Result<Self, String> {
        let bootstrap = sidecar_bootstrap(name, filter, inbound, settings);
        Self::start_from(name, |_| bootstrap, cluster(ServiceKind::User)).await
    }

    /// A gRPC channel to the inbound listener, as a caller's sidecar would open one to this pod.
    pub(super) async fn inbound_channel(&self) -> tonic::transport::Channel {
        let port = self.envoy.port("virtualInbound").unwrap();
        envoy::channel_to(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), None)
            .await
            .unwrap()
    }

    /// Envoy with the bootstrap `write` gives for the demo services' ports, which routes
    /// UserService to the cluster `user_upstream`.
    pub(super) async fn start_from(
        name: &str,
        write: impl FnOnce(&UpstreamPorts) -> tempfile::NamedTempFile,
        user_upstream: &str,
    ) -> Result<Self, String> {
        let upstreams = Upstreams::start().await.unwrap();
        let ports = upstreams.ports();
        let bootstrap = write(&ports);
        let template = bootstrap.path().to_str().expect("UTF-8 temp path");
        let envoy = Envoy::start_from(name, template, &ports, "{}")
            .await
            .map_err(|e| e.to_string())?;
        let Upstreams {
            user,
            content,
            feed,
            auth,
            web,
        } = upstreams;
        Ok(Self {
            user,
            content,
            _feed: feed,
            auth,
            _web: web,
            envoy,
            user_upstream: user_upstream.to_string(),
        })
    }

    pub(super) async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.envoy.metric(name, labels).await.unwrap()
    }

    /// One successful call through the filter, counted under the cluster's name: the filter is in the
    /// chain and its metrics come out with the names and labels of docs/metrics.md.
    pub(super) async fn serves_one_call(&self) {
        let mut client =
            pb::user_service_client::UserServiceClient::new(channel(&self.envoy).await);
        client
            .get_user(pb::GetUserRequest {
                user_id: "u1".into(),
            })
            .await
            .unwrap_or_else(|s| panic!("a call through the sidecar failed: {s:?}"));
        let upstream = self.user_upstream.as_str();
        let calls = self
            .metric(
                "circuit_breaker_calls_total",
                &[("upstream", upstream), ("result", "success")],
            )
            .await;
        assert_eq!(
            calls,
            1.0,
            "calls_total for {upstream}:\n{}",
            self.envoy.metrics().await.unwrap().dump("circuit_breaker")
        );
    }
}

async fn channel(envoy: &Envoy) -> tonic::transport::Channel {
    envoy.channel().await.unwrap()
}

/// What one gRPC call got: through to the upstream (`Ok` or its error), or rejected by the breaker.
#[derive(Debug)]
pub(super) enum CallResult {
    Passed(Result<(), tonic::Status>),
    Rejected(tonic::Status),
}

fn classify(result: Result<(), tonic::Status>) -> CallResult {
    match result {
        Err(status)
            if status.metadata().get("x-circuit-breaker").is_some()
                && status.code() == tonic::Code::Unavailable =>
        {
            CallResult::Rejected(status)
        }
        other => CallResult::Passed(other),
    }
}

/// One call to the service of `kind` through the sidecar.
pub(super) async fn call(envoy: &Envoy, kind: ServiceKind) -> CallResult {
    let ch = channel(envoy).await;
    let result = match kind {
        ServiceKind::User => pb::user_service_client::UserServiceClient::new(ch)
            .get_user(pb::GetUserRequest {
                user_id: "u1".into(),
            })
            .await
            .map(drop),
        ServiceKind::Content => pb::content_service_client::ContentServiceClient::new(ch)
            .get_post(pb::GetPostRequest {
                post_id: "p1".into(),
            })
            .await
            .map(drop),
        ServiceKind::Feed => pb::feed_service_client::FeedServiceClient::new(ch)
            .get_feed(pb::GetFeedRequest {
                user_id: "u1".into(),
                limit: 3,
            })
            .await
            .map(drop),
        ServiceKind::Auth => pb::auth_service_client::AuthServiceClient::new(ch)
            .check(pb::CheckRequest { token: "t".into() })
            .await
            .map(drop),
    };
    classify(result)
}

/// Calls `service` (failing) until its breaker rejects a call, at most `limit` calls; returns the
/// rejection and how many calls reached the service first.
pub(super) async fn trip(
    envoy: &Envoy,
    service: &GrpcService,
    limit: usize,
) -> (tonic::Status, u64) {
    let before = service.requests();
    for _ in 0..limit {
        match call(envoy, service.kind()).await {
            CallResult::Rejected(status) => return (status, service.requests() - before),
            CallResult::Passed(Ok(())) => {
                panic!("{} answered OK during its outage", service.kind())
            }
            CallResult::Passed(Err(_)) => {}
        }
    }
    panic!(
        "the breaker for {} did not open within {limit} failing calls; log:\n{}",
        service.kind(),
        envoy.log()
    );
}
