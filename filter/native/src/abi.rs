//! The part of Envoy's dynamic-module ABI (Envoy 1.40, ABI version [`ABI_VERSION`]) this module uses,
//! declared here from the ABI's documented types and signatures: the types that cross the boundary,
//! the enums as Envoy numbers them, and the callbacks Envoy exports. The hooks Envoy calls are the
//! `#[no_mangle]` functions of `lib.rs`.
//!
//! Only `host.rs` calls these functions. Every name below was checked against the symbols the pinned
//! Envoy binary exports (`tests/exports.rs` does it again for every build). Values Envoy hands to a hook
//! as an enum are taken as plain `u32` where the module does not produce them, so that a value this file
//! does not know can never become an invalid Rust enum.

use std::ffi::{c_char, c_void};

/// The ABI version this module is written against. Envoy 1.40 compares it with its own: on a match it
/// logs "Dynamic module ABI version v0.2.0 matched."; on a mismatch it only warns, and loads the module.
pub const ABI_VERSION: &std::ffi::CStr = c"v0.2.0";

/// Envoy's per-configuration object (`*_config_envoy_ptr`).
pub type ConfigEnvoyPtr = *mut c_void;
/// Envoy's per-stream filter object (`*_filter_envoy_ptr`): valid during a hook of that stream only.
pub type FilterEnvoyPtr = *mut c_void;
/// The module's own objects, as Envoy holds them (`*_module_ptr`).
pub type ModulePtr = *const c_void;

/// Bytes owned by Envoy, valid for the duration of the hook or callback that produced them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyBuffer {
    /// Start of the bytes; may be null when `length` is 0.
    pub ptr: *const c_char,
    /// Number of bytes.
    pub length: usize,
}

/// Bytes owned by the module, read by Envoy during the callback only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleBuffer {
    /// Start of the bytes.
    pub ptr: *const c_char,
    /// Number of bytes.
    pub length: usize,
}

impl ModuleBuffer {
    /// A view of `bytes`; it must outlive the callback it is passed to.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }
}

/// A header the module hands Envoy (a local reply's headers).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleHttpHeader {
    /// Name.
    pub key_ptr: *const c_char,
    /// Name length.
    pub key_length: usize,
    /// Value.
    pub value_ptr: *const c_char,
    /// Value length.
    pub value_length: usize,
}

/// A header Envoy hands the module (callout and stream responses, which this module does not make).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyHttpHeader {
    /// Name.
    pub key_ptr: *const c_char,
    /// Name length.
    pub key_length: usize,
    /// Value.
    pub value_ptr: *const c_char,
    /// Value length.
    pub value_length: usize,
}

/// `envoy_dynamic_module_type_http_header_type`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderType {
    /// Request headers.
    RequestHeader = 0,
    /// Request trailers.
    RequestTrailer = 1,
    /// Response headers.
    ResponseHeader = 2,
    /// Response trailers.
    ResponseTrailer = 3,
}

/// `envoy_dynamic_module_type_log_level`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Trace.
    Trace = 0,
    /// Debug.
    Debug = 1,
    /// Info.
    Info = 2,
    /// Warn.
    Warn = 3,
    /// Error.
    Error = 4,
    /// Critical.
    Critical = 5,
}

/// `envoy_dynamic_module_type_metrics_result`: 0 Success, 1 MetricNotFound, 2 InvalidLabels, 3 Frozen
/// (a metric defined outside `config_new`). A plain number: it comes from Envoy.
pub type MetricsResult = u32;
/// [`MetricsResult`] success.
pub const METRICS_SUCCESS: MetricsResult = 0;

/// `envoy_dynamic_module_type_attribute_id`, the ids this module reads.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributeId {
    /// `response.code`.
    ResponseCode = 15,
    /// `response.flags`: Envoy's legacy response-flag bit mask.
    ResponseFlags = 17,
}

/// `envoy_dynamic_module_type_on_http_filter_request_headers_status` (and the response twin).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersStatus {
    /// Go on with the filter chain.
    Continue = 0,
    /// Stop here: a local reply was sent.
    StopIteration = 1,
}

/// `envoy_dynamic_module_type_on_http_filter_request_body_status` (and the response twin).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyStatus {
    /// Go on with the filter chain.
    Continue = 0,
}

/// `envoy_dynamic_module_type_on_http_filter_request_trailers_status` (and the response twin).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailersStatus {
    /// Go on with the filter chain.
    Continue = 0,
    /// Stop here.
    StopIteration = 1,
}

// The callbacks Envoy exports (`envoy_dynamic_module_callback_*`). Names and argument order as Envoy
// 1.40 has them; each returns `false` (or a non-success result) when Envoy has no such value.
extern "C" {
    /// The `index`-th value of header `key`; `optional_count`, when not null, gets the number of values.
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter: FilterEnvoyPtr,
        kind: HeaderType,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_count: *mut usize,
    ) -> bool;
    /// Sets (replaces) a header.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoyPtr,
        kind: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    /// Adds a header value.
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter: FilterEnvoyPtr,
        kind: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    /// The routed cluster's name; `false` when the stream has no route or cluster.
    pub fn envoy_dynamic_module_callback_http_get_cluster_name(
        filter: FilterEnvoyPtr,
        result: *mut EnvoyBuffer,
    ) -> bool;
    /// An integer attribute of the stream.
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: FilterEnvoyPtr,
        id: AttributeId,
        result: *mut u64,
    ) -> bool;
    /// A local reply (`sendLocalReply`). For a gRPC request Envoy makes it trailers-only, and sets
    /// `grpc-status` itself only when `headers` has none (then to 0, OK).
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoyPtr,
        status_code: u32,
        headers: *const ModuleHttpHeader,
        headers_count: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    /// The index of the worker this stream runs on (0-based).
    pub fn envoy_dynamic_module_callback_http_filter_get_worker_index(
        filter: FilterEnvoyPtr,
    ) -> u32;
    /// Defines a counter; only in `config_new` (later: Frozen).
    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_count: usize,
        id_out: *mut usize,
    ) -> MetricsResult;
    /// Defines a gauge; only in `config_new`.
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        label_count: usize,
        id_out: *mut usize,
    ) -> MetricsResult;
    /// Adds to a counter, from a stream.
    pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_count: usize,
        value: u64,
    ) -> MetricsResult;
    /// Sets a gauge, from a stream.
    pub fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_count: usize,
        value: u64,
    ) -> MetricsResult;
    /// Adds to a counter, outside any stream.
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_count: usize,
        value: u64,
    ) -> MetricsResult;
    /// Sets a gauge, outside any stream.
    pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const ModuleBuffer,
        label_count: usize,
        value: u64,
    ) -> MetricsResult;
    /// A scheduler for events on the main thread, for this configuration; deleted with
    /// `..._config_scheduler_delete`.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: ConfigEnvoyPtr,
    ) -> *mut std::ffi::c_void;
    /// Posts `event_id` to the main thread, where Envoy calls
    /// `envoy_dynamic_module_on_http_filter_config_scheduled` with it. Callable from any thread.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: *mut std::ffi::c_void,
        event_id: u64,
    );
    /// Deletes a scheduler (no commit may follow).
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler: *mut std::ffi::c_void,
    );
    /// A scheduler for events on the stream's worker thread, for this stream; deleted with
    /// `..._scheduler_delete`.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter: FilterEnvoyPtr,
    ) -> *mut std::ffi::c_void;
    /// Posts `event_id` to the stream's worker, where Envoy calls
    /// `envoy_dynamic_module_on_http_filter_scheduled` with it if the stream still exists. Callable
    /// from any thread.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: *mut std::ffi::c_void,
        event_id: u64,
    );
    /// Deletes a stream's scheduler (no commit may follow; events already committed are still
    /// delivered).
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(
        scheduler: *mut std::ffi::c_void,
    );
    /// The number of worker threads; main thread only.
    pub fn envoy_dynamic_module_callback_get_concurrency() -> u32;
    /// Logs to Envoy's `dynamic_modules` logger, with the module's source location (new in 1.40; the
    /// older `envoy_dynamic_module_callback_log` is deprecated).
    pub fn envoy_dynamic_module_callback_log_v2(
        level: LogLevel,
        message: ModuleBuffer,
        source_file: ModuleBuffer,
        source_line: u32,
    );
    /// Whether a line at `level` would be written.
    pub fn envoy_dynamic_module_callback_log_enabled(level: LogLevel) -> bool;
}

#[cfg(any(test, feature = "stubs"))]
pub mod stubs;
