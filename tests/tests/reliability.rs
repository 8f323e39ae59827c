//! Reliability and security (issue 7): the built `.wasm` in a real Envoy (two workers) under load and
//! faults, through live reconfiguration, against hostile input and against foreign bytes in its shared
//! data. What each test holds and the figures measured are in RELIABILITY.md.
//!
//! - [`chaos_under_load`]: 16 concurrent gRPC clients while the upstream goes down, hangs, resets and
//!   flaps. Every call gets an answer of the contract; the breaker opens, fails fast and recovers; every
//!   call is counted exactly once (no outcome lost to CAS races between the workers).
//! - [`live_reconfiguration_keeps_state_and_refuses_a_bad_config`]: file-based LDS
//!   (`envoy/lds.yaml`); new filter configurations swapped in under load keep the breakers' state; bad
//!   ones are refused while the last good one keeps serving; no request fails.
//! - Hostile input: [`a_flood_of_distinct_keys_stays_bounded`] (100,000 `header:` keys),
//!   [`malformed_grpc_status_and_message_are_failures`] (a raw HTTP/2 upstream),
//!   [`thousands_of_overrides_load_and_apply`], [`deep_nesting_and_too_many_overrides_are_refused`],
//!   [`huge_configs_are_refused_in_a_short_line`].
//! - Corrupt shared data: [`corrupt_shared_data_fails_open_and_restarts`] and
//!   [`empty_bytes_under_a_breaker_key_are_corrupt_state`]: a second wasm module on the breaker's
//!   `vm_id` (`tests/fixtures/corruptor`) writes foreign bytes under the breaker's keys.
//!
//! Run with `make test-e2e` (it builds the filter and the corruptor fixture first), or, after those
//! builds, `ENVOY=/path/to/envoy cargo test -p circuit-breaker-e2e --test reliability`.

// Integration tests: clippy's allow-*-in-tests settings cover `#[test]` functions but not the helper
// functions of a test crate, and a failed `unwrap` in a helper is a failed test, as intended.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::pb::content_service_client::ContentServiceClient;
use e2e::pb::feed_service_client::FeedServiceClient;
use e2e::pb::user_service_client::UserServiceClient;
use e2e::{
    channel_to, health_entry, raw_grpc, workspace_root, Build, Envoy, Fault, GrpcService,
    HttpServer, Metrics, TestBed, UpstreamPorts, Upstreams,
};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::codegen::{http, Bytes};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Bound on one call through Envoy. Every upstream call of these tests ends well within it (refused,
/// reset, or cut by `call_timeout`), so reaching it means a hung call: a failure, never a wait.
const CALL_BOUND: Duration = Duration::from_secs(10);

/// The two heavy load tests take turns: on a two-core machine, two floods at once would only measure
/// the scheduler. The other tests run alongside them.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What Envoy logs when a wasm VM traps (`Function: proxy_on_... failed: Uncaught RuntimeError: ...`)
/// or the filter panics (its panic hook's line). None may ever appear. (Envoy's "Wasm VM failed" is
/// not one: it also says that when `on_configure` refuses a configuration, as designed.)
const TRAP_MARKERS: [&str; 3] = ["panicked", "Uncaught", "RuntimeError"];

// ---- small helpers -----------------------------------------------------------------------------

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(CALL_BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_BOUND:?}"))
}

/// Polls `f` until it returns true, at most `tries` times, 50 ms apart.
async fn eventually<F, Fut>(what: &str, tries: u32, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..tries {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn meta<'a>(status: &'a Status, name: &str) -> Option<&'a str> {
    status.metadata().get(name).and_then(|v| v.to_str().ok())
}

/// The breaker's rejection of contract section 4 (gRPC form), for upstream `key`.
fn is_rejection(status: &Status, key: &str) -> bool {
    status.code() == Code::Unavailable
        && matches!(
            meta(status, "x-circuit-breaker"),
            Some("open" | "half_open")
        )
        && status.message() == format!("circuit breaker open for {key}")
}

async fn get_post(channel: &Channel, metadata: &[(&'static str, &str)]) -> Result<(), Status> {
    let mut client = ContentServiceClient::new(channel.clone());
    let mut request = tonic::Request::new(e2e::pb::GetPostRequest {
        post_id: "1".into(),
    });
    for (k, v) in metadata {
        request.metadata_mut().insert(*k, v.parse().unwrap());
    }
    bounded("GetPost", client.get_post(request))
        .await
        .map(|_| ())
}

async fn get_user(channel: &Channel) -> Result<(), Status> {
    let mut client = UserServiceClient::new(channel.clone());
    let request = e2e::pb::GetUserRequest {
        user_id: "u".into(),
    };
    bounded("GetUser", client.get_user(request))
        .await
        .map(|_| ())
}

async fn get_feed(channel: &Channel) -> Result<(), Status> {
    let mut client = FeedServiceClient::new(channel.clone());
    let request = e2e::pb::GetFeedRequest {
        user_id: "u".into(),
        limit: 1,
    };
    bounded("GetFeed", client.get_feed(request))
        .await
        .map(|_| ())
}

/// The health endpoint: status code and JSON.
async fn health(envoy: &Envoy, path: &str) -> (u16, Value) {
    e2e::health(envoy, path).await.unwrap()
}

/// Calls let through and recorded + calls rejected + calls untracked: every call the filter admitted
/// or refused, each exactly once (health requests and the corruptor's replies are neither).
fn accounted(m: &Metrics) -> f64 {
    m.sum("circuit_breaker_calls_total", &[])
        + m.sum("circuit_breaker_rejected_calls_total", &[])
        + m.value("circuit_breaker_untracked_calls_total", &[])
            .unwrap_or(0.0)
}

fn global(m: &Metrics, name: &str) -> f64 {
    m.value(name, &[]).unwrap_or(0.0)
}

/// Fails if Envoy's log shows a trapped VM or a panicking filter.
#[track_caller]
fn assert_no_trap(envoy: &Envoy) {
    let log = envoy.log();
    for marker in TRAP_MARKERS {
        if let Some(line) = log.lines().find(|l| l.contains(marker)) {
            panic!(
                "the filter trapped ({marker}): {line}\nlog: {}",
                envoy.log_path().display()
            );
        }
    }
}

fn run_dir(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("e2e")
        .join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Admin `/memory`: tcmalloc's `allocated` bytes (Envoy's own heap; the wasm VMs' memory is not in it).
async fn heap_allocated(envoy: &Envoy) -> u64 {
    let body = envoy.admin_get("/memory").await.unwrap().json().unwrap();
    body["allocated"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| body["allocated"].as_u64())
        .unwrap_or(0)
}

// ---- 1. chaos under load -----------------------------------------------------------------------

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

// ---- file-based LDS (live reconfiguration, corruptor) -------------------------------------------

/// The demo services behind an Envoy whose listener comes from a file (`envoy/lds.yaml`).
struct LdsBed {
    user: GrpcService,
    content: GrpcService,
    feed: GrpcService,
    _auth: GrpcService,
    _web: HttpServer,
    envoy: Envoy,
    /// The listener template (`envoy/lds-listener*.yaml`, for the build under test).
    template: String,
    /// The file Envoy watches.
    lds: PathBuf,
    version: u32,
}

/// The corruptor fixture: `CB_CORRUPTOR_WASM`, else where `make test-e2e` builds it.
fn corruptor_path() -> PathBuf {
    let path = std::env::var_os("CB_CORRUPTOR_WASM")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || workspace_root().join("target/fixtures/wasm32-wasip1/release/corruptor.wasm"),
            PathBuf::from,
        );
    assert!(
        path.is_file(),
        "no corruptor fixture at {}: run `make test-e2e`, or `cargo build --manifest-path \
         tests/fixtures/corruptor/Cargo.toml --target wasm32-wasip1 --release --target-dir target/fixtures`",
        path.display()
    );
    path
}

/// Renders a listener template with `filter_config` (and the paths of the built modules).
fn render_listener(template: &str, version: u32, filter_config: &str) -> String {
    let text = fs::read_to_string(workspace_root().join(template)).unwrap();
    let wasm = e2e::wasm_path().unwrap();
    let mut rendered = text
        .replace("{{VERSION}}", &version.to_string())
        .replace("{{WASM_PATH}}", wasm.to_str().unwrap())
        // A JSON string is a valid YAML double-quoted scalar.
        .replace(
            "{{FILTER_CONFIG}}",
            &Value::String(filter_config.to_string()).to_string(),
        );
    if rendered.contains("{{CORRUPTOR_PATH}}") {
        rendered = rendered.replace("{{CORRUPTOR_PATH}}", corruptor_path().to_str().unwrap());
    }
    assert!(
        !rendered.contains("{{"),
        "unfilled placeholder in {template}"
    );
    rendered
}

/// Writes `content` to `path` the way Envoy wants it: a complete file renamed over the watched one.
fn replace_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("yaml.tmp");
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, path).unwrap();
}

impl LdsBed {
    /// Starts with the listener `template`, in its twin for the build under test.
    async fn start(name: &str, template: &str, filter_config: &Value) -> Self {
        let template = Build::from_env().template(template);
        let upstreams = Upstreams::start().await.unwrap();
        let ports = upstreams.ports();
        let lds = run_dir(name).join("lds.yaml");
        replace_atomically(
            &lds,
            &render_listener(&template, 1, &filter_config.to_string()),
        );
        let envoy = Envoy::start_with(
            name,
            "envoy/lds.yaml",
            &ports,
            &filter_config.to_string(),
            &[("LDS_PATH", lds.to_str().unwrap())],
        )
        .await
        .unwrap();
        let Upstreams {
            user,
            content,
            feed,
            auth,
            web,
        } = upstreams;
        Self {
            user,
            content,
            feed,
            _auth: auth,
            _web: web,
            envoy,
            template,
            lds,
            version: 1,
        }
    }

    async fn lds_counter(&self, which: &str) -> f64 {
        let m = self.envoy.metrics().await.unwrap();
        global(&m, &format!("envoy_listener_manager_lds_{which}"))
    }

    /// Publishes a new filter configuration and waits until Envoy has taken (`update_success`) or
    /// refused (`update_rejected`) it, as `expect` says.
    async fn publish(&mut self, filter_config: &str, expect: &str) {
        let before = self.lds_counter(expect).await;
        self.version += 1;
        replace_atomically(
            &self.lds,
            &render_listener(&self.template, self.version, filter_config),
        );
        let what = format!("lds {expect} after version {}", self.version);
        eventually(&what, 400, || async {
            self.lds_counter(expect).await > before
        })
        .await;
    }

    /// `version_info` of the listener configuration Envoy serves (the `lds.version_text` readout).
    async fn listener_version(&self) -> String {
        let stats = self
            .envoy
            .admin_get("/stats?filter=lds.version_text")
            .await
            .unwrap()
            .body;
        stats
            .lines()
            .find_map(|l| l.strip_prefix("listener_manager.lds.version_text:"))
            .map(|v| v.trim().trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("no lds.version_text in {stats}"))
    }
}

// ---- 2. live reconfiguration -------------------------------------------------------------------

/// What the load of the reconfiguration test saw: calls, and calls that did not get the answer they
/// should have.
#[derive(Debug, Default)]
struct Load {
    calls: AtomicU64,
    wrong: std::sync::Mutex<Vec<String>>,
}

impl Load {
    fn wrong(&self, what: String) {
        self.wrong.lock().unwrap().push(what);
    }
}

/// A client of the reconfiguration test: `GetUser` (healthy, must succeed) and `GetPost` (its breaker
/// is open, must be rejected), on a new connection every 25 calls so new connections keep meeting the
/// newest configuration while old ones drain.
async fn reconfig_client(addr: SocketAddr, load: Arc<Load>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let channel = channel_to(addr, None).await.unwrap();
        for _ in 0..25 {
            load.calls.fetch_add(2, Ordering::SeqCst);
            if let Err(status) = get_user(&channel).await {
                load.wrong(format!("GetUser: {status:?}"));
            }
            match get_post(&channel, &[]).await {
                Err(status) if is_rejection(&status, "content") => {}
                other => load.wrong(format!("GetPost not rejected: {other:?}")),
            }
        }
    }
}

/// Good configurations swapped in, one after the other, in the reconfiguration test.
const RECONFIG_GOOD_VERSIONS: u32 = 4;
/// Calls the load makes between two steps of the reconfiguration test.
const RECONFIG_CALLS_BETWEEN: u64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reconfiguration_keeps_state_and_refuses_a_bad_config() {
    let v1 = json!({"failure_threshold": 3, "open_timeout": "60s", "health_path": "/health"});
    let mut bed = LdsBed::start("reconfig", "envoy/lds-listener.yaml", &v1).await;
    let mut sent = 0u64;
    let channel = bed.envoy.channel().await.unwrap();

    // content's breaker opens.
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        let status = get_post(&channel, &[]).await.unwrap_err();
        assert!(!is_rejection(&status, "content"), "{status:?}");
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");
    get_feed(&channel).await.unwrap();
    sent += 5;
    let (_, before) = health(&bed.envoy, "/health").await;
    let retry_before = health_entry(&before, "content").unwrap()["retry_after_ms"]
        .as_u64()
        .unwrap();
    let m0 = bed.envoy.metrics().await.unwrap();

    // Load on both workers for the whole test.
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<JoinHandle<()>> = (0..4)
        .map(|_| {
            tokio::spawn(reconfig_client(
                bed.envoy.listener(),
                Arc::clone(&load),
                Arc::clone(&stop),
            ))
        })
        .collect();
    let wait_load = |more: u64| {
        let load = Arc::clone(&load);
        async move {
            let from = load.calls.load(Ordering::SeqCst);
            eventually("load", 600, || async {
                load.calls.load(Ordering::SeqCst) >= from + more
            })
            .await;
        }
    };
    wait_load(RECONFIG_CALLS_BETWEEN).await;

    // New configurations, one after the other under load: another threshold each time, an override
    // that forces `feed` open, and one more override that changes with the version.
    let mut retry_before = retry_before;
    for version in 2..=RECONFIG_GOOD_VERSIONS + 1 {
        let config = json!({
            "failure_threshold": 8 + version, "open_timeout": "60s", "health_path": "/health",
            "upstreams": {"feed": {"mode": "forced_open"}, format!("extra-{version}"): {"failure_threshold": 1}}
        });
        bed.publish(&config.to_string(), "update_success").await;
        assert_eq!(bed.listener_version().await, version.to_string());
        // New connections get it: feed is rejected (the forced opening), ...
        let mut fresh_feed_calls = 0;
        eventually("the new configuration on new connections", 200, || {
            fresh_feed_calls += 1;
            let addr = bed.envoy.listener();
            async move {
                let channel = channel_to(addr, None).await.unwrap();
                matches!(get_feed(&channel).await, Err(s) if is_rejection(&s, "feed"))
            }
        })
        .await;
        sent += fresh_feed_calls;
        // ... while content's breaker kept its state: still open, in the same open period (not
        // restarted, nor re-opened), with the failures it had.
        let fresh = channel_to(bed.envoy.listener(), None).await.unwrap();
        let status = get_post(&fresh, &[]).await.unwrap_err();
        assert!(is_rejection(&status, "content"), "{status:?}");
        sent += 1;
        let (code, after) = health(&bed.envoy, "/health").await;
        assert_eq!(code, 503, "{after}");
        let content = health_entry(&after, "content").unwrap();
        assert_eq!(content["state"], "open", "{after}");
        assert_eq!(content["consecutive_failures"], 3, "{after}");
        let retry_after = content["retry_after_ms"].as_u64().unwrap();
        assert!(
            retry_after < retry_before,
            "version {version}: the open period restarted: {retry_before} ms left before, {retry_after} ms after"
        );
        retry_before = retry_after;
        assert_eq!(bed.content.requests(), 3, "content was called while open");
        wait_load(RECONFIG_CALLS_BETWEEN).await;
    }
    assert!(bed.envoy.log().contains("overrides=2"));
    let last_good = (RECONFIG_GOOD_VERSIONS + 1).to_string();

    // Bad configurations: each refused (Envoy NACKs the whole update), naming the problem, while the
    // last good one keeps serving.
    let bad = [
        (
            json!({"error_rate_threshold": 2, "health_path": "/health"}).to_string(),
            "error_rate_threshold must be a number in (0, 1], got 2",
        ),
        ("{not json".to_string(), "must be a JSON object"),
    ];
    for (config, names) in bad {
        bed.publish(&config, "update_rejected").await;
        let log = bed.envoy.log();
        assert!(
            log.lines()
                .filter(|l| l.contains("circuit breaker configuration rejected"))
                .any(|l| l.contains(names)),
            "no rejection line naming {names:?}; log: {}",
            bed.envoy.log_path().display()
        );
        assert_eq!(bed.listener_version().await, last_good);
        let fresh = channel_to(bed.envoy.listener(), None).await.unwrap();
        let status = get_feed(&fresh).await.unwrap_err();
        assert!(is_rejection(&status, "feed"), "{status:?}");
        get_user(&fresh).await.unwrap();
        sent += 2;
        wait_load(RECONFIG_CALLS_BETWEEN / 2).await;
    }

    // More load on the surviving configuration, then stop.
    wait_load(RECONFIG_CALLS_BETWEEN).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let wrong = load.wrong.lock().unwrap().clone();
    let load_calls = load.calls.load(Ordering::SeqCst);
    sent += load_calls;
    assert!(
        wrong.is_empty(),
        "{} of {load_calls} calls under reconfiguration got a wrong answer, e.g. {:?}",
        wrong.len(),
        wrong.iter().take(5).collect::<Vec<_>>()
    );

    // Counters continued through both updates (stats are global by name, the state is in shared data).
    let m = bed.envoy.metrics().await.unwrap();
    let user_ok = [("upstream", "user"), ("result", "success")];
    let rejected_content = [("upstream", "content")];
    assert!(m.sum("circuit_breaker_calls_total", &user_ok) > 0.0);
    assert!(
        m.sum("circuit_breaker_rejected_calls_total", &rejected_content)
            > m0.sum("circuit_breaker_rejected_calls_total", &rejected_content)
    );
    assert_eq!(
        m.value(
            "circuit_breaker_open_total",
            &[("upstream", "content"), ("reason", "consecutive_failures")]
        ),
        Some(1.0),
        "content re-opened: its state was lost"
    );
    assert_eq!(bed.content.requests(), 3);
    assert!(bed.user.requests() > 0 && bed.feed.requests() == 1);
    eventually("every call accounted", 100, || {
        let envoy = &bed.envoy;
        async move { accounted(&envoy.metrics().await.unwrap()) as u64 == sent }
    })
    .await;
    assert_eq!(global(&m, "circuit_breaker_cas_give_ups_total"), 0.0);
    println!(
        "reconfiguration: {sent} calls ({load_calls} under load by 4 clients on fresh connections every 25 \
         calls), 0 wrong; lds update_success {}, update_rejected {}",
        bed.lds_counter("update_success").await,
        bed.lds_counter("update_rejected").await
    );
    assert_no_trap(&bed.envoy);
}

// ---- 3. hostile input --------------------------------------------------------------------------

const FLOOD_KEYS: usize = 100_000;
const FLOOD_MAX_UPSTREAMS: usize = 64;
/// Keep-alive HTTP/1.1 connections, each sending its requests pipelined in batches: the cheapest
/// client there is, so the flood measures Envoy and not the (debug-built) test client.
const FLOOD_CONNECTIONS: usize = 16;
const FLOOD_BATCH: usize = 50;

/// One response read off a pipelined connection: its status, and how many bytes it took.
fn parse_one(buf: &[u8]) -> Option<(u16, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some((status, head_end + length))
}

/// Sends `GET /flood` once for each tenant in `tenants` over one connection, `FLOOD_BATCH` requests
/// pipelined at a time. Returns the statuses that were not 200.
async fn flood_connection(addr: SocketAddr, tenants: Vec<usize>) -> Vec<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut not_ok = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    for batch in tenants.chunks(FLOOD_BATCH) {
        let mut requests = String::with_capacity(batch.len() * 80);
        for n in batch {
            requests.push_str(&format!(
                "GET /flood HTTP/1.1\r\nhost: flood\r\nx-tenant: tenant-{n}\r\n\r\n"
            ));
        }
        stream.write_all(requests.as_bytes()).await.unwrap();
        let mut answered = 0;
        while answered < batch.len() {
            while let Some((status, used)) = parse_one(&buf) {
                buf.drain(..used);
                answered += 1;
                if status != 200 {
                    not_ok.push(status);
                }
            }
            if answered == batch.len() {
                break;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = bounded("pipelined responses", stream.read(&mut chunk))
                .await
                .unwrap();
            assert!(n > 0, "Envoy closed a flood connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    not_ok
}

/// One request for each tenant in `range`, spread over `FLOOD_CONNECTIONS` connections.
async fn flood(addr: SocketAddr, range: std::ops::Range<usize>) -> Vec<u16> {
    let tasks: Vec<_> = (0..FLOOD_CONNECTIONS)
        .map(|c| {
            let tenants: Vec<usize> = range.clone().skip(c).step_by(FLOOD_CONNECTIONS).collect();
            tokio::spawn(flood_connection(addr, tenants))
        })
        .collect();
    let mut not_ok = Vec::new();
    for task in tasks {
        not_ok.extend(task.await.unwrap());
    }
    not_ok
}

/// One Envoy labels at most this many upstream keys (contract section 6).
const FLOOD_LABELS: usize = 4 * FLOOD_MAX_UPSTREAMS;
/// More than `idle_timeout` (1 s): every breaker is idle after it.
const IDLE: Duration = Duration::from_millis(1_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_keys_stays_bounded() {
    let _heavy = HEAVY.lock().await;
    let config = json!({
        "upstream_key": "header:x-tenant", "max_upstreams": FLOOD_MAX_UPSTREAMS,
        "idle_timeout": "1s", "failure_threshold": 5, "open_timeout": "30s", "health_path": "/health"
    });
    let bed = TestBed::start("key_flood", &config).await.unwrap();
    let addr = bed.envoy.listener();
    let pid = bed.envoy.pid();

    // A first batch fills the table and warms everything up (connections, pools, the VMs' heaps).
    // Then every breaker idles past idle_timeout, so the second batch's first keys evict them all
    // (and later ones evict whatever idled meanwhile).
    let first = 2_000;
    let started = Instant::now();
    let mut not_ok = flood(addr, 0..first).await;
    let (rss_first, heap_first) = (rss_kib(pid), heap_allocated(&bed.envoy).await);
    tokio::time::sleep(IDLE).await;
    not_ok.extend(flood(addr, first..FLOOD_KEYS).await);
    let elapsed = started.elapsed();
    let (rss_all, heap_all) = (rss_kib(pid), heap_allocated(&bed.envoy).await);
    // Past 4 x max_upstreams labelled keys when the flood was too quick to get there: waves of
    // max_upstreams new keys, each after the table idled, each evicting breakers (all of them, less
    // the races two new keys lose over one idle slot). 16 waves are four times what that takes.
    let mut keys = FLOOD_KEYS;
    for _ in 0..16 {
        let m = bed.envoy.metrics().await.unwrap();
        if m.sum("circuit_breaker_calls_total", &[("upstream", "_other")]) > 0.0 {
            break;
        }
        tokio::time::sleep(IDLE).await;
        not_ok.extend(flood(addr, keys..keys + FLOOD_MAX_UPSTREAMS).await);
        keys += FLOOD_MAX_UPSTREAMS;
    }
    assert!(
        not_ok.is_empty(),
        "{} requests were not answered 200, e.g. {:?}",
        not_ok.len(),
        &not_ok[..not_ok.len().min(5)]
    );

    // Bounded: max_upstreams breakers at a time. A key had a breaker when it found an empty slot (the
    // first 64) or evicted an idle one; every other key passed untracked and was counted.
    let (code, body) = health(&bed.envoy, "/health").await;
    assert_eq!(code, 200, "{body}");
    let listed = body["circuit_breakers"].as_array().unwrap().len();
    assert_eq!(listed, FLOOD_MAX_UPSTREAMS, "{body}");
    let m = bed.envoy.metrics().await.unwrap();
    let untracked = global(&m, "circuit_breaker_untracked_calls_total") as usize;
    let recorded = m.sum("circuit_breaker_calls_total", &[]) as usize;
    let evicted = global(&m, "circuit_breaker_evicted_total") as usize;
    assert!(
        evicted >= FLOOD_MAX_UPSTREAMS,
        "the second batch evicts the first one's {FLOOD_MAX_UPSTREAMS} idle breakers: evicted \
         {evicted}"
    );
    assert_eq!(recorded, FLOOD_MAX_UPSTREAMS + evicted);
    assert_eq!(recorded + untracked, keys);
    assert_eq!(bed.web.requests() as usize, keys);
    // Metrics are labelled with 4 x max_upstreams keys at most, in every series with an upstream
    // label; calls of further keys are counted as _other, and the first such key is logged once.
    let labelled: std::collections::BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|s| s.name.starts_with("circuit_breaker_"))
        .filter_map(|s| s.labels.get("upstream").map(String::as_str))
        .filter(|u| *u != "_other")
        .collect();
    assert_eq!(labelled.len(), FLOOD_LABELS, "{evicted} evicted");
    let other = m.sum("circuit_breaker_calls_total", &[("upstream", "_other")]) as usize;
    assert_eq!(other, recorded - FLOOD_LABELS);
    let told = bed
        .envoy
        .log()
        .lines()
        .filter(|l| l.contains("counted as upstream=_other"))
        .count();
    assert_eq!(told, 1, "the first key past the label limit is logged once");

    // Flat memory: 98,000 keys after the first batch. Had the filter kept anything per key (a string
    // and a map entry are ~100 bytes, twice for two workers), it would show as ~20 MB; what a busy
    // Envoy moves by itself, and the series of the at most 192 keys labelled after the first batch,
    // are well under the bound.
    let growth_kib = rss_all.saturating_sub(rss_first);
    println!(
        "key flood: {FLOOD_KEYS} keys in {elapsed:?} (with a {IDLE:?} pause) over \
         {FLOOD_CONNECTIONS} HTTP/1.1 connections ({FLOOD_BATCH} pipelined at a time); RSS \
         {rss_first} KiB after {first} keys, {rss_all} KiB after all (+{growth_kib} KiB); Envoy \
         heap {heap_first} -> {heap_all} bytes; evicted {evicted}, untracked {untracked}, _other \
         {other}"
    );
    assert!(
        growth_kib < 4 * 1024,
        "RSS grew by {growth_kib} KiB over {} new keys",
        FLOOD_KEYS - first
    );

    // Still a working breaker for a tracked key. And once the flood idled out, a new key gets a
    // breaker of its own (evicting an idle one) that opens too: junk keys cannot keep a real
    // upstream from its breaker.
    tokio::time::sleep(IDLE).await;
    bed.web.set_fault(Fault::Unavailable).await.unwrap();
    let tracked = body["circuit_breakers"][0]["upstream"]
        .as_str()
        .unwrap()
        .to_string();
    let page = async |tenant: &str| {
        bed.envoy
            .get_with("/page", &[("x-tenant", tenant)])
            .await
            .unwrap()
    };
    for tenant in [tracked.as_str(), "after-the-flood"] {
        for _ in 0..5 {
            let r = page(tenant).await;
            assert_eq!(
                (r.status, r.header("x-circuit-breaker")),
                (503, None),
                "{r:?}"
            );
        }
        let r = page(tenant).await;
        assert_eq!(
            r.header("x-circuit-breaker"),
            Some("open"),
            "{tenant}: {r:?}"
        );
    }
    assert_eq!(
        global(
            &bed.envoy.metrics().await.unwrap(),
            "circuit_breaker_evicted_total"
        ) as usize,
        evicted + 1,
        "after-the-flood took an idle breaker's slot"
    );
    assert_no_trap(&bed.envoy);
}

/// How the raw upstream answers one case: the `grpc-status` and `grpc-message` bytes to send (`None`:
/// leave the field out), and what the breaker must make of it.
struct Case {
    name: &'static str,
    grpc_status: Option<&'static [u8]>,
    grpc_message: Option<Vec<u8>>,
    failure: bool,
}

fn malformed_cases() -> Vec<Case> {
    let case = |name, status: Option<&'static [u8]>, message: Option<Vec<u8>>, failure| Case {
        name,
        grpc_status: status,
        grpc_message: message,
        failure,
    };
    vec![
        case("ok", Some(b"0"), None, false),
        case("alpha", Some(b"abc"), None, true),
        case("too-long", Some(b"99999"), None, true),
        case("beyond-16", Some(b"999"), None, true),
        case("negative", Some(b"-1"), None, true),
        case("empty", Some(b""), None, true),
        case("spaces", Some(b" 0 "), None, true),
        case("non-ascii", Some(b"\xff\xfe0"), None, true),
        case("missing", None, None, true),
        case(
            "long-message-ok",
            Some(b"0"),
            Some(vec![b'm'; 10 * 1024]),
            false,
        ),
        case(
            "long-message-fail",
            Some(b"14"),
            Some(vec![b'm'; 10 * 1024]),
            true,
        ),
        case(
            "binary-message",
            Some(b"13"),
            Some((0x80..=0xffu8).cycle().take(4096).collect()),
            true,
        ),
        // Past Envoy's limit on an upstream response's headers (60 KiB): Envoy resets the upstream
        // stream, and that is a failure whatever the status claimed.
        case(
            "oversized-message",
            Some(b"0"),
            Some(vec![b'm'; 100 * 1024]),
            true,
        ),
    ]
}

/// Forms of a gRPC response: status in trailers after a message, or in the headers alone.
const FORMS: [&str; 2] = ["trailers", "trailers-only"];

/// A raw HTTP/2 upstream: answers each call as `x-case: <case>/<form>` says, with any bytes as
/// `grpc-status` and `grpc-message` (tonic's server would never send a malformed status).
async fn start_raw_upstream() -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((socket, _)) => {
                    tokio::spawn(serve_raw_connection(socket));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    (port, task)
}

async fn serve_raw_connection(socket: TcpStream) {
    let Ok(mut connection) = h2::server::handshake(socket).await else {
        return;
    };
    // Accepting drives the connection; each stream is answered on its own task.
    while let Some(Ok((request, respond))) = connection.accept().await {
        tokio::spawn(answer_raw(request, respond));
    }
}

async fn answer_raw(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let case_header = request
        .headers()
        .get("x-case")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("ok/trailers")
        .to_string();
    // Read the request to its end (and give the flow-control window back).
    let mut body = request.into_body();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let (name, form) = case_header.split_once('/').unwrap_or(("ok", "trailers"));
    let cases = malformed_cases();
    let Some(case) = cases.iter().find(|c| c.name == name) else {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    let mut fields = http::HeaderMap::new();
    if let Some(status) = case.grpc_status {
        fields.insert(
            "grpc-status",
            http::HeaderValue::from_bytes(status).unwrap(),
        );
    }
    if let Some(message) = &case.grpc_message {
        fields.insert(
            "grpc-message",
            http::HeaderValue::from_bytes(message).unwrap(),
        );
    }
    let mut response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    if form == "trailers-only" {
        for (k, v) in &fields {
            response = response.header(k, v);
        }
        let _ = respond.send_response(response.body(()).unwrap(), true);
        return;
    }
    let Ok(mut stream) = respond.send_response(response.body(()).unwrap(), false) else {
        return;
    };
    // One empty message (an empty protobuf is a valid `Post`): flag 0, length 0.
    let _ = stream.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false);
    if fields.is_empty() {
        // A trailers frame must carry something: one field that is not a status.
        fields.insert("x-no-status", http::HeaderValue::from_static("1"));
    }
    let _ = stream.send_trailers(fields);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_status_and_message_are_failures() {
    let (port, _upstream) = start_raw_upstream().await;
    let ports = UpstreamPorts {
        user: 1,
        content: port,
        feed: 3,
        auth: 4,
        web: 5,
    };
    // One breaker per case (the key is the x-case header); nothing ever opens (thresholds out of reach),
    // so every call reaches the upstream and is recorded.
    let config =
        json!({"upstream_key": "header:x-case", "failure_threshold": 0, "minimum_requests": 100});
    let envoy = Envoy::start("malformed", &ports, &config.to_string())
        .await
        .unwrap();
    let channel = envoy.channel().await.unwrap();
    let message = e2e::pb::GetPostRequest {
        post_id: "1".into(),
    };
    let path = "/social.v1.ContentService/GetPost";
    for case in malformed_cases() {
        for form in FORMS {
            let key = format!("{}/{form}", case.name);
            let answer = raw_grpc(&channel, path, &[("x-case", &key)], &message).await;
            // What reaches the client is Envoy's business; only its arrival (no hang) matters here.
            let summary = match &answer {
                Ok(r) => format!(
                    "HTTP {} grpc-status {:?} ({} bytes of grpc-message)",
                    r.status,
                    r.grpc_status(),
                    r.trailers
                        .as_ref()
                        .and_then(|t| t.get("grpc-message"))
                        .or_else(|| r.headers.get("grpc-message"))
                        .map_or(0, |v| v.len())
                ),
                Err(e) => format!("error: {e}"),
            };
            println!("malformed: {key:<34} -> {summary}");
        }
    }
    // A well-formed call after all of them: the filter still serves (and counts).
    let after = raw_grpc(&channel, path, &[("x-case", "ok/after")], &message)
        .await
        .unwrap();
    assert_eq!(after.grpc_status(), Some("0"), "{after:?}");

    let mut m = envoy.metrics().await.unwrap();
    let expected_calls = (malformed_cases().len() * FORMS.len() + 1) as f64;
    for _ in 0..100 {
        if m.sum("circuit_breaker_calls_total", &[]) >= expected_calls {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = envoy.metrics().await.unwrap();
    }
    let mut wrong = Vec::new();
    for case in malformed_cases() {
        for form in FORMS {
            let key = format!("{}/{form}", case.name);
            let result = if case.failure { "failure" } else { "success" };
            let got = m.value(
                "circuit_breaker_calls_total",
                &[("upstream", key.as_str()), ("result", result)],
            );
            if got != Some(1.0) {
                wrong.push(format!("{key}: expected one {result}, got {got:?}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{wrong:#?}\n{}",
        m.dump("circuit_breaker_calls")
    );
    assert_eq!(m.sum("circuit_breaker_calls_total", &[]), expected_calls);
    assert_no_trap(&envoy);
}

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

// ---- 4. corrupt shared data ----------------------------------------------------------------------

/// The shared-data key of `upstream`'s slot in the default table (`max_upstreams` 1024): its home slot,
/// where the first upstream of a fresh table always lands.
fn slot_key(upstream: &str) -> String {
    let table = cb_core::store::SharedData::new(cb_core::store::MemoryStore::new(), 1024);
    table.slot_key(cb_core::registry::home_slot(upstream, 1024))
}

/// How many bytes `upstream`'s slot takes with a count window of 100, as the corruptor reports it.
fn slot_len(upstream: &str) -> String {
    let slot = cb_core::store::Slot {
        key: upstream.to_string(),
        last_call_ms: 0,
        shaped_ms: 0,
        breaker: cb_core::breaker::Breaker::new(&cb_core::config::BreakerConfig::default()),
    };
    cb_core::codec::encode_slot(Some(&slot)).len().to_string()
}

/// A slot of `upstream` whose breaker part is `breaker_hex`, as hex.
fn slot_hex(upstream: &str, breaker_hex: &str) -> String {
    let mut hex = format!("cb5302{:04x}", (upstream.len() as u16).swap_bytes());
    for b in upstream.bytes() {
        hex.push_str(&format!("{b:02x}"));
    }
    hex.push_str(&"00".repeat(16));
    hex.push_str(breaker_hex);
    hex
}

/// Overwrites shared-data `key` through the corruptor with `hex` bytes (`repeat` times); returns the
/// length of what was there before (`none` if nothing).
async fn corrupt(envoy: &Envoy, key: &str, hex: &str, repeat: usize) -> String {
    let repeat = repeat.to_string();
    let r = envoy
        .get_with(
            "/corrupt",
            &[
                ("x-corrupt-key", key),
                ("x-corrupt-hex", hex),
                ("x-corrupt-repeat", &repeat),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("x-corrupt-written").is_some(), "{r:?}");
    r.header("x-corrupt-previous-len").unwrap().to_string()
}

/// The corruptor writes into shared data, which only the wasm build keeps its breakers in: for the
/// native build (breakers in the module's own memory, out of any other module's reach) the test says
/// so in one line and passes.
fn skipped_natively() -> bool {
    let native = Build::from_env() == Build::Native;
    if native {
        println!("not for the native build: its breakers live in process memory, not in shared data a second module could write");
    }
    native
}

async fn corrupted(envoy: &Envoy) -> f64 {
    global(
        &envoy.metrics().await.unwrap(),
        "circuit_breaker_corrupt_state_total",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_shared_data_fails_open_and_restarts() {
    if skipped_natively() {
        return;
    }
    let config = json!({"failure_threshold": 3, "open_timeout": "60s", "health_path": "/health"});
    let bed = LdsBed::start("corrupt", "envoy/lds-listener-corruptor.yaml", &config).await;
    let envoy = &bed.envoy;
    let channel = envoy.channel().await.unwrap();
    let state_key = slot_key("content");

    // content's breaker opens.
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        get_post(&channel, &[]).await.unwrap_err();
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");
    assert_eq!(bed.content.requests(), 3);

    // Foreign bytes under its key. The corruptor, another module with the same vm_id, found the
    // breaker's own slot there: Envoy's shared data is per vm_id, not per module.
    let previous = corrupt(envoy, &state_key, "deadbeef", 1).await;
    assert_eq!(
        previous,
        slot_len("content"),
        "the corruptor does not see the breaker's data"
    );
    // The health endpoint cannot tell that breaker's state, so it claims nothing: 503, unknown.
    let (code, body) = health(envoy, "/health").await;
    assert_eq!(
        (code, body["status"].as_str()),
        (503, Some("unknown")),
        "{body}"
    );
    assert!(health_entry(&body, "content").is_none(), "{body}");

    // The next call fails open (it reaches the upstream although the breaker was open), the breaker
    // restarts closed, and it is logged and counted.
    bed.content.set_fault(Fault::Ok).await.unwrap();
    get_post(&channel, &[]).await.unwrap();
    assert_eq!(bed.content.requests(), 4);
    assert_eq!(corrupted(envoy).await, 1.0);
    let log = envoy.log();
    let line = log
        .lines()
        .find(|l| l.contains("corrupt state for upstream=content"))
        .unwrap_or_else(|| panic!("no warning; log: {}", envoy.log_path().display()));
    assert!(
        line.contains("[warning]") && line.contains("bad length or magic"),
        "{line}"
    );
    let (code, body) = health(envoy, "/health").await;
    assert_eq!(code, 200, "{body}");
    let content = health_entry(&body, "content").unwrap();
    assert_eq!(content["state"], "closed", "{body}");
    assert_eq!(content["consecutive_failures"], 0, "{body}");
    assert_eq!(content["calls_in_window"], 1, "{body}");

    // The restarted breaker works: it opens again on failures.
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        get_post(&channel, &[]).await.unwrap_err();
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");
    bed.content.set_fault(Fault::Ok).await.unwrap();

    // Other foreign bytes: each fails open once, is counted, and names what was wrong.
    let cases = [
        ("truncated", "cb53".to_string(), 1, "bad length or magic"),
        (
            "other version",
            format!("cb5303{}", "00".repeat(90)),
            1,
            "unknown version 3",
        ),
        (
            "impossible state",
            slot_hex("content", &format!("cb0209{}", "00".repeat(61))),
            1,
            "impossible breaker state",
        ),
        ("one MiB", "cb".to_string(), 1 << 20, "bad length or magic"),
    ];
    // (Zero bytes are the subject of `empty_bytes_under_a_breaker_key_are_corrupt_state`.)
    for (n, (name, hex, repeat, why)) in cases.iter().enumerate() {
        corrupt(envoy, &state_key, hex, *repeat).await;
        let before = bed.content.requests();
        get_post(&channel, &[])
            .await
            .unwrap_or_else(|s| panic!("{name}: the call did not pass: {s:?}"));
        assert_eq!(bed.content.requests(), before + 1, "{name}");
        assert_eq!(corrupted(envoy).await, 2.0 + n as f64, "{name}");
        let log = envoy.log();
        assert!(
            log.lines()
                .filter(|l| l.contains("corrupt state for upstream=content"))
                .any(|l| l.contains(why)),
            "{name}: no warning naming {why:?}"
        );
    }

    // A corrupt slot that no upstream holds: health cannot vouch for it and says unknown, while the
    // breakers stay enforced through their own slots, and a new upstream gets a breaker.
    let other = {
        let table = cb_core::store::SharedData::new(cb_core::store::MemoryStore::new(), 1024);
        let home = cb_core::registry::home_slot("content", 1024);
        table.slot_key((home + 512) % 1024)
    };
    let previous = corrupt(envoy, &other, "0badc0de", 1).await;
    assert_ne!(
        previous, "none",
        "the table is created when a worker is configured"
    );
    let (code, body) = health(envoy, "/health").await;
    assert_eq!(
        (code, body["status"].as_str()),
        (503, Some("unknown")),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("1 breaker states"),
        "{body}"
    );
    get_user(&channel).await.unwrap();
    let (_, body) = health(envoy, "/health").await;
    assert!(health_entry(&body, "user").is_some(), "{body}");
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        get_post(&channel, &[]).await.unwrap_err();
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");

    let m = envoy.metrics().await.unwrap();
    assert_eq!(global(&m, "circuit_breaker_cas_give_ups_total"), 0.0);
    println!(
        "corruption: {} corrupt states detected and restarted; {}",
        global(&m, "circuit_breaker_corrupt_state_total"),
        m.dump("circuit_breaker_corrupt")
    );
    assert_no_trap(envoy);
}

/// Zero bytes under a breaker's key are foreign bytes like any other: the call fails open, the state
/// is restarted at once, logged and counted as corrupt, and nothing is counted as a CAS give-up.
///
/// Envoy hands a zero-length value back with a CAS token but a null data pointer, and the SDK's
/// `get_shared_data` turns that into `None`, the answer for a key that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_bytes_under_a_breaker_key_are_corrupt_state() {
    if skipped_natively() {
        return;
    }
    let config = json!({"failure_threshold": 3, "open_timeout": "60s", "health_path": "/health"});
    let bed = LdsBed::start(
        "corrupt_empty",
        "envoy/lds-listener-corruptor.yaml",
        &config,
    )
    .await;
    let envoy = &bed.envoy;
    let channel = envoy.channel().await.unwrap();
    bed.content.set_fault(Fault::Unavailable).await.unwrap();
    for _ in 0..3 {
        get_post(&channel, &[]).await.unwrap_err();
    }
    let status = get_post(&channel, &[]).await.unwrap_err();
    assert!(is_rejection(&status, "content"), "{status:?}");

    assert_eq!(
        corrupt(envoy, &slot_key("content"), "", 1).await,
        slot_len("content")
    );
    bed.content.set_fault(Fault::Ok).await.unwrap();
    get_post(&channel, &[]).await.unwrap();
    assert_eq!(bed.content.requests(), 4, "did not fail open");
    let m = envoy.metrics().await.unwrap();
    let summary = format!(
        "corrupt_state {}, untracked {}, cas_give_ups {}; log: {}",
        global(&m, "circuit_breaker_corrupt_state_total"),
        global(&m, "circuit_breaker_untracked_calls_total"),
        global(&m, "circuit_breaker_cas_give_ups_total"),
        envoy.log_path().display()
    );
    assert_eq!(
        global(&m, "circuit_breaker_corrupt_state_total"),
        1.0,
        "{summary}"
    );
    assert_eq!(
        global(&m, "circuit_breaker_cas_give_ups_total"),
        0.0,
        "{summary}"
    );
    // Restarted at once: the breaker is there again, closed, with the call just made.
    let (code, body) = health(envoy, "/health").await;
    assert_eq!(code, 200, "{body}");
    let content = health_entry(&body, "content").unwrap_or_else(|| panic!("{body}"));
    assert_eq!(content["calls_in_window"], 1, "{body}");
    assert!(envoy.log().contains("corrupt state for upstream=content"));
    assert_no_trap(envoy);
}
