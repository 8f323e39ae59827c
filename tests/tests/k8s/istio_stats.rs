//! Istio stats settings: the copies in `k8s/istio/` agree, their tags are the labels the reference
//! bootstrap (`envoy/e2e.yaml`) extracts, and their inclusion prefixes keep the filter's metrics.

use super::*;

use super::sidecar::istio_stats_settings;

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
