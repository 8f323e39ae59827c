//! `simulate --fleet N`: one outage met by N proxies, each with its own breaker and its own seed.
//! Jitter spreads the probes of many proxies, the ramp brings the traffic back gradually, more proxies
//! take longer to all open and send more calls to the failed upstream, a seed repeats a run exactly,
//! and the command line prints the issue's figures. Every run is a seeded simulation: no clock.

// The whole file is test code: clippy.toml allows these in `#[test]` functions, and the helpers below
// only keep those functions short.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod cli;
use cli::{run, temp_file};

use cb_core::config::FilterConfig;
use harness::simulate::fleet::{fleet, without_jitter_or_ramp, FleetOptions, FleetReport};
use harness::simulate::{generate, parse_scenario, Call};

/// 400 calls a second for 150s to `content`, 0.2 % noise, failing entirely from 30s to 90s.
fn outage() -> Vec<Call> {
    let text = r#"{"seed": 5, "rate_per_sec": 400, "duration_s": 150, "upstreams": {"content": [
        {"from_s": 0, "to_s": 30, "failure_rate": 0.002},
        {"from_s": 30, "to_s": 90, "failure_rate": 1.0, "latency_ms": 5},
        {"from_s": 90, "to_s": 150, "failure_rate": 0.002}]}}"#;
    generate(&parse_scenario(text).unwrap()).unwrap()
}

/// Probes every 10s, plus what the case adds.
fn config(extra: &str) -> String {
    format!(r#"{{"open_timeout": "10s", "success_threshold": 2 {extra}}}"#)
}

fn run_fleet(calls: &[Call], config: &str, proxies: u32, seed: u64) -> FleetReport {
    let with = FilterConfig::from_json(config.as_bytes()).unwrap();
    let without = without_jitter_or_ramp(config).unwrap();
    let without = FilterConfig::from_json(without.as_bytes()).unwrap();
    let opts = FleetOptions {
        source: "test".into(),
        proxies,
        seed,
    };
    fleet(calls, &with, &without, &opts).unwrap()
}

#[test]
fn jitter_spreads_the_probes_of_a_hundred_proxies() {
    let r = run_fleet(
        &outage(),
        &config(r#", "open_timeout_jitter": 0.2"#),
        100,
        1,
    );
    assert_eq!(
        (r.upstream.as_str(), r.failure_start_ms),
        ("content", 30_000)
    );
    let (with, without) = (&r.figures, &r.without_jitter_or_ramp);
    // Every proxy opens within the failure's first second, so without jitter they probe together
    // every 10s; with it, each draws its own extra of up to 2s at every opening.
    assert!(
        without.max_probes_in_100ms >= 50,
        "the herd without jitter: {without:#?}"
    );
    assert!(
        with.max_probes_in_100ms * 3 <= without.max_probes_in_100ms,
        "jitter 0.2 spreads the probes: {with:#?} against {without:#?}"
    );
    // Jitter only moves the probes: the same proxies open, about as many probes go out.
    assert_eq!(with.proxies_opened, 100);
    assert!(
        with.probes.abs_diff(without.probes) * 5 <= without.probes,
        "{r:#?}"
    );
}

#[test]
fn the_ramp_brings_the_traffic_back_a_tenth_at_a_time() {
    let r = run_fleet(&outage(), &config(r#", "recovery_ramp": "10s""#), 10, 1);
    let (with, without) = (&r.figures, &r.without_jitter_or_ramp);
    let step = |f: &harness::simulate::fleet::FleetFigures| f.max_recovery_step.unwrap();
    // Without the ramp, ten breakers that probed together close together: all the traffic at once.
    assert!(step(without) >= 0.8, "{without:#?}");
    // With it, each admits 10 % at first, rising by about 9 % a second.
    assert!(step(with) <= 0.3, "{with:#?}");
    // A log holds no retries: either way the traffic comes back to what it was, not more.
    for f in [with, without] {
        let peak = f.peak_recovery_ratio.unwrap();
        assert!((0.8..1.3).contains(&peak), "{f:#?}");
    }
}

#[test]
fn more_proxies_take_longer_to_all_open_and_send_more_calls_to_the_failed_upstream() {
    let calls = outage();
    let one = run_fleet(&calls, &config(""), 1, 1).figures;
    let hundred = run_fleet(&calls, &config(""), 100, 1).figures;
    // One proxy sees 400 calls a second: five failures in a row within ~15 ms. A hundred each see
    // 4 a second, and the last of them needs its own five.
    assert!(one.time_to_open_all_ms.unwrap() < 100, "{one:#?}");
    assert!(
        hundred.time_to_open_all_ms.unwrap() >= 1_000,
        "{hundred:#?}"
    );
    // Each proxy pays its own five failures and its own probes.
    assert!(one.calls_to_failed_upstream < 50, "{one:#?}");
    assert!(
        hundred.calls_to_failed_upstream >= 500 + hundred.probes / 2,
        "{hundred:#?}"
    );
    assert_eq!(hundred.proxies_opened, 100);
}

#[test]
fn a_seed_repeats_a_run_and_each_proxy_draws_its_own_jitter() {
    let calls = outage();
    let cfg = config(r#", "open_timeout_jitter": 0.5"#);
    let a = run_fleet(&calls, &cfg, 20, 1);
    assert_eq!(
        a,
        run_fleet(&calls, &cfg, 20, 1),
        "the same seed, the same run"
    );
    let b = run_fleet(&calls, &cfg, 20, 2);
    assert_ne!(a.figures, b.figures, "another seed, other draws");
    // Without jitter there is nothing to draw: the seed changes nothing.
    assert_eq!(a.without_jitter_or_ramp, b.without_jitter_or_ramp);
}

#[test]
fn the_command_prints_the_figures_as_json_or_a_table_and_names_bad_input() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/fleet.json");
    let scenario = temp_file(
        "fleet-scenario.json",
        r#"{"rate_per_sec": 200, "duration_s": 60, "upstreams": {"content": [
            {"from_s": 0, "to_s": 20}, {"from_s": 20, "to_s": 40, "failure_rate": 1},
            {"from_s": 40, "to_s": 60}]}}"#,
    );
    let scenario = scenario.to_str().unwrap();
    let args = ["--scenario", scenario, "--config", sample, "--fleet", "10"];
    let out = run(&[&args[..], &["--json", "--seed", "7"]].concat());
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for name in [
        "time_to_open_all_ms",
        "calls_to_failed_upstream",
        "max_probes_in_100ms",
        "peak_recovery_ratio",
    ] {
        assert!(v[name].is_number(), "{name} in {v:#}");
        assert!(v["without_jitter_or_ramp"][name].is_number(), "{name}");
    }
    assert_eq!(
        (v["proxies"].as_u64(), v["seed"].as_u64()),
        (Some(10), Some(7))
    );
    assert_eq!(v["open_timeout_jitter"].as_f64(), Some(0.2));

    let table = run(&args);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains("10 proxies against content")
            && text.contains("without jitter or ramp")
            && text.contains("jitter 0.2, ramp 10s"),
        "{text}"
    );

    let refused = |extra: &[&str], says: &str| {
        let out = run(&[&args[..4], extra].concat());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            !out.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
    };
    refused(
        &["--fleet", "0"],
        "--fleet must be 1 to 10000 proxies, got 0",
    );
    refused(&["--fleet", "2", "--tune"], "--tune");
    let calm = temp_file(
        "calm.json",
        r#"{"rate_per_sec": 50, "duration_s": 30, "upstreams": {"a": [{"from_s": 0, "to_s": 30}]}}"#,
    );
    let out = run(&["--scenario", calm.to_str().unwrap(), "--fleet", "2"]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("no upstream of the input has a failure episode"),
        "{err}"
    );
}
