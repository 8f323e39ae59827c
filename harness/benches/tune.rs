//! `simulate --tune` on 100,000 access-log lines: the time it takes, parsing included (issue 13).
//!
//! The log is generated (a seeded scenario, written out as Envoy JSON access-log lines): four upstreams
//! over 25 minutes, three of them with outages, full and partial, and blips, so the search runs for
//! each of them as far as its bound (`MAX_REPLAYS` candidates per upstream); the fourth is healthy and
//! keeps the defaults after one replay. One iteration is `parse_log` + `tune` of the whole log; the time
//! criterion shows is the time per 100,000 lines.
//!
//! `cargo bench -p circuit-breaker-harness --bench tune` (`make bench` runs it).

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use cb_core::key::UpstreamKey;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use harness::simulate::tune::{tune, Base, TuneOptions};
use harness::simulate::{format_rfc3339_ms, generate, parse_log, parse_scenario, Call};

const LINES: usize = 100_000;

const SCENARIO: &str = r#"{"seed": 11, "start": "2026-11-22T10:00:00Z", "duration_s": 1500, "upstreams": {
  "outbound|50051||content.social.svc.cluster.local": [
    {"from_s": 0, "to_s": 300, "failure_rate": 0.01, "rate_per_sec": 30},
    {"from_s": 300, "to_s": 390, "failure_rate": 1.0, "rate_per_sec": 30, "latency_ms": 3, "failure": "UF"},
    {"from_s": 390, "to_s": 800, "failure_rate": 0.01, "rate_per_sec": 30},
    {"from_s": 800, "to_s": 803, "failure_rate": 1.0, "rate_per_sec": 30, "latency_ms": 3},
    {"from_s": 803, "to_s": 1100, "failure_rate": 0.01, "rate_per_sec": 30},
    {"from_s": 1100, "to_s": 1160, "failure_rate": 0.6, "rate_per_sec": 30},
    {"from_s": 1160, "to_s": 1500, "failure_rate": 0.01, "rate_per_sec": 30}],
  "outbound|50051||user.social.svc.cluster.local": [
    {"from_s": 0, "to_s": 1500, "failure_rate": 0.01, "rate_per_sec": 15}],
  "outbound|8083||auth.social.svc.cluster.local": [
    {"from_s": 0, "to_s": 600, "failure_rate": 0.02, "rate_per_sec": 15},
    {"from_s": 600, "to_s": 660, "failure_rate": 0.5, "rate_per_sec": 15, "failure": "DEADLINE_EXCEEDED", "latency_ms": 500},
    {"from_s": 660, "to_s": 1000, "failure_rate": 0.02, "rate_per_sec": 15},
    {"from_s": 1000, "to_s": 1004, "failure_rate": 1.0, "rate_per_sec": 15, "failure": "UNAVAILABLE"},
    {"from_s": 1004, "to_s": 1500, "failure_rate": 0.02, "rate_per_sec": 15}],
  "outbound|8080||feed.social.svc.cluster.local": [
    {"from_s": 0, "to_s": 200, "failure_rate": 0.005, "rate_per_sec": 8},
    {"from_s": 200, "to_s": 202, "failure_rate": 1.0, "rate_per_sec": 8},
    {"from_s": 202, "to_s": 900, "failure_rate": 0.005, "rate_per_sec": 8},
    {"from_s": 900, "to_s": 1000, "failure_rate": 1.0, "rate_per_sec": 8, "failure": "UF"},
    {"from_s": 1000, "to_s": 1500, "failure_rate": 0.005, "rate_per_sec": 8}]}}"#;

/// One call as Envoy's JSON access log writes it.
fn log_line(c: &Call, out: &mut String) {
    let cluster = c.upstream_cluster.as_deref().unwrap_or("-");
    let _ = writeln!(
        out,
        r#"{{"start_time":"{}","method":"POST","path":"{}","response_code":{},"response_flags":"{}","grpc_status":{},"duration":{},"upstream_cluster":"{cluster}","authority":"{}"}}"#,
        format_rfc3339_ms(c.start_ms),
        c.path.as_deref().unwrap_or("/"),
        c.response_code.unwrap_or(0),
        flags(c),
        c.grpc_status.map_or("null".to_string(), |s| s.to_string()),
        c.duration_ms,
        c.authority.as_deref().unwrap_or("-"),
    );
}

fn flags(c: &Call) -> &'static str {
    if c.response_flags.upstream_failed(true) {
        "UF"
    } else {
        "-"
    }
}

/// `LINES` lines of the scenario's traffic (the first ones, in start order).
fn access_log() -> Result<String, String> {
    let calls = generate(&parse_scenario(SCENARIO)?)?;
    if calls.len() < LINES {
        return Err(format!(
            "the scenario has {} calls, not {LINES}",
            calls.len()
        ));
    }
    let mut text = String::with_capacity(LINES * 200);
    for c in calls.iter().take(LINES) {
        log_line(c, &mut text);
    }
    Ok(text)
}

fn tune_100k_lines(c: &mut Criterion) {
    let (text, base) = match access_log().and_then(|t| Ok((t, Base::parse("")?))) {
        Ok(setup) => setup,
        Err(e) => {
            eprintln!("tune bench: {e}");
            return;
        }
    };
    let opts = TuneOptions::default();
    // Once before timing: the work is what it should be (every line read, three upstreams tuned).
    let parsed = parse_log(&text, &UpstreamKey::Cluster);
    assert_eq!((parsed.calls.len(), parsed.malformed.len()), (LINES, 0));
    let report = tune(&parsed.calls, &base, &opts);
    let replays: usize = report.results.iter().map(|r| r.replays).sum();
    let tuned = report.results.iter().filter(|r| r.replays > 1).count();
    eprintln!("tune bench: {LINES} lines, {tuned} upstreams searched, {replays} replays in all");

    let mut group = c.benchmark_group("tune");
    group.throughput(Throughput::Elements(LINES as u64));
    // One iteration takes seconds: criterion's smallest sample.
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.bench_function("tune_100k_lines", |b| {
        b.iter(|| {
            let parsed = parse_log(black_box(&text), &UpstreamKey::Cluster);
            black_box(tune(&parsed.calls, &base, &opts))
        })
    });
    group.finish();
}

criterion_group!(benches, tune_100k_lines);
criterion_main!(benches);
