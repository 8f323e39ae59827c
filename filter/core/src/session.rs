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

use crate::breaker::StateKind;
use crate::classify::{classify, CallFacts, Outcome, ResponseFlags};
use crate::config::MAX_KEY_LEN;
use crate::deadline::parse_grpc_timeout;
use crate::host::{Action, Host};
use crate::key::UpstreamKey;
use crate::registry::Untracked;
use crate::reply;
use crate::store::BreakerStore;
use crate::telemetry::Event;
use crate::worker::{Admission, Call, Worker};

/// A call let through and not yet settled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tracked {
    call: Call,
    grpc: bool,
    /// `:status` of the response headers, kept for the trailers (or the end) that settle a gRPC
    /// call; Envoy's response code at the end of the stream.
    http_status: Option<u16>,
}

/// One stream.
#[derive(Debug, Default)]
pub struct Session {
    call: Option<Tracked>,
    /// `dry_run` would have rejected this call: mark its response.
    dry_run: Option<StateKind>,
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

    /// The request headers: the health endpoint, or admission.
    pub fn on_request<S: BreakerStore, H: Host>(
        &mut self,
        w: &mut Worker<S>,
        host: &mut H,
    ) -> Action {
        if is_health_request(w, host) {
            let now = host.now_ms();
            let answer = w.health(now);
            return if host.send_reply(&answer) {
                Action::Stop
            } else {
                Action::Continue
            };
        }
        let key = match upstream_key(&w.config().upstream_key, host) {
            Ok(key) => key,
            Err(why) => {
                host.event("", &Event::Untracked(why));
                return Action::Continue;
            }
        };
        self.admit(w, host, key)
    }

    fn admit<S: BreakerStore, H: Host>(
        &mut self,
        w: &mut Worker<S>,
        host: &mut H,
        key: String,
    ) -> Action {
        let (_, cfg) = w.settings(&key);
        if cfg.mode == crate::config::Mode::Disabled {
            // Nothing to track or report: spare the clock and the content-type.
            return Action::Continue;
        }
        let (call_timeout_ms, fallback) = (cfg.call_timeout_ms, cfg.fallback.clone());
        let Some(now) = host.now_ms() else {
            host.event(&key, &Event::Untracked(Untracked::NoClock));
            return Action::Continue;
        };
        let grpc = reply::is_grpc(
            host.request_header("content-type")
                .as_deref()
                .and_then(|v| std::str::from_utf8(v).ok()),
        );
        match w.admit(&key, now, host) {
            Admission::Allow(call) => {
                if let Some(ms) = call_timeout_ms {
                    host.set_request_header("x-envoy-upstream-rq-timeout-ms", &ms.to_string());
                }
                self.call = Some(Tracked {
                    call,
                    grpc,
                    http_status: None,
                });
                Action::Continue
            }
            Admission::Reject(r) => {
                let answer = reply::rejection(grpc, &key, &r, fallback.as_ref());
                // Counted only once the reply is out: a call the host would not answer goes on, and
                // counts as untracked instead.
                if host.send_reply(&answer) {
                    host.event(&key, &Event::Rejected(r));
                    Action::Stop
                } else {
                    host.event(&key, &Event::Untracked(Untracked::ReplyFailed));
                    Action::Continue
                }
            }
            Admission::DryRun(r) => {
                self.dry_run = Some(r.state);
                Action::Continue
            }
            Admission::Untracked => Action::Continue,
        }
    }

    /// The response headers. `end_of_stream`: they end the response (a trailers-only gRPC response,
    /// or an HTTP response without a body).
    pub fn on_response_headers<S: BreakerStore, H: Host>(
        &mut self,
        w: &mut Worker<S>,
        host: &mut H,
        end_of_stream: bool,
    ) -> Action {
        if let Some(state) = self.dry_run.take() {
            host.add_response_header("x-circuit-breaker-dry-run", state.as_str());
        }
        let Some(tracked) = self.call.as_mut() else {
            return Action::Continue;
        };
        // Read here for gRPC too, where only a response without grpc-status needs it: in the
        // trailers callback the headers may no longer be readable (wasm answers BadArgument).
        tracked.http_status = host
            .response_header(":status")
            .and_then(|s| parse_status(&s));
        if !tracked.grpc {
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
        let deadline_us = if tracked.grpc {
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
        facts.grpc = tracked.grpc;
        facts.http_status = tracked.http_status;
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
/// longer than [`MAX_KEY_LEN`], is refused here, before any lookup.
fn upstream_key<H: Host>(kind: &UpstreamKey, host: &mut H) -> Result<String, Untracked> {
    let raw = match kind {
        UpstreamKey::Cluster => host.cluster_name(),
        UpstreamKey::Authority => host.request_header(":authority"),
        UpstreamKey::GrpcService | UpstreamKey::GrpcMethod => host.request_header(":path"),
        UpstreamKey::Header(name) => host.request_header(name),
    };
    let raw = raw.ok_or(Untracked::NoKey)?;
    // Checked on the raw value, so even a gRPC path is refused before it is parsed.
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
mod tests;
