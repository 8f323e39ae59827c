//! End-to-end: the recovery features of issue 19 in a real Envoy (two workers), for the build
//! `CB_BUILD` names (`make test-e2e` runs this file once per build).
//!
//! - [`open_timeout_jitter_spreads_the_probes_of_breakers_opened_together`]: ten breakers behind one
//!   cluster (`upstream_key: "header:x-tenant"`), opened by one failure each, all at once, with
//!   `open_timeout_jitter`. Each comes out of Open within `[open_timeout, open_timeout × (1 + jitter)]`
//!   of its opening, as its `retry_after_ms` in the health JSON and the moment it admits its probe both
//!   show, and not all at the same moment: the measured extras differ by more than the measurement's
//!   own error can explain. [`without_jitter_breakers_opened_together_probe_together`] is the control:
//!   the same measurement finds every extra to be 0 when the jitter is.
//! - [`recovery_ramp_admits_a_share_and_turns_the_rest_away_as_recovering`]: after HalfOpen closes a
//!   breaker with `recovery_ramp`, a burst of gRPC and plain-HTTP calls early in the ramp is admitted
//!   only in part; the others get the contract's answer marked `recovering`, counted as rejected, and
//!   the health endpoint shows the share being admitted. When the ramp has run, every call is admitted
//!   again and the log says the ramp ended.
//!
//! Time drives the state machine here (open times, the ramp), but nothing asserts how fast anything
//! runs: the jitter tests bound each open time from the calls' own send and answer times, so a slow
//! machine widens the intervals instead of failing them; the ramp's burst only needs 20 calls in 5 s.

use std::time::{Duration, Instant};

use e2e::{health, health_entry, raw_grpc, worker_channels, Fault, RawGrpcResponse, TestBed};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tonic::transport::Channel;

const HEALTH: &str = "/health/circuit-breakers";
const GET_POST: &str = "/social.v1.ContentService/GetPost";

/// Breakers opened together by the jitter tests.
const TENANTS: usize = 10;
/// Their `open_timeout`, ms.
const OPEN_TIMEOUT_MS: f64 = 2_000.0;
/// Their `open_timeout_jitter`.
const JITTER: f64 = 0.5;
/// Slack for the clocks: Envoy's are read in whole milliseconds, and the wasm build's is the system
/// clock, not the monotonic one this test reads.
const CLOCK_SLACK_MS: f64 = 10.0;
/// How often the jitter tests call each breaker while waiting for its probe.
const POLL: Duration = Duration::from_millis(25);
/// Bound on anything one test waits for: far above what a passing test needs.
const BOUND: Duration = Duration::from_secs(30);

fn get_post() -> e2e::pb::GetPostRequest {
    e2e::pb::GetPostRequest {
        post_id: "1".into(),
    }
}

/// One `GetPost` for `tenant`, as it came over the wire.
async fn call(channel: &Channel, tenant: &str) -> RawGrpcResponse {
    raw_grpc(channel, GET_POST, &[("x-tenant", tenant)], &get_post())
        .await
        .unwrap()
}

/// `x-circuit-breaker` of an answer: `None` when the upstream answered.
fn marker(r: &RawGrpcResponse) -> Option<&str> {
    r.header("x-circuit-breaker")
}

#[track_caller]
fn assert_upstream_answered(r: &RawGrpcResponse, grpc_status: &str) {
    assert_eq!(
        (marker(r), r.grpc_status()),
        (None, Some(grpc_status)),
        "expected the upstream's answer: {r:?}"
    );
}

async fn health_of(bed: &TestBed) -> (u16, Value) {
    health(&bed.envoy, HEALTH).await.unwrap()
}

#[track_caller]
fn entry<'a>(body: &'a Value, tenant: &str) -> &'a Value {
    health_entry(body, tenant).unwrap_or_else(|| panic!("no breaker {tenant} in {body}"))
}

fn ms_between(from: Instant, to: Instant) -> f64 {
    if to >= from {
        to.duration_since(from).as_secs_f64() * 1_000.0
    } else {
        -(from.duration_since(to).as_secs_f64() * 1_000.0)
    }
}

// ---- open_timeout_jitter ------------------------------------------------------------------------

/// An interval of milliseconds known to hold a value that cannot be read directly.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    lo: f64,
    hi: f64,
}

impl Bounds {
    /// With [`CLOCK_SLACK_MS`] on each side.
    fn new(lo: f64, hi: f64) -> Self {
        Self {
            lo: lo - CLOCK_SLACK_MS,
            hi: hi + CLOCK_SLACK_MS,
        }
    }

    fn meets(&self, other: &Bounds) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }
}

/// How far apart the values the `bounds` hold are for sure: the largest `lo` less the smallest `hi`.
/// Positive only if two of the values differ; when they are all equal it is at most 0.
fn sure_spread(bounds: &[Bounds]) -> f64 {
    let lo = bounds.iter().map(|b| b.lo).fold(f64::MIN, f64::max);
    let hi = bounds.iter().map(|b| b.hi).fold(f64::MAX, f64::min);
    lo - hi
}

/// A call that opened a breaker: Envoy opened it somewhere between `sent` and `answered` (the outcome
/// is recorded as the response passes the filter, before the client has it).
struct Opening {
    tenant: String,
    sent: Instant,
    answered: Instant,
}

/// What one run of the jitter scenario measured for each breaker: the extra over `open_timeout` of its
/// open time (ms), as the health endpoint's `retry_after_ms` shows it and as the moment it admitted
/// its probe shows it.
struct Extras {
    from_health: Vec<Bounds>,
    from_probes: Vec<Bounds>,
}

/// Starts Envoy with `open_timeout_jitter: jitter`, opens [`TENANTS`] breakers at once (one failure
/// each, half of them on each worker), reads their open times from the health endpoint, then calls
/// each every [`POLL`] until it admits its probe.
async fn opened_together(name: &str, jitter: f64) -> Extras {
    let bed = TestBed::start(
        name,
        &json!({
            "upstream_key": "header:x-tenant", "failure_threshold": 1, "success_threshold": 1,
            "open_timeout": "2s", "open_timeout_jitter": jitter, "health_path": HEALTH
        }),
    )
    .await
    .unwrap();
    let channels = worker_channels(&bed.envoy).await.unwrap();
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    let mut calls = JoinSet::new();
    for i in 0..TENANTS {
        let channel = channels[i % 2].clone();
        calls.spawn(async move {
            let tenant = format!("tenant-{i}");
            let sent = Instant::now();
            let r = call(&channel, &tenant).await;
            let answered = Instant::now();
            assert_upstream_answered(&r, "14");
            Opening {
                tenant,
                sent,
                answered,
            }
        });
    }
    let mut openings: Vec<Opening> = calls.join_all().await;
    openings.sort_by(|a, b| a.tenant.cmp(&b.tenant));

    // retry_after_ms = the end of the open time less the moment Envoy answered the health request,
    // somewhere between `asked` and `told`; so the extra over open_timeout is retry_after_ms + (that
    // moment - the opening) - open_timeout.
    let asked = Instant::now();
    let (code, body) = health_of(&bed).await;
    let told = Instant::now();
    assert_eq!((code, &body["status"]), (503, &json!("degraded")), "{body}");
    let from_health = openings
        .iter()
        .map(|o| {
            let b = entry(&body, &o.tenant);
            assert_eq!(
                (&b["state"], &b["admitting"]),
                (&json!("open"), &json!(0.0)),
                "{body}"
            );
            let retry_after = b["retry_after_ms"]
                .as_f64()
                .unwrap_or_else(|| panic!("retry_after_ms of {}: {body}", o.tenant));
            Bounds::new(
                retry_after + ms_between(o.answered, asked) - OPEN_TIMEOUT_MS,
                retry_after + ms_between(o.sent, told) - OPEN_TIMEOUT_MS,
            )
        })
        .collect();

    // Each breaker is called until it admits a call: its probe, which succeeds and closes it. Its
    // open time ended after the last call it refused was sent and before the admitted one's answer.
    bed.content.set_fault(Fault::Ok).await.unwrap();
    let mut polls = JoinSet::new();
    for (i, o) in openings.iter().enumerate() {
        let channel = channels[i % 2].clone();
        let (tenant, opened_sent, opened_answered) = (o.tenant.clone(), o.sent, o.answered);
        polls.spawn(async move {
            let mut last_refused = None;
            let deadline = Instant::now() + BOUND;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let r = call(&channel, &tenant).await;
                match marker(&r) {
                    Some("open") => last_refused = Some(sent),
                    None => {
                        assert_upstream_answered(&r, "0");
                        let refused = last_refused.unwrap_or_else(|| {
                            panic!("{tenant}: its first call after opening was admitted")
                        });
                        return (
                            tenant,
                            Bounds::new(
                                ms_between(opened_answered, refused) - OPEN_TIMEOUT_MS,
                                ms_between(opened_sent, Instant::now()) - OPEN_TIMEOUT_MS,
                            ),
                        );
                    }
                    Some(_) => panic!("{tenant}: unexpected answer while Open: {r:?}"),
                }
                tokio::time::sleep(POLL).await;
            }
            panic!("{tenant}: no probe admitted within {BOUND:?}");
        });
    }
    let mut from_probes: Vec<(String, Bounds)> = polls.join_all().await;
    from_probes.sort_by(|a, b| a.0.cmp(&b.0));

    // Every breaker went Open → HalfOpen → Closed exactly once.
    let m = bed.envoy.metrics().await.unwrap();
    for o in &openings {
        for (from, to) in [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ] {
            let labels = [
                ("upstream", o.tenant.as_str()),
                ("from_state", from),
                ("to_state", to),
            ];
            assert_eq!(
                m.value("circuit_breaker_state_changes_total", &labels),
                Some(1.0),
                "{}",
                m.dump("circuit_breaker_state_changes_total")
            );
        }
    }
    Extras {
        from_health,
        from_probes: from_probes.into_iter().map(|(_, b)| b).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_timeout_jitter_spreads_the_probes_of_breakers_opened_together() {
    let extras = opened_together("jitter", JITTER).await;
    eprintln!("extras over open_timeout, ms: {:?}", extras.from_health);
    let max_extra = OPEN_TIMEOUT_MS * JITTER;
    for (i, (health, probe)) in extras
        .from_health
        .iter()
        .zip(&extras.from_probes)
        .enumerate()
    {
        // Each open time lies in [open_timeout, open_timeout × (1 + jitter)], both as the health
        // endpoint tells it and as the probe shows it, and the two agree.
        for (what, b) in [("retry_after_ms", health), ("the probe", probe)] {
            assert!(
                b.hi >= 0.0 && b.lo <= max_extra,
                "tenant-{i}: by {what}, the extra open time lies in [{:.0}, {:.0}] ms, outside \
                 [0, {max_extra}]",
                b.lo,
                b.hi
            );
        }
        assert!(
            health.meets(probe),
            "tenant-{i}: the probe came at another time than retry_after_ms said: {health:?} vs \
             {probe:?}"
        );
    }
    // Without jitter every extra is 0 and every interval holds 0 (the control below checks it), so
    // no two of them could be told apart. Here two differ for sure, slack of the clocks included.
    for (what, bounds) in [
        ("retry_after_ms", &extras.from_health),
        ("the probes", &extras.from_probes),
    ] {
        let spread = sure_spread(bounds);
        assert!(
            spread > 0.0,
            "by {what}, the open times of breakers opened together are not spread: the extras \
             over open_timeout are {bounds:?}, no two surely apart (largest lo - smallest hi: \
             {spread:.0} ms)"
        );
    }
}

/// The control of the test above: with `open_timeout_jitter: 0`, the same measurement finds each
/// extra open time to be 0, so the spread it found there came from the jitter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_jitter_breakers_opened_together_probe_together() {
    let extras = opened_together("no_jitter", 0.0).await;
    eprintln!("extras over open_timeout, ms: {:?}", extras.from_health);
    for (what, bounds) in [
        ("retry_after_ms", &extras.from_health),
        ("the probes", &extras.from_probes),
    ] {
        for (i, b) in bounds.iter().enumerate() {
            assert!(
                b.lo <= 0.0 && b.hi >= 0.0,
                "tenant-{i}: by {what}, the open time is not open_timeout: the extra lies in \
                 [{:.0}, {:.0}] ms",
                b.lo,
                b.hi
            );
        }
        assert!(sure_spread(bounds) <= 0.0, "{what}: {bounds:?}");
    }
}

// ---- recovery_ramp ------------------------------------------------------------------------------

/// The ramp of the test below, ms.
const RAMP_MS: f64 = 10_000.0;
/// Calls sent early in the ramp, at most; and for at most this long (the share admitted grows with
/// time, 10 % at first and 55 % half-way, so the burst must stay in the ramp's early part).
const BURST_CALLS: usize = 100;
const BURST_TIME: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_ramp_admits_a_share_and_turns_the_rest_away_as_recovering() {
    let bed = TestBed::start(
        "recovery_ramp",
        &json!({
            "upstream_key": "header:x-tenant", "failure_threshold": 1, "success_threshold": 1,
            "open_timeout": "1s", "recovery_ramp": "10s", "health_path": HEALTH
        }),
    )
    .await
    .unwrap();
    let channel = bed.envoy.channel().await.unwrap();
    let tenant = [("x-tenant", "acme")];

    // Open, by one failure; wait out the open time without a call, so that every rejection counted
    // below is one of the ramp.
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    assert_upstream_answered(&call(&channel, "acme").await, "14");
    let (code, body) = health_of(&bed).await;
    let acme = entry(&body, "acme");
    assert_eq!((code, &acme["state"]), (503, &json!("open")), "{body}");
    let retry_after = acme["retry_after_ms"].as_u64().unwrap();
    bed.content.set_fault(Fault::Ok).await.unwrap();
    tokio::time::sleep(Duration::from_millis(retry_after + 150)).await;

    // The probe succeeds and closes the breaker: the ramp starts as its answer passes the filter.
    assert_upstream_answered(&call(&channel, "acme").await, "0");
    let closed = Instant::now();
    let (code, body) = health_of(&bed).await;
    let acme = entry(&body, "acme");
    assert_eq!((code, &acme["state"]), (200, &json!("closed")), "{body}");
    let admitting = acme["admitting"].as_f64().unwrap();
    assert!((0.1..1.0).contains(&admitting), "{body}");

    // A burst early in the ramp, gRPC and plain HTTP taking turns (one breaker: the same tenant).
    let (content_before, web_before) = (bed.content.requests(), bed.web.requests());
    let mut admitted = [0u64; 2];
    let mut refused = [0u64; 2];
    let burst = Instant::now();
    for i in 0..BURST_CALLS {
        if burst.elapsed() > BURST_TIME {
            break;
        }
        let sent = Instant::now();
        if i % 2 == 0 {
            let r = call(&channel, "acme").await;
            match marker(&r) {
                None => {
                    assert_upstream_answered(&r, "0");
                    admitted[0] += 1;
                }
                Some("recovering") => {
                    // Trailers-only UNAVAILABLE, with a pushback no longer than the ramp has left.
                    assert!(
                        r.status == 200
                            && r.header("content-type") == Some("application/grpc")
                            && r.body.is_empty()
                            && r.trailers.is_none(),
                        "not trailers-only: {r:?}"
                    );
                    assert_eq!(r.grpc_status(), Some("14"), "{r:?}");
                    assert_eq!(
                        r.header("grpc-message"),
                        Some("circuit breaker open for acme"),
                        "{r:?}"
                    );
                    let pushback: f64 = r
                        .header("grpc-retry-pushback-ms")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("no grpc-retry-pushback-ms: {r:?}"));
                    let left = RAMP_MS - ms_between(closed, sent) + CLOCK_SLACK_MS;
                    assert!(pushback >= 1.0 && pushback <= left, "left {left} ms: {r:?}");
                    refused[0] += 1;
                }
                Some(_) => panic!("unexpected answer in the ramp: {r:?}"),
            }
        } else {
            let r = bed.envoy.get_with("/page", &tenant).await.unwrap();
            match r.header("x-circuit-breaker") {
                None => {
                    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{r:?}");
                    admitted[1] += 1;
                }
                Some("recovering") => {
                    assert_eq!(
                        (r.status, r.header("retry-after")),
                        (503, Some("1")),
                        "{r:?}"
                    );
                    assert_eq!(
                        r.json().unwrap(),
                        json!({"error": "circuit breaker open", "upstream": "acme"})
                    );
                    refused[1] += 1;
                }
                Some(_) => panic!("unexpected answer in the ramp: {r:?}"),
            }
        }
    }
    let (admitted_all, refused_all) = (admitted[0] + admitted[1], refused[0] + refused[1]);
    let calls = admitted_all + refused_all;
    let share = admitted_all as f64 / calls as f64;
    eprintln!(
        "early in the ramp: admitted {admitted:?}, refused {refused:?} in {:?}",
        burst.elapsed()
    );
    // 10 % at first, rising 9 points a second on this ramp: far from none and far from all.
    assert!(
        calls >= 20 && (0.02..=0.5).contains(&share),
        "admitted {admitted_all} of {calls} calls early in the ramp (gRPC, HTTP: admitted {admitted:?}, refused \
         {refused:?})"
    );
    assert!(
        refused[0] > 0 && refused[1] > 0,
        "both kinds of answer: {refused:?}"
    );
    // The refused calls never reached an upstream.
    assert_eq!(
        (
            bed.content.requests() - content_before,
            bed.web.requests() - web_before
        ),
        (admitted[0], admitted[1])
    );

    let (code, body) = health_of(&bed).await;
    let acme = entry(&body, "acme");
    assert_eq!((code, &acme["state"]), (200, &json!("closed")), "{body}");
    let admitting = acme["admitting"].as_f64().unwrap();
    assert!(admitting > 0.0 && admitting < 1.0, "{body}");

    let m = bed.envoy.metrics().await.unwrap();
    let acme_metric = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("upstream", "acme")];
        labels.extend_from_slice(extra);
        m.value(name, &labels).unwrap_or(0.0)
    };
    assert_eq!(
        acme_metric("circuit_breaker_rejected_calls_total", &[]),
        refused_all as f64,
        "{}",
        m.dump("circuit_breaker")
    );
    assert_eq!(
        acme_metric("circuit_breaker_calls_total", &[("result", "success")]),
        (1 + admitted_all) as f64,
        "the probe and the admitted calls: {}",
        m.dump("circuit_breaker")
    );
    assert_eq!(
        acme_metric(
            "circuit_breaker_state_changes_total",
            &[("from_state", "half_open"), ("to_state", "closed")]
        ),
        1.0
    );
    assert_eq!(acme_metric("circuit_breaker_state", &[]), 0.0);

    // Once the ramp has run, every call is admitted again; the first one ends the ramp, which the log
    // reports like a state change.
    let ramp_end = closed + Duration::from_millis(RAMP_MS as u64 + 200);
    tokio::time::sleep_until(ramp_end.into()).await;
    let (content_before, web_before) = (bed.content.requests(), bed.web.requests());
    for _ in 0..10 {
        assert_upstream_answered(&call(&channel, "acme").await, "0");
        let r = bed.envoy.get_with("/page", &tenant).await.unwrap();
        assert_eq!(
            (r.status, r.header("x-circuit-breaker")),
            (200, None),
            "{r:?}"
        );
    }
    assert_eq!(
        (
            bed.content.requests() - content_before,
            bed.web.requests() - web_before
        ),
        (10, 10)
    );
    let (code, body) = health_of(&bed).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(entry(&body, "acme")["admitting"], 1.0, "{body}");
    let deadline = Instant::now() + BOUND;
    loop {
        let log = bed.envoy.log();
        let lines = [
            "upstream=acme from=half_open to=closed reason=probes_succeeded",
            "upstream=acme from=closed to=closed reason=recovery_ramp_ended",
        ];
        if lines.iter().all(|l| log.contains(l)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected {lines:?} in the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        bed.envoy
            .metric(
                "circuit_breaker_rejected_calls_total",
                &[("upstream", "acme")]
            )
            .await
            .unwrap(),
        refused_all as f64,
        "no call refused after the ramp"
    );
}
