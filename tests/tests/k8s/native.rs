//! The native dynamic module's forms: the Istio EnvoyFilter of `k8s/components/native-envoyfilter`
//! (through the `*-native` overlays) and the Envoy Gateway EnvoyProxy and EnvoyExtensionPolicy of
//! `k8s/envoy-gateway`, each loaded into a real Envoy shaped like the proxy it is for.
//!
//! They need the built module, `CB_NATIVE` or `dist/libcircuit_breaker.so`. Without it each test
//! still starts Envoy with its form, checks that Envoy refuses it only because the module is
//! missing (not for the structure of the config), and then fails saying what to build.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use harness::envoy;
use harness::services::{Fault, ServiceKind};
use serde_json::{json, Value};

use super::destination::destination_side_guards_the_pod;
use super::overlays_in_envoy::prod_overrides_and_metric_labels;
use super::rendered_filter::{
    filter_config, inbound_sidecar_filter, sidecar_filter, DYNAMIC_MODULE_FILTER_TYPE,
    STRING_VALUE_TYPE,
};
use super::sidecar::{call, temp_config, trip, CallResult, ProxySettings, Sidecar};
use super::{k8s, kustomize, only_of_kind, root, yaml_documents, yaml_file, Loader, Overlay, Side};

/// The runtime flag that gives the module's metrics the names of docs/metrics.md.
const STRIP_PREFIX_FLAG: &str =
    "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix";
/// Where Envoy files the module's stats (and what it strips from their Prometheus names).
const NATIVE_STATS_PREFIX: &str = "dynamicmodulescustom.";
/// The file Envoy looks for: `lib<dynamic_module_config.name>.so`.
const MODULE_FILE: &str = "libcircuit_breaker.so";
const ROUTE_FILTER_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.FilterConfig";

/// The native module: `CB_NATIVE`, else `dist/libcircuit_breaker.so` (it may not exist).
fn native_module() -> PathBuf {
    std::env::var_os("CB_NATIVE")
        .filter(|p| !p.is_empty())
        .map_or_else(|| root().join("dist").join(MODULE_FILE), PathBuf::from)
}

/// Envoy's refusal of a form for want of the module: the line that says so. Fails if Envoy refused
/// the configuration itself.
fn missing_module_line(error: &str, module: &str) -> String {
    for structural in [
        "INVALID_ARGUMENT",
        "unknown field",
        "Unable to parse",
        "Proto constraint",
    ] {
        assert!(
            !error.contains(structural),
            "Envoy refused the configuration itself ({structural}), not just the missing module:\n{error}"
        );
    }
    error
        .lines()
        .find(|l| l.contains("Failed to load dynamic module") && l.contains(module))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| panic!("Envoy did not start, but not for want of {module}:\n{error}"))
}

fn module_missing(module: &Path, form: &str, line: &str) -> ! {
    panic!(
        "{} does not exist: build the native module (`make build` writes dist/{MODULE_FILE}) or \
         point CB_NATIVE at it. Without it, Envoy refused the {form} only for want of the module \
         (so its structure is accepted): {line}",
        module.display()
    )
}

fn found_elsewhere(module: &Path) -> ! {
    panic!(
        "{} does not exist, yet Envoy loaded a {MODULE_FILE}: from LD_LIBRARY_PATH (cargo points it \
         at target/) or a system library directory. Build dist/{MODULE_FILE} (`make build`) or point \
         CB_NATIVE at the module to test",
        module.display()
    )
}

/// Points this process's ENVOY_DYNAMIC_MODULES_SEARCH_PATH at the module's directory, once: every
/// Envoy started afterwards inherits it. `std::env::set_var` takes the same lock as the environment
/// reads of `std::process::Command`, through which every Envoy and tool of these tests is started;
/// the other Envoys do not look at the variable.
fn use_search_path(module: &Path) {
    assert_eq!(
        module.file_name().and_then(|n| n.to_str()),
        Some(MODULE_FILE),
        "Envoy looks the module up as {MODULE_FILE}; CB_NATIVE names another file"
    );
    let dir = module
        .parent()
        .expect("the module's directory")
        .to_path_buf();
    static SET: OnceLock<PathBuf> = OnceLock::new();
    let set = SET.get_or_init(|| {
        std::env::set_var("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", &dir);
        dir.clone()
    });
    assert_eq!(set, &dir, "one search path per test process");
}

/// The ProxyConfig that `workload-patch.yaml` gives the native sidecars.
/// The custom bootstrap of `bootstrap-override.yaml`, which the workload patch's
/// `sidecar.istio.io/bootstrapOverride` names.
fn native_bootstrap_override() -> Value {
    let map = yaml_file("components/native-envoyfilter/bootstrap-override.yaml");
    assert_eq!(map["metadata"]["name"], "circuit-breaker-native-bootstrap");
    let text = map["data"]["custom_bootstrap.json"]
        .as_str()
        .expect("custom_bootstrap.json");
    serde_json::from_str(text).expect("custom_bootstrap.json is JSON")
}

fn native_workload_proxy_config() -> Value {
    let patch = yaml_file("components/native-envoyfilter/workload-patch.yaml");
    let annotations = &patch["spec"]["template"]["metadata"]["annotations"];
    let text = annotations["proxy.istio.io/config"]
        .as_str()
        .expect("the proxy.istio.io/config annotation");
    yaml_documents(text, "proxy.istio.io/config").remove(0)
}

/// The annotations of `workload-patch.yaml` fit together: the module is mounted where the search
/// path points, the runtime flag is on, and Istio keeps the module's stats.
#[test]
fn native_workload_patch_gives_the_sidecar_what_it_needs() {
    let patch = yaml_file("components/native-envoyfilter/workload-patch.yaml");
    let annotations = &patch["spec"]["template"]["metadata"]["annotations"];
    let json_annotation = |name: &str| -> Vec<Value> {
        let text = annotations[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} annotation"));
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{name} is not a JSON list: {e}"))
    };
    let volumes = json_annotation("sidecar.istio.io/userVolume");
    let mounts = json_annotation("sidecar.istio.io/userVolumeMount");
    assert_eq!(
        (volumes.len(), mounts.len()),
        (1, 1),
        "one volume, one mount"
    );
    assert_eq!(
        mounts[0]["name"], volumes[0]["name"],
        "the mount names the volume"
    );
    assert_eq!(mounts[0]["readOnly"], true);

    let proxy_config = native_workload_proxy_config();
    let search_path = &proxy_config["proxyMetadata"]["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"];
    assert_eq!(
        search_path, &mounts[0]["mountPath"],
        "Envoy must look for {MODULE_FILE} where the volume is mounted"
    );
    // The flag comes from the bootstrap override, as a boolean: from runtimeValues it would be a
    // string, which Envoy does not take for a feature flag.
    assert!(proxy_config["runtimeValues"]
        .get(STRIP_PREFIX_FLAG)
        .is_none());
    assert_eq!(
        annotations["sidecar.istio.io/bootstrapOverride"],
        "circuit-breaker-native-bootstrap"
    );
    let layers = &native_bootstrap_override()["layered_runtime"]["layers"];
    assert_eq!(layers[0]["static_layer"][STRIP_PREFIX_FLAG], true);
    let settings = ProxySettings::default().with_workload(&proxy_config);
    assert!(
        settings
            .prefixes
            .iter()
            .any(|p| format!("{NATIVE_STATS_PREFIX}circuit_breaker_state").starts_with(p.as_str())),
        "Istio would drop the module's stats: {:?}",
        settings.prefixes
    );
    // The EnvoyFilter names the module the volume provides.
    let docs = kustomize("overlays/prod-native");
    let filter = &only_of_kind(&docs, "EnvoyFilter")["spec"]["configPatches"][0]["patch"]["value"];
    let name = filter["typed_config"]["dynamic_module_config"]["name"]
        .as_str()
        .expect("dynamic_module_config.name");
    assert_eq!(format!("lib{name}.so"), MODULE_FILE);
    // It reaches only the pods the patch gives the module to.
    let selector = &only_of_kind(&docs, "EnvoyFilter")["spec"]["workloadSelector"]["labels"];
    let pod_labels = &patch["spec"]["template"]["metadata"]["labels"];
    let selected = selector.as_object().is_some_and(|labels| {
        !labels.is_empty() && labels.iter().all(|(k, v)| &pod_labels[k] == v)
    });
    assert!(
        selected,
        "the EnvoyFilter selects {selector}, the patched pods carry {pod_labels}"
    );
}

/// The prod-native overlay in an Istio-like sidecar with the workload patch's settings: the prod
/// overrides apply and the metrics carry the names and labels of docs/metrics.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_envoy_filter_works_in_a_sidecar() {
    let overlay = Overlay::find("prod-native");
    let filter = sidecar_filter(&kustomize(&overlay.path()), Side::Caller, overlay.loader);
    let settings = ProxySettings::mesh()
        .with_workload(&native_workload_proxy_config())
        .with_bootstrap_override(&native_bootstrap_override());
    let module = native_module();
    if !module.is_file() {
        let refused = Sidecar::start_istio("k8s-prod-native", &filter, &settings)
            .await
            .err()
            .unwrap_or_else(|| found_elsewhere(&module));
        let line = missing_module_line(&refused, MODULE_FILE);
        module_missing(&module, "prod-native EnvoyFilter", &line);
    }
    use_search_path(&module);
    let sidecar = Sidecar::start_istio("k8s-prod-native", &filter, &settings)
        .await
        .unwrap_or_else(|e| panic!("Envoy refused the prod-native filter:\n{e}"));
    prod_overrides_and_metric_labels(&sidecar, "prod-native").await;
    let metrics = sidecar.envoy.metrics().await.unwrap();
    assert_eq!(
        metrics.dump("envoy_dynamicmodulescustom"),
        "",
        "{STRIP_PREFIX_FLAG} did not take: the module's metrics kept Envoy's prefix"
    );
}

/// The prod-inbound-native overlay in an Istio-like sidecar with the workload patch's settings: one
/// module on both sides, and the destination's side guards the pod as the wasm forms do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_destination_side_guards_the_pod_in_a_sidecar() {
    let overlay = Overlay::find("prod-inbound-native");
    let docs = kustomize(&overlay.path());
    let outbound = sidecar_filter(&docs, Side::Caller, overlay.loader);
    let inbound = inbound_sidecar_filter(&docs, overlay.loader);
    let config = filter_config(&docs, Side::Destination, overlay.loader);
    let settings = ProxySettings::mesh()
        .with_workload(&native_workload_proxy_config())
        .with_bootstrap_override(&native_bootstrap_override());
    let module = native_module();
    let name = "k8s-prod-inbound-native";
    if !module.is_file() {
        let refused = Sidecar::start_both_sides(name, &outbound, Some(&inbound), &settings)
            .await
            .err()
            .unwrap_or_else(|| found_elsewhere(&module));
        let line = missing_module_line(&refused, MODULE_FILE);
        module_missing(&module, "prod-inbound-native EnvoyFilters", &line);
    }
    use_search_path(&module);
    let sidecar = Sidecar::start_both_sides(name, &outbound, Some(&inbound), &settings)
        .await
        .unwrap_or_else(|e| panic!("Envoy refused the prod-inbound-native filters:\n{e}"));
    // Not yet `held_calls_were_cut`: the native build does not cut stuck calls so far (issue 17,
    // item 2); the held calls are dropped here.
    drop(destination_side_guards_the_pod(&sidecar, "prod-inbound-native", &config).await);
}

// ------------------------------------------------------------------------------------------------
// Envoy Gateway

/// The dynamic-module HTTP filters Envoy Gateway builds from `policy` with the modules `proxy`
/// registers (internal/xds/translator/dynamicmodule.go, v1.8/v1.9): one per entry, named
/// `envoy.filters.http.dynamic_modules/envoyextensionpolicy/<ns>/<name>/dynamic-module/<i>`,
/// disabled on the listener and enabled per route; the module by its path, `config` as a JSON
/// StringValue. The module's path is the built one here; in the cluster it is mounted there.
fn envoy_gateway_filters(proxy: &Value, policy: &Value, module: &Path) -> Vec<Value> {
    let registered = proxy["spec"]["dynamicModules"]
        .as_array()
        .expect("EnvoyProxy spec.dynamicModules");
    let meta = &policy["metadata"];
    let entries = policy["spec"]["dynamicModule"]
        .as_array()
        .expect("EnvoyExtensionPolicy spec.dynamicModule");
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let name = entry["name"].as_str().expect("dynamicModule name");
            let module_entry = registered
                .iter()
                .find(|m| m["name"] == name)
                .unwrap_or_else(|| panic!("the policy uses {name}, which the EnvoyProxy lacks"));
            let source = &module_entry["source"];
            assert_ne!(source["type"], "Remote", "the test loads a local module");
            let path = source["local"]["path"].as_str().expect("source.local.path");
            assert!(path.ends_with(&format!("/{MODULE_FILE}")), "{path}");
            let mut typed = json!({
                "@type": DYNAMIC_MODULE_FILTER_TYPE,
                "dynamic_module_config": {
                    "do_not_close": module_entry["doNotClose"].as_bool().unwrap_or(false),
                    "load_globally": module_entry["loadGlobally"].as_bool().unwrap_or(false),
                    "module": {"local": {"filename": module}}
                },
                "filter_name": entry["filterName"].as_str().unwrap_or(""),
                "terminal_filter": entry["terminalFilter"].as_bool().unwrap_or(false)
            });
            if !entry["config"].is_null() {
                typed["filter_config"] =
                    json!({"@type": STRING_VALUE_TYPE, "value": entry["config"].to_string()});
            }
            json!({
                "name": format!(
                    "envoy.filters.http.dynamic_modules/envoyextensionpolicy/{}/{}/dynamic-module/{i}",
                    meta["namespace"].as_str().unwrap_or("default"),
                    meta["name"].as_str().expect("metadata.name")
                ),
                "disabled": true,
                "typed_config": typed
            })
        })
        .collect()
}

/// RFC 6901 `add` of `value` at `path` (into an object, or an array by index or `-`).
fn json_patch_add(doc: &mut Value, path: &str, value: Value) {
    let (parent, last) = path
        .rsplit_once('/')
        .unwrap_or_else(|| panic!("not a JSON pointer: {path}"));
    let key = last.replace("~1", "/").replace("~0", "~");
    let target = doc
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("the bootstrap has nothing at {parent} (patch {path})"));
    match target {
        Value::Object(map) => {
            map.insert(key, value);
        }
        Value::Array(items) if key == "-" => items.push(value),
        Value::Array(items) => {
            let at: usize = key
                .parse()
                .unwrap_or_else(|_| panic!("bad index in {path}"));
            assert!(at <= items.len(), "index out of range in {path}");
            items.insert(at, value);
        }
        other => panic!("cannot add {path} under {other}"),
    }
}

/// `k8s/testdata/envoy-gateway.yaml` for `ports` as Envoy Gateway would give it to a proxy of
/// `proxy`: the EnvoyProxy's bootstrap JSON patches applied, `filters` before the router and
/// enabled on every route (the policy targets the Gateway).
fn envoy_gateway_bootstrap(
    ports: &envoy::UpstreamPorts,
    proxy: &Value,
    filters: &[Value],
) -> tempfile::NamedTempFile {
    let rendered = envoy::render_config_with(
        "k8s/testdata/envoy-gateway.yaml",
        ports,
        Path::new("unused"),
        "{}",
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut bootstrap = yaml_documents(&rendered, "k8s/testdata/envoy-gateway.yaml").remove(0);
    let patch = &proxy["spec"]["bootstrap"];
    assert_eq!(patch["type"], "JSONPatch", "the test applies JSON patches");
    for op in patch["jsonPatches"].as_array().expect("jsonPatches") {
        assert_eq!(op["op"], "add", "the test applies `add` only: {op}");
        let path = op["path"].as_str().expect("path");
        json_patch_add(&mut bootstrap, path, op["value"].clone());
    }
    let hcm = bootstrap
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
        .expect("the listener's HTTP connection manager");
    let http_filters = hcm["http_filters"].as_array_mut().expect("http_filters");
    let router = http_filters.len() - 1;
    for (i, filter) in filters.iter().enumerate() {
        http_filters.insert(router + i, filter.clone());
    }
    for host in hcm["route_config"]["virtual_hosts"]
        .as_array_mut()
        .expect("virtual_hosts")
    {
        for route in host["routes"].as_array_mut().expect("routes") {
            for filter in filters {
                let name = filter["name"].as_str().expect("filter name");
                route["typed_per_filter_config"][name] =
                    json!({"@type": ROUTE_FILTER_CONFIG_TYPE, "config": {}});
            }
        }
    }
    temp_config("envoy-gateway", &bootstrap.to_string())
}

/// The Envoy Gateway form, as Envoy Gateway builds it, in an Envoy shaped like its proxies: the
/// runtime flag the EnvoyProxy patches in takes, the breaker guards each route (one breaker per
/// route rule, opening after the base's 5 failures), and the metrics carry the documented names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_gateway_form_works_in_a_gateway_proxy() {
    let docs = kustomize("envoy-gateway");
    let proxy = only_of_kind(&docs, "EnvoyProxy");
    let policy = only_of_kind(&docs, "EnvoyExtensionPolicy");
    // The same breaker settings as the base WasmPlugin.
    assert_eq!(
        policy["spec"]["dynamicModule"][0]["config"],
        filter_config(&kustomize("base"), Side::Caller, Loader::WasmPlugin),
        "k8s/envoy-gateway/envoyextensionpolicy.yaml's config and k8s/base's pluginConfig differ"
    );
    let patches = proxy["spec"]["bootstrap"]["jsonPatches"].to_string();
    assert!(patches.contains(STRIP_PREFIX_FLAG), "{patches}");

    let module = native_module();
    let filters = envoy_gateway_filters(proxy, policy, &module);
    let user = "httproute/social/user-service/rule/0";
    let started = Sidecar::start_from(
        "k8s-envoy-gateway",
        |ports| envoy_gateway_bootstrap(ports, proxy, &filters),
        user,
    )
    .await;
    if !module.is_file() {
        let refused = started.err().unwrap_or_else(|| found_elsewhere(&module));
        let line = missing_module_line(&refused, &module.display().to_string());
        module_missing(&module, "Envoy Gateway form", &line);
    }
    let sidecar = started.unwrap_or_else(|e| panic!("Envoy refused the Envoy Gateway form:\n{e}"));
    sidecar.serves_one_call().await;

    sidecar.auth.set_fault(Fault::Unavailable).await.unwrap();
    let (rejection, reached) = trip(&sidecar.envoy, &sidecar.auth, 10).await;
    assert_eq!(
        reached, 5,
        "calls that reached auth-service before its breaker opened"
    );
    assert!(
        rejection
            .message()
            .contains("circuit breaker open for httproute/social/auth-service/rule/0"),
        "{rejection:?}"
    );
    // The other routes keep their own, closed, breakers.
    assert!(
        matches!(
            call(&sidecar.envoy, ServiceKind::User).await,
            CallResult::Passed(Ok(()))
        ),
        "user-service's breaker opened with auth-service's"
    );
}

#[test]
fn envoy_gateway_form_is_set_up_as_documented() {
    let docs = kustomize("envoy-gateway");
    let proxy = &only_of_kind(&docs, "EnvoyProxy")["spec"];
    let module = &proxy["dynamicModules"][0];
    assert_eq!(
        module["doNotClose"], true,
        "the breakers live in the module"
    );
    let path = module["source"]["local"]["path"]
        .as_str()
        .expect("a local path");
    // The module's directory is the one mounted into the envoy container.
    let deployment = &proxy["provider"]["kubernetes"]["envoyDeployment"];
    let mount = &deployment["container"]["volumeMounts"][0];
    let dir = mount["mountPath"].as_str().expect("mountPath");
    assert_eq!(path, format!("{dir}/{MODULE_FILE}"));
    assert_eq!(mount["readOnly"], true);
    assert_eq!(deployment["pod"]["volumes"][0]["name"], mount["name"]);
    // The policy uses the registered module and the module's filter.
    let policy = &only_of_kind(&docs, "EnvoyExtensionPolicy")["spec"];
    assert_eq!(policy["dynamicModule"][0]["name"], module["name"]);
    assert_eq!(policy["dynamicModule"][0]["filterName"], "circuit_breaker");
    let readme = std::fs::read_to_string(k8s("README.md")).unwrap();
    assert!(
        readme.contains("parametersRef"),
        "k8s/README.md says how to attach the EnvoyProxy"
    );
}
