//! Stand-ins for Envoy's callbacks, for binaries that link this crate without Envoy: the unit tests
//! and the fuzz target (feature `stubs`). They answer as an Envoy with an empty stream would, and record
//! what the module logged and counted, per thread, so a test can assert on it.
//!
//! Never part of the module Envoy loads: there, these names must resolve to Envoy's own functions
//! (`tests/exports.rs` checks that the built `.so` defines none of them).

use std::cell::RefCell;
use std::ffi::c_void;

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
}

thread_local! {
    static RECORDED: RefCell<Recorded> = RefCell::new(Recorded::default());
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
    RECORDED.with(|r| r.borrow_mut().counted.push((id, texts(labels, n), value)));
    METRICS_SUCCESS
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_header(
    _: FilterEnvoyPtr,
    _: HeaderType,
    _: ModuleBuffer,
    _: *mut EnvoyBuffer,
    _: usize,
    _: *mut usize,
) -> bool {
    false
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_set_header(
    _: FilterEnvoyPtr,
    _: HeaderType,
    _: ModuleBuffer,
    _: ModuleBuffer,
) -> bool {
    false
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_add_header(
    _: FilterEnvoyPtr,
    _: HeaderType,
    _: ModuleBuffer,
    _: ModuleBuffer,
) -> bool {
    false
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_cluster_name(
    _: FilterEnvoyPtr,
    _: *mut EnvoyBuffer,
) -> bool {
    false
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
    _: FilterEnvoyPtr,
    _: AttributeId,
    _: *mut u64,
) -> bool {
    false
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_send_response(
    _: FilterEnvoyPtr,
    _: u32,
    _: *const ModuleHttpHeader,
    _: usize,
    _: ModuleBuffer,
    _: ModuleBuffer,
) {
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
    _: usize,
    _: *const ModuleBuffer,
    _: usize,
    _: u64,
) -> MetricsResult {
    METRICS_SUCCESS
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
    _: usize,
    _: *const ModuleBuffer,
    _: usize,
    _: u64,
) -> MetricsResult {
    METRICS_SUCCESS
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
    RECORDED.with(|r| r.borrow_mut().logs.push((level, text(message))));
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_log_enabled(_: LogLevel) -> bool {
    true
}

/// An Envoy object address for tests: never dereferenced by the stubs.
pub fn fake_envoy_ptr() -> *mut c_void {
    std::ptr::NonNull::<u8>::dangling().as_ptr().cast()
}
