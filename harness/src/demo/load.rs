//! The gateway's load: concurrent workers calling the four services in turn, each call with a gRPC
//! deadline, as an API gateway does; and how each call ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::Code;

use crate::services::pb::auth_service_client::AuthServiceClient;
use crate::services::pb::content_service_client::ContentServiceClient;
use crate::services::pb::feed_service_client::FeedServiceClient;
use crate::services::pb::user_service_client::UserServiceClient;
use crate::services::pb::{CheckRequest, GetFeedRequest, GetPostRequest, GetUserRequest};
use crate::services::ServiceKind;

/// Concurrent gateway workers: enough that a hanging service ties most of them up without a breaker.
pub(super) const WORKERS: usize = 12;
/// Pause between two calls of one worker: about 12 × 20 calls a second in all when healthy.
const THINK_TIME: Duration = Duration::from_millis(50);
/// The gateway's deadline on every call. tonic sends it as `grpc-timeout` and cancels the call when it
/// passes; Envoy's route timeout (10 s in envoy/demo.yaml) is far longer, so against a dead host the
/// deadline is what ends a call.
pub(super) const CLIENT_DEADLINE: Duration = Duration::from_secs(2);

/// How one call ended, as the gateway sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// An answer: `OK`, or a status the client caused (none in the demo).
    Ok,
    /// An answer: the upstream (or Envoy on its behalf: timeout, reset) failed the call.
    UpstreamFailure,
    /// An answer: the breaker rejected the call at once.
    Rejected,
    /// No answer: the gateway gave up at its deadline and cancelled the call.
    GaveUp,
}

impl Ending {
    /// Whether the gateway got an answer (of any kind, fast or slow) rather than giving up.
    pub(super) fn answered(self) -> bool {
        self != Ending::GaveUp
    }
}

/// One call, as the gateway saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct CallRecord {
    /// When the call ended, since the start of the run: a call is counted in the second its caller got
    /// the answer (or gave up), which is when a hanging upstream hurts.
    pub(super) at_ms: u64,
    pub(super) service: ServiceKind,
    pub(super) latency_ms: f64,
    pub(super) ending: Ending,
}

/// The calls every worker has recorded, in the order they ended.
pub(super) type Calls = Arc<Mutex<Vec<CallRecord>>>;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One gateway worker: calls the four services in turn until told to stop.
pub(super) async fn gateway_worker(
    worker: usize,
    channel: Channel,
    start: Instant,
    calls: Calls,
    stop: Arc<AtomicBool>,
) {
    let mut n = worker;
    while !stop.load(Ordering::Relaxed) {
        let service = ServiceKind::ALL
            .get(n % 4)
            .copied()
            .unwrap_or(ServiceKind::User);
        n += 1;
        let began = Instant::now();
        let result = call(&channel, service, n).await;
        let latency = began.elapsed();
        let record = CallRecord {
            at_ms: start.elapsed().as_millis() as u64,
            service,
            latency_ms: latency.as_secs_f64() * 1000.0,
            ending: ending(result, latency),
        };
        lock(&calls).push(record);
        tokio::time::sleep(THINK_TIME).await;
    }
}

/// Classifies a call's result.
fn ending(result: Result<(), tonic::Status>, latency: Duration) -> Ending {
    match result {
        Ok(()) => Ending::Ok,
        Err(status) if status.metadata().get("x-circuit-breaker").is_some() => Ending::Rejected,
        // tonic reports its own deadline as CANCELLED ("Timeout expired"); a server could send
        // DEADLINE_EXCEEDED. Either way, at the deadline the gateway got nothing.
        Err(status)
            if matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded)
                && latency >= CLIENT_DEADLINE.mul_f64(0.95) =>
        {
            Ending::GaveUp
        }
        Err(_) => Ending::UpstreamFailure,
    }
}

async fn call(channel: &Channel, service: ServiceKind, n: usize) -> Result<(), tonic::Status> {
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
        assert!(!Ending::GaveUp.answered() && Ending::Rejected.answered());
    }
}
