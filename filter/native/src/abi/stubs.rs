//! Stand-ins for Envoy's callbacks, for binaries that link this crate without Envoy: the unit tests
//! and the fuzz target (feature `stubs`). They answer from a stream a test describes ([`set_stream`];
//! by default an empty one), and record what the module logged, counted, wrote and replied, per thread,
//! so a test can assert on it.
//!
//! Never part of the module Envoy loads: there, these names must resolve to Envoy's own functions
//! (`tests/exports.rs` checks that the built `.so` defines none of them).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use super::{
    AttributeId, ConfigEnvoyPtr, EnvoyBuffer, FilterEnvoyPtr, HeaderType, LogLevel, MetricsResult,
    ModuleBuffer, ModuleHttpHeader, METRICS_SUCCESS,
};

/// What the module did through the stubs on this thread.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// Log lines, with their level.
    pub logs: Vec<(LogLevel, String)>,
    /// Metrics defined: name and label names, in definition order (the index is the id).
    pub defined: Vec<(String, Vec<String>)>,
    /// Counter increments: id, label values, amount.
    pub counted: Vec<(usize, Vec<String>, u64)>,
    /// Gauges set: id, label values, value.
    pub gauges: Vec<(usize, Vec<String>, u64)>,
    /// Headers written: where, name, value, and whether added (else set).
    pub written: Vec<(HeaderType, String, String, bool)>,
    /// Local replies.
    pub replies: Vec<Reply>,
    /// Stream schedulers made, in order (their addresses: unique, never reused).
    pub schedulers_made: Vec<usize>,
    /// Events committed to a live stream scheduler: which, and the event.
    pub committed: Vec<(usize, u64)>,
    /// Stream schedulers deleted, in order.
    pub schedulers_deleted: Vec<usize>,
    /// Commits to, or deletes of, a stream scheduler that was not live (deleted, or never made):
    /// each a use-after-free in Envoy. Which, and the event (`None` for a delete).
    pub strays: Vec<(usize, Option<u64>)>,
}

/// A local reply the module sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u32,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// `details` (Envoy's response code details).
    pub details: String,
}

/// The stream the stubs answer for.
#[derive(Debug, Default, Clone)]
pub struct StubStream {
    /// Headers and trailers: where, name, value.
    pub headers: Vec<(HeaderType, Vec<u8>, Vec<u8>)>,
    /// The routed cluster.
    pub cluster: Option<Vec<u8>>,
    /// Integer attributes.
    pub attributes: Vec<(AttributeId, u64)>,
}

thread_local! {
    static RECORDED: RefCell<Recorded> = RefCell::new(Recorded::default());
    static STREAM: RefCell<StubStream> = RefCell::new(StubStream::default());
    /// What `send_response` runs after recording the reply, once: Envoy completing the stream.
    static ON_REPLY: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
    /// The stream schedulers made on this thread and not deleted.
    static LIVE_SCHEDULERS: RefCell<HashSet<usize>> = RefCell::new(HashSet::new());
}

/// Makes the next `send_response` on this thread run `then` after recording the reply, as Envoy
/// runs the stream's `stream_complete` (and may destroy it) inside that call.
pub fn on_send_response(then: impl FnOnce() + 'static) {
    ON_REPLY.with(|r| *r.borrow_mut() = Some(Box::new(then)));
}

/// A scheduler address no other stub scheduler ever had (never dereferenced).
fn fresh_scheduler() -> *mut c_void {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    std::ptr::without_provenance_mut(0x1000 + 16 * NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Configuration schedulers alive, each with the events committed to it (the ticker commits from its
/// own thread, so this is the process's), and how many commits reached one that was not alive.
#[derive(Debug, Default)]
struct ConfigSchedulers {
    live: HashMap<usize, Vec<u64>>,
    strays: u64,
}

fn config_schedulers() -> std::sync::MutexGuard<'static, ConfigSchedulers> {
    static ALL: OnceLock<Mutex<ConfigSchedulers>> = OnceLock::new();
    ALL.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The events committed so far to the configuration scheduler at `address`; `None` once it is deleted.
pub fn config_events(address: usize) -> Option<Vec<u64>> {
    config_schedulers().live.get(&address).cloned()
}

/// How many commits, in the whole process, reached a configuration scheduler that was not alive.
pub fn config_strays() -> u64 {
    config_schedulers().strays
}

/// Makes the stubs answer for `stream` on this thread.
pub fn set_stream(stream: StubStream) {
    STREAM.with(|s| *s.borrow_mut() = stream);
}

/// Writes `bytes` (owned by the thread's [`StubStream`], which outlives the module's read) as Envoy does.
fn lend(bytes: &[u8], out: *mut EnvoyBuffer) {
    if !out.is_null() {
        // SAFETY: the module passes a pointer to its own buffer for the answer.
        unsafe {
            *out = EnvoyBuffer {
                ptr: bytes.as_ptr().cast(),
                length: bytes.len(),
            }
        };
    }
}

/// Everything recorded on this thread so far, and a fresh start.
pub fn take() -> Recorded {
    RECORDED.with(|r| std::mem::take(&mut *r.borrow_mut()))
}

fn text(b: ModuleBuffer) -> String {
    if b.ptr.is_null() || b.length == 0 {
        return String::new();
    }
    // SAFETY: the module passes buffers that point at `length` live bytes for the call.
    let bytes = unsafe { std::slice::from_raw_parts(b.ptr.cast::<u8>(), b.length) };
    String::from_utf8_lossy(bytes).into_owned()
}

fn record(f: impl FnOnce(&mut Recorded)) {
    RECORDED.with(|r| f(&mut r.borrow_mut()));
}

fn texts(ptr: *const ModuleBuffer, n: usize) -> Vec<String> {
    if ptr.is_null() || n == 0 {
        return Vec::new();
    }
    // SAFETY: the module passes an array of `n` buffers, live for the call.
    let all = unsafe { std::slice::from_raw_parts(ptr, n) };
    all.iter().map(|b| text(*b)).collect()
}

fn define(
    name: ModuleBuffer,
    labels: *const ModuleBuffer,
    n: usize,
    id: *mut usize,
) -> MetricsResult {
    RECORDED.with(|r| {
        let mut r = r.borrow_mut();
        if !id.is_null() {
            // SAFETY: the module passes a pointer to its own `usize` for the id.
            unsafe { *id = r.defined.len() };
        }
        r.defined.push((text(name), texts(labels, n)));
    });
    METRICS_SUCCESS
}

fn count(id: usize, labels: *const ModuleBuffer, n: usize, value: u64) -> MetricsResult {
    record(|r| r.counted.push((id, texts(labels, n), value)));
    METRICS_SUCCESS
}

fn gauge(id: usize, labels: *const ModuleBuffer, n: usize, value: u64) -> MetricsResult {
    record(|r| r.gauges.push((id, texts(labels, n), value)));
    METRICS_SUCCESS
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_header(
    _: FilterEnvoyPtr,
    kind: HeaderType,
    key: ModuleBuffer,
    out: *mut EnvoyBuffer,
    index: usize,
    count: *mut usize,
) -> bool {
    let key = text(key);
    STREAM.with(|s| {
        let s = s.borrow();
        let values: Vec<&Vec<u8>> = s
            .headers
            .iter()
            .filter(|(k, n, _)| *k == kind && n.eq_ignore_ascii_case(key.as_bytes()))
            .map(|(_, _, v)| v)
            .collect();
        if !count.is_null() {
            // SAFETY: the module passes a pointer to its own `usize` for the count.
            unsafe { *count = values.len() };
        }
        values.get(index).map(|v| lend(v, out)).is_some()
    })
}

fn write(kind: HeaderType, key: ModuleBuffer, value: ModuleBuffer, added: bool) -> bool {
    record(|r| r.written.push((kind, text(key), text(value), added)));
    true
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_set_header(
    _: FilterEnvoyPtr,
    kind: HeaderType,
    key: ModuleBuffer,
    value: ModuleBuffer,
) -> bool {
    write(kind, key, value, false)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_add_header(
    _: FilterEnvoyPtr,
    kind: HeaderType,
    key: ModuleBuffer,
    value: ModuleBuffer,
) -> bool {
    write(kind, key, value, true)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_cluster_name(
    _: FilterEnvoyPtr,
    out: *mut EnvoyBuffer,
) -> bool {
    STREAM.with(|s| s.borrow().cluster.as_ref().map(|c| lend(c, out)).is_some())
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
    _: FilterEnvoyPtr,
    id: AttributeId,
    out: *mut u64,
) -> bool {
    let value = STREAM.with(|s| {
        s.borrow()
            .attributes
            .iter()
            .find(|(a, _)| *a == id)
            .map(|(_, v)| *v)
    });
    match value {
        Some(v) if !out.is_null() => {
            // SAFETY: the module passes a pointer to its own `u64` for the answer.
            unsafe { *out = v };
            true
        }
        _ => false,
    }
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_send_response(
    _: FilterEnvoyPtr,
    status: u32,
    headers: *const ModuleHttpHeader,
    n: usize,
    body: ModuleBuffer,
    details: ModuleBuffer,
) {
    let headers = if headers.is_null() || n == 0 {
        &[][..]
    } else {
        // SAFETY: the module passes an array of `n` headers, live for the call.
        unsafe { std::slice::from_raw_parts(headers, n) }
    };
    let field = |ptr, length| text(ModuleBuffer { ptr, length });
    let headers = headers
        .iter()
        .map(|h| {
            (
                field(h.key_ptr, h.key_length),
                field(h.value_ptr, h.value_length),
            )
        })
        .collect();
    let reply = Reply {
        status,
        headers,
        body: text(body).into_bytes(),
        details: text(details),
    };
    record(|r| r.replies.push(reply));
    if let Some(then) = ON_REPLY.with(|r| r.borrow_mut().take()) {
        then();
    }
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_get_worker_index(_: FilterEnvoyPtr) -> u32 {
    0
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_counter(
    _: ConfigEnvoyPtr,
    name: ModuleBuffer,
    labels: *const ModuleBuffer,
    n: usize,
    id: *mut usize,
) -> MetricsResult {
    define(name, labels, n, id)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
    _: ConfigEnvoyPtr,
    name: ModuleBuffer,
    labels: *const ModuleBuffer,
    n: usize,
    id: *mut usize,
) -> MetricsResult {
    define(name, labels, n, id)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_increment_counter(
    _: FilterEnvoyPtr,
    id: usize,
    labels: *const ModuleBuffer,
    n: usize,
    value: u64,
) -> MetricsResult {
    count(id, labels, n, value)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_set_gauge(
    _: FilterEnvoyPtr,
    id: usize,
    labels: *const ModuleBuffer,
    n: usize,
    value: u64,
) -> MetricsResult {
    gauge(id, labels, n, value)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
    _: ConfigEnvoyPtr,
    id: usize,
    labels: *const ModuleBuffer,
    n: usize,
    value: u64,
) -> MetricsResult {
    count(id, labels, n, value)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
    _: ConfigEnvoyPtr,
    id: usize,
    labels: *const ModuleBuffer,
    n: usize,
    value: u64,
) -> MetricsResult {
    gauge(id, labels, n, value)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_get_concurrency() -> u32 {
    2
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_log_v2(
    level: LogLevel,
    message: ModuleBuffer,
    _: ModuleBuffer,
    _: u32,
) {
    record(|r| r.logs.push((level, text(message))));
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_log_enabled(_: LogLevel) -> bool {
    true
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
    _: ConfigEnvoyPtr,
) -> *mut c_void {
    let scheduler = fresh_scheduler();
    config_schedulers()
        .live
        .insert(scheduler.addr(), Vec::new());
    scheduler
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
    scheduler: *mut c_void,
    event_id: u64,
) {
    let mut all = config_schedulers();
    match all.live.get_mut(&scheduler.addr()) {
        Some(events) => events.push(event_id),
        None => all.strays += 1,
    }
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
    scheduler: *mut c_void,
) {
    let mut all = config_schedulers();
    if all.live.remove(&scheduler.addr()).is_none() {
        all.strays += 1;
    }
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_new(
    _: FilterEnvoyPtr,
) -> *mut c_void {
    let scheduler = fresh_scheduler();
    LIVE_SCHEDULERS.with(|l| l.borrow_mut().insert(scheduler.addr()));
    record(|r| r.schedulers_made.push(scheduler.addr()));
    scheduler
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
    scheduler: *mut c_void,
    event_id: u64,
) {
    let at = scheduler.addr();
    if LIVE_SCHEDULERS.with(|l| l.borrow().contains(&at)) {
        record(|r| r.committed.push((at, event_id)));
    } else {
        record(|r| r.strays.push((at, Some(event_id))));
    }
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void) {
    let at = scheduler.addr();
    if LIVE_SCHEDULERS.with(|l| l.borrow_mut().remove(&at)) {
        record(|r| r.schedulers_deleted.push(at));
    } else {
        record(|r| r.strays.push((at, None)));
    }
}

/// An Envoy object address for tests: never dereferenced by the stubs.
pub fn fake_envoy_ptr() -> *mut c_void {
    std::ptr::NonNull::<u8>::dangling().as_ptr().cast()
}
