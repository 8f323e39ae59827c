//! Chaos under load (section 1 of RELIABILITY.md): 16 concurrent gRPC clients while the upstream goes
//! down, hangs, resets and flaps. Every call gets an answer of the contract; the breaker opens, fails
//! fast and recovers; every call is counted exactly once (no outcome lost to CAS races between the
//! workers).

use super::*;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;

/// What the clients saw in one phase of the chaos run. A call belongs to the phase in which it was
/// sent, so a few calls at each boundary meet the next phase's fault.
#[derive(Debug, Default, Clone)]
struct Tally {
    ok: u64,
    rejected: u64,
    /// Upstream failures by gRPC code (no `x-circuit-breaker` marker).
    upstream: BTreeMap<String, u64>,
    /// Anything the contract does not allow, with a sample.
    unexpected: Vec<String>,
    /// Calls that got no answer within [`CALL_BOUND`].
    hung: u64,
}

impl Tally {
    fn total(&self) -> u64 {
        self.ok
            + self.rejected
            + self.upstream.values().sum::<u64>()
            + self.unexpected.len() as u64
            + self.hung
    }

    fn upstream_failures(&self) -> u64 {
        self.upstream.values().sum()
    }

    fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        self.rejected += other.rejected;
        for (k, v) in &other.upstream {
            *self.upstream.entry(k.clone()).or_default() += v;
        }
        self.unexpected.extend(other.unexpected.iter().cloned());
        self.hung += other.hung;
    }
}

/// Upstream failures the chaos faults can produce, as the client sees them: Envoy's 503 for a refused
/// connection or a reset stream, its 504 for a `call_timeout`, both mapped to UNAVAILABLE by the gRPC
/// client; UNAVAILABLE and INTERNAL answered by the demo service itself.
const UPSTREAM_CODES: [Code; 2] = [Code::Unavailable, Code::Internal];

/// The phases of the chaos run: the fault, and how long it is held. `Ok` phases are held until the
/// health endpoint reports every breaker closed again (bounded).
const CHAOS_PHASES: [(&str, Option<Fault>, u64); 9] = [
    ("steady", Some(Fault::Ok), 1_500),
    ("down", Some(Fault::Down), 3_000),
    ("recover after down", Some(Fault::Ok), 0),
    ("hang", Some(Fault::Hang), 3_000),
    ("recover after hang", Some(Fault::Ok), 0),
    ("reset", Some(Fault::Reset), 3_000),
    ("recover after reset", Some(Fault::Ok), 0),
    // Flapping: the fault changes every FLAP_MS (see FLAPS).
    ("flap", None, 6_000),
    ("final recovery", Some(Fault::Ok), 0),
];

const FLAP_MS: u64 = 300;

const FLAPS: [Fault; 6] = [
    Fault::Unavailable,
    Fault::Ok,
    Fault::Down,
    Fault::Internal,
    Fault::Ok,
    Fault::Reset,
];

/// How long an `Ok` phase may take to see every breaker closed: `open_timeout` (1 s) plus the probes,
/// with a wide margin for a loaded machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);

const CHAOS_CLIENTS: usize = 16;

const HEALTH: &str = "/health/circuit-breakers";

/// One chaos client: unary `GetPost` calls back to back on its own connection until `stop`.
async fn chaos_client(
    channel: Channel,
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Vec<Tally> {
    let mut tallies = vec![Tally::default(); CHAOS_PHASES.len()];
    let mut client = ContentServiceClient::new(channel);
    while !stop.load(Ordering::SeqCst) {
        let at = phase.load(Ordering::SeqCst);
        let tally = &mut tallies[at];
        // No grpc-timeout is sent and the bound is far above `call_timeout`: the client never cancels a
        // call (a cancelled call would be `ignored`, in no counter), Envoy always answers first.
        let call = client.get_post(e2e::pb::GetPostRequest {
            post_id: "1".into(),
        });
        match tokio::time::timeout(CALL_BOUND, call).await {
            Err(_) => tally.hung += 1,
            Ok(Ok(_)) => tally.ok += 1,
            Ok(Err(status)) if is_rejection(&status, "content") => tally.rejected += 1,
            Ok(Err(status))
                if UPSTREAM_CODES.contains(&status.code())
                    && meta(&status, "x-circuit-breaker").is_none() =>
            {
                *tally
                    .upstream
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
            }
            Ok(Err(status)) => tally.unexpected.push(format!("{status:?}")),
        }
    }
    tallies
}

/// content's state changes so far: closed→open, half_open→open, half_open→closed.
async fn state_changes(envoy: &Envoy) -> [f64; 3] {
    let m = envoy.metrics().await.unwrap();
    let change = |from: &str, to: &str| {
        m.sum(
            "circuit_breaker_state_changes_total",
            &[
                ("upstream", "content"),
                ("from_state", from),
                ("to_state", to),
            ],
        )
    };
    [
        change("closed", "open"),
        change("half_open", "open"),
        change("half_open", "closed"),
    ]
}

/// While a fault phase runs: whether the health endpoint said `degraded` with the breaker open.
async fn watch_health(envoy: &Envoy, until: Instant) -> bool {
    let mut seen_open = false;
    while Instant::now() < until {
        let (code, body) = health(envoy, HEALTH).await;
        if code == 503
            && body["status"] == "degraded"
            && health_entry(&body, "content").is_some_and(|b| b["state"] == "open")
        {
            seen_open = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen_open
}

/// Waits until the health endpoint says healthy (200, every breaker closed); false if it never does
/// within [`RECOVERY_BOUND`].
async fn wait_healthy(envoy: &Envoy) -> bool {
    let deadline = Instant::now() + RECOVERY_BOUND;
    while Instant::now() < deadline {
        let (code, body) = health(envoy, HEALTH).await;
        if code == 200 && body["status"] == "healthy" {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_under_load() {
    let _heavy = HEAVY.lock().await;
    let config = json!({
        "failure_threshold": 5, "window_size": 50, "minimum_requests": 20,
        "open_timeout": "1s", "half_open_max_requests": 2, "success_threshold": 3,
        "call_timeout": "300ms", "health_path": HEALTH
    });
    let bed = TestBed::start("chaos", &config).await.unwrap();
    // One call first, so the breaker exists before the load races to create it.
    let warm = bed.envoy.channel().await.unwrap();
    get_post(&warm, &[]).await.unwrap();
    let started = Instant::now();

    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    // One connection per client: the listener balances them over both Envoy workers.
    for _ in 0..CHAOS_CLIENTS {
        let channel = bed.envoy.channel().await.unwrap();
        clients.push(tokio::spawn(chaos_client(
            channel,
            Arc::clone(&phase),
            Arc::clone(&stop),
        )));
    }

    let mut degraded_seen = vec![false; CHAOS_PHASES.len()];
    let mut recovered = vec![true; CHAOS_PHASES.len()];
    // State changes of content's breaker in each phase: [closed->open, half_open->open, half_open->closed].
    let mut changes = vec![[0.0; 3]; CHAOS_PHASES.len()];
    for (i, (name, fault, hold_ms)) in CHAOS_PHASES.iter().enumerate() {
        let at_start = state_changes(&bed.envoy).await;
        phase.store(i, Ordering::SeqCst);
        let hold = Duration::from_millis(*hold_ms);
        match fault {
            Some(Fault::Ok) if *hold_ms == 0 => {
                bed.content.set_fault(Fault::Ok).await.unwrap();
                recovered[i] = wait_healthy(&bed.envoy).await;
                // A little steady traffic on the closed breaker before the next fault.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some(fault) => {
                bed.content.set_fault(*fault).await.unwrap();
                degraded_seen[i] = watch_health(&bed.envoy, Instant::now() + hold).await;
            }
            None => {
                let end = Instant::now() + hold;
                let mut flips = 0;
                while Instant::now() < end {
                    bed.content
                        .set_fault(FLAPS[flips % FLAPS.len()])
                        .await
                        .unwrap();
                    flips += 1;
                    tokio::time::sleep(Duration::from_millis(FLAP_MS)).await;
                }
            }
        }
        let at_end = state_changes(&bed.envoy).await;
        for (c, (end, start)) in changes[i].iter_mut().zip(at_end.iter().zip(at_start)) {
            *c = end - start;
        }
        println!(
            "chaos: phase {name} done at {:?}; opened {}, re-opened by a failed probe {}, closed {}",
            started.elapsed(),
            changes[i][0],
            changes[i][1],
            changes[i][2]
        );
    }
    stop.store(true, Ordering::SeqCst);
    let mut per_phase = vec![Tally::default(); CHAOS_PHASES.len()];
    for client in clients {
        for (i, t) in client.await.unwrap().iter().enumerate() {
            per_phase[i].merge(t);
        }
    }
    let duration = started.elapsed();
    let mut all = Tally::default();
    for (i, t) in per_phase.iter().enumerate() {
        println!(
            "chaos: {:<20} calls {:>6}  ok {:>6}  rejected {:>6}  upstream {:?}  hung {}  unexpected {}",
            CHAOS_PHASES[i].0,
            t.total(),
            t.ok,
            t.rejected,
            t.upstream,
            t.hung,
            t.unexpected.len()
        );
        all.merge(t);
    }
    let sent = all.total() + 1; // + the warm-up call

    // Every call got an answer of the contract, in time.
    assert_eq!(all.hung, 0, "calls without an answer within {CALL_BOUND:?}");
    assert!(
        all.unexpected.is_empty(),
        "{} answers outside the contract, e.g. {:?}",
        all.unexpected.len(),
        all.unexpected.iter().take(5).collect::<Vec<_>>()
    );
    // Each fault opened the breaker (the health endpoint said degraded) and it failed fast.
    for (i, (name, fault, _)) in CHAOS_PHASES.iter().enumerate() {
        if matches!(fault, Some(f) if *f != Fault::Ok) {
            assert!(degraded_seen[i], "phase {name}: health never said degraded");
            assert!(
                per_phase[i].rejected > 0,
                "phase {name}: no call failed fast"
            );
            assert!(
                per_phase[i].upstream_failures() > 0,
                "phase {name}: the fault was never seen"
            );
            // Held for longer than open_timeout: probes went through, met the fault, and re-opened it.
            assert!(
                changes[i][1] > 0.0,
                "phase {name}: no probe failed: {:?}",
                changes[i]
            );
        }
        assert!(recovered[i], "phase {name}: never healthy again");
    }
    assert!(per_phase[CHAOS_PHASES.len() - 1].ok > 0);

    // Every call was counted exactly once: recorded (success or failure) or rejected. A call settled in
    // `on_log` may be counted just after its client had the answer, hence the short wait.
    let mut m = bed.envoy.metrics().await.unwrap();
    for _ in 0..100 {
        if accounted(&m) as u64 == sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = bed.envoy.metrics().await.unwrap();
    }
    let success = m.sum(
        "circuit_breaker_calls_total",
        &[("upstream", "content"), ("result", "success")],
    );
    let failure = m.sum(
        "circuit_breaker_calls_total",
        &[("upstream", "content"), ("result", "failure")],
    );
    let rejected = m.sum("circuit_breaker_rejected_calls_total", &[]);
    let retries = global(&m, "circuit_breaker_cas_retries_total");
    println!(
        "chaos: {sent} calls in {duration:?} by {CHAOS_CLIENTS} clients: {} ok, {} rejected, {} upstream \
         failures; metrics: success {success}, failure {failure}, rejected {rejected}, untracked {}, \
         cas retries {retries}, cas give-ups {}",
        all.ok + 1,
        all.rejected,
        all.upstream_failures(),
        global(&m, "circuit_breaker_untracked_calls_total"),
        global(&m, "circuit_breaker_cas_give_ups_total"),
    );
    assert_eq!(
        accounted(&m) as u64,
        sent,
        "calls + rejected + untracked != calls sent\n{}",
        m.dump("circuit_breaker")
    );
    assert_eq!(
        global(&m, "circuit_breaker_cas_give_ups_total"),
        0.0,
        "updates lost to CAS races"
    );
    assert_eq!(global(&m, "circuit_breaker_untracked_calls_total"), 0.0);
    assert_eq!(global(&m, "circuit_breaker_corrupt_state_total"), 0.0);
    // And counted as what the client saw.
    assert_eq!(rejected as u64, all.rejected, "rejections");
    assert_eq!(success as u64, all.ok + 1, "successes");
    assert_eq!(failure as u64, all.upstream_failures(), "failures");
    assert_eq!(
        m.value("circuit_breaker_state", &[("upstream", "content")]),
        Some(0.0)
    );
    assert_no_trap(&bed.envoy);
}
