//! The configuration's tests: defaults, overrides, every refusal and its message.

use super::error::MAX_ERROR_PART;
use super::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn parse(s: &str) -> Result<FilterConfig, ConfigError> {
    FilterConfig::from_json(s.as_bytes())
}

fn err(s: &str) -> String {
    parse(s).expect_err("config should be refused").to_string()
}

#[test]
fn empty_config_gives_contract_defaults() {
    let c = parse("{}").unwrap();
    let d = c.defaults();
    assert_eq!(c.upstream_key, UpstreamKey::Cluster);
    assert_eq!(c.max_upstreams, 1024);
    assert_eq!(c.health_path, None);
    assert_eq!(d.failure_threshold, 5);
    assert_eq!(d.error_rate_threshold_ppm, 500_000);
    assert_eq!(d.window, WindowConfig::Count(100));
    assert_eq!(d.minimum_requests, 20);
    assert_eq!(d.slow_call_duration_ms, None);
    assert_eq!(d.slow_call_rate_threshold_ppm, 1_000_000);
    assert_eq!(d.open_timeout_ms, 60_000);
    assert_eq!(d.backoff_multiplier, 1.0);
    assert_eq!(d.max_open_timeout_ms, 300_000);
    assert_eq!(d.half_open_max_requests, 1);
    assert_eq!(d.success_threshold, 2);
    for code in [2u8, 4, 8, 13, 14, 15] {
        assert!(d.failure_grpc_statuses.contains(code), "code {code}");
    }
    for code in [0u8, 1, 3, 5, 6, 7, 9, 10, 11, 12, 16] {
        assert!(!d.failure_grpc_statuses.contains(code), "code {code}");
    }
    assert!(d.failure_http_statuses.contains(500) && d.failure_http_statuses.contains(599));
    assert!(!d.failure_http_statuses.contains(404));
    assert_eq!(d.mode, Mode::Enforce);
    assert_eq!(parse("").unwrap(), c);
}

#[test]
fn contract_example_parses_with_overrides() {
    let c = parse(
        r#"{
          "failure_threshold": 5, "error_rate_threshold": 0.5, "window_size": 100,
          "open_timeout": "30s", "success_threshold": 2,
          "health_path": "/health/circuit-breakers",
          "upstreams": {
            "outbound|8083||auth-service.nova.svc.cluster.local": { "failure_threshold": 3 },
            "*media-service*": { "open_timeout": "60s", "success_threshold": 5 }
          }
        }"#,
    )
    .unwrap();
    assert_eq!(c.health_path.as_deref(), Some("/health/circuit-breakers"));
    let auth = c.breaker_for("outbound|8083||auth-service.nova.svc.cluster.local");
    assert_eq!(auth.failure_threshold, 3);
    assert_eq!(
        auth.open_timeout_ms, 30_000,
        "unset override fields inherit the defaults"
    );
    let media = c.breaker_for("outbound|80||media-service.nova.svc.cluster.local");
    assert_eq!(
        (media.open_timeout_ms, media.success_threshold),
        (60_000, 5)
    );
    assert_eq!(c.breaker_for("other").open_timeout_ms, 30_000);
}

#[test]
fn exact_beats_glob_and_longest_glob_wins() {
    let c = parse(
        r#"{"upstreams": {
            "*": {"failure_threshold": 1},
            "*media*": {"failure_threshold": 2},
            "*media-service*": {"failure_threshold": 3},
            "media-service": {"failure_threshold": 4}
        }}"#,
    )
    .unwrap();
    assert_eq!(c.breaker_for("media-service").failure_threshold, 4);
    assert_eq!(c.breaker_for("x-media-service-y").failure_threshold, 3);
    assert_eq!(c.breaker_for("media").failure_threshold, 2);
    assert_eq!(c.breaker_for("auth").failure_threshold, 1);
}

#[test]
fn glob_matching() {
    assert!(glob_match("*", ""));
    assert!(glob_match("a*c", "abbbc"));
    assert!(glob_match("*svc*", "outbound|80||svc.ns"));
    assert!(!glob_match("a*c", "abd"));
    assert!(glob_match("a**", "a"));
    assert!(!glob_match("abc", "abcd"));
    assert!(glob_match("*a*a*a*b", "aaaaaaaaaaaaaab"));
    assert!(!glob_match("*a*a*a*b", "aaaaaaaaaaaaaaa"));
}

#[test]
fn unknown_fields_are_refused_also_inside_upstreams() {
    let e = err(r#"{"failure_treshold": 3}"#);
    assert!(
        e.contains("failure_treshold") && e.contains("failure_threshold"),
        "{e}"
    );
    let e = err(r#"{"upstreams": {"a": {"bogus": 1}}}"#);
    assert!(
        e.starts_with("upstreams.\"a\"") && e.contains("bogus"),
        "{e}"
    );
    let e = err(r#"{"upstreams": {"a": {"health_path": "/h"}}}"#);
    assert!(
        e.contains("upstreams.\"a\".health_path") && e.contains("top level"),
        "{e}"
    );
}

#[test]
fn errors_name_field_value_and_allowed_values() {
    assert_eq!(
        err(r#"{"error_rate_threshold": 2}"#),
        "error_rate_threshold must be a number in (0, 1], got 2"
    );
    assert_eq!(
        err(r#"{"error_rate_threshold": 0}"#),
        "error_rate_threshold must be a number in (0, 1], got 0"
    );
    assert_eq!(
        err(r#"{"window_size": 0}"#),
        "window_size must be an integer from 1 to 1024, got 0"
    );
    assert_eq!(
        err(r#"{"window_size": 2000}"#),
        "window_size must be an integer from 1 to 1024, got 2000"
    );
    let e = err(r#"{"failure_threshold": -1}"#);
    assert!(
        e.starts_with("failure_threshold: ") && e.contains("-1"),
        "{e}"
    );
    let e = err(r#"{"failure_threshold": "5"}"#);
    assert!(
        e.starts_with("failure_threshold: invalid type: string \"5\""),
        "{e}"
    );
    let e = err(r#"{"open_timeout": "soon"}"#);
    assert!(
        e.starts_with("open_timeout must be a duration") && e.ends_with("got \"soon\""),
        "{e}"
    );
    let e = err(r#"{"mode": "panic"}"#);
    assert!(
        e.contains("mode") && e.contains("dry_run") && e.contains("panic"),
        "{e}"
    );
    let e = err(r#"{"upstream_key": "host"}"#);
    assert!(
        e.contains("upstream_key") && e.contains("grpc_method") && e.contains("\"host\""),
        "{e}"
    );
    let e = err(r#"{"failure_grpc_statuses": ["UNAVAILABLE", "NOPE"]}"#);
    assert!(
        e.starts_with("failure_grpc_statuses[1] must be a gRPC status name"),
        "{e}"
    );
    let e = err(r#"{"failure_http_statuses": ["6xx"]}"#);
    assert!(
        e.starts_with("failure_http_statuses[0] must be an HTTP status"),
        "{e}"
    );
    let e = err(r#"{"upstreams": {"*m*": {"error_rate_threshold": 1.5}}}"#);
    assert_eq!(
        e,
        "upstreams.\"*m*\".error_rate_threshold must be a number in (0, 1], got 1.5"
    );
    let e = err(r#"{"max_upstreams": 0}"#);
    assert!(
        e.starts_with("max_upstreams must be an integer from 1"),
        "{e}"
    );
    let e = err(r#"[1, 2]"#);
    assert!(e.starts_with("configuration must be a JSON object"), "{e}");
    let e = err(r#"{"health_path": "health"}"#);
    assert!(e.starts_with("health_path must be null or a path"), "{e}");
}

#[test]
fn inconsistent_combinations_are_refused() {
    let e = err(r#"{"window_size": 10, "window_duration": "10s"}"#);
    assert!(
        e.contains("window_duration") && e.contains("window_size"),
        "{e}"
    );
    let e = err(r#"{"window_size": 10}"#);
    assert!(
        e.starts_with("minimum_requests must be at most window_size (10)"),
        "{e}"
    );
    let e = err(r#"{"open_timeout": "10m", "max_open_timeout": "5m"}"#);
    assert!(
        e.starts_with("max_open_timeout must be at least open_timeout"),
        "{e}"
    );
    let e = err(r#"{"upstreams": {"a": {"window_size": 5}}}"#);
    assert!(e.starts_with("upstreams.\"a\".minimum_requests"), "{e}");
}

#[test]
fn durations_statuses_and_fallback() {
    let c = parse(
        r#"{"window_duration": "30s", "slow_call_duration": "1.5s", "call_timeout": "250ms",
            "open_timeout": "2m", "max_open_timeout": "10m",
            "failure_grpc_statuses": ["unavailable", 4, "INTERNAL"],
            "failure_http_statuses": ["5xx", 429, "408"],
            "fallback": {"status": 200, "headers": {"X-From": "fallback"}, "body": "{}"}}"#,
    )
    .unwrap();
    let d = c.defaults();
    assert_eq!(
        d.window,
        WindowConfig::Time {
            duration_ms: 30_000
        }
    );
    assert_eq!(d.slow_call_duration_ms, Some(1_500));
    assert_eq!(d.call_timeout_ms, Some(250));
    assert_eq!(d.open_timeout_ms, 120_000);
    assert!(d.failure_grpc_statuses.contains(14) && d.failure_grpc_statuses.contains(4));
    assert!(!d.failure_grpc_statuses.contains(2));
    assert!(d.failure_http_statuses.contains(429) && d.failure_http_statuses.contains(408));
    assert!(d.failure_http_statuses.contains(503) && !d.failure_http_statuses.contains(404));
    let fb = d.fallback.as_ref().unwrap();
    assert_eq!(
        fb.headers,
        vec![(Arc::from("x-from"), Arc::from("fallback"))]
    );
}

#[test]
fn override_can_switch_window_kind_and_unset_optional_fields() {
    let c = parse(
        r#"{"window_duration": "10s", "slow_call_duration": "1s",
            "upstreams": {"a": {"window_size": 50, "slow_call_duration": null}}}"#,
    )
    .unwrap();
    let a = c.breaker_for("a");
    assert_eq!(a.window, WindowConfig::Count(50));
    assert_eq!(a.slow_call_duration_ms, None);
    assert_eq!(
        c.breaker_for("b").window,
        WindowConfig::Time {
            duration_ms: 10_000
        }
    );
}

#[test]
fn huge_values_are_cut_in_the_error_line() {
    let huge = "x".repeat(1 << 20);
    for config in [
        format!(r#"{{"open_timeout": "{huge}"}}"#),
        format!(r#"{{"{huge}": 1}}"#),
        format!(r#"{{"upstreams": {{"{huge}": {{"open_timeout": "soon"}}}}}}"#),
        format!(r#"{{"upstream_key": "é{huge}"}}"#),
    ] {
        let e = err(&config);
        assert!(e.len() < 4 * MAX_ERROR_PART, "{} bytes", e.len());
        assert!(e.contains("..."), "{}", &e[..100]);
    }
}

#[test]
fn too_many_overrides_are_refused() {
    let mut m = serde_json::Map::new();
    for i in 0..=MAX_OVERRIDES {
        m.insert(
            format!("svc-{i}"),
            serde_json::json!({"failure_threshold": 1}),
        );
    }
    let e = FilterConfig::from_value(serde_json::json!({ "upstreams": m })).unwrap_err();
    assert_eq!(e.field, "upstreams");
}

#[test]
fn raising_open_timeout_alone_raises_the_ceiling_with_it() {
    let c = parse(r#"{"open_timeout": "10m"}"#).unwrap();
    assert_eq!(
        (
            c.defaults().open_timeout_ms,
            c.defaults().max_open_timeout_ms
        ),
        (600_000, 600_000)
    );
    // Below the default ceiling, the ceiling stays.
    let c = parse(r#"{"open_timeout": "30s"}"#).unwrap();
    assert_eq!(c.defaults().max_open_timeout_ms, 300_000);
    // In an override, against the ceiling it inherits.
    let c = parse(r#"{"upstreams": {"a": {"open_timeout": "20m"}}}"#).unwrap();
    assert_eq!(c.breaker_for("a").max_open_timeout_ms, 1_200_000);
    assert_eq!(c.defaults().max_open_timeout_ms, 300_000);
}

#[test]
fn stuck_call_duration_is_a_breaker_field_and_idle_timeout_a_top_level_one() {
    let c = parse(
        r#"{"stuck_call_duration": "500ms", "idle_timeout": "30s",
            "upstreams": {"a": {"stuck_call_duration": null}, "b*": {"stuck_call_duration": "2s"}}}"#,
    )
    .unwrap();
    assert_eq!(c.defaults().stuck_call_duration_ms, Some(500));
    assert_eq!(c.breaker_for("a").stuck_call_duration_ms, None);
    assert_eq!(c.breaker_for("bee").stuck_call_duration_ms, Some(2_000));
    assert_eq!(c.idle_timeout_ms, 30_000);
    assert!(c.tracks_stuck_calls());
    let d = parse("{}").unwrap();
    assert_eq!(d.defaults().stuck_call_duration_ms, None);
    assert_eq!(d.idle_timeout_ms, 600_000);
    assert!(!d.tracks_stuck_calls());
    let e = err(r#"{"stuck_call_duration": "0s"}"#);
    assert_eq!(
        e,
        "stuck_call_duration must be a duration above zero, got \"0s\""
    );
    let e = err(r#"{"upstreams": {"a": {"stuck_call_duration": "later"}}}"#);
    assert!(
        e.starts_with("upstreams.\"a\".stuck_call_duration must be a duration"),
        "{e}"
    );
    let e = err(r#"{"upstreams": {"a": {"idle_timeout": "1m"}}}"#);
    assert!(
        e.contains("upstreams.\"a\".idle_timeout") && e.contains("top level"),
        "{e}"
    );
    let e = err(r#"{"idle_timeout": 5}"#);
    assert!(e.starts_with("idle_timeout must be a duration"), "{e}");
}

#[test]
fn resolving_once_gives_the_same_settings_as_a_lookup() {
    let c =
        parse(r#"{"upstreams": {"a": {"failure_threshold": 1}, "*b*": {"failure_threshold": 2}}}"#)
            .unwrap();
    for key in ["a", "xbx", "c"] {
        let id = c.resolve(key);
        assert_eq!(c.breaker(id), c.breaker_for(key), "{key}");
    }
    assert_eq!(c.resolve("c"), BreakerId::DEFAULTS);
    assert_eq!(
        c.breaker(BreakerId(99)),
        c.defaults(),
        "an unknown id falls back"
    );
}

#[test]
fn a_refusal_is_one_line_whatever_the_value_held() {
    let e = err("{\"mode\": \"a\\nb\\r\\u0007c\"}");
    assert!(
        !e.contains('\n') && !e.contains('\r') && !e.contains('\u{7}'),
        "{e:?}"
    );
    assert!(e.contains("a\\nb\\r\\u{0007}c"), "{e}");
    let refused = parse(r#"{"window_size": 0}"#).unwrap_err();
    assert_eq!(
        refused.rejected_line(),
        "circuit breaker configuration rejected: window_size must be an integer from 1 to 1024, got 0"
    );
    assert_eq!(
        parse("{}").unwrap().configured_line(),
        "circuit breaker configured: upstream_key=cluster mode=enforce overrides=0 max_upstreams=1024"
    );
}

#[test]
fn cut_stuck_calls_needs_stuck_call_duration_in_the_same_resolved_settings() {
    let c = parse(r#"{"stuck_call_duration": "300ms", "cut_stuck_calls": true}"#).unwrap();
    assert!(c.defaults().cut_stuck_calls);
    assert!(!parse("{}").unwrap().defaults().cut_stuck_calls);
    // An override inherits the top level's duration, or brings its own.
    let c = parse(
        r#"{"stuck_call_duration": "1s",
            "upstreams": {"inbound|*": {"cut_stuck_calls": true}, "b": {"stuck_call_duration": "2s"}}}"#,
    )
    .unwrap();
    assert!(c.breaker_for("inbound|8080||").cut_stuck_calls);
    assert!(!c.breaker_for("b").cut_stuck_calls);
    let e = err(r#"{"cut_stuck_calls": true}"#);
    assert_eq!(
        e,
        "cut_stuck_calls must be false unless stuck_call_duration is set in the same resolved \
         settings (the top level, plus the upstreams entry that matches): a call is cut only once \
         it is stuck, got true"
    );
    // An override that unsets the duration it would inherit is refused too, by its own path.
    let e = err(r#"{"stuck_call_duration": "1s", "cut_stuck_calls": true,
            "upstreams": {"a": {"stuck_call_duration": null}}}"#);
    assert!(
        e.starts_with("upstreams.\"a\".cut_stuck_calls must be false unless stuck_call_duration"),
        "{e}"
    );
    let e = err(r#"{"cut_stuck_calls": "yes"}"#);
    assert!(e.starts_with("cut_stuck_calls"), "{e}");
}

#[test]
fn open_timeout_jitter_and_recovery_ramp_are_breaker_fields() {
    let c = parse(
        r#"{"open_timeout_jitter": 0.2, "recovery_ramp": "30s",
            "upstreams": {"a": {"open_timeout_jitter": 0, "recovery_ramp": null}}}"#,
    )
    .unwrap();
    assert_eq!(c.defaults().open_timeout_jitter_ppm, 200_000);
    assert_eq!(c.defaults().recovery_ramp_ms, Some(30_000));
    assert_eq!(c.breaker_for("a").open_timeout_jitter_ppm, 0);
    assert_eq!(c.breaker_for("a").recovery_ramp_ms, None);
    let d = parse("{}").unwrap();
    assert_eq!(d.defaults().open_timeout_jitter_ppm, 0);
    assert_eq!(d.defaults().recovery_ramp_ms, None);
    assert_eq!(
        parse(r#"{"open_timeout_jitter": 1}"#)
            .unwrap()
            .defaults()
            .open_timeout_jitter_ppm,
        1_000_000
    );
    for bad in ["-0.1", "1.5", "\"0.2\""] {
        let e = err(&format!(r#"{{"open_timeout_jitter": {bad}}}"#));
        assert!(e.starts_with("open_timeout_jitter"), "{e}");
    }
    assert_eq!(
        err(r#"{"open_timeout_jitter": 2}"#),
        "open_timeout_jitter must be a number in [0, 1], got 2"
    );
    assert_eq!(
        err(r#"{"recovery_ramp": "0s"}"#),
        "recovery_ramp must be a duration above zero, got \"0s\""
    );
    let e = err(r#"{"upstreams": {"a": {"recovery_ramp": "soon"}}}"#);
    assert!(
        e.starts_with("upstreams.\"a\".recovery_ramp must be a duration"),
        "{e}"
    );
}
