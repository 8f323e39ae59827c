//! One HTTP stream through the breaker (contract sections 3 and 4): the per-stream rules every host
//! drives, written once.
//!
//! - On the request headers: answer the health endpoint, or work out the upstream key, admit the
//!   call, and answer it locally when the breaker rejects it.
//! - As soon as the response is complete, record its outcome, before the client has it: the final
//!   headers of an HTTP response or of a trailers-only gRPC response, the trailers of any other gRPC
//!   response. A caller that saw the fifth failure come back then sees its next call fail fast.
//! - When the stream ends with the call still unsettled (a reset, a cancel, a gRPC response that ended
//!   without trailers), judge it from what Envoy says happened: its response flags, always read then,
//!   and the call's `grpc-timeout` deadline. A HalfOpen probe's permit goes back either way.
//!
//! A session holds no host and no worker: each callback is handed both, and everything it has to say
//! goes to the host as [`crate::telemetry::Event`]s as it happens.

use crate::breaker::Rejection;
use crate::classify::{classify, CallFacts, Outcome, ResponseFlags};
use crate::config::MAX_KEY_LEN;
use crate::deadline::parse_grpc_timeout;
use crate::host::{Action, Host};
use crate::key::{normalize_authority, UpstreamKey};
use crate::registry::Untracked;
use crate::store::BreakerStore;
use crate::telemetry::{Event, Level, Upstream};
use crate::worker::{Admission, Call, Refusal, Worker};

/// A call let through and not yet settled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tracked {
    call: Call,
    /// `:status` of the response headers, kept for the trailers (or the end) that settle a gRPC
    /// call; Envoy's response code at the end of the stream.
    http_status: Option<u16>,
    /// Response headers came: the call can no longer be stuck, nor its cancel be a deadline's.
    headers_came: bool,
}

/// One stream.
#[derive(Debug, Default)]
pub struct Session {
    call: Option<Tracked>,
    /// `dry_run` would have rejected this call: mark its response.
    dry_run: Option<Rejection>,
    /// The client has sent its whole request (a stream idle timeout is then the upstream's).
    request_complete: bool,
}

impl Session {
    /// A stream that has not started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the stream holds an admitted call that is not settled yet.
    pub fn in_flight(&self) -> bool {
        self.call.is_some()
    }

    /// Whether the stream has nothing left to do: no call to settle, no response to mark. The
    /// response-side callbacks of such a stream (a rejected call, an untracked one) need no worker.
    pub fn idle(&self) -> bool {
        self.call.is_none() && self.dry_run.is_none()
    }

    /// Whether that call holds a HalfOpen probe permit.
    pub fn holds_probe(&self) -> bool {
        self.call.as_ref().is_some_and(|t| t.call.ticket.probe)
    }

    /// The call held, if any (the native host keeps it to forget it if the stream is lost).
    pub fn call(&self) -> Option<&Call> {
        self.call.as_ref().map(|t| &t.call)
    }

    /// The request headers: the health endpoint, or admission. `end_of_stream`: the request has no
    /// body.
    pub fn on_request<S: BreakerStore, H: Host>(
        &mut self,
        w: &mut Worker<S>,
        host: &mut H,
        end_of_stream: bool,
    ) -> Action {
        self.request_complete = end_of_stream;
        if is_health_request(w, host) {
            let now = host.now_ms();
            let answer = w.health(now);
            return if host.send_reply(answer) {
                Action::Stop
            } else {
                Action::Continue
            };
        }
        let key = match upstream_key(&w.config().upstream_key, host) {
            Ok(key) => key,
            Err(why) => {
                host.event(Upstream::NONE, &Event::Untracked(why));
                return Action::Continue;
            }
        };
        match w.admit(&key, host) {
            Admission::Allow(call) => {
                let cfg = w.config().breaker(call.breaker);
                if let Some(ms) = cfg.call_timeout_ms {
                    let ms = crate::reply::Digits::new(ms);
                    host.set_request_header("x-envoy-upstream-rq-timeout-ms", ms.as_str());
                }
                if w.wants_stream(&call) {
                    if let Some(stream) = host.stream_token() {
                        w.attach_stream(&call, stream);
                    }
                }
                self.call = Some(Tracked {
                    call,
                    http_status: None,
                    headers_came: false,
                });
                Action::Continue
            }
            Admission::Reject(refusal) => {
                if answer(host, refusal, false) {
                    Action::Stop
                } else {
                    Action::Continue
                }
            }
            Admission::DryRun(r) => {
                self.dry_run = Some(r);
                Action::Continue
            }
            Admission::Untracked | Admission::Disabled => Action::Continue,
        }
    }

    /// The last of the request went upstream (a body chunk or trailers that end the stream).
    pub fn on_request_end(&mut self) {
        self.request_complete = true;
    }

    /// The response headers. `end_of_stream`: they end the response (a trailers-only gRPC response,
    /// or an HTTP response without a body).
    pub fn on_response_headers<S: BreakerStore, H: Host>(
        &mut self,
        w: &mut Worker<S>,
        host: &mut H,
        end_of_stream: bool,
    ) -> Action {
        if let Some(r) = self.dry_run.take() {
            host.add_response_header("x-circuit-breaker-dry-run", r.marker());
        }
        let Some(tracked) = self.call.as_mut() else {
            return Action::Continue;
        };
        tracked.headers_came = true;
        w.headers_came(&mut tracked.call);
        // Read here for gRPC too, where only a response without grpc-status needs it: in the
        // trailers callback the headers may no longer be readable (wasm answers BadArgument).
        tracked.http_status = host
            .response_header(":status")
            .and_then(|s| parse_status(&s));
        if !tracked.call.grpc {
            self.settle(w, host, CallFacts::default());
        } else if end_of_stream {
            // Trailers-only gRPC: the status is in the headers.
            let grpc_status = host.response_header("grpc-status");
            let facts = CallFacts {
                grpc_status: grpc_status.as_deref(),
                ..CallFacts::default()
            };
            self.settle(w, host, facts);
        }
        Action::Continue
    }

    /// The response trailers: they complete a gRPC response.
    pub fn on_response_trailers<S: BreakerStore, H: Host>(
        &mut self,
        w: &mut Worker<S>,
        host: &mut H,
    ) -> Action {
        if self.call.is_some() {
            let grpc_status = host.response_trailer("grpc-status");
            let facts = CallFacts {
                grpc_status: grpc_status.as_deref(),
                ..CallFacts::default()
            };
            self.settle(w, host, facts);
        }
        Action::Continue
    }

    /// The stream ended (wasm `on_log`, native `stream_complete`). A call still unsettled is judged
    /// from Envoy's account of the stream, and from the call's deadline: read only now, since only a
    /// call that ends this way needs it.
    pub fn on_end<S: BreakerStore, H: Host>(&mut self, w: &mut Worker<S>, host: &mut H) {
        let Some(tracked) = self.call.as_mut() else {
            return;
        };
        if let Some(code) = host.response_code().filter(|c| *c != 0) {
            tracked.http_status = Some(code);
        }
        let deadline_us = if tracked.call.grpc && !tracked.headers_came {
            host.request_header("grpc-timeout")
                .and_then(|raw| parse_grpc_timeout(&raw))
        } else {
            None
        };
        let grpc_status = host
            .response_trailer("grpc-status")
            .or_else(|| host.response_header("grpc-status"));
        let facts = CallFacts {
            grpc_status: grpc_status.as_deref(),
            flags: ResponseFlags(host.response_flags().unwrap_or(0)),
            ended_early: true,
            deadline_us,
            ..CallFacts::default()
        };
        self.settle(w, host, facts);
    }

    /// Records the outcome of the call, once.
    fn settle<S: BreakerStore, H: Host>(
        &mut self,
        w: &mut Worker<S>,
        host: &mut H,
        mut facts: CallFacts<'_>,
    ) {
        let Some(tracked) = self.call.take() else {
            return;
        };
        let now = host.now_ms().unwrap_or(tracked.call.start_ms);
        facts.grpc = tracked.call.grpc;
        facts.http_status = tracked.http_status;
        facts.headers_came = tracked.headers_came;
        facts.request_complete = self.request_complete;
        facts.duration_ms = Some(now.saturating_sub(tracked.call.start_ms));
        let cfg = w.config().breaker(tracked.call.breaker);
        let mut verdict = classify(cfg, &facts);
        // Flags can only make an outcome a failure, and only Envoy's own replies (never OK) carry the
        // ones that do on a complete response: on a failure already, or on an upstream's OK, reading
        // them (a host call) would change nothing.
        if !facts.ended_early && verdict.outcome != Outcome::Failure && !clean_ok(&facts) {
            facts.flags = ResponseFlags(host.response_flags().unwrap_or(0));
            verdict = classify(cfg, &facts);
        }
        w.record(tracked.call, verdict, now, host);
    }
}

/// Delivers the breaker's answer to a stuck call the worker's tick ordered cut
/// ([`crate::worker::CutOrder`]): `host` is that call's stream (wasm: the root's host calls once the
/// stream is the effective context; native: the stream's own scheduled event). Counted in
/// `circuit_breaker_cut_calls_total` once the reply is out; its outcome stays the stuck failure
/// recorded before. `false` when there was nothing to send or the host refused.
pub fn deliver_cut<S: BreakerStore, H: Host + ?Sized>(
    w: &mut Worker<S>,
    host: &mut H,
    call: u64,
) -> bool {
    let Some(refusal) = w.take_cut(call) else {
        return false;
    };
    let sent = answer(host, refusal, true);
    if !sent {
        host.log(
            Level::Warn,
            "circuit breaker: the host refused to answer a stuck call being cut; it goes on waiting",
        );
    }
    sent
}

/// Sends a refusal's reply; once it is out, reports it: a cut (`cut`), else a rejection. A rejection
/// the host will not send is reported as an untracked call (the request goes on).
fn answer<H: Host + ?Sized>(host: &mut H, refusal: Refusal, cut: bool) -> bool {
    let Refusal {
        reply,
        rejection,
        names,
    } = refusal;
    let upstream = names.upstream();
    // Counted only once the reply is out: a call the host would not answer goes on.
    if host.send_reply(reply) {
        let event = if cut {
            Event::Cut
        } else {
            Event::Rejected(rejection)
        };
        host.event(upstream, &event);
        true
    } else {
        if !cut {
            host.event(upstream, &Event::Untracked(Untracked::ReplyFailed));
        }
        false
    }
}

/// A complete response that only an upstream gives: gRPC `OK`, or HTTP below 400. Envoy's local
/// replies (connect failure, timeout, overflow) are never that, so their flags need no reading.
fn clean_ok(facts: &CallFacts<'_>) -> bool {
    if facts.grpc {
        facts.grpc_status == Some(b"0")
    } else {
        facts.http_status.is_some_and(|s| (100..400).contains(&s))
    }
}

fn is_health_request<S: BreakerStore, H: Host>(w: &Worker<S>, host: &mut H) -> bool {
    let Some(health_path) = w.config().health_path.as_deref() else {
        return false;
    };
    let Some(path) = host.request_header(":path") else {
        return false;
    };
    let path = path.split(|b| *b == b'?').next().unwrap_or_default();
    path == health_path.as_bytes() && host.request_header(":method").as_deref() == Some(b"GET")
}

/// The upstream key of this request, per `upstream_key`. A missing, empty or non-UTF-8 key, or one
/// longer than [`MAX_KEY_LEN`], is refused here, before any lookup (a header value that long is not
/// even copied, where the host can tell).
fn upstream_key<H: Host>(kind: &UpstreamKey, host: &mut H) -> Result<String, Untracked> {
    let too_long = |_| Untracked::KeyTooLong;
    let raw = match kind {
        UpstreamKey::Cluster => host.cluster_name(),
        UpstreamKey::Authority => host
            .request_header_up_to(":authority", MAX_KEY_LEN)
            .map_err(too_long)?,
        UpstreamKey::GrpcService | UpstreamKey::GrpcMethod => host.request_header(":path"),
        UpstreamKey::Header(name) => host
            .request_header_up_to(name, MAX_KEY_LEN)
            .map_err(too_long)?,
    };
    let raw = raw.ok_or(Untracked::NoKey)?;
    // A cluster name (Envoy's own) is checked here on its raw value. A gRPC path is not: its key is
    // a part of it, checked once parsed below, so a long method name under a short service still
    // has a breaker per service.
    if raw.len() > MAX_KEY_LEN
        && !matches!(kind, UpstreamKey::GrpcService | UpstreamKey::GrpcMethod)
    {
        return Err(Untracked::KeyTooLong);
    }
    let text = String::from_utf8(raw).map_err(|_| Untracked::NoKey)?;
    let key = match kind {
        UpstreamKey::GrpcService | UpstreamKey::GrpcMethod => kind
            .from_grpc_path(&text)
            .ok_or(Untracked::NoKey)?
            .to_string(),
        UpstreamKey::Authority => {
            let scheme = host.request_header(":scheme");
            normalize_authority(&text, scheme.as_deref()).ok_or(Untracked::NoKey)?
        }
        _ => text,
    };
    if key.is_empty() {
        return Err(Untracked::NoKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Untracked::KeyTooLong);
    }
    Ok(key)
}

fn parse_status(raw: &[u8]) -> Option<u16> {
    std::str::from_utf8(raw).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod stuck_tests;
#[cfg(test)]
mod tests;
