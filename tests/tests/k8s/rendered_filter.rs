//! The filter configuration inside the rendered objects: the JSON configuration each form carries,
//! and the HTTP filter a sidecar gets from a WasmPlugin or an EnvoyFilter.

use super::*;

use super::sidecar::{InboundFilter, InboundPlace};

pub(super) const WASM_FILTER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

pub(super) const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";

pub(super) const DYNAMIC_MODULE_FILTER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";

/// The HTTP filter an EnvoyFilter inserts (its only patch).
pub(super) fn envoy_filter_http_filter(envoy_filter: &Value) -> &Value {
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
pub(super) fn filter_config(docs: &[Value], side: Side, loader: Loader) -> Value {
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
pub(super) fn istio_filter_from_wasm_plugin(plugin: &Value, wasm: &Path) -> Value {
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
pub(super) fn sidecar_filter(docs: &[Value], side: Side, loader: Loader) -> Value {
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
pub(super) fn inbound_sidecar_filter(docs: &[Value], loader: Loader) -> InboundFilter {
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
