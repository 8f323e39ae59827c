//! The simulated Envoy around one call: what the core's [`Host`] asks of a stream, answered from the
//! call's script, and every event counted in the simulation's [`Stats`].

use cb_core::host::Host;
use cb_core::reply::LocalReply;
use cb_core::telemetry::{Event, Level, Series, Telemetry, Upstream};

use super::stats::Stats;
use super::upstream::Clock;

/// Events of one worker that belong to no stream (the stuck-call check), counted in the stats.
pub(super) struct SimTelemetry<'a> {
    pub clock: Clock,
    pub worker: usize,
    pub stats: &'a Stats,
    /// The events, in order, for the caller to look at.
    pub events: Vec<Event>,
}

impl Telemetry for SimTelemetry<'_> {
    // The stats count events; the metric series and log lines the core derives from them are what
    // the real hosts export, and are tested there.
    fn add(&mut self, _: &Series<'_>, _: u64) {}
    fn set(&mut self, _: &Series<'_>, _: u64) {}
    fn log(&mut self, _: Level, _: &str) {}
    fn event(&mut self, upstream: Upstream<'_>, event: &Event) {
        self.stats
            .event(self.clock.now_ms(), self.worker, upstream.key, event);
        self.events.push(event.clone());
    }
}

/// One stream, as Envoy would show it to the filter.
pub(super) struct SimHost<'a> {
    pub telemetry: SimTelemetry<'a>,
    pub request: Vec<(&'static str, String)>,
    pub cluster: String,
    pub response: Vec<(&'static str, String)>,
    pub trailers: Vec<(&'static str, String)>,
    pub flags: u64,
    pub reply: Option<LocalReply>,
    /// The stream's handle for a cut: the worker's tick sends the call's id to it.
    pub stream: u64,
}

fn find(headers: &[(&'static str, String)], name: &str) -> Option<Vec<u8>> {
    headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_bytes().to_vec())
}

impl Telemetry for SimHost<'_> {
    fn add(&mut self, s: &Series<'_>, n: u64) {
        self.telemetry.add(s, n);
    }
    fn set(&mut self, s: &Series<'_>, v: u64) {
        self.telemetry.set(s, v);
    }
    fn log(&mut self, level: Level, message: &str) {
        self.telemetry.log(level, message);
    }
    fn event(&mut self, upstream: Upstream<'_>, event: &Event) {
        self.telemetry.event(upstream, event);
    }
}

impl Host for SimHost<'_> {
    fn now_ms(&mut self) -> Option<u64> {
        Some(self.telemetry.clock.now_ms())
    }
    fn request_header(&mut self, name: &str) -> Option<Vec<u8>> {
        find(&self.request, name)
    }
    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        find(&self.response, name)
    }
    fn response_trailer(&mut self, name: &str) -> Option<Vec<u8>> {
        find(&self.trailers, name)
    }
    fn cluster_name(&mut self) -> Option<Vec<u8>> {
        Some(self.cluster.as_bytes().to_vec())
    }
    fn response_code(&mut self) -> Option<u16> {
        find(&self.response, ":status").and_then(|s| String::from_utf8(s).ok()?.parse().ok())
    }
    fn response_flags(&mut self) -> Option<u64> {
        Some(self.flags)
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        let name = if name == "x-envoy-upstream-rq-timeout-ms" {
            "x-envoy-upstream-rq-timeout-ms"
        } else {
            "x-other"
        };
        self.request.push((name, value.to_string()));
    }
    fn add_response_header(&mut self, _: &str, _: &str) {}
    fn stream_token(&mut self) -> Option<u64> {
        Some(self.stream)
    }
    fn send_reply(&mut self, reply: LocalReply) -> bool {
        self.reply = Some(reply);
        true
    }
}
