//! The host, in one place: every call into Envoy, and every pointer Envoy hands back, goes through this
//! file. [`NativeHost`] is one stream's view of Envoy (the core's [`Host`] and [`Telemetry`]);
//! [`ConfigTelemetry`] counts and logs outside any stream (the main thread); the rest turns the module's
//! objects into the pointers Envoy keeps, and back.
//!
//! Envoy's answers are translated here once: a callback that says "no such value" becomes `None`, and no
//! byte Envoy returns is trusted to be UTF-8 or small (header values come back as bytes; the core
//! decides what they mean).

use std::panic::Location;
use std::sync::OnceLock;
use std::time::Instant;

use cb_core::host::Host;
use cb_core::reply::LocalReply;
use cb_core::telemetry::{Level, Metric, MetricKind, Series, Telemetry};

use crate::abi::{self, AttributeId, EnvoyBuffer, HeaderType, LogLevel, ModuleBuffer, ModulePtr};
use crate::config::ModuleConfig;
use crate::filter::Stream;

/// `details` of the module's local replies (Envoy's `%RESPONSE_CODE_DETAILS%`).
const REPLY_DETAILS: &[u8] = b"circuit_breaker";

/// Envoy's object for one filter configuration, kept by the module configuration to count and log
/// outside streams.
#[derive(Debug, Clone, Copy)]
pub struct ConfigEnvoy(abi::ConfigEnvoyPtr);

// SAFETY: the pointer is only handed back to Envoy's `http_filter_config_*` metric callbacks, which
// update thread-safe stats; Envoy keeps the object alive until it calls `config_destroy`, which drops
// the module configuration holding this copy.
unsafe impl Send for ConfigEnvoy {}
// SAFETY: as for `Send`: the module never reads through the pointer itself.
unsafe impl Sync for ConfigEnvoy {}

impl ConfigEnvoy {
    /// The pointer Envoy passed to `config_new`.
    pub fn new(ptr: abi::ConfigEnvoyPtr) -> Self {
        Self(ptr)
    }
}

/// The ids Envoy gave the metrics of [`Metric::ALL`] in `config_new`; `None` for one Envoy refused.
#[derive(Debug, Clone, Default)]
pub struct MetricIds([Option<usize>; Metric::ALL.len()]);

impl MetricIds {
    /// Defines every metric of [`Metric::ALL`], with its label names. Only valid inside `config_new`:
    /// Envoy freezes metric creation afterwards.
    pub fn define(envoy: ConfigEnvoy) -> Self {
        let mut ids = Self::default();
        for (slot, metric) in ids.0.iter_mut().zip(Metric::ALL) {
            *slot = define_metric(envoy, metric);
            if slot.is_none() {
                log(Level::Warn, &format!("circuit breaker: Envoy refused to define metric {}; it will not be reported", metric.name()));
            }
        }
        ids
    }

    fn get(&self, metric: Metric) -> Option<usize> {
        // `Metric::ALL` lists the variants in declaration order (a unit test holds it to that).
        self.0.get(metric as usize).copied().flatten()
    }
}

fn define_metric(envoy: ConfigEnvoy, metric: Metric) -> Option<usize> {
    let define = match metric.kind() {
        MetricKind::Counter => abi::envoy_dynamic_module_callback_http_filter_config_define_counter,
        MetricKind::Gauge => abi::envoy_dynamic_module_callback_http_filter_config_define_gauge,
    };
    let name = ModuleBuffer::of(metric.name().as_bytes());
    let (labels, count) = buffers(metric.labels().iter().copied());
    let mut id = 0usize;
    // SAFETY: `envoy` is the live config object of the running `config_new`; the name and label buffers
    // outlive the call, and `id` is a valid place for Envoy to write.
    let result = unsafe { define(envoy.0, name, labels.as_ptr(), count, &mut id) };
    (result == abi::METRICS_SUCCESS).then_some(id)
}

/// Label names or values as Envoy wants them, without allocating: no metric has more than three.
fn buffers<'s>(values: impl Iterator<Item = &'s str>) -> ([ModuleBuffer; 3], usize) {
    let mut out = [ModuleBuffer::of(&[]); 3];
    let mut n = 0;
    for (slot, value) in out.iter_mut().zip(values) {
        *slot = ModuleBuffer::of(value.as_bytes());
        n += 1;
    }
    (out, n)
}

/// Milliseconds on one monotonic clock for the whole process, so every worker of this Envoy (and every
/// filter configuration) measures from the same origin.
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn log_level(level: Level) -> LogLevel {
    match level {
        Level::Trace => LogLevel::Trace,
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
        Level::Critical => LogLevel::Critical,
    }
}

/// Whether Envoy writes lines at `level`: check it before formatting a line only a log would read.
pub fn log_enabled(level: Level) -> bool {
    // SAFETY: a module-wide callback with no pointer arguments, callable from any thread.
    unsafe { abi::envoy_dynamic_module_callback_log_enabled(log_level(level)) }
}

/// Writes a line to Envoy's `dynamic_modules` logger, with the caller's source location.
#[track_caller]
pub fn log(level: Level, message: &str) {
    let at = Location::caller();
    let line = at.line();
    // SAFETY: a module-wide callback, callable from any thread; both buffers outlive the call.
    unsafe {
        abi::envoy_dynamic_module_callback_log_v2(
            log_level(level),
            ModuleBuffer::of(message.as_bytes()),
            ModuleBuffer::of(at.file().as_bytes()),
            line,
        );
    }
}

/// Writes the line `message` makes, only if Envoy writes lines at `level`: no formatting otherwise.
#[track_caller]
pub fn log_with(level: Level, message: impl FnOnce() -> String) {
    if log_enabled(level) {
        log(level, &message());
    }
}

/// The number of worker threads. Main thread only (`config_new`).
pub fn concurrency() -> u32 {
    // SAFETY: called from `config_new`, which runs on the main thread as the callback requires.
    unsafe { abi::envoy_dynamic_module_callback_get_concurrency() }
}

/// Bytes Envoy lent to a hook (`config_new`'s name and configuration), for the duration of that hook.
pub fn lent<'a>(buffer: EnvoyBuffer) -> &'a [u8] {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return &[];
    }
    // SAFETY: Envoy passed `length` readable bytes at `ptr`, valid until the running hook returns; the
    // caller uses them only within it.
    unsafe { std::slice::from_raw_parts(buffer.ptr.cast::<u8>(), buffer.length) }
}

/// Bytes Envoy lent, copied before the callback's lifetime ends.
fn copied(buffer: EnvoyBuffer) -> Option<Vec<u8>> {
    if buffer.ptr.is_null() {
        return (buffer.length == 0).then(Vec::new);
    }
    // SAFETY: Envoy returned `length` readable bytes at `ptr`, valid until the current hook returns.
    Some(unsafe { std::slice::from_raw_parts(buffer.ptr.cast::<u8>(), buffer.length) }.to_vec())
}

/// One stream's view of Envoy, built for the duration of one hook from the pointer Envoy passed it.
pub struct NativeHost<'a> {
    envoy: abi::FilterEnvoyPtr,
    config: &'a ModuleConfig,
    /// A local reply the session asked for, sent by [`NativeHost::send_pending`] once the worker is
    /// released: Envoy runs the stream's response hooks inside `send_response`, and those take the
    /// worker too.
    pending: Option<LocalReply>,
}

impl<'a> NativeHost<'a> {
    /// The stream behind `envoy` (the filter pointer of the running hook), under `config`.
    pub fn new(envoy: abi::FilterEnvoyPtr, config: &'a ModuleConfig) -> Self {
        Self {
            envoy,
            config,
            pending: None,
        }
    }

    /// Sends the local reply the session asked for, if any.
    pub fn send_pending(&mut self) {
        if let Some(reply) = self.pending.take() {
            self.send_now(&reply);
        }
    }

    /// The configuration this stream runs under.
    pub fn config(&self) -> &'a ModuleConfig {
        self.config
    }

    /// The index of the worker running this stream, 0-based (for per-worker state).
    pub fn worker_index(&self) -> u32 {
        // SAFETY: `envoy` is the live filter of the running hook.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_get_worker_index(self.envoy) }
    }

    fn header(&self, kind: HeaderType, name: &str) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: `envoy` is the live filter of the running hook; `out` is a valid place to write, and
        // a null count pointer is allowed (only the first value is asked for).
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                self.envoy,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                &mut out,
                0,
                std::ptr::null_mut(),
            )
        };
        found.then(|| copied(out)).flatten()
    }

    fn attribute_int(&self, id: AttributeId) -> Option<u64> {
        let mut out = 0u64;
        // SAFETY: `envoy` is the live filter of the running hook; `out` is a valid place to write.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_int(
                self.envoy, id, &mut out,
            )
        };
        found.then_some(out)
    }

    fn put_header(&self, kind: HeaderType, name: &str, value: &str, add: bool) {
        let (key, value) = (
            ModuleBuffer::of(name.as_bytes()),
            ModuleBuffer::of(value.as_bytes()),
        );
        // SAFETY: `envoy` is the live filter of the running hook; both buffers outlive the call. A
        // refusal (no such header map at this point of the stream) changes nothing: ignored.
        let _ = unsafe {
            if add {
                abi::envoy_dynamic_module_callback_http_add_header(self.envoy, kind, key, value)
            } else {
                abi::envoy_dynamic_module_callback_http_set_header(self.envoy, kind, key, value)
            }
        };
    }
}

impl Host for NativeHost<'_> {
    fn now_ms(&mut self) -> Option<u64> {
        Some(now_ms())
    }

    fn request_header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.header(HeaderType::RequestHeader, name)
    }

    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.header(HeaderType::ResponseHeader, name)
    }

    fn response_trailer(&mut self, name: &str) -> Option<Vec<u8>> {
        self.header(HeaderType::ResponseTrailer, name)
    }

    fn cluster_name(&mut self) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: `envoy` is the live filter of the running hook; `out` is a valid place to write.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_get_cluster_name(self.envoy, &mut out)
        };
        found.then(|| copied(out)).flatten()
    }

    fn response_code(&mut self) -> Option<u16> {
        self.attribute_int(AttributeId::ResponseCode)
            .and_then(|c| u16::try_from(c).ok())
    }

    fn response_flags(&mut self) -> Option<u64> {
        self.attribute_int(AttributeId::ResponseFlags)
    }

    fn set_request_header(&mut self, name: &str, value: &str) {
        self.put_header(HeaderType::RequestHeader, name, value, false);
    }

    fn add_response_header(&mut self, name: &str, value: &str) {
        self.put_header(HeaderType::ResponseHeader, name, value, true);
    }

    /// Kept for [`NativeHost::send_pending`]; Envoy's `send_response` cannot fail, so the reply is as
    /// good as sent.
    fn send_reply(&mut self, reply: LocalReply) -> bool {
        self.pending = Some(reply);
        true
    }
}

impl NativeHost<'_> {
    fn send_now(&mut self, reply: &LocalReply) {
        // The core's gRPC rejection carries `grpc-status: 14` itself: without it, Envoy's trailers-only
        // reply would say 0 (OK).
        let headers: Vec<abi::ModuleHttpHeader> = reply
            .headers
            .iter()
            .map(|(k, v)| abi::ModuleHttpHeader {
                key_ptr: k.as_str().as_ptr().cast(),
                key_length: k.as_str().len(),
                value_ptr: v.as_str().as_ptr().cast(),
                value_length: v.as_str().len(),
            })
            .collect();
        // SAFETY: `envoy` is the live filter of the running hook; headers, body and details outlive
        // the call, which copies them.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.envoy,
                u32::from(reply.status),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(reply.body.as_bytes()),
                ModuleBuffer::of(REPLY_DETAILS),
            );
        }
    }
}

/// One of Envoy's four metric updates (counter or gauge, through a stream or a configuration): they
/// share one shape.
type MetricUpdate = unsafe extern "C" fn(
    *mut std::ffi::c_void,
    usize,
    *const ModuleBuffer,
    usize,
    u64,
) -> abi::MetricsResult;

/// Applies `update` to `series` with `value`, through `envoy` (a live stream or configuration
/// object, as `update` expects), if the configuration defined the metric.
fn update_metric(
    update: MetricUpdate,
    envoy: *mut std::ffi::c_void,
    ids: &MetricIds,
    series: &Series<'_>,
    value: u64,
) {
    let Some(id) = ids.get(series.metric) else {
        return;
    };
    let (labels, count) = buffers(series.label_values());
    // SAFETY: the callers pass the object `update` takes (the running hook's filter, or a
    // configuration alive until `config_destroy`); Envoy's stat updates are thread-safe; the label
    // buffers outlive the call.
    let _ = unsafe { update(envoy, id, labels.as_ptr(), count, value) };
}

impl Telemetry for NativeHost<'_> {
    fn add(&mut self, series: &Series<'_>, n: u64) {
        let add = abi::envoy_dynamic_module_callback_http_filter_increment_counter;
        update_metric(add, self.envoy, &self.config.metrics, series, n);
    }

    fn set(&mut self, series: &Series<'_>, value: u64) {
        let set = abi::envoy_dynamic_module_callback_http_filter_set_gauge;
        update_metric(set, self.envoy, &self.config.metrics, series, value);
    }

    #[track_caller]
    fn log(&mut self, level: Level, message: &str) {
        log(level, message);
    }
}

/// Metrics and logs of one filter configuration outside any stream: on the main thread (a stuck-call
/// check driven by Envoy's config scheduler), or where no stream pointer is at hand (a panic report).
pub struct ConfigTelemetry<'a> {
    config: &'a ModuleConfig,
}

impl<'a> ConfigTelemetry<'a> {
    /// The telemetry of `config`.
    pub fn new(config: &'a ModuleConfig) -> Self {
        Self { config }
    }
}

impl Telemetry for ConfigTelemetry<'_> {
    fn add(&mut self, series: &Series<'_>, n: u64) {
        let add = abi::envoy_dynamic_module_callback_http_filter_config_increment_counter;
        update_metric(add, self.config.envoy.0, &self.config.metrics, series, n);
    }

    fn set(&mut self, series: &Series<'_>, value: u64) {
        let set = abi::envoy_dynamic_module_callback_http_filter_config_set_gauge;
        update_metric(
            set,
            self.config.envoy.0,
            &self.config.metrics,
            series,
            value,
        );
    }

    #[track_caller]
    fn log(&mut self, level: Level, message: &str) {
        log(level, message);
    }
}

// ---- The configuration's scheduler ----------------------------------------------------------------

/// A configuration's scheduler: events committed to it run `config_scheduled` on the main thread.
#[derive(Debug)]
pub struct ConfigScheduler(*mut std::ffi::c_void);

// SAFETY: Envoy's commit is callable from any thread (it posts to the main dispatcher); the pointer is
// only handed back to Envoy, and deleted once, in `Drop`, after the only thread that commits stopped.
unsafe impl Send for ConfigScheduler {}
// SAFETY: as for `Send`.
unsafe impl Sync for ConfigScheduler {}

impl ConfigScheduler {
    /// A scheduler for the configuration being made (`config_new`, main thread).
    pub fn new(envoy: ConfigEnvoy) -> Option<Self> {
        // SAFETY: `envoy` is the live config object of the running `config_new`.
        let ptr =
            unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(envoy.0) };
        (!ptr.is_null()).then_some(Self(ptr))
    }

    /// Runs `config_scheduled(event_id)` on the main thread, soon.
    pub fn commit(&self, event_id: u64) {
        // SAFETY: a live scheduler (deleted only in `Drop`); commit may be called from any thread.
        unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.0, event_id)
        }
    }
}

impl Drop for ConfigScheduler {
    fn drop(&mut self) {
        // SAFETY: deleted once; its owner stopped committing first (see `ticker`).
        unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0) }
    }
}

// ---- The module's objects as Envoy holds them ----------------------------------------------------

/// The stream object handed to Envoy when `filter_new` failed: every hook passes it through and
/// `filter_destroy` leaves it alone. (A null pointer would make Envoy close the stream.)
static PASS_THROUGH: u8 = 0;

fn is_ours(ptr: ModulePtr) -> bool {
    !ptr.is_null() && !std::ptr::eq(ptr.cast::<u8>(), &PASS_THROUGH)
}

/// The pointer Envoy keeps for a configuration; [`config_ref`] reads it, [`drop_config`] frees it.
pub fn config_into_ptr(config: Box<ModuleConfig>) -> ModulePtr {
    Box::into_raw(config).cast_const().cast()
}

/// The configuration behind a pointer from [`config_into_ptr`].
pub fn config_ref<'a>(ptr: ModulePtr) -> Option<&'a ModuleConfig> {
    // SAFETY: Envoy hands back the pointer `config_new` returned, and keeps it alive (each filter holds
    // a reference to the config) until `config_destroy`, after every stream made under it is gone.
    unsafe { ptr.cast::<ModuleConfig>().as_ref() }
}

/// Frees a configuration (`config_destroy`).
pub fn drop_config(ptr: ModulePtr) {
    if !ptr.is_null() {
        // SAFETY: Envoy calls `config_destroy` once per pointer `config_new` returned, after the last
        // stream under it is destroyed; nothing refers to it afterwards.
        drop(unsafe { Box::from_raw(ptr.cast_mut().cast::<ModuleConfig>()) });
    }
}

/// The pointer Envoy keeps for a stream; `None` hands Envoy the pass-through object.
pub fn stream_into_ptr(stream: Option<Box<Stream>>) -> ModulePtr {
    match stream {
        Some(s) => Box::into_raw(s).cast_const().cast(),
        None => std::ptr::from_ref(&PASS_THROUGH).cast(),
    }
}

/// The stream behind a pointer from [`stream_into_ptr`]; `None` for the pass-through object.
pub fn stream_mut<'a>(ptr: ModulePtr) -> Option<&'a mut Stream> {
    if !is_ours(ptr) {
        return None;
    }
    // SAFETY: a pointer from `stream_into_ptr`, alive until `filter_destroy`; Envoy runs one stream's
    // hooks on its worker one at a time, so no other reference to it exists while a hook runs.
    unsafe { ptr.cast_mut().cast::<Stream>().as_mut() }
}

/// Frees a stream (`filter_destroy`). Envoy calls it once per stream (it forgets the pointer right
/// after, and since 1.40 runs it from the worker's deferred-delete list, after `stream_complete`).
pub fn drop_stream(ptr: ModulePtr) {
    if is_ours(ptr) {
        // SAFETY: a pointer from `stream_into_ptr`, destroyed once; no hook of its stream runs after.
        drop(unsafe { Box::from_raw(ptr.cast_mut().cast::<Stream>()) });
    }
}
