//! What the overlays configure: the documented thresholds, the same settings in every form, the
//! WasmPlugin and EnvoyFilter set up as documented.

use super::*;

use super::rendered_filter::{filter_config, DYNAMIC_MODULE_FILTER_TYPE, WASM_FILTER_TYPE};

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
