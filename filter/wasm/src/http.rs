//! The per-stream context: admit on request headers, record the outcome as soon as the response is
//! complete (final headers for HTTP and trailers-only gRPC, trailers for gRPC), settle whatever is left
//! in `on_log` (resets, cancels), releasing a HalfOpen probe permit the stream held.

use std::rc::Rc;

use cb_core::breaker::{StateKind, Ticket, Transition};
use cb_core::classify::{classify, CallFacts, Outcome, ResponseFlags};
use cb_core::config::{BreakerConfig, Mode};
use cb_core::key::UpstreamKey;
use cb_core::registry::{Admission, Admitted, Recorded, Registry, Untracked};
use cb_core::reply;
use cb_core::store::UpdateError;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

use crate::host::{self, HostStore};
use crate::metrics::{Global, Metrics};
use crate::root::Shared;

/// A call the breaker let through, waiting for its outcome.
struct Call {
    upstream: String,
    ticket: Ticket,
    grpc: bool,
    start_ms: u64,
    /// `:status` of the response headers, kept for the trailers that complete a gRPC response.
    http_status: Option<u16>,
}

/// One HTTP stream.
pub struct Stream {
    shared: Option<Rc<Shared>>,
    call: Option<Call>,
    /// `dry_run` would have rejected this call: mark the response.
    dry_run: Option<StateKind>,
}

impl Stream {
    /// A stream under a configuration (`None` only if the root was never configured: pass through).
    pub fn new(shared: Option<Rc<Shared>>) -> Self {
        Self {
            shared,
            call: None,
            dry_run: None,
        }
    }

    /// Answers the health endpoint if this request is for it.
    fn answer_health(&self, shared: &Shared) -> bool {
        let Some(health_path) = shared.config.health_path.as_deref() else {
            return false;
        };
        let Some(path) = host::request_header(":path") else {
            return false;
        };
        let path = path.split(|b| *b == b'?').next().unwrap_or_default();
        if path != health_path.as_bytes()
            || host::request_header(":method").as_deref() != Some(b"GET")
        {
            return false;
        }
        let now = host::now_ms().unwrap_or(0);
        let reply = match Registry::snapshot(&HostStore, now) {
            Ok(breakers) => reply::health(&breakers),
            Err(e) => {
                host::log(
                    LogLevel::Warn,
                    &format!("circuit breaker: health endpoint could not read shared data: {e}"),
                );
                reply::LocalReply {
                    status: 503,
                    ..reply::health(&[])
                }
            }
        };
        host::send_reply(&reply)
    }

    /// Admits the request, or answers it.
    fn admit(&mut self, shared: &Shared) -> Action {
        let config = &shared.config;
        let Some(upstream) = upstream_key(&config.upstream_key) else {
            count_untracked(shared, &Untracked::NoKey);
            return Action::Continue;
        };
        let cfg = config.breaker_for(&upstream);
        if cfg.mode == Mode::Disabled {
            // Nothing to track or report (the registry would answer `Untracked::Disabled`, which is not
            // counted): skip the clock and the content-type, which is a host call that allocates.
            return Action::Continue;
        }
        let Some(now) = host::now_ms() else {
            count_untracked(shared, &Untracked::NoKey);
            return Action::Continue;
        };
        let Ok(mut registry) = shared.registry.try_borrow_mut() else {
            return Action::Continue;
        };
        let admitted = registry.admit(&HostStore, &upstream, cfg, now);
        drop(registry);
        report_admission(shared, &upstream, &admitted);
        let grpc = reply::is_grpc(
            host::request_header("content-type")
                .as_deref()
                .and_then(|v| std::str::from_utf8(v).ok()),
        );
        match admitted.admission {
            Admission::Allow(ticket) => {
                if let Some(ms) = cfg.call_timeout_ms {
                    host::set_request_header("x-envoy-upstream-rq-timeout-ms", &ms.to_string());
                }
                self.call = Some(Call {
                    upstream,
                    ticket,
                    grpc,
                    start_ms: now,
                    http_status: None,
                });
                Action::Continue
            }
            Admission::Reject(rejection) => {
                with_metrics(shared, |m| m.rejected(&upstream));
                let answer = reply::rejection(grpc, &upstream, &rejection, cfg.fallback.as_ref());
                if host::send_reply(&answer) {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
            Admission::DryRun(rejection) => {
                with_metrics(shared, |m| m.dry_run_rejection(&upstream));
                self.dry_run = Some(rejection.state);
                Action::Continue
            }
            Admission::Untracked(why) => {
                count_untracked(shared, &why);
                Action::Continue
            }
        }
    }

    /// Records the outcome of the admitted call, once.
    fn settle(&mut self, mut facts: CallFacts<'_>) {
        let (Some(shared), Some(call)) = (self.shared.clone(), self.call.take()) else {
            return;
        };
        let cfg: &BreakerConfig = shared.config.breaker_for(&call.upstream);
        let now = host::now_ms().unwrap_or(call.start_ms);
        facts.grpc = call.grpc;
        facts.duration_ms = Some(now.saturating_sub(call.start_ms));
        let mut verdict = classify(cfg, &facts);
        // Response flags can only make an outcome a failure. When the statuses already do, reading
        // them (a property lookup, whose bytes come back through an allocation inside the VM) would
        // change nothing; otherwise they decide, as before.
        if verdict.outcome != Outcome::Failure {
            facts.flags = ResponseFlags(host::property_u64(&["response", "flags"]).unwrap_or(0));
            verdict = classify(cfg, &facts);
        }
        let Ok(mut registry) = shared.registry.try_borrow_mut() else {
            return;
        };
        let recorded = registry.record(&HostStore, &call.upstream, cfg, call.ticket, now, verdict);
        drop(registry);
        with_metrics(&shared, |m| {
            if verdict.outcome != Outcome::Ignored {
                m.call(
                    &call.upstream,
                    verdict.outcome == Outcome::Failure,
                    verdict.slow,
                );
            }
        });
        report_record(&shared, &call.upstream, &recorded);
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        if self.answer_health(&shared) {
            return Action::Pause;
        }
        self.admit(&shared)
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if let Some(state) = self.dry_run.take() {
            host::add_response_header("x-circuit-breaker-dry-run", state.as_str());
        }
        let Some(call) = self.call.as_mut() else {
            return Action::Continue;
        };
        let status = host::response_header(":status").and_then(|s| parse_status(&s));
        call.http_status = status;
        if !call.grpc {
            self.settle(CallFacts {
                http_status: status,
                ..CallFacts::default()
            });
        } else if end_of_stream {
            // Trailers-only gRPC response: the status is in the headers.
            let grpc_status = host::response_header("grpc-status");
            self.settle(CallFacts {
                http_status: status,
                grpc_status: grpc_status.as_deref(),
                ..CallFacts::default()
            });
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        if let Some(call) = self.call.as_ref() {
            let http_status = call.http_status;
            let grpc_status = host::response_trailer("grpc-status");
            self.settle(CallFacts {
                http_status,
                grpc_status: grpc_status.as_deref(),
                ..CallFacts::default()
            });
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // Still unsettled: the stream was reset or cancelled, or a gRPC response ended without trailers.
        // Envoy's attributes say what happened; the flags (read in `settle`) tell a reset from a cancel.
        let Some(call) = self.call.as_ref() else {
            return;
        };
        let code = host::property_u64(&["response", "code"])
            .and_then(|c| u16::try_from(c).ok())
            .or(call.http_status);
        let grpc_status =
            host::response_trailer("grpc-status").or_else(|| host::response_header("grpc-status"));
        self.settle(CallFacts {
            http_status: code,
            grpc_status: grpc_status.as_deref(),
            ..CallFacts::default()
        });
    }
}

/// The upstream key of this request, per `upstream_key`; `None` when the request has none (or one that
/// is not UTF-8).
fn upstream_key(kind: &UpstreamKey) -> Option<String> {
    let raw = match kind {
        UpstreamKey::Cluster => host::property(&["xds", "cluster_name"])?,
        UpstreamKey::Authority => host::request_header(":authority")?,
        UpstreamKey::GrpcService | UpstreamKey::GrpcMethod => {
            let path = String::from_utf8(host::request_header(":path")?).ok()?;
            return kind.from_grpc_path(&path).map(str::to_string);
        }
        UpstreamKey::Header(name) => host::request_header(name)?,
    };
    String::from_utf8(raw).ok().filter(|k| !k.is_empty())
}

fn parse_status(raw: &[u8]) -> Option<u16> {
    std::str::from_utf8(raw).ok()?.trim().parse().ok()
}

fn with_metrics(shared: &Shared, f: impl FnOnce(&mut Metrics)) {
    if let Ok(mut m) = shared.metrics.try_borrow_mut() {
        f(&mut m);
    }
}

fn count_untracked(shared: &Shared, why: &Untracked) {
    if why.counted() {
        with_metrics(shared, |m| m.add(Global::Untracked, 1));
    }
    if let Untracked::Store(e) = why {
        host::log(
            LogLevel::Warn,
            &format!("circuit breaker: failing open, shared data: {e}"),
        );
        count_store_error(shared, e);
    }
}

/// Metrics and logs of an admission: the state gauge the first time this VM sees the upstream, state
/// changes, corrupt state, contention.
fn report_admission(shared: &Shared, upstream: &str, a: &Admitted) {
    let seen_state = match a.admission {
        Admission::Allow(t) if t.probe => Some(StateKind::HalfOpen),
        Admission::Allow(_) => Some(StateKind::Closed),
        Admission::Reject(r) | Admission::DryRun(r) => Some(r.state),
        Admission::Untracked(_) => None,
    };
    with_metrics(shared, |m| {
        if let (Some(state), false) = (seen_state, m.knows(upstream)) {
            m.state(upstream, state);
        }
        m.add(Global::CasRetries, u64::from(a.attempts.saturating_sub(1)));
    });
    report_common(shared, upstream, a.transition, a.corrupt.as_ref());
}

fn report_record(shared: &Shared, upstream: &str, r: &Recorded) {
    with_metrics(shared, |m| {
        m.add(Global::CasRetries, u64::from(r.attempts.saturating_sub(1)))
    });
    if let Some(e) = &r.error {
        host::log(
            LogLevel::Warn,
            &format!("circuit breaker: outcome for upstream={upstream} lost: {e}"),
        );
        count_store_error(shared, e);
    }
    report_common(shared, upstream, r.transition, r.corrupt.as_ref());
}

/// Counts a shared-data failure under the metric that names it: a lost CAS race, or the host
/// refusing a call. A state not created yet (see `MISSING_GRACE_MS`) is neither: the call is already
/// counted as untracked.
fn count_store_error(shared: &Shared, e: &UpdateError) {
    let which = match e {
        UpdateError::GaveUp => Global::CasGiveUps,
        UpdateError::Store(_) => Global::StoreErrors,
        UpdateError::Missing => return,
    };
    with_metrics(shared, |m| m.add(which, 1));
}

fn report_common(
    shared: &Shared,
    upstream: &str,
    t: Option<Transition>,
    corrupt: Option<&cb_core::codec::CodecError>,
) {
    if let Some(e) = corrupt {
        host::log(
            LogLevel::Warn,
            &format!("circuit breaker: corrupt state for upstream={upstream} in shared data ({e}); restarted it closed"),
        );
        with_metrics(shared, |m| m.add(Global::CorruptState, 1));
    }
    if let Some(t) = t {
        host::log(
            LogLevel::Info,
            &format!(
                "circuit breaker state change: upstream={upstream} from={} to={} reason={}",
                t.from.as_str(),
                t.to.as_str(),
                t.reason.as_str()
            ),
        );
        with_metrics(shared, |m| m.transition(upstream, t));
    }
}
