//! Hostile input in the configuration (section 3 of RELIABILITY.md): thousands of overrides load and
//! apply; deep nesting, too many overrides and huge configurations are refused, in a short log line.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_overrides_load_and_apply() {
    // 5000 exact keys and 500 globs; thresholds vary so the test can tell which override applied.
    let mut upstreams = serde_json::Map::new();
    for i in 0..5_000 {
        upstreams.insert(
            format!("tenant-{i}"),
            json!({"failure_threshold": 1 + i % 4}),
        );
    }
    for j in 0..500 {
        upstreams.insert(
            format!("*-g{j}-*"),
            json!({"failure_threshold": 1 + (j + 1) % 4}),
        );
    }
    let config = json!({
        "upstream_key": "header:x-tenant", "failure_threshold": 6, "open_timeout": "30s",
        "upstreams": upstreams
    });
    let size = config.to_string().len();
    let bed = TestBed::start("many_overrides", &config).await.unwrap();
    assert!(
        bed.envoy.log().contains("overrides=5500"),
        "log: {}",
        bed.envoy.log_path().display()
    );
    let channel = bed.envoy.channel().await.unwrap();
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    // tenant-4321: exact, 1 + 4321 % 4 = 2. x-g499-y: glob 499, 1 + 500 % 4 = 1. x-g498-y: 4. nobody:
    // the default, 6.
    for (key, threshold) in [
        ("tenant-4321", 2),
        ("x-g499-y", 1),
        ("x-g498-y", 4),
        ("nobody", 6),
    ] {
        let before = bed.content.requests();
        for _ in 0..threshold {
            let status = get_post(&channel, &[("x-tenant", key)]).await.unwrap_err();
            assert!(!is_rejection(&status, key), "{key}: {status:?}");
        }
        let status = get_post(&channel, &[("x-tenant", key)]).await.unwrap_err();
        assert!(
            is_rejection(&status, key),
            "{key} did not open after {threshold}: {status:?}"
        );
        assert_eq!(bed.content.requests() - before, threshold as u64, "{key}");
    }
    println!("overrides: 5000 exact + 500 globs, {size} bytes of JSON, loaded and applied");
    assert_no_trap(&bed.envoy);
}

/// Starts Envoy with a filter configuration it must refuse, and returns the filter's rejection line.
async fn refused(name: &str, config: &str) -> String {
    let log = Envoy::start_expecting_failure(name, config).await.unwrap();
    for marker in TRAP_MARKERS {
        assert!(
            !log.contains(marker),
            "{name}: the filter trapped ({marker})"
        );
    }
    let line = log
        .lines()
        .find(|l| l.contains("circuit breaker configuration rejected"))
        .unwrap_or_else(|| panic!("{name}: no rejection line"));
    line.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_and_too_many_overrides_are_refused() {
    // 10,000 levels of nesting, as a field's value and as the whole document: serde_json's recursion
    // limit stops the parser long before the stack.
    let depth = 10_000;
    let arrays = format!(
        "{{\"failure_threshold\": {}{}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    for (name, config) in [("nested_arrays", &arrays), ("nested_objects", &objects)] {
        let line = refused(name, config).await;
        assert!(line.contains("recursion limit"), "{name}: {line}");
        println!("{name}: {} bytes -> {line}", config.len());
    }

    // Past the override limit (10,000 entries).
    let mut upstreams = serde_json::Map::new();
    for i in 0..10_001 {
        upstreams.insert(format!("u{i}"), json!({}));
    }
    let too_many = json!({ "upstreams": upstreams }).to_string();
    let line = refused("too_many_overrides", &too_many).await;
    assert!(
        line.contains("upstreams") && line.contains("10000"),
        "{line}"
    );
    println!("too_many_overrides: {} bytes -> {line}", too_many.len());
}

/// 8 MiB configurations: an unknown field with a huge value, an unknown field with a huge name, a
/// known field with a huge bad value, a huge override key with a bad field.
fn huge_configs() -> Vec<(&'static str, String, &'static str)> {
    let huge = "x".repeat(8 << 20);
    let mut named = serde_json::Map::new();
    named.insert(huge.clone(), json!(1));
    let mut keyed = serde_json::Map::new();
    keyed.insert(huge.clone(), json!({"bogus": 1}));
    vec![
        (
            "huge_unknown_field",
            json!({ "padding": huge }).to_string(),
            "padding",
        ),
        (
            "huge_unknown_name",
            Value::Object(named).to_string(),
            "unknown field",
        ),
        (
            "huge_bad_value",
            json!({ "open_timeout": huge }).to_string(),
            "open_timeout",
        ),
        (
            "huge_override_key",
            json!({ "upstreams": keyed }).to_string(),
            "bogus",
        ),
    ]
}

/// Each huge configuration is refused, naming the problem, nothing traps, and the one log line that
/// refuses it stays short: the megabytes are not echoed into the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_configs_are_refused_in_a_short_line() {
    let mut long = Vec::new();
    for (name, config, names) in huge_configs() {
        let line = refused(name, &config).await;
        assert!(
            line.contains(names),
            "{name}: {}",
            &line[..line.len().min(300)]
        );
        println!(
            "{name}: {} bytes -> rejection line of {} bytes",
            config.len(),
            line.len()
        );
        if line.len() >= 4096 {
            long.push(format!(
                "{name}: a {}-byte line: {}...",
                line.len(),
                &line[..400.min(line.len())]
            ));
        }
    }
    assert!(long.is_empty(), "{long:#?}");
}
