//! One simulated Envoy worker: its own core worker over the shared store, the calls it serves (each a
//! stream of the core's [`Session`] over a [`SimHost`]), and its tick, which delivers the cuts the core
//! orders to the calls they name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cb_core::breaker::{Rejection, Transition};
use cb_core::classify::{Classification, ResponseFlags};
use cb_core::config::{BreakerConfig, FilterConfig};
use cb_core::host::Action;
use cb_core::session::{deliver_cut, Session};
use cb_core::store::{MemoryStore, SharedData, StoreError};
use cb_core::telemetry::Event;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::host::{SimHost, SimTelemetry};
use super::lock;
use super::stats::{bump, Stats};
use super::upstream::{millis, Clock, Reply, Upstream, DEFAULT_ROUTE_TIMEOUT};

/// The core worker of one simulated Envoy worker, over shared data in memory.
type CoreWorker = cb_core::worker::Worker<SharedData<Arc<MemoryStore>>>;

/// What the breaker decided on a call, as the simulation saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Let through with a ticket; `probe` when it holds a HalfOpen permit.
    Allow {
        /// A HalfOpen probe.
        probe: bool,
    },
    /// Answered locally.
    Reject(Rejection),
    /// `dry_run` would have rejected it: let through, marked, not recorded.
    DryRun(Rejection),
    /// Let through with no breaker (counted by the filter).
    Untracked,
    /// `mode: disabled`: let through, not counted.
    Disabled,
}

/// Everything that happened to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallReport {
    /// The breaker's decision.
    pub admission: Admission,
    /// What came back from upstream; `None` when the call was rejected and never left the worker.
    pub reply: Option<Reply>,
    /// What the call was recorded as; `None` when nothing was recorded for it (rejected, untracked,
    /// or already recorded as stuck).
    pub classification: Option<Classification>,
    /// State changes the call caused (at admission, at recording).
    pub transitions: Vec<Transition>,
    /// How long the caller waited.
    pub waited: Duration,
}

impl CallReport {
    /// The worker answered the call itself.
    pub fn rejected(&self) -> Option<&Rejection> {
        match &self.admission {
            Admission::Reject(r) => Some(r),
            _ => None,
        }
    }

    /// The call was let through to the upstream.
    pub fn forwarded(&self) -> bool {
        self.reply.is_some()
    }
}

/// What a caller does while it waits.
#[derive(Debug, Clone, Copy)]
enum Patience {
    /// Waits for whatever ends the call (the answer, or the router's timeout).
    Forever,
    /// Gives up after this long, having told nobody.
    GivesUpAfter(Duration),
    /// Sends this as its `grpc-timeout` deadline, and gives up when it passes, as gRPC clients do.
    Deadline(Duration),
}

/// One simulated Envoy worker: its own core worker (as each worker's VM has), the shared store, and
/// the filter configuration. Like an Envoy worker it serves many calls at once; the core worker sits
/// behind a mutex that is never held across an `await`, the way a VM runs one callback at a time.
#[derive(Debug)]
pub struct Worker {
    id: usize,
    core: Mutex<CoreWorker>,
    config: Arc<FilterConfig>,
    clock: Clock,
    stats: Arc<Stats>,
    /// The calls in flight that a cut can reach, by stream token: the tick sends the call's id.
    streams: Mutex<HashMap<u64, oneshot::Sender<u64>>>,
    next_stream: AtomicU64,
}

/// One call's stream on its worker, from the request to the end.
struct Stream<'a> {
    session: Session,
    host: SimHost<'a>,
    admission: Admission,
    /// Where a cut ordered by the worker's tick arrives.
    cut: oneshot::Receiver<u64>,
}

impl Worker {
    /// A worker numbered `id` on `store`, configured (its table prepared) as `on_configure` does; its
    /// random draws (the open time's jitter) come from `seed`.
    pub fn new(
        id: usize,
        store: Arc<MemoryStore>,
        config: Arc<FilterConfig>,
        clock: Clock,
        stats: Arc<Stats>,
        seed: u64,
    ) -> Result<Self, StoreError> {
        let table = SharedData::new(store, config.max_upstreams);
        // Each simulated worker draws its own reproducible sequence, as each Envoy worker draws its own.
        let seed = seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut core = CoreWorker::new(Arc::clone(&config), clock.now_ms(), table, seed);
        core.prepare()?;
        Ok(Self {
            id,
            core: Mutex::new(core),
            config,
            clock,
            stats,
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
        })
    }

    /// This worker's number.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The breaker settings for an upstream key.
    pub fn config_for(&self, key: &str) -> &BreakerConfig {
        self.config.breaker_for(key)
    }

    /// Makes one call to `upstream` through the breaker, as the filter and Envoy's router would: admit;
    /// if rejected, answer at once; otherwise forward under the router timeout (`call_timeout`, else
    /// [`DEFAULT_ROUTE_TIMEOUT`]), and settle the call as its response comes back.
    pub async fn call(&self, upstream: &Upstream) -> CallReport {
        self.call_inner(upstream, Patience::Forever).await
    }

    /// Like [`Worker::call`], but the client gives up after `patience`, without a deadline header.
    pub async fn call_with_patience(&self, upstream: &Upstream, patience: Duration) -> CallReport {
        self.call_inner(upstream, Patience::GivesUpAfter(patience))
            .await
    }

    /// Like [`Worker::call`], from a gRPC client with a deadline: it sends `grpc-timeout` and cancels
    /// the call when the deadline passes.
    pub async fn call_with_deadline(&self, upstream: &Upstream, deadline: Duration) -> CallReport {
        self.call_inner(upstream, Patience::Deadline(deadline))
            .await
    }

    async fn call_inner(&self, upstream: &Upstream, patience: Patience) -> CallReport {
        let started = Instant::now();
        let key = upstream.name();
        let mut stream = self.start(key, patience);
        if matches!(stream.admission, Admission::Reject(_)) {
            return self.end(stream, None, started);
        }
        let router_timeout = self
            .config_for(key)
            .call_timeout_ms
            .map_or(DEFAULT_ROUTE_TIMEOUT, Duration::from_millis);
        let forwarded = async {
            tokio::time::timeout(router_timeout, upstream.serve())
                .await
                .unwrap_or(Reply::TimedOut)
        };
        let give_up = match patience {
            Patience::Forever => None,
            Patience::GivesUpAfter(d) | Patience::Deadline(d) => Some(d),
        };
        let waiting = async {
            match give_up {
                None => forwarded.await,
                Some(after) => tokio::select! {
                    // On a tie the answer wins: it arrived as the client was leaving.
                    biased;
                    reply = forwarded => reply,
                    () = tokio::time::sleep(after) => Reply::ClientCancelled,
                },
            }
        };
        tokio::pin!(waiting);
        let reply = tokio::select! {
            biased;
            reply = &mut waiting => reply,
            Ok(call) = &mut stream.cut => {
                // The upstream request is reset with the cut (the future is dropped), unless the
                // host refused the answer: then the call goes on waiting.
                let cut = deliver_cut(&mut lock(&self.core), &mut stream.host, call);
                if cut { Reply::Cut } else { waiting.await }
            }
        };
        self.finish(&mut stream, reply);
        self.end(stream, Some(reply), started)
    }

    /// The same call, settled at once with `reply`: for tests that race OS threads, not tasks.
    pub fn complete(&self, key: &str, reply: Reply) -> CallReport {
        let started = Instant::now();
        let mut stream = self.start(key, Patience::Forever);
        if matches!(stream.admission, Admission::Reject(_)) {
            return self.end(stream, None, started);
        }
        self.finish(&mut stream, reply);
        self.end(stream, Some(reply), started)
    }

    /// The request side: the session admits (or answers) the call.
    fn start(&self, key: &str, patience: Patience) -> Stream<'_> {
        bump(&self.stats.calls, 1);
        let mut request = vec![("content-type", "application/grpc".to_string())];
        if let Patience::Deadline(d) = patience {
            request.push(("grpc-timeout", format!("{}m", d.as_millis())));
        }
        let mut host = SimHost {
            telemetry: self.telemetry(),
            request,
            cluster: key.to_string(),
            response: Vec::new(),
            trailers: Vec::new(),
            flags: 0,
            reply: None,
            stream: self.next_stream.fetch_add(1, Ordering::Relaxed),
        };
        let (to_stream, cut) = oneshot::channel();
        lock(&self.streams).insert(host.stream, to_stream);
        let mut session = Session::new();
        let action = session.on_request(&mut lock(&self.core), &mut host, true);
        if session.holds_probe() {
            // After the permit was taken in the store: the gauge counts a subset of the permits held,
            // so its high-water mark can be held against the limit.
            self.stats.probes_in_flight().inc();
        }
        let admission = admission_of(&host.telemetry.events, action, &session);
        if admission == Admission::Disabled {
            bump(&self.stats.disabled, 1);
        }
        Stream {
            session,
            host,
            admission,
            cut,
        }
    }

    /// The response side: what Envoy would show the filter for `reply`, then the end of the stream.
    fn finish(&self, stream: &mut Stream<'_>, reply: Reply) {
        let Stream { session, host, .. } = stream;
        let mut core = lock(&self.core);
        let probe = session.holds_probe();
        if probe {
            // Before the store gives the permit back, not after: another worker may take it the moment
            // it is written, and the gauge must never count one permit twice.
            self.stats.probes_in_flight().dec();
        }
        let local_reply = |flag: u64| {
            (
                flag,
                vec![
                    (":status", "200".to_string()),
                    ("grpc-status", "14".to_string()),
                ],
            )
        };
        match reply {
            Reply::Grpc(code) => {
                host.response = vec![(":status", "200".to_string())];
                session.on_response_headers(&mut core, host, false);
                host.trailers = vec![("grpc-status", code.to_string())];
                session.on_response_trailers(&mut core, host);
            }
            Reply::ConnectFailure | Reply::TimedOut => {
                // Envoy answers with a trailers-only UNAVAILABLE of its own, and says why in the flags.
                let flag = if reply == Reply::TimedOut {
                    ResponseFlags::UPSTREAM_REQUEST_TIMEOUT
                } else {
                    ResponseFlags::UPSTREAM_CONNECTION_FAILURE
                };
                (host.flags, host.response) = local_reply(flag);
                session.on_response_headers(&mut core, host, true);
            }
            Reply::ClientCancelled => host.flags = ResponseFlags::DOWNSTREAM_REMOTE_RESET,
            Reply::Cut => {
                // The breaker's own trailers-only answer passes the filter on its way out.
                host.response = host.reply.as_ref().map_or_else(Vec::new, |r| {
                    let status = (":status", r.status.to_string());
                    let grpc = r
                        .header("grpc-status")
                        .map(|v| ("grpc-status", v.to_string()));
                    std::iter::once(status).chain(grpc).collect()
                });
                session.on_response_headers(&mut core, host, true);
            }
        }
        session.on_end(&mut core, host);
        let released = host.telemetry.events.iter().any(|e| {
            matches!(e, Event::Recorded { outcome, .. } if *outcome == cb_core::classify::Outcome::Ignored)
        });
        bump(&self.stats.released, u64::from(probe && released));
    }

    /// The stream is gone: a cut can no longer reach it.
    fn end(&self, stream: Stream<'_>, reply: Option<Reply>, started: Instant) -> CallReport {
        lock(&self.streams).remove(&stream.host.stream);
        let events = stream.host.telemetry.events;
        self.report(stream.admission, reply, events, started)
    }

    fn report(
        &self,
        admission: Admission,
        reply: Option<Reply>,
        events: Vec<Event>,
        started: Instant,
    ) -> CallReport {
        let waited = started.elapsed();
        bump(&self.stats.wait_ms, millis(waited));
        let mut classification = None;
        let mut transitions = Vec::new();
        for e in events {
            match e {
                Event::Recorded { outcome, slow, .. } => {
                    classification = Some(Classification { outcome, slow });
                }
                Event::Transition(t) => transitions.push(t),
                _ => {}
            }
        }
        CallReport {
            admission,
            reply,
            classification,
            transitions,
            waited,
        }
    }

    fn telemetry(&self) -> SimTelemetry<'_> {
        SimTelemetry {
            clock: self.clock,
            worker: self.id,
            stats: &self.stats,
            events: Vec::new(),
        }
    }

    /// One run of the worker's tick (what the wasm root's tick does): the stuck-call check, then each
    /// cut it orders sent to its call, which answers itself on its own task.
    pub fn tick(&self) -> Vec<Event> {
        let mut t = self.telemetry();
        let orders = lock(&self.core).tick(self.clock.now_ms(), &mut t);
        let mut streams = lock(&self.streams);
        for order in orders {
            // A call that ended meanwhile has no stream left: nothing to answer.
            if let Some(to_stream) = streams.remove(&order.stream) {
                let _ = to_stream.send(order.call);
            }
        }
        t.events
    }
}

/// The admission, from the events the request side produced.
fn admission_of(events: &[Event], action: Action, session: &Session) -> Admission {
    for e in events {
        match e {
            Event::Rejected(r) if action == Action::Stop => return Admission::Reject(*r),
            Event::DryRun(r) => return Admission::DryRun(*r),
            Event::Untracked(_) => return Admission::Untracked,
            _ => {}
        }
    }
    if session.in_flight() {
        Admission::Allow {
            probe: session.holds_probe(),
        }
    } else {
        Admission::Disabled
    }
}
