//! End-to-end: one hung replica, and the breaker on the destination's side (issue 17; the contract's
//! "Where it runs").
//!
//! A slice of an Istio mesh on loopback ([`MeshLaunch`]): a real Envoy as the caller's sidecar,
//! configured as Istio configures one (the default gRPC retry policy with the previous-hosts
//! predicate, no route timeout, cluster limits at their maximum), sends content-service's calls round
//! robin to three replicas, each behind its own real Envoy as its inbound sidecar, with the breaker in
//! the inbound chain keyed by the inbound cluster (`inbound|<port>||`), `stuck_call_duration` and
//! `cut_stuck_calls`. One replica hangs: it takes calls and never answers. Clients call through the
//! caller's sidecar with a deadline, a call every few milliseconds.
//!
//! What the replica's own sidecar does about it is checked from every side: the clients (every call
//! OK, none at its deadline), the caller's sidecar (each cut or rejected attempt retried on another
//! replica, counted in `upstream_rq_retry`), and the hung replica's sidecar (its breaker opened, the
//! others' did not; every request it received is a recorded call, a rejection or untracked; its stuck
//! calls are exactly the calls it cut, which are exactly the cut answers the caller got). A server
//! stream whose first message came, kept open across the opening of its replica's breaker and far
//! longer than `stuck_call_duration`, is neither stuck nor cut.
//!
//! Run by `make test-e2e` for both builds (`CB_BUILD`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::pb::content_service_client::ContentServiceClient;
use e2e::{
    http_request, worker_channels, Envoy, Fault, GrpcService, Mesh, MeshLaunch, Metrics,
    ServiceKind,
};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The clients' deadline on every call (tonic sends it as `grpc-timeout`).
const DEADLINE: Duration = Duration::from_secs(3);
/// Calls made while the replica hangs, one every [`EVERY`]: 3 s of load, long enough for the hung
/// replica's breaker to open, go half-open after its 1 s `open_timeout`, and open again on its probe.
const CALLS: u32 = 300;
const EVERY: Duration = Duration::from_millis(10);
/// The server streams: this many posts, [`STREAM_EVERY_MS`] apart (2.4 s: far past
/// `stuck_call_duration`, and past the opening of the hung replica's breaker).
const STREAM_POSTS: u32 = 25;
const STREAM_EVERY_MS: u32 = 100;
/// Bound on anything a test waits for: far above what a passing test needs.
const BOUND: Duration = Duration::from_secs(30);

/// Replica 0 hangs; 1 and 2 stay healthy.
const HUNG: usize = 0;
const HEALTHY: [usize; 2] = [1, 2];

/// The breaker in every replica's sidecar: a replica whose calls stop answering is one breaker, fed by
/// every caller, that learns it from calls stuck 500 ms, opens after three, and then answers those
/// calls and every new one at once, so that the callers' sidecars retry them on another replica.
fn destination_config() -> Value {
    json!({
        "failure_threshold": 3,
        "stuck_call_duration": "500ms",
        "cut_stuck_calls": true,
        "open_timeout": "1s",
        "success_threshold": 2,
        "health_path": "/health/circuit-breakers"
    })
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {BOUND:?}"))
}

/// Polls until `f` holds, within [`BOUND`].
async fn eventually<Fut: Future<Output = bool>>(what: &str, mut f: impl FnMut() -> Fut) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Reads with `read` until `done` holds of what it read, within [`BOUND`]; returns that.
async fn settled<T: std::fmt::Debug, Fut: Future<Output = T>>(
    what: &str,
    mut read: impl FnMut() -> Fut,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let value = read().await;
        if done(&value) {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; last read: {value:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Three replicas of content-service and the mesh in front of them.
struct Scene {
    replicas: [GrpcService; 3],
    mesh: Mesh,
}

impl Scene {
    async fn start(name: &str) -> Self {
        let (a, b, c) = tokio::try_join!(
            GrpcService::start(ServiceKind::Content),
            GrpcService::start(ServiceKind::Content),
            GrpcService::start(ServiceKind::Content),
        )
        .unwrap();
        let replicas = [a, b, c];
        let mesh = MeshLaunch::new(name, replicas.each_ref().map(GrpcService::port))
            .caller_config("{}")
            .destination_config(&destination_config().to_string())
            .start()
            .await
            .unwrap();
        Self { replicas, mesh }
    }

    fn sidecar(&self, i: usize) -> &Envoy {
        &self.mesh.inbound[i]
    }

    fn key(&self, i: usize) -> String {
        self.mesh.inbound_key(i).unwrap()
    }
}

/// One `GetPost` with the clients' deadline.
async fn get_post(channel: Channel) -> Result<(), Status> {
    let mut request = tonic::Request::new(e2e::pb::GetPostRequest {
        post_id: "p1".into(),
    });
    request.set_timeout(DEADLINE);
    let mut client = ContentServiceClient::new(channel);
    bounded("GetPost", client.get_post(request))
        .await
        .map(|_| ())
}

/// A `WatchPosts` server stream of [`STREAM_POSTS`] posts, with no deadline; `seen` counts the posts
/// as they come. Ends with the number of posts, or the status that ended the stream.
async fn watch(channel: Channel, seen: Arc<AtomicU32>) -> Result<u32, Status> {
    let request = e2e::pb::WatchPostsRequest {
        author_id: "watcher".into(),
        count: STREAM_POSTS,
        interval_ms: STREAM_EVERY_MS,
    };
    let mut client = ContentServiceClient::new(channel);
    let mut stream = bounded("WatchPosts", client.watch_posts(request))
        .await?
        .into_inner();
    while bounded("the next post", stream.message()).await?.is_some() {
        seen.fetch_add(1, Ordering::SeqCst);
    }
    Ok(seen.load(Ordering::SeqCst))
}

/// `circuit_breaker_open_total` of `upstream`, over every reason, from `admin`; 0 when absent.
async fn opened(admin: SocketAddr, upstream: &str) -> f64 {
    let path = "/stats/prometheus?filter=circuit_breaker_open_total";
    match http_request(admin, "GET", path, &[]).await {
        Ok(r) if r.status == 200 => {
            Metrics::parse(&r.body).sum("circuit_breaker_open_total", &[("upstream", upstream)])
        }
        _ => 0.0,
    }
}

/// The breaker's counters for one upstream at one Envoy.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    calls: f64,
    rejected: f64,
    untracked: f64,
    stuck: f64,
    cut: f64,
    opened: f64,
    state: f64,
    /// Requests the Envoy's listener received (`downstream_rq_total` of its connection manager).
    received: f64,
}

impl Counts {
    fn read(m: &Metrics, upstream: &str) -> Self {
        let of = [("upstream", upstream)];
        Self {
            calls: m.sum("circuit_breaker_calls_total", &of),
            rejected: m.sum("circuit_breaker_rejected_calls_total", &of),
            untracked: m.sum("circuit_breaker_untracked_calls_total", &[]),
            stuck: m.sum("circuit_breaker_stuck_calls_total", &of),
            cut: m.sum("circuit_breaker_cut_calls_total", &of),
            opened: m.sum("circuit_breaker_open_total", &of),
            state: m.value("circuit_breaker_state", &of).unwrap_or(0.0),
            // Exactly the listener's connection manager: the admin interface counts its own requests
            // under the same name.
            received: m.sum(
                "envoy_http_downstream_rq_total",
                &[("envoy_http_conn_manager_prefix", "inbound")],
            ),
        }
    }
}

/// One attempt of the caller's sidecar, from its router's upstream log (`[upstream] ...` lines of
/// `envoy/outbound.yaml`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attempt {
    /// The call's `x-request-id`: the same on every attempt of one call.
    id: String,
    /// The replica's sidecar it went to.
    host: String,
    grpc: String,
    /// What the replica's sidecar's breaker said (`x-circuit-breaker`), `-` for nothing.
    cb: String,
}

fn attempts(log: &str) -> Vec<Attempt> {
    log.lines()
        .filter(|l| l.starts_with("[upstream] "))
        .map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or("")
                    .to_string()
            };
            Attempt {
                id: field("id"),
                host: field("host"),
                grpc: field("grpc"),
                cb: field("cb"),
            }
        })
        .collect()
}

/// The caller's sidecar's count of requests it sent to `host` (`/clusters`: `content::host::rq_total`).
async fn sent_to(caller: &Envoy, host: SocketAddr) -> f64 {
    let clusters = caller.admin_get("/clusters").await.unwrap().body;
    let prefix = format!("content::{host}::rq_total::");
    clusters
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in /clusters:\n{clusters}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_is_cut_off_by_its_own_sidecar_and_its_calls_retried_elsewhere() {
    let scene = Scene::start("replica").await;
    let caller = &scene.mesh.caller;
    // One connection on each of the caller's workers; calls alternate between them.
    let channels = worker_channels(caller).await.unwrap();

    // Healthy, every replica answers through the caller's sidecar.
    for i in 0..6 {
        get_post(channels[i % 2].clone()).await.unwrap();
    }
    for replica in &scene.replicas {
        assert!(replica.requests() >= 1, "round robin reaches every replica");
    }

    // A server stream on the replica about to hang and one on a healthy replica, straight to their
    // sidecars; each has its headers and first post before the hang begins.
    let streams: Vec<_> = [HUNG, HEALTHY[0]]
        .into_iter()
        .map(|i| {
            let seen = Arc::new(AtomicU32::new(0));
            let addr = scene.sidecar(i).listener();
            let task = tokio::spawn({
                let seen = Arc::clone(&seen);
                async move { watch(e2e::channel_to(addr, None).await.unwrap(), seen).await }
            });
            (seen, task)
        })
        .collect();
    for (seen, _) in &streams {
        eventually("the first post of each stream", || async {
            seen.load(Ordering::SeqCst) >= 1
        })
        .await;
    }

    scene.replicas[HUNG].set_fault(Fault::Hang).await.unwrap();
    let hung_admin = scene.sidecar(HUNG).admin();
    let hung_key = scene.key(HUNG);
    // When the hung replica's breaker first opens, how far its stream had come.
    let stream_at_opening = tokio::spawn({
        let seen = Arc::clone(&streams[0].0);
        async move {
            eventually("the hung replica's breaker to open", || async {
                opened(hung_admin, &hung_key).await >= 1.0
            })
            .await;
            seen.load(Ordering::SeqCst)
        }
    });
    let mut tick = tokio::time::interval(EVERY);
    let mut calls = Vec::new();
    for i in 0..CALLS as usize {
        tick.tick().await;
        calls.push(tokio::spawn(get_post(channels[i % 2].clone())));
    }
    let mut failed = Vec::new();
    for call in calls {
        if let Err(status) = call.await.unwrap() {
            failed.push(status);
        }
    }
    let at_opening = stream_at_opening.await.unwrap();
    let mut ended = Vec::new();
    for (_, task) in streams {
        ended.push(task.await.unwrap());
    }

    every_call_ended_ok_before_its_deadline(&failed);
    server_streams_with_headers_are_neither_stuck_nor_cut(&ended, at_opening);
    let hung = hung_replica_accounting(&scene).await;
    cut_and_rejected_calls_were_retried_on_other_replicas(&scene, &hung).await;
    only_the_hung_replica_opened(&scene, &hung).await;
}

#[track_caller]
fn every_call_ended_ok_before_its_deadline(failed: &[Status]) {
    let at_deadline = failed
        .iter()
        .filter(|s| matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled))
        .count();
    assert_eq!(
        (failed.len(), at_deadline),
        (0, 0),
        "of {CALLS} calls, these failed ({at_deadline} at their deadline): {failed:#?}"
    );
}

/// Both streams ended OK with every post; the hung replica's was still open when its breaker opened.
#[track_caller]
fn server_streams_with_headers_are_neither_stuck_nor_cut(
    ended: &[Result<u32, Status>],
    hung_stream_at_opening: u32,
) {
    for (which, result) in ["the hung replica's", "a healthy replica's"]
        .iter()
        .zip(ended)
    {
        assert_eq!(
            result.as_ref().ok(),
            Some(&STREAM_POSTS),
            "{which} stream: {result:?}"
        );
    }
    assert!(
        hung_stream_at_opening < STREAM_POSTS,
        "the hung replica's stream had ended ({hung_stream_at_opening} posts) before its breaker \
         opened: it says nothing about the cut"
    );
}

/// At the hung replica's sidecar: every request it received is a recorded call, a rejection or
/// untracked; every stuck call was cut (the stream, open far longer than `stuck_call_duration`, is not
/// among them); and the caller's sidecar sent it exactly those requests but the stream's.
async fn hung_replica_accounting(scene: &Scene) -> Counts {
    let sidecar = scene.sidecar(HUNG);
    let key = scene.key(HUNG);
    // Every call has ended; the counters settle as the sidecar finishes each stream.
    let counts = settled(
        "every request at the hung replica's sidecar accounted for",
        || async { Counts::read(&sidecar.metrics().await.unwrap(), &key) },
        |c| c.calls + c.rejected + c.untracked == c.received,
    )
    .await;
    assert!(counts.stuck >= 3.0, "{counts:?}");
    assert_eq!(
        counts.cut, counts.stuck,
        "every stuck call was cut: {counts:?}"
    );
    assert_eq!(counts.untracked, 0.0, "{counts:?}");
    let sent = sent_to(&scene.mesh.caller, scene.mesh.endpoint(HUNG).unwrap()).await;
    assert_eq!(
        sent + 1.0,
        counts.received,
        "the caller's sidecar's requests, and the one stream sent straight to the replica's: {counts:?}"
    );
    counts
}

/// The caller's sidecar got each cut call and each rejection from the hung replica's sidecar, with
/// `x-circuit-breaker: cut` or `open`/`half_open`, and retried every one on another replica, where it
/// ended OK.
async fn cut_and_rejected_calls_were_retried_on_other_replicas(scene: &Scene, hung: &Counts) {
    let caller = &scene.mesh.caller;
    let hung_host = scene.mesh.endpoint(HUNG).unwrap().to_string();
    let at_hung = |log: &[Attempt], f: &dyn Fn(&str) -> bool| {
        log.iter()
            .filter(|a| a.host == hung_host && f(&a.cb))
            .count() as f64
    };
    let log = settled(
        "the caller's upstream log of every cut and rejection",
        || async { attempts(&caller.log()) },
        |log| {
            at_hung(log, &|cb| cb == "cut") == hung.cut
                && at_hung(log, &|cb| cb == "open" || cb == "half_open") == hung.rejected
        },
    )
    .await;
    let answered_by_breaker: Vec<&Attempt> = log
        .iter()
        .filter(|a| a.host == hung_host && a.cb != "-")
        .collect();
    for attempt in &answered_by_breaker {
        assert_eq!(attempt.grpc, "14", "{attempt:?}");
        let retried_ok = log
            .iter()
            .any(|a| a.id == attempt.id && a.host != hung_host && a.grpc == "0" && a.cb == "-");
        assert!(retried_ok, "not retried on another replica: {attempt:?}");
    }
    let retries = caller
        .metric(
            "envoy_cluster_upstream_rq_retry",
            &[("envoy_cluster_name", "content")],
        )
        .await
        .unwrap();
    assert_eq!(
        retries,
        hung.cut + hung.rejected,
        "every retry of the caller's sidecar is one of the hung replica's cuts or rejections: {hung:?}"
    );
    assert!(hung.cut >= 1.0 && hung.rejected >= 1.0, "{hung:?}");
    // The caller's own breaker saw only successes: the destination's side answered for the hang.
    let m = caller.metrics().await.unwrap();
    assert_eq!(
        m.sum(
            "circuit_breaker_calls_total",
            &[("upstream", "content"), ("result", "failure")]
        ),
        0.0
    );
}

/// The hung replica's breaker opened (and is not closed: the replica still hangs); the healthy
/// replicas' never did, and counted nothing stuck.
async fn only_the_hung_replica_opened(scene: &Scene, hung: &Counts) {
    assert!(hung.opened >= 1.0, "{hung:?}");
    assert_ne!(hung.state, 0.0, "{hung:?}");
    for i in HEALTHY {
        let counts = Counts::read(&scene.sidecar(i).metrics().await.unwrap(), &scene.key(i));
        assert_eq!(
            (counts.opened, counts.state, counts.stuck, counts.cut),
            (0.0, 0.0, 0.0, 0.0),
            "healthy replica {i}: {counts:?}"
        );
        let health = scene
            .sidecar(i)
            .get("/health/circuit-breakers")
            .await
            .unwrap();
        assert_eq!(health.status, 200, "{health:?}");
    }
    // Read last: the health endpoint's answers are requests too, which the accounting above excludes.
    let health = scene
        .sidecar(HUNG)
        .get("/health/circuit-breakers")
        .await
        .unwrap();
    assert_eq!(health.status, 503, "{health:?}");
    assert_eq!(health.json().unwrap()["status"], "degraded", "{health:?}");
}
