//! The gateway's load, open-loop as a real gateway's is: requests arrive at a fixed rate from many
//! independent clients, whatever became of the earlier ones. Each request is one gRPC call in its own
//! task, with a deadline, as an API gateway sets them; and how each call ended.
//!
//! Open-loop matters for the story: a closed loop (a fixed set of workers, each waiting for its call)
//! stops making calls once every worker is stuck on the dead host, so the gateway goes silent whether
//! or not the breaker opened. Here calls keep arriving; once the breaker opens, they get a fast answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;
// tokio's clock, so that a test with paused time drives the deadlines and the arrivals alike; in a
// real run it is the system's monotonic clock.
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::Channel;

use crate::services::pb::auth_service_client::AuthServiceClient;
use crate::services::pb::content_service_client::ContentServiceClient;
use crate::services::pb::feed_service_client::FeedServiceClient;
use crate::services::pb::user_service_client::UserServiceClient;
use crate::services::pb::{CheckRequest, GetFeedRequest, GetPostRequest, GetUserRequest};
use crate::services::ServiceKind;

/// A new request every 5 ms, 200 a second, to the four services in turn (50 a second each): about
/// the rate the demo's earlier closed loop (12 workers, 50 ms apart) made when healthy.
pub(super) const ARRIVAL_EVERY: Duration = Duration::from_millis(5);
/// Requests the gateway lets wait for an answer at once; one that finds them all taken is shed at
/// once. A dead service with no breaker holds 50 calls/s × 2 s = 100 of them, so at this bound nothing
/// is shed in either run: the bound is there so that nothing is unbounded.
pub(super) const MAX_IN_FLIGHT: usize = 300;
/// The gateway's deadline on every call. tonic sends it as `grpc-timeout` and cancels the call when it
/// passes; Envoy's route timeout (10 s in envoy/demo.yaml) is far longer, so against a dead host the
/// deadline is what ends a call.
pub(super) const CLIENT_DEADLINE: Duration = Duration::from_secs(2);
/// A call tonic has not ended this long after its deadline is given up on all the same, so every call
/// task ends.
const DEADLINE_GRACE: Duration = Duration::from_millis(500);

/// How one request ended, as the gateway sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// An answer: `OK`, or a status the client caused (none in the demo).
    Ok,
    /// An answer: the upstream (or Envoy on its behalf: timeout, reset) failed the call.
    UpstreamFailure,
    /// An answer: the breaker's (`x-circuit-breaker`): it rejected the call at once, or it cut a stuck
    /// call and no retry turned that into another answer.
    Rejected,
    /// No answer: the gateway gave up at its deadline and cancelled the call (or Envoy, timing the
    /// call out at that same deadline, said so first).
    GaveUp,
    /// No answer, and no call: [`MAX_IN_FLIGHT`] calls were already waiting, so the gateway refused
    /// the request itself.
    Shed,
}

impl Ending {
    /// Whether the gateway got an answer (a complete response of any kind, fast or slow, from the
    /// service or from the breaker) rather than giving up or shedding the request.
    pub(super) fn answered(self) -> bool {
        matches!(
            self,
            Ending::Ok | Ending::UpstreamFailure | Ending::Rejected
        )
    }
}

/// One request, as the gateway saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct CallRecord {
    /// When the request arrived, since the start of the run.
    pub(super) started_ms: u64,
    /// When it ended, since the start of the run: a call is counted in the second its caller got the
    /// answer (or gave up), which is when a hanging upstream hurts.
    pub(super) at_ms: u64,
    pub(super) service: ServiceKind,
    /// 0 for a shed request, which never became a call.
    pub(super) latency_ms: f64,
    pub(super) ending: Ending,
}

impl CallRecord {
    /// Whether the request became a call through Envoy (it was not shed).
    pub(super) fn made(&self) -> bool {
        self.ending != Ending::Shed
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The gateway: the arrivals, the calls in flight, and the record of every request that ended.
pub(super) struct Gateway {
    channel: Channel,
    start: Instant,
    calls: Mutex<Vec<CallRecord>>,
    /// One permit per call in flight.
    slots: Arc<Semaphore>,
    arrived: AtomicU64,
    /// The furthest behind schedule a request arrived, in µs: how long the harness's runtime was kept
    /// from running (on a busy machine, by the other processes), which delays every measure with it.
    max_lag_us: AtomicU64,
}

impl Gateway {
    pub(super) fn new(channel: Channel, start: Instant) -> Arc<Self> {
        Arc::new(Gateway {
            channel,
            start,
            calls: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            arrived: AtomicU64::new(0),
            max_lag_us: AtomicU64::new(0),
        })
    }

    /// Calls waiting for an answer now.
    pub(super) fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT.saturating_sub(self.slots.available_permits())
    }

    /// The furthest behind schedule a request has arrived so far, in ms.
    pub(super) fn max_lag_ms(&self) -> f64 {
        self.max_lag_us.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Every request that has ended so far, in the order they ended.
    pub(super) fn calls(&self) -> Vec<CallRecord> {
        lock(&self.calls).clone()
    }

    /// The arrivals: a request every [`ARRIVAL_EVERY`] from the start of the run until `until`, and
    /// at most `max_requests`. Ticks missed while the runtime was busy are made up at once: the
    /// clients do not wait for the gateway. The calls in flight at `until` go on.
    pub(super) async fn arrivals(self: Arc<Self>, until: Instant, max_requests: u64) {
        let mut tick = tokio::time::interval_at(self.start, ARRIVAL_EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        for n in 0..max_requests {
            let due = tick.tick().await;
            if due >= until {
                break;
            }
            let lag = Instant::now().saturating_duration_since(due).as_micros();
            self.max_lag_us
                .fetch_max(u64::try_from(lag).unwrap_or(u64::MAX), Ordering::Relaxed);
            self.arrived.fetch_add(1, Ordering::Relaxed);
            let service = ServiceKind::ALL
                .get((n % 4) as usize)
                .copied()
                .unwrap_or(ServiceKind::User);
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    let gateway = self.clone();
                    tokio::spawn(async move {
                        gateway.one_call(service, n).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    let at_ms = self.ms();
                    self.record(CallRecord {
                        started_ms: at_ms,
                        at_ms,
                        service,
                        latency_ms: 0.0,
                        ending: Ending::Shed,
                    });
                }
            }
        }
    }

    /// Waits until every call in flight has ended: each ends by its deadline, so this takes at most
    /// [`CLIENT_DEADLINE`] and the grace, after which it gives up waiting.
    pub(super) async fn drain(&self) {
        let all = u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX);
        let wait = CLIENT_DEADLINE + DEADLINE_GRACE + Duration::from_secs(1);
        let _ = tokio::time::timeout(wait, self.slots.acquire_many(all)).await;
    }

    async fn one_call(&self, service: ServiceKind, n: u64) {
        let started_ms = self.ms();
        let began = Instant::now();
        let result = tokio::time::timeout(
            CLIENT_DEADLINE + DEADLINE_GRACE,
            call(&self.channel, service, n),
        )
        .await
        .unwrap_or_else(|_| Err(tonic::Status::cancelled("gave up after the deadline")));
        let latency = began.elapsed();
        self.record(CallRecord {
            started_ms,
            at_ms: self.ms(),
            service,
            latency_ms: latency.as_secs_f64() * 1000.0,
            ending: ending(result, latency),
        });
    }

    fn record(&self, call: CallRecord) {
        lock(&self.calls).push(call);
    }

    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Classifies a call's result.
fn ending(result: Result<(), tonic::Status>, latency: Duration) -> Ending {
    match result {
        Ok(()) => Ending::Ok,
        Err(status) if status.metadata().get("x-circuit-breaker").is_some() => Ending::Rejected,
        // tonic reports its own deadline as CANCELLED ("Timeout expired"); a server could send
        // DEADLINE_EXCEEDED; an Envoy that times the route out at the client's deadline (a sidecar
        // with `max_grpc_timeout: 0s`, envoy/outbound.yaml) answers its timeout as UNAVAILABLE, a
        // moment before or after. Whichever came first, at the deadline the gateway got nothing.
        Err(_) if latency >= CLIENT_DEADLINE.mul_f64(0.95) => Ending::GaveUp,
        Err(_) => Ending::UpstreamFailure,
    }
}

async fn call(channel: &Channel, service: ServiceKind, n: u64) -> Result<(), tonic::Status> {
    let id = format!("{}", n % 100);
    match service {
        ServiceKind::User => UserServiceClient::new(channel.clone())
            .get_user(request(GetUserRequest { user_id: id }))
            .await
            .map(|_| ()),
        ServiceKind::Content => ContentServiceClient::new(channel.clone())
            .get_post(request(GetPostRequest { post_id: id }))
            .await
            .map(|_| ()),
        ServiceKind::Feed => FeedServiceClient::new(channel.clone())
            .get_feed(request(GetFeedRequest {
                user_id: id,
                ..Default::default()
            }))
            .await
            .map(|_| ()),
        ServiceKind::Auth => AuthServiceClient::new(channel.clone())
            .check(request(CheckRequest { token: id }))
            .await
            .map(|_| ()),
    }
}

/// A request with the gateway's deadline: tonic sets `grpc-timeout` from it and enforces it.
fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(CLIENT_DEADLINE);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings() {
        let late = CLIENT_DEADLINE;
        assert_eq!(ending(Ok(()), late), Ending::Ok);
        assert_eq!(
            ending(Err(tonic::Status::cancelled("Timeout expired")), late),
            Ending::GaveUp
        );
        // Envoy's own timeout at the client's deadline is no answer either.
        assert_eq!(
            ending(
                Err(tonic::Status::unavailable("upstream request timeout")),
                late
            ),
            Ending::GaveUp
        );
        // A cancel well before the deadline is not the gateway giving up at it.
        assert_eq!(
            ending(
                Err(tonic::Status::cancelled("x")),
                Duration::from_millis(10)
            ),
            Ending::UpstreamFailure
        );
        let mut rejected = tonic::Status::unavailable("circuit breaker open for content");
        rejected
            .metadata_mut()
            .insert("x-circuit-breaker", "open".parse().unwrap());
        assert_eq!(
            ending(Err(rejected), Duration::from_millis(1)),
            Ending::Rejected
        );
        assert!(!Ending::GaveUp.answered() && !Ending::Shed.answered());
        assert!(Ending::Rejected.answered() && Ending::UpstreamFailure.answered());
    }

    /// Against a listener that takes connections and never says a word, arrivals keep coming while
    /// every call hangs: the in-flight bound is reached, the rest are shed, and the loop ends at its
    /// request bound; every call then ends at its deadline.
    #[tokio::test(start_paused = true)]
    async fn arrivals_are_open_loop_and_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let start = Instant::now();
        let gateway = Gateway::new(channel, start);
        let extra = 20;
        let requests = (MAX_IN_FLIGHT + extra) as u64;
        let never = start + Duration::from_secs(3600);
        tokio::time::timeout(
            ARRIVAL_EVERY * (requests as u32 + 10),
            gateway.clone().arrivals(never, requests),
        )
        .await
        .expect("the arrival loop ends at its request bound");
        assert_eq!(gateway.arrived.load(Ordering::Relaxed), requests);
        let shed = |g: &Gateway| g.calls().iter().filter(|c| !c.made()).count();
        // 300 × 5 ms = 1.5 s: the first calls are not yet at their 2 s deadline, so none has ended.
        assert_eq!(gateway.in_flight(), MAX_IN_FLIGHT);
        assert_eq!(shed(&gateway), extra);
        gateway.drain().await;
        assert_eq!(gateway.in_flight(), 0);
        let calls = gateway.calls();
        assert_eq!(calls.len() as u64, requests);
        assert!(calls.iter().all(|c| c.ending
            == if c.made() {
                Ending::GaveUp
            } else {
                Ending::Shed
            }));
        held.abort();
    }

    /// The arrivals end at `until` whatever their count bound: a request every 5 ms from the start,
    /// for 100 ms, is 20 requests.
    #[tokio::test(start_paused = true)]
    async fn arrivals_end_at_their_time() {
        let channel = Channel::from_static("http://127.0.0.1:9").connect_lazy();
        let start = Instant::now();
        let gateway = Gateway::new(channel, start);
        let until = start + ARRIVAL_EVERY * 20;
        gateway.clone().arrivals(until, u64::MAX).await;
        assert_eq!(gateway.arrived.load(Ordering::Relaxed), 20);
        assert_eq!(Instant::now(), until);
        gateway.drain().await;
    }
}
