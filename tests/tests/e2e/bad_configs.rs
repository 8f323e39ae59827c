//! Configurations Envoy must refuse, the rejection naming the field at fault.

use super::*;

use e2e::Envoy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_refused_naming_the_field() {
    let cases = [
        (
            json!({"error_rate_threshold": 2}).to_string(),
            "error_rate_threshold",
        ),
        (json!({"window_size": 0}).to_string(), "window_size"),
        (
            json!({"window_size": 10, "window_duration": "10s"}).to_string(),
            "window_duration",
        ),
        (json!({"upstream_key": "bogus"}).to_string(), "upstream_key"),
        (json!({"mode": "sometimes"}).to_string(), "mode"),
        (
            json!({"failure_treshold": 3}).to_string(),
            "failure_treshold",
        ),
        (
            json!({"upstreams": {"content": {"open_timeout": "soon"}}}).to_string(),
            "open_timeout",
        ),
        (
            json!({"upstreams": {"content": {"health_path": "/h"}}}).to_string(),
            "health_path",
        ),
        (
            "{not json".to_string(),
            "circuit breaker configuration rejected",
        ),
    ];
    for (i, (config, field)) in cases.iter().enumerate() {
        let log = Envoy::start_expecting_failure(&format!("bad_config_{i}"), config)
            .await
            .unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("circuit breaker configuration rejected"));
        let line = line.unwrap_or_else(|| panic!("no rejection line for {config}; log:\n{log}"));
        assert!(
            line.contains(field),
            "rejection of {config} does not name {field}: {line}"
        );
    }
}
