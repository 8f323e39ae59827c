//! Alert rules and dashboard, statically: `promtool check rules` and `promtool test rules` pass, the
//! PrometheusRule carries the groups of `rules.yaml`, and both use the documented metrics.

use super::*;

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
