//! `harness simulate`: the sample log and scenario replayed through the core, malformed input, the
//! filter's config errors, and the SVG. Most tests call the library; a few run the binary to check
//! what a user sees (stdout, stderr, exit status).

// The whole file is test code: clippy.toml allows these in `#[test]` functions, and the helpers below
// only keep those functions short.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::process::Command;

mod cli;
use cli::{run, temp_file};

use cb_core::config::FilterConfig;
use cb_core::key::UpstreamKey;
use harness::simulate::{
    generate, load_config, parse_log, parse_rfc3339_ms, parse_scenario, render_json, render_table,
    scenario_span_ms, simulate, timeline, Options, Report, UpstreamReport,
};
use harness::svg;

const CONTENT: &str = "outbound|50051||content.social.svc.cluster.local";
const USER: &str = "outbound|50051||user.social.svc.cluster.local";
const AUTH: &str = "outbound|8083||auth.social.svc.cluster.local";

fn sample(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("samples")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(sample(name)).unwrap()
}

fn sample_config() -> FilterConfig {
    load_config(&read("filter.json")).unwrap()
}

fn replay_log(config: &FilterConfig) -> Report {
    let parsed = parse_log(&read("access-log.jsonl"), &config.upstream_key);
    assert!(parsed.malformed.is_empty(), "{:?}", parsed.malformed);
    simulate(
        &parsed.calls,
        config,
        &Options {
            source: "access-log.jsonl".into(),
            ..Options::default()
        },
    )
}

fn upstream<'a>(r: &'a Report, key: &str) -> &'a UpstreamReport {
    r.upstreams
        .iter()
        .find(|u| u.upstream == key)
        .unwrap_or_else(|| panic!("no upstream {key} in {r:#?}"))
}

fn at(t: &str) -> u64 {
    parse_rfc3339_ms(t).unwrap()
}

#[test]
fn sample_log_outage_opens_backs_off_and_closes_after_recovery() {
    let r = replay_log(&sample_config());
    assert_eq!(r.upstreams.len(), 3);
    assert_eq!(r.malformed_lines, 0);
    let content = upstream(&r, CONTENT);

    // The outage runs from 10:01:00 to 10:02:30 in the log. Five failures in a row open the breaker a
    // few seconds in; probes at 20s and then 40s (backoff 2) fail; the 60s probe finds it healthy.
    assert_eq!(content.open_periods.len(), 1, "{content:#?}");
    let p = &content.open_periods[0];
    assert_eq!(p.reason, "consecutive_failures");
    assert!(
        (at("2026-11-22T10:01:00Z")..at("2026-11-22T10:01:15Z")).contains(&p.opened_at_ms),
        "{p:?}"
    );
    let closed = p
        .closed_at_ms
        .expect("the breaker closes once content is back");
    assert!(
        closed > at("2026-11-22T10:02:30Z"),
        "never closes while the outage lasts: {p:?}"
    );
    assert!(closed < at("2026-11-22T10:03:30Z"), "{p:?}");
    assert_eq!(
        p.reopens, 2,
        "two failed probes: {:#?}",
        content.transitions
    );
    let first_probe = p.first_probe_at_ms.unwrap();
    assert!(
        (p.opened_at_ms + 20_000..p.opened_at_ms + 25_000).contains(&first_probe),
        "probes after open_timeout: {p:?}"
    );
    assert!(!p.blip, "a 90s outage is no blip: {p:?}");
    assert!(p.failure_episode_ms.unwrap() >= 85_000, "{p:?}");
    assert_eq!(content.final_state, "closed");

    // Every rejection happened inside the open period, and most of them spared a failing call.
    assert_eq!(p.rejected, content.rejected);
    assert_eq!(content.allowed + content.rejected, content.calls);
    assert!(content.rejected_would_have_failed > 60, "{content:#?}");
    assert!(content.failures_let_through < 10, "{content:#?}");
    assert_eq!(
        content.rejected_would_have_failed + content.rejected_would_have_succeeded,
        content.rejected
    );
    let kinds: Vec<(&str, &str)> = content
        .transitions
        .iter()
        .map(|t| (t.from.as_str(), t.to.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "open"),
            ("open", "half_open"),
            ("half_open", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ]
    );
}

#[test]
fn sample_log_healthy_upstream_never_opens_and_the_short_blip_is_flagged() {
    let r = replay_log(&sample_config());
    let user = upstream(&r, USER);
    assert!(user.transitions.is_empty(), "{user:#?}");
    assert_eq!((user.rejected, user.allowed), (0, user.calls));
    assert!(
        user.log_failures > 0,
        "the healthy upstream has isolated failures, too few to trip"
    );

    let auth = upstream(&r, AUTH);
    assert_eq!(auth.open_periods.len(), 1, "{auth:#?}");
    let p = &auth.open_periods[0];
    assert!(p.blip, "a 3s pod restart is a blip: {p:?}");
    assert!(p.failure_episode_ms.unwrap() < 10_000);
    assert!(
        (at("2026-11-22T10:03:20Z")..at("2026-11-22T10:03:24Z")).contains(&p.opened_at_ms),
        "{p:?}"
    );
    assert!(p.closed_at_ms.is_some());
    assert_eq!(auth.blips, 1);

    // With a blip threshold below the episode it is an ordinary trip.
    let parsed = parse_log(&read("access-log.jsonl"), &UpstreamKey::Cluster);
    let strict = simulate(
        &parsed.calls,
        &sample_config(),
        &Options {
            blip_ms: 1_000,
            ..Options::default()
        },
    );
    assert_eq!(upstream(&strict, AUTH).blips, 0);
}

#[test]
fn other_upstream_keys_use_the_fields_they_need() {
    let by_service = replay_log(
        &load_config(r#"{"upstream_key": "grpc_service", "open_timeout": "20s"}"#).unwrap(),
    );
    let keys: Vec<&str> = by_service
        .upstreams
        .iter()
        .map(|u| u.upstream.as_str())
        .collect();
    assert!(
        keys.contains(&"social.content.v1.ContentService"),
        "{keys:?}"
    );
    assert!(keys.contains(&"social.user.v1.UserService"), "{keys:?}");
    assert_eq!(
        upstream(&by_service, "social.content.v1.ContentService")
            .open_periods
            .len(),
        1
    );

    let by_method = replay_log(&load_config(r#"{"upstream_key": "grpc_method"}"#).unwrap());
    assert!(by_method
        .upstreams
        .iter()
        .any(|u| u.upstream == "social.content.v1.ContentService/ListPosts"));

    let by_authority = replay_log(&load_config(r#"{"upstream_key": "authority"}"#).unwrap());
    assert!(by_authority
        .upstreams
        .iter()
        .any(|u| u.upstream == "content.social.svc.cluster.local:50051"));

    // A header the log does not have: every call passes untracked, and the report says why.
    let by_header = replay_log(&load_config(r#"{"upstream_key": "header:x-tenant"}"#).unwrap());
    assert!(by_header.upstreams.is_empty());
    assert_eq!(by_header.untracked.get("no_key"), Some(&by_header.calls));
}

#[test]
fn dry_run_judges_without_rejecting() {
    let r = replay_log(&load_config(r#"{"mode": "dry_run", "open_timeout": "20s"}"#).unwrap());
    let content = upstream(&r, CONTENT);
    assert_eq!(content.rejected, 0);
    assert!(content.dry_run_rejections > 0, "{content:#?}");
    assert_eq!(content.open_periods[0].rejected, content.dry_run_rejections);
    assert_eq!(content.mode, "dry_run");
}

#[test]
fn scenario_replay_follows_the_phases() {
    let scenario = parse_scenario(&read("scenario.json")).unwrap();
    let calls = generate(&scenario).unwrap();
    let opts = Options {
        source: "scenario.json".into(),
        span_ms: Some(scenario_span_ms(&scenario)),
        ..Options::default()
    };
    let r = simulate(&calls, &sample_config(), &opts);
    assert_eq!(
        r,
        simulate(&generate(&scenario).unwrap(), &sample_config(), &opts),
        "deterministic"
    );
    let t0 = at("2026-11-22T10:00:00Z");
    assert_eq!(
        r.start_ms, t0,
        "the report covers the scenario, not just its calls"
    );
    assert!(
        (t0 + 120_000..t0 + 121_000).contains(&r.end_ms),
        "{}",
        r.end
    );

    // content fails completely from 30s to 60s, then 60 % until 75s, then recovers.
    let content = upstream(&r, CONTENT);
    assert_eq!(content.open_periods.len(), 1, "{:#?}", content.transitions);
    let p = &content.open_periods[0];
    assert!(
        (t0 + 30_000..t0 + 31_000).contains(&p.opened_at_ms),
        "{p:?}"
    );
    assert!(p.closed_at_ms.unwrap() >= t0 + 75_000, "{p:?}");
    assert!(!p.blip);
    assert!(content.rejected > 1_000);

    let user = upstream(&r, USER);
    assert!(
        user.transitions.is_empty(),
        "1 % isolated failures never trip: {user:#?}"
    );

    let auth = upstream(&r, AUTH);
    assert_eq!(auth.open_periods.len(), 1);
    assert!(auth.open_periods[0].blip, "{:?}", auth.open_periods[0]);
    assert!((t0 + 90_000..t0 + 92_000).contains(&auth.open_periods[0].opened_at_ms));
}

#[test]
fn malformed_lines_are_reported_with_their_number_and_skipped() {
    let log = [
        r#"{"start_time":"2026-11-22T10:00:00.000Z","duration":5,"response_code":200,"upstream_cluster":"a"}"#,
        "",
        r#"{"start_time":"2026-11-22T10:00:01.000Z","duration":5,"response_code":200,"#,
        r#"{"start_time":"yesterday","duration":5,"response_code":200,"upstream_cluster":"a"}"#,
        r#"{"start_time":"2026-11-22T10:00:02.000Z","duration":5,"response_code":503,"upstream_cluster":"a"}"#,
    ]
    .join("\n");
    let parsed = parse_log(&log, &UpstreamKey::Cluster);
    assert_eq!(parsed.calls.len(), 2);
    assert_eq!(
        parsed.calls.iter().map(|c| c.line).collect::<Vec<_>>(),
        [1, 5]
    );
    assert_eq!(
        parsed.malformed.iter().map(|m| m.line).collect::<Vec<_>>(),
        [3, 4]
    );
    assert!(
        parsed.malformed[1].error.contains("start_time"),
        "{:?}",
        parsed.malformed
    );

    let path = temp_file("malformed.jsonl", &log);
    let out = run(&["--log", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "skipped lines are not fatal: {stderr}"
    );
    assert!(stderr.contains("line 3: skipped: not JSON"), "{stderr}");
    assert!(stderr.contains("line 4: skipped: start_time"), "{stderr}");
    assert!(
        !stderr.contains("line 2"),
        "blank lines are not malformed: {stderr}"
    );
    assert!(
        stdout.contains("Replayed 2 calls") && stdout.contains("2 malformed lines skipped"),
        "{stdout}"
    );
}

#[test]
fn a_malformed_config_gets_the_filters_error_and_fails() {
    let e = load_config(r#"{"error_rate_threshold": 2}"#).unwrap_err();
    assert!(
        e.contains("error_rate_threshold must be a number in (0, 1], got 2"),
        "{e}"
    );

    let config = temp_file("bad-filter.json", r#"{"error_rate_threshold": 2}"#);
    let log = sample("access-log.jsonl");
    let out = run(&[
        "--log",
        log.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("error_rate_threshold must be a number in (0, 1], got 2"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "no report for a refused configuration"
    );

    let out = run(&["--config", config.to_str().unwrap()]);
    assert!(!out.status.success(), "an input is required");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log"));
}

#[test]
fn svg_is_well_formed_and_shows_every_upstream() {
    let r = replay_log(&sample_config());
    let doc = svg::render(&timeline(&r));
    assert!(
        doc.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
        "{}",
        &doc[..80]
    );
    assert!(doc.trim_end().ends_with("</svg>"));
    for u in [CONTENT, USER, AUTH] {
        assert!(doc.contains(u), "{u} missing");
    }
    assert_well_formed(&doc);
}

#[test]
fn binary_writes_table_json_and_svg() {
    let log = sample("access-log.jsonl");
    let config = sample("filter.json");
    let svg_path = temp_file("out.svg", "");
    let out = run(&[
        "--log",
        log.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--svg",
        svg_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("UPSTREAM") && table.contains(CONTENT) && table.contains("BLIP"),
        "{table}"
    );
    let doc = std::fs::read_to_string(&svg_path).unwrap();
    assert!(doc.starts_with("<svg") && doc.contains(AUTH));

    let out = run(&[
        "--log",
        log.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let upstreams = json["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 3);
    let content = upstreams.iter().find(|u| u["upstream"] == CONTENT).unwrap();
    assert_eq!(content["open_periods"][0]["reason"], "consecutive_failures");
    assert_eq!(content["open_periods"][0]["blip"], false);

    // The library renders the same report the binary prints.
    let r = replay_log(&sample_config());
    assert!(render_table(&r).contains("open period 1"));
    assert!(render_json(&r)
        .unwrap()
        .contains("\"rejected_would_have_failed\""));

    let scenario = sample("scenario.json");
    let out = run(&[
        "--scenario",
        scenario.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A minimal XML check: tags nest and close, attribute values are quoted, text has no stray `<` or
/// unescaped `&`.
fn assert_well_formed(doc: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = doc;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        assert!(!text.contains('>'), "stray > in {text:?}");
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..text[i..].find(';').map_or(text.len(), |e| i + e + 1)];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&entity),
                "bad entity {entity:?}"
            );
        }
        let close = rest[open..].find('>').expect("unclosed tag") + open;
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "< inside tag {tag:?}");
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in {tag:?}"
        );
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else if !tag.ends_with('/') {
            stack.push(tag.split_whitespace().next().unwrap().to_string());
        }
        rest = &rest[close + 1..];
        if stack.is_empty() {
            assert!(
                rest.trim().is_empty(),
                "content after the root element: {rest:?}"
            );
            return;
        }
    }
    panic!("unclosed elements: {stack:?}");
}

#[test]
fn every_subcommand_has_its_own_help_and_demo_and_bench_get_their_options_untouched() {
    let bin = env!("CARGO_BIN_EXE_circuit-breaker");
    let help = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    for sub in ["simulate", "demo", "bench"] {
        assert!(top.contains(sub), "{top}");
    }
    let simulate = help(&["simulate", "--help"]);
    for flag in [
        "--log",
        "--scenario",
        "--config",
        "--svg",
        "--json",
        "--blip",
    ] {
        assert!(simulate.contains(flag), "{flag}: {simulate}");
    }
    assert!(help(&["demo", "--help"]).contains("--outage S"));
    assert!(help(&["bench", "--help"]).contains("--rounds"));

    // An option clap does not know reaches the demo's own parser, which names it (and starts nothing).
    let out = Command::new(bin).args(["demo", "--nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("demo: unknown option \"--nope\""),
        "{out:?}"
    );
}
