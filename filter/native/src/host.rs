//! The host, in one place: every call into Envoy goes through this file. [`NativeHost`] is one
//! stream's view of Envoy (the core's [`Host`] and [`Telemetry`]); [`ConfigTelemetry`] counts and logs
//! outside any stream (the main thread); [`FilterEnvoy`] and [`ConfigEnvoy`] are Envoy's objects as
//! the hooks receive them. (The module's own objects, as Envoy keeps them, are in `objects.rs`.)
//!
//! Envoy's answers are translated here once: a callback that says "no such value" becomes `None`, and no
//! byte Envoy returns is trusted to be UTF-8 or small (header values come back as bytes; the core
//! decides what they mean).

use std::marker::PhantomData;
use std::panic::Location;
use std::sync::OnceLock;
use std::time::Instant;

use cb_core::host::{Host, TooLong};
use cb_core::reply::LocalReply;
use cb_core::telemetry::{Level, Metric, MetricKind, Series, Telemetry};

use crate::abi::{self, AttributeId, EnvoyBuffer, HeaderType, LogLevel, ModuleBuffer};
use crate::config::ModuleConfig;
use crate::scheduler::{StreamScheduler, StreamSchedulers};

/// Envoy's object for one filter configuration, kept by the module configuration to count, log and
/// schedule outside streams.
#[derive(Debug, Clone, Copy)]
pub struct ConfigEnvoy(abi::ConfigEnvoyPtr);

// SAFETY: the pointer is only handed back to Envoy's `http_filter_config_*` callbacks (metrics, which
// update thread-safe stats, and the scheduler's creation); Envoy keeps the object alive until it calls
// `config_destroy`, which drops the module configuration holding this copy.
unsafe impl Send for ConfigEnvoy {}
// SAFETY: as for `Send`: the module never reads through the pointer itself.
unsafe impl Sync for ConfigEnvoy {}

impl ConfigEnvoy {
    /// Envoy's configuration object.
    ///
    /// # Safety
    ///
    /// `ptr` is the pointer Envoy passed to the running `config_new`, and the value is kept only by
    /// the configuration `config_new` returns (Envoy keeps the object alive until that
    /// configuration's `config_destroy`).
    pub unsafe fn new(ptr: abi::ConfigEnvoyPtr) -> Self {
        Self(ptr)
    }

    /// A stand-in for tests: the stub callbacks accept any pointer.
    #[cfg(any(test, feature = "stubs"))]
    pub fn stub() -> Self {
        Self(abi::stubs::fake_envoy_ptr())
    }

    pub(crate) fn ptr(self) -> abi::ConfigEnvoyPtr {
        self.0
    }
}

/// Envoy's filter object of the running stream hook: valid only until that hook returns, so it is
/// neither `Clone` nor `Send`, and the hook holds it by value. Sending a local reply consumes it
/// ([`FilterEnvoy::send_response`]): Envoy may finish the stream inside that call.
#[derive(Debug)]
pub struct FilterEnvoy<'hook> {
    ptr: abi::FilterEnvoyPtr,
    _hook: PhantomData<&'hook mut ()>,
}

impl FilterEnvoy<'_> {
    /// Envoy's filter object.
    ///
    /// # Safety
    ///
    /// `ptr` is the filter pointer Envoy passed to the running stream hook, and the value is dropped
    /// before that hook returns.
    pub unsafe fn new(ptr: abi::FilterEnvoyPtr) -> Self {
        Self {
            ptr,
            _hook: PhantomData,
        }
    }

    /// A stand-in for tests: the stub callbacks accept any pointer.
    #[cfg(any(test, feature = "stubs"))]
    pub fn stub() -> FilterEnvoy<'static> {
        FilterEnvoy {
            ptr: abi::stubs::fake_envoy_ptr(),
            _hook: PhantomData,
        }
    }

    pub(crate) fn ptr(&self) -> abi::FilterEnvoyPtr {
        self.ptr
    }

    /// The index of the worker running this stream, 0-based (for per-worker state).
    pub fn worker_index(&self) -> u32 {
        // SAFETY: the live filter of the running hook (`FilterEnvoy::new`).
        unsafe { abi::envoy_dynamic_module_callback_http_filter_get_worker_index(self.ptr) }
    }

    /// A local reply (see `reply.rs`, which builds the arguments). Consumes the filter: inside this
    /// call Envoy runs the stream's `stream_complete` hook, and may destroy the stream.
    pub fn send_response(
        self,
        status: u16,
        headers: &[abi::ModuleHttpHeader],
        body: &[u8],
        details: &[u8],
    ) {
        // SAFETY: the live filter of the running hook; headers, body and details outlive the call,
        // which copies them.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                u32::from(status),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(details),
            );
        }
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

/// Bytes Envoy lent, copied before the callback's lifetime ends.
fn copied(buffer: EnvoyBuffer) -> Option<Vec<u8>> {
    if buffer.ptr.is_null() {
        return (buffer.length == 0).then(Vec::new);
    }
    // SAFETY: Envoy returned `length` readable bytes at `ptr`, valid until the current hook returns.
    Some(unsafe { std::slice::from_raw_parts(buffer.ptr.cast::<u8>(), buffer.length) }.to_vec())
}

/// One stream's view of Envoy for the duration of one hook's work on its worker's breakers.
pub struct NativeHost<'a> {
    envoy: &'a FilterEnvoy<'a>,
    config: &'a ModuleConfig,
    /// The worker's stream schedulers, where [`Host::stream_token`] registers this stream's.
    schedulers: Option<&'a mut StreamSchedulers>,
    /// The stream's token in `schedulers`, once it has one.
    token: Option<u64>,
    /// The local reply the session asked for: the hook sends it once it has let go of the stream and
    /// of the worker (see `reply.rs`).
    reply: Option<LocalReply>,
}

impl<'a> NativeHost<'a> {
    /// The stream of `envoy`, under `config`, on a worker whose stream schedulers are `schedulers`
    /// (`None` where the hook has no worker), where the stream's scheduler, if it has one, is `token`.
    pub fn new(
        envoy: &'a FilterEnvoy<'a>,
        config: &'a ModuleConfig,
        schedulers: Option<&'a mut StreamSchedulers>,
        token: Option<u64>,
    ) -> Self {
        Self {
            envoy,
            config,
            schedulers,
            token,
            reply: None,
        }
    }

    /// The stream's scheduler token (made by [`Host::stream_token`] if it was asked), and the local
    /// reply the session asked for, to send once the stream is let go.
    pub fn finish(self) -> (Option<u64>, Option<LocalReply>) {
        (self.token, self.reply)
    }

    /// The configuration this stream runs under.
    pub fn config(&self) -> &'a ModuleConfig {
        self.config
    }

    /// The first value of a header, as Envoy lends it (valid until the running hook returns).
    fn header_lent(&self, kind: HeaderType, name: &str) -> Option<EnvoyBuffer> {
        let mut out = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: `envoy` is the live filter of the running hook; `out` is a valid place to write, and
        // a null count pointer is allowed (only the first value is asked for).
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                self.envoy.ptr(),
                kind,
                ModuleBuffer::of(name.as_bytes()),
                &mut out,
                0,
                std::ptr::null_mut(),
            )
        };
        found.then_some(out)
    }

    fn header(&self, kind: HeaderType, name: &str) -> Option<Vec<u8>> {
        self.header_lent(kind, name).and_then(copied)
    }

    fn attribute_int(&self, id: AttributeId) -> Option<u64> {
        let mut out = 0u64;
        // SAFETY: `envoy` is the live filter of the running hook; `out` is a valid place to write.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_int(
                self.envoy.ptr(),
                id,
                &mut out,
            )
        };
        found.then_some(out)
    }

    fn put_header(&self, kind: HeaderType, name: &str, value: &str, add: bool) {
        let (key, value) = (
            ModuleBuffer::of(name.as_bytes()),
            ModuleBuffer::of(value.as_bytes()),
        );
        let envoy = self.envoy.ptr();
        // SAFETY: `envoy` is the live filter of the running hook; both buffers outlive the call. A
        // refusal (no such header map at this point of the stream) changes nothing: ignored.
        let _ = unsafe {
            if add {
                abi::envoy_dynamic_module_callback_http_add_header(envoy, kind, key, value)
            } else {
                abi::envoy_dynamic_module_callback_http_set_header(envoy, kind, key, value)
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

    /// Checks the length Envoy reports before copying: a huge client-chosen value is never copied.
    fn request_header_up_to(&mut self, name: &str, max: usize) -> Result<Option<Vec<u8>>, TooLong> {
        match self.header_lent(HeaderType::RequestHeader, name) {
            Some(lent) if lent.length > max => Err(TooLong),
            Some(lent) => Ok(copied(lent)),
            None => Ok(None),
        }
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
            abi::envoy_dynamic_module_callback_http_get_cluster_name(self.envoy.ptr(), &mut out)
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

    /// Kept for the hook to send once it has let go of the stream and the worker; Envoy's
    /// `send_response` cannot fail, so the reply is as good as sent.
    fn send_reply(&mut self, reply: LocalReply) -> bool {
        self.reply = Some(reply);
        true
    }

    /// The stream's scheduler, registered with its worker: the token the worker's tick names the
    /// stream by in a cut order (see `scheduler.rs`). `None` when Envoy gives no scheduler, or the hook
    /// has no worker.
    fn stream_token(&mut self) -> Option<u64> {
        if self.token.is_some() {
            return self.token;
        }
        let schedulers = self.schedulers.as_deref_mut()?;
        let scheduler = StreamScheduler::new(self.envoy)?;
        self.token = Some(schedulers.insert(scheduler));
        self.token
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
        update_metric(add, self.envoy.ptr(), &self.config.metrics, series, n);
    }

    fn set(&mut self, series: &Series<'_>, value: u64) {
        let set = abi::envoy_dynamic_module_callback_http_filter_set_gauge;
        update_metric(set, self.envoy.ptr(), &self.config.metrics, series, value);
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
        update_metric(
            add,
            self.config.envoy.ptr(),
            &self.config.metrics,
            series,
            n,
        );
    }

    fn set(&mut self, series: &Series<'_>, value: u64) {
        let set = abi::envoy_dynamic_module_callback_http_filter_config_set_gauge;
        update_metric(
            set,
            self.config.envoy.ptr(),
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
