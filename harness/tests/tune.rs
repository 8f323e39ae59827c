//! `simulate --tune`: on generated logs with known outages (full and partial) and blips, the
//! recommendation catches every outage in time and trips on no blip, on the log it was tuned on and on
//! another log of the same traffic; an upstream with no outage keeps the defaults; the JSON is accepted
//! by the filter's own configuration parser; the shipped sample log; what cannot be met is named; bad
//! input is named. Tuning is slow in a debug build, so each generated log is tuned once.

// The whole file is test code: clippy.toml allows these in `#[test]` functions, and the helpers below
// only keep those functions short.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;

mod cli;
use cli::{run, temp_file};

use cb_core::config::{FilterConfig, WindowConfig};
use cb_core::key::UpstreamKey;
use harness::simulate::tune::{
    evaluate, tune, Base, Effect, Knobs, TuneOptions, TuneReport, UpstreamTuning,
};
use harness::simulate::{generate, parse_log, parse_scenario, Call};

/// Ten minutes of three upstreams. `api`: a full outage at 100s and a 70 % partial one at 350s, both
/// 60s, and a 2s blip at 250s. `db`: a 70 % partial outage at 150s (deadline exceeded) and a 3s blip
/// of connect failures at 300s. `quiet`: 1 % noise, nothing else.
fn traffic(seed: u64) -> Vec<Call> {
    let text = r#"{"seed": SEED, "start": "2026-11-22T10:00:00Z", "duration_s": 480, "upstreams": {
      "api": [
        {"from_s": 0, "to_s": 100, "failure_rate": 0.01, "rate_per_sec": 20},
        {"from_s": 100, "to_s": 160, "failure_rate": 1.0, "rate_per_sec": 20, "latency_ms": 3},
        {"from_s": 160, "to_s": 250, "failure_rate": 0.01, "rate_per_sec": 20},
        {"from_s": 250, "to_s": 252, "failure_rate": 1.0, "rate_per_sec": 20, "latency_ms": 3},
        {"from_s": 252, "to_s": 350, "failure_rate": 0.01, "rate_per_sec": 20},
        {"from_s": 350, "to_s": 410, "failure_rate": 0.7, "rate_per_sec": 20},
        {"from_s": 410, "to_s": 480, "failure_rate": 0.01, "rate_per_sec": 20}],
      "db": [
        {"from_s": 0, "to_s": 150, "failure_rate": 0.02, "rate_per_sec": 10},
        {"from_s": 150, "to_s": 210, "failure_rate": 0.7, "rate_per_sec": 10,
         "failure": "DEADLINE_EXCEEDED", "latency_ms": 100},
        {"from_s": 210, "to_s": 300, "failure_rate": 0.02, "rate_per_sec": 10},
        {"from_s": 300, "to_s": 303, "failure_rate": 1.0, "rate_per_sec": 10, "failure": "UF",
         "latency_ms": 1},
        {"from_s": 303, "to_s": 480, "failure_rate": 0.02, "rate_per_sec": 10}],
      "quiet": [{"from_s": 0, "to_s": 480, "failure_rate": 0.01, "rate_per_sec": 5}]}}"#;
    generate(&parse_scenario(&text.replace("SEED", &seed.to_string())).unwrap()).unwrap()
}

fn result<'a>(r: &'a TuneReport, key: &str) -> &'a UpstreamTuning {
    r.results
        .iter()
        .find(|u| u.upstream == key)
        .unwrap_or_else(|| panic!("no {key} in {r:#?}"))
}

/// The base with the report's `upstreams` pasted in, through the filter's own parser.
fn pasted(base: &str, r: &TuneReport) -> FilterConfig {
    let mut config: serde_json::Value = serde_json::from_str(base).unwrap();
    config["upstreams"] = serde_json::Value::Object(r.upstreams.clone());
    FilterConfig::from_json(config.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("the filter refuses the recommendation: {e}\n{config}"))
}

fn assert_catches_all_and_trips_on_no_blip(what: &str, e: &Effect) {
    assert!(!e.outages.is_empty(), "{what}: no outage found: {e:#?}");
    for c in &e.outages {
        assert!(c.in_time, "{what}: outage not caught in time: {e:#?}");
    }
    assert_eq!(
        (e.blip_trips, e.normal_traffic_trips),
        (0, 0),
        "{what}: {e:#?}"
    );
}

fn sample(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("samples")
        .join(name)
}

#[test]
fn recommendation_catches_every_outage_and_trips_on_no_blip_also_on_a_log_it_was_not_tuned_on() {
    let opts = TuneOptions::default();
    let tuned_on = traffic(1);
    let report = tune(&tuned_on, &Base::parse("").unwrap(), &opts);

    for key in ["api", "db"] {
        let r = result(&report, key);
        assert_eq!(
            (r.outages, r.blips),
            (if key == "api" { 2 } else { 1 }, 1),
            "{key}: {:#?}",
            r.episodes
        );
        // The defaults trip on the blip: the recommendation has something to fix.
        assert_eq!(r.base.blip_trips, 1, "{key}: {:#?}", r.base);
        assert!(r.override_fields.is_some(), "{key}");
        assert!(
            r.unmet.iter().all(|u| u.priority > 2),
            "{key}: {:?}",
            r.unmet
        );
        assert_catches_all_and_trips_on_no_blip(key, &r.recommended);
    }

    // The block, pasted into the configuration, is exactly what was replayed.
    let config = pasted("{}", &report);
    let again = evaluate(&tuned_on, &config, &opts);
    for key in ["api", "db"] {
        assert_eq!(again[key].1, result(&report, key).recommended, "{key}");
    }

    // Another day of the same traffic, which the search never saw.
    let other_day = evaluate(&traffic(2), &config, &opts);
    for key in ["api", "db"] {
        assert_catches_all_and_trips_on_no_blip(
            &format!("{key} on another log"),
            &other_day[key].1,
        );
    }

    // An upstream with no outage keeps the defaults' thresholds, and the report says so; its
    // override only adds the measured stuck_call_duration (20 ms calls: the rule's floor of 1s).
    let quiet = result(&report, "quiet");
    assert_eq!(quiet.outages, 0);
    assert_eq!(
        quiet
            .override_fields
            .as_ref()
            .map(|o| serde_json::Value::Object(o.clone())),
        Some(serde_json::json!({"stuck_call_duration": "1s"})),
        "{quiet:#?}"
    );
    assert!(
        quiet
            .note
            .contains("keeps the defaults, with stuck_call_duration added"),
        "{}",
        quiet.note
    );
    let (q, d) = (config.breaker_for("quiet"), config.defaults());
    assert_eq!(Knobs::of(q).distance(&Knobs::of(d)), 0, "{q:?}");
    assert_eq!(q.stuck_call_duration_ms, Some(1_000));
    let text = harness::simulate::render::render_tune(&report);
    assert!(
        text.contains("quiet: ")
            && text.contains("stuck_call_duration by the rule (see --help): 1s, from a 99.9th percentile of 25ms"),
        "{text}"
    );
}

#[test]
fn json_upstreams_is_accepted_by_the_filter_and_keeps_what_the_base_set() {
    // The sample config: a glob override for content with backoff, an exact one for auth.
    let base = std::fs::read_to_string(sample("filter.json")).unwrap();
    let out = run(&[
        "--tune",
        "--log",
        sample("access-log.jsonl").to_str().unwrap(),
        "--config",
        sample("filter.json").to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let upstreams = json["upstreams"].as_object().unwrap();
    assert!(
        upstreams.contains_key("*content*"),
        "the base's own entries stay: {json:#}"
    );

    let mut config: serde_json::Value = serde_json::from_str(&base).unwrap();
    config["upstreams"] = json["upstreams"].clone();
    let config = FilterConfig::from_json(config.to_string().as_bytes()).unwrap();
    for r in json["results"].as_array().unwrap() {
        let key = r["upstream"].as_str().unwrap();
        let cfg = config.breaker_for(key);
        match r["override"].as_object() {
            Some(fields) => {
                assert_eq!(&upstreams[key], &r["override"], "{key}");
                for (field, value) in fields {
                    let got: serde_json::Value = match field.as_str() {
                        "failure_threshold" => cfg.failure_threshold.into(),
                        "error_rate_threshold" => {
                            (f64::from(cfg.error_rate_threshold_ppm) / 1e6).into()
                        }
                        "minimum_requests" => cfg.minimum_requests.into(),
                        "window_size" => match cfg.window {
                            WindowConfig::Count(n) => n.into(),
                            other => panic!("{key}: {other:?}"),
                        },
                        _ => continue,
                    };
                    assert_eq!(&got, value, "{key}.{field}");
                }
            }
            None => assert!(!upstreams.contains_key(key), "{key}"),
        }
    }
    // What the glob gave content (backoff) is kept in its exact override.
    let content = config.breaker_for("outbound|50051||content.social.svc.cluster.local");
    assert_eq!(
        (content.backoff_multiplier, content.max_open_timeout_ms),
        (2.0, 60_000)
    );
}

#[test]
fn sample_log_recommendation_catches_its_outage_and_trips_on_no_blip() {
    let text = std::fs::read_to_string(sample("access-log.jsonl")).unwrap();
    let parsed = parse_log(&text, &UpstreamKey::Cluster);
    assert!(parsed.malformed.is_empty());
    let report = tune(
        &parsed.calls,
        &Base::parse("").unwrap(),
        &TuneOptions::default(),
    );
    let content = result(&report, "outbound|50051||content.social.svc.cluster.local");
    assert_eq!(content.outages, 1, "{:#?}", content.episodes);
    let auth = result(&report, "outbound|8083||auth.social.svc.cluster.local");
    assert_eq!(auth.blips, 1, "{:#?}", auth.episodes);
    assert_eq!(auth.base.blip_trips, 1, "the defaults trip on auth's blip");
    for r in &report.results {
        assert!(
            r.unmet.iter().all(|u| u.priority > 2),
            "{}: {:?}",
            r.upstream,
            r.unmet
        );
        assert!(r.recommended.outages.iter().all(|c| c.in_time), "{r:#?}");
        assert_eq!(r.recommended.needless_trips(), 0, "{r:#?}");
    }

    let out = run(&[
        "--tune",
        "--log",
        sample("access-log.jsonl").to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"upstreams\": {"), "{stdout}");
    assert!(stdout.contains("(in time: within 15s)"), "{stdout}");
    assert!(stdout.contains("it meets every priority"), "{stdout}");
}

#[test]
fn priorities_that_cannot_be_met_are_named_with_the_reason() {
    // A blip that lasts as long as the time allowed to catch an outage looks, meanwhile, exactly like
    // that outage: whatever catches the one trips on the other.
    let text = r#"{"seed": 4, "duration_s": 300, "rate_per_sec": 10, "upstreams": {"a": [
        {"from_s": 0, "to_s": 100, "failure_rate": 0.0},
        {"from_s": 100, "to_s": 140, "failure_rate": 1.0},
        {"from_s": 140, "to_s": 200, "failure_rate": 0.0},
        {"from_s": 200, "to_s": 208, "failure_rate": 1.0},
        {"from_s": 208, "to_s": 300, "failure_rate": 0.0}]}}"#;
    let calls = generate(&parse_scenario(text).unwrap()).unwrap();
    let opts = TuneOptions {
        outage_ms: 10_000,
        blip_ms: 10_000,
        ..TuneOptions::default()
    };
    let r = tune(&calls, &Base::parse("").unwrap(), &opts);
    let a = result(&r, "a");
    assert_eq!((a.outages, a.blips), (1, 1), "{:#?}", a.episodes);
    assert!(a.recommended.outages[0].in_time, "priority 1 comes first");
    let unmet: Vec<u8> = a.unmet.iter().map(|u| u.priority).collect();
    assert!(unmet.contains(&2), "{:?}", a.unmet);
    let why = &a.unmet.iter().find(|u| u.priority == 2).unwrap().why;
    assert!(
        why.contains("trips on the blip at")
            && why.contains("looks like the first seconds of the outage"),
        "{why}"
    );

    // Calls come at 0.9s past each second: no breaker can see an outage within half a second of its
    // start.
    let calls: Vec<Call> = (0..120u64)
        .map(|s| Call {
            start_ms: s * 1000 + 900,
            upstream_cluster: Some("b".into()),
            response_code: Some(if (60..90).contains(&s) { 503 } else { 200 }),
            ..Call::default()
        })
        .collect();
    let opts = TuneOptions {
        outage_ms: 1_000,
        blip_ms: 500,
        ..TuneOptions::default()
    };
    let r = tune(&calls, &Base::parse("").unwrap(), &opts);
    let b = result(&r, "b");
    assert_eq!(b.outages, 1);
    let first = b.unmet.first().unwrap();
    assert_eq!(first.priority, 1, "{:?}", b.unmet);
    assert!(
        first.why.contains("caught within 0.5s by none of the")
            && first
                .why
                .contains("the earliest any caught it was after 0.9s"),
        "{}",
        first.why
    );
}

#[test]
fn a_base_window_of_the_other_kind_is_replaced_not_doubled() {
    let base = Base::parse(r#"{"window_duration": "30s", "upstreams": {"a*": {"window_duration": "20s", "open_timeout": "7s"}}}"#).unwrap();
    let mut knobs = Knobs::of(base.config.breaker_for("ab"));
    knobs.window = WindowConfig::Count(200);
    let entry = base.override_for("ab", &knobs).unwrap();
    assert_eq!(
        serde_json::Value::Object(entry.clone()),
        serde_json::json!({"window_size": 200, "open_timeout": "7s"})
    );
    let config = base.with_override("ab", entry).unwrap();
    assert_eq!(config.breaker_for("ab").window, WindowConfig::Count(200));
    assert_eq!(config.breaker_for("ab").open_timeout_ms, 7_000);
    assert_eq!(
        base.override_for("ab", &Knobs::of(base.config.breaker_for("ab"))),
        None,
        "nothing changed: no override"
    );
}

#[test]
fn malformed_log_and_bad_base_config_are_named() {
    let good = r#"{"start_time":"2026-11-22T10:00:00.000Z","duration":5,"response_code":200,"upstream_cluster":"a"}"#;
    let log = temp_file(
        "tune-malformed.jsonl",
        &[good, r#"{"start_time":"2026-11-22T10:00:01.000Z","#, good].join("\n"),
    );
    let out = run(&["--tune", "--log", log.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("line 2: skipped: not JSON"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 malformed line skipped"),
        "{out:?}"
    );

    let bad = temp_file("tune-bad.jsonl", "{\"duration\": 5}\nnot json\n");
    let out = run(&["--tune", "--log", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("line 1: skipped: start_time is missing")
            && stderr.contains("no calls to replay (2 malformed lines)"),
        "{stderr}"
    );

    let sample_log = sample("access-log.jsonl");
    for (config, field) in [
        (
            r#"{"error_rate_threshold": 2}"#,
            "error_rate_threshold must be a number in (0, 1], got 2",
        ),
        (
            r#"{"upstreams": {"a": {"open_timout": "5s"}}}"#,
            "upstreams.\"a\".open_timout",
        ),
        ("[1, 2]", "configuration must be a JSON object"),
    ] {
        let path = temp_file("tune-bad-config.json", config);
        let out = run(&[
            "--tune",
            "--log",
            sample_log.to_str().unwrap(),
            "--config",
            path.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{config}");
        assert!(stderr.contains(field), "{config}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "no recommendation from a refused base"
        );
    }

    let out = run(&[
        "--tune",
        "--log",
        sample_log.to_str().unwrap(),
        "--outage",
        "5s",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--outage (5s) must be at least --blip (10s)"));
    let out = run(&["--log", sample_log.to_str().unwrap(), "--outage", "5s"]);
    assert!(!out.status.success(), "--outage without --tune");
}

#[test]
fn help_states_the_definitions_the_objective_and_the_bound() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--tune",
        "--outage <DURATION>",
        "max(3 x noise, noise + 0.2)",
        "median error rate of its 10s buckets outside episodes",
        "1. every outage caught in time",
        "2. no needless trip",
        "6. closest to the defaults",
        "at most 120 candidates are replayed per upstream",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
}

#[test]
fn healthy_or_untracked_upstreams_are_left_as_they_are() {
    let text = r#"{"seed": 5, "duration_s": 120, "rate_per_sec": 10, "upstreams": {
        "calm": [{"from_s": 0, "to_s": 120, "failure_rate": 0.01}],
        "off": [{"from_s": 0, "to_s": 120, "failure_rate": 0.5}]}}"#;
    let calls = generate(&parse_scenario(text).unwrap()).unwrap();
    // A stuck_call_duration longer than any healthy call is kept as it is.
    let base =
        Base::parse(r#"{"stuck_call_duration": "5s", "upstreams": {"off": {"mode": "disabled"}}}"#)
            .unwrap();
    let r = tune(&calls, &base, &TuneOptions::default());
    assert_eq!(r.results.len(), 1);
    let calm = result(&r, "calm");
    assert_eq!((calm.outages, calm.replays), (0, 1), "{calm:#?}");
    assert!(calm.override_fields.is_none());
    assert_eq!(calm.stuck.map(|a| a.recommended_ms), Some(5_000));
    assert_eq!(
        r.skipped.get("off").map(String::as_str),
        Some("mode disabled: not tuned")
    );
    assert_eq!(
        serde_json::Value::Object(r.upstreams.clone()),
        serde_json::json!({"off": {"mode": "disabled"}}),
        "the base's own entries, nothing added"
    );
    let text = harness::simulate::render::render_tune(&r);
    assert!(
        text.contains("No upstream needs an override") && text.contains("off: mode disabled"),
        "{text}"
    );
}

#[test]
fn a_blip_that_comes_close_to_a_trip_falls_short_of_the_margin() {
    // 10 calls a second, no noise, a 3s blip: 26 failures in a row (this seed's count) among the
    // last 100 calls.
    let text = r#"{"seed": 6, "duration_s": 120, "rate_per_sec": 10, "upstreams": {"a": [
        {"from_s": 0, "to_s": 60, "failure_rate": 0.0},
        {"from_s": 60, "to_s": 63, "failure_rate": 1.0},
        {"from_s": 63, "to_s": 120, "failure_rate": 0.0}]}}"#;
    let calls = generate(&parse_scenario(text).unwrap()).unwrap();
    let opts = TuneOptions::default();
    let judged = |config: &str| {
        let config = FilterConfig::from_json(config.as_bytes()).unwrap();
        evaluate(&calls, &config, &opts).remove("a").unwrap().1
    };
    let failures = calls.iter().filter(|c| c.grpc_status == Some(14)).count();
    assert_eq!(failures, 26);
    // 0.35 is not reached (no trip), but 0.26 is more than 2/3 of it.
    let close = judged(r#"{"failure_threshold": 0, "error_rate_threshold": 0.35}"#);
    assert_eq!(close.needless_trips(), 0, "{close:#?}");
    assert_eq!(close.short_of_margin.len(), 1, "{close:#?}");
    assert!(
        close.short_of_margin[0]
            .contains("the blip at 00:01:00 came close to a trip (a window failure rate of 0.26"),
        "{:?}",
        close.short_of_margin
    );
    let clear = judged(r#"{"failure_threshold": 0, "error_rate_threshold": 0.5}"#);
    assert!(clear.short_of_margin.is_empty(), "{clear:#?}");
    // 26 in a row against a failure_threshold of 35: no trip, but more than 2/3 of the way.
    let run = judged(r#"{"failure_threshold": 35, "error_rate_threshold": 1.0}"#);
    assert_eq!(run.needless_trips(), 0);
    assert!(
        run.short_of_margin
            .iter()
            .any(|s| s.contains("26 failures in a row against failure_threshold 35")),
        "{run:#?}"
    );
}

/// Thirty minutes of HTTP traffic at 5 calls a second over 0.5-1 % noise (503s), with a 120s episode
/// of 40 % 503s at 900s: issue 17's case.
fn partial_outage(seed: u64) -> Vec<Call> {
    let text = r#"{"seed": SEED, "grpc": false, "duration_s": 1800, "rate_per_sec": 5, "upstreams": {"web": [
        {"from_s": 0, "to_s": 450, "failure_rate": 0.005},
        {"from_s": 450, "to_s": 900, "failure_rate": 0.01},
        {"from_s": 900, "to_s": 1020, "failure_rate": 0.4},
        {"from_s": 1020, "to_s": 1400, "failure_rate": 0.01},
        {"from_s": 1400, "to_s": 1800, "failure_rate": 0.005}]}}"#;
    generate(&parse_scenario(&text.replace("SEED", &seed.to_string())).unwrap()).unwrap()
}

#[test]
fn a_partial_outage_is_caught_in_time_also_on_a_log_it_was_not_tuned_on() {
    // The margin once looked only at the outage's first third, where a lucky run of failures can
    // clear it: the search then settled on error_rate_threshold 0.1 over 50 calls, which on log 3
    // trips on a blip (and which issue 17 saw caught 30s late). It now asks the trigger to be met
    // again within every third of --outage, which only settings that hold on any day of this
    // traffic do.
    let opts = TuneOptions::default();
    let report = tune(&partial_outage(1), &Base::parse("").unwrap(), &opts);
    let r = result(&report, "web");
    assert_eq!(r.outages, 1, "{:#?}", r.episodes);
    assert_catches_all_and_trips_on_no_blip("web", &r.recommended);
    let config = pasted("{}", &report);
    for seed in [2, 3] {
        let other_day = evaluate(&partial_outage(seed), &config, &opts);
        assert_catches_all_and_trips_on_no_blip(
            &format!("web on log {seed}, with {:?}", r.override_fields),
            &other_day["web"].1,
        );
    }
}
