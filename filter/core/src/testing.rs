//! A fake host for the core's own tests: what Envoy would show a stream, set by the test, and
//! everything the session did to it, kept for assertions. A test of the session over this host is a
//! test of every host's stream logic.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::FilterConfig;
use crate::host::Host;
use crate::reply::LocalReply;
use crate::store::{CasToken, MemoryStore, SharedData, SharedStore, StoreError};
use crate::telemetry::{report, Event, Level, Metric, Series, Telemetry, Upstream};
use crate::worker::Worker;

/// One stream's host, and the telemetry of the whole test.
#[derive(Debug, Default)]
pub struct FakeHost {
    pub now: Option<u64>,
    pub request: BTreeMap<String, Vec<u8>>,
    pub response: BTreeMap<String, Vec<u8>>,
    pub trailers: BTreeMap<String, Vec<u8>>,
    pub cluster: Option<Vec<u8>>,
    pub code: Option<u16>,
    pub flags: Option<u64>,
    pub refuse_replies: bool,
    /// What `stream_token` answers.
    pub token: Option<u64>,
    /// What the session did.
    pub set_request: Vec<(String, String)>,
    pub added_response: Vec<(String, String)>,
    pub replies: Vec<LocalReply>,
    pub flag_reads: u32,
    /// Telemetry: counters and gauges by series text (`name{a=b,...}`), logs, events.
    pub counters: BTreeMap<String, u64>,
    pub gauges: BTreeMap<String, u64>,
    pub logs: Vec<(Level, String)>,
    pub events: Vec<(String, Event)>,
}

impl FakeHost {
    /// A gRPC request to cluster `content` at `now`.
    pub fn grpc(now: u64) -> Self {
        let mut h = Self {
            now: Some(now),
            cluster: Some(b"content".to_vec()),
            ..Self::default()
        };
        h.req("content-type", "application/grpc");
        h.req(":path", "/social.Content/GetPost");
        h.req(":method", "POST");
        h
    }

    /// A plain HTTP request to cluster `content` at `now`.
    pub fn http(now: u64) -> Self {
        let mut h = Self {
            now: Some(now),
            cluster: Some(b"content".to_vec()),
            ..Self::default()
        };
        h.req(":path", "/posts/1");
        h.req(":method", "GET");
        h
    }

    pub fn req(&mut self, name: &str, value: &str) -> &mut Self {
        self.request.insert(name.into(), value.as_bytes().to_vec());
        self
    }

    pub fn resp(&mut self, name: &str, value: &str) -> &mut Self {
        self.response.insert(name.into(), value.as_bytes().to_vec());
        self
    }

    pub fn trailer(&mut self, name: &str, value: &str) -> &mut Self {
        self.trailers.insert(name.into(), value.as_bytes().to_vec());
        self
    }

    /// A counter's value, by series text (`circuit_breaker_calls_total{upstream=content,result=failure}`).
    pub fn counter(&self, series: &str) -> u64 {
        self.counters.get(series).copied().unwrap_or(0)
    }

    /// Moves the telemetry of `other` (a later stream of the same test) into this one.
    pub fn absorb(&mut self, other: FakeHost) {
        for (k, v) in other.counters {
            *self.counters.entry(k).or_default() += v;
        }
        self.gauges.extend(other.gauges);
        self.logs.extend(other.logs);
        self.events.extend(other.events);
    }
}

/// `name{label=value,...}`, the way the tests name a series.
pub fn series_text(s: &Series<'_>) -> String {
    let labels: Vec<String> = s
        .metric
        .labels()
        .iter()
        .zip(s.label_values())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if labels.is_empty() {
        s.metric.name().to_string()
    } else {
        format!("{}{{{}}}", s.metric.name(), labels.join(","))
    }
}

impl Telemetry for FakeHost {
    fn add(&mut self, series: &Series<'_>, n: u64) {
        assert_eq!(series.metric.kind(), crate::telemetry::MetricKind::Counter);
        *self.counters.entry(series_text(series)).or_default() += n;
    }
    fn set(&mut self, series: &Series<'_>, value: u64) {
        assert_eq!(series.metric, Metric::State);
        self.gauges.insert(series_text(series), value);
    }
    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }
    fn event(&mut self, upstream: Upstream<'_>, event: &Event) {
        self.events.push((upstream.key.to_string(), event.clone()));
        report(upstream, event, self);
    }
}

impl Host for FakeHost {
    fn now_ms(&mut self) -> Option<u64> {
        self.now
    }
    fn request_header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.request.get(name).cloned()
    }
    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.response.get(name).cloned()
    }
    fn response_trailer(&mut self, name: &str) -> Option<Vec<u8>> {
        self.trailers.get(name).cloned()
    }
    fn cluster_name(&mut self) -> Option<Vec<u8>> {
        self.cluster.clone()
    }
    fn response_code(&mut self) -> Option<u16> {
        self.code
    }
    fn response_flags(&mut self) -> Option<u64> {
        self.flag_reads += 1;
        self.flags
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        self.set_request.push((name.into(), value.into()));
    }
    fn add_response_header(&mut self, name: &str, value: &str) {
        self.added_response.push((name.into(), value.into()));
    }
    fn send_reply(&mut self, reply: LocalReply) -> bool {
        if self.refuse_replies {
            return false;
        }
        self.replies.push(reply);
        true
    }
    fn stream_token(&mut self) -> Option<u64> {
        self.token
    }
}

/// A worker over shared data in memory, for `json` loaded at time 0.
pub fn worker(json: &str, store: &Arc<MemoryStore>) -> Worker<SharedData<Arc<MemoryStore>>> {
    let config = FilterConfig::from_json(json.as_bytes()).expect("test config");
    let capacity = config.max_upstreams;
    let mut w = Worker::new(
        Arc::new(config),
        0,
        SharedData::new(Arc::clone(store), capacity),
        0x5eed,
    );
    w.prepare().expect("prepare");
    w
}

/// Shared data in memory that counts its reads, to see which ones an optimisation spares.
#[derive(Debug, Default)]
pub struct CountingStore {
    pub inner: MemoryStore,
    pub gets: std::cell::Cell<u64>,
}

impl SharedStore for CountingStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
        self.gets.set(self.gets.get() + 1);
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
        self.inner.set(key, value, cas)
    }
}
