//! The circuit breaker as a native Envoy dynamic module (`libcircuit_breaker.so`): thin glue from
//! Envoy's dynamic-module ABI to the breaker core (`cb_core`), the same core the wasm filter drives.
//!
//! Targets Envoy 1.40's ABI, version string **`v0.2.0`** ([`abi::ABI_VERSION`]), which
//! [`envoy_dynamic_module_on_program_init`] returns; Envoy logs "Dynamic module ABI version v0.2.0
//! matched." when it agrees, and only warns when it does not.
//!
//! - [`abi`]: the types and callbacks of the ABI this module uses, declared here.
//! - [`host`]: every call into Envoy, and every pointer Envoy keeps for the module.
//! - [`config`]: `config_new`: the configuration validated, the metrics defined, one core worker per
//!   Envoy worker.
//! - [`filter`]: the per-stream object: each hook one call of the core's `Session`.
//! - [`tables`]: the process-wide breaker tables, kept across reconfigurations.
//! - [`ticker`]: the stuck-call check's clock.
//!
//! This file holds the hooks Envoy resolves by name: Envoy refuses a module that lacks any of the 20
//! `envoy_dynamic_module_on_http_filter_*` hooks below ("Failed to resolve symbol"), so the ones the
//! breaker has no use for are here too, and do nothing. Each runs its body behind [`guard`]: a panic
//! must not unwind into Envoy (there is no VM between them: it would take the process down), so it is
//! caught, logged at Critical with the hook and the place, counted in `circuit_breaker_panics_total`,
//! and the stream goes on as if the filter were not there. That needs the `release-native` profile
//! (`panic = "unwind"`); under the workspace's `panic = "abort"` nothing could be caught.
#![deny(unsafe_op_in_unsafe_fn)]

// Unsafe code lives in `abi` (the declarations, and the test stubs) and `host` (the only caller); the
// other modules deny it, and this file has none but the `#[no_mangle]` of the hooks.
pub mod abi;
pub mod config;
pub mod filter;
pub mod host;
pub mod tables;
pub mod ticker;

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};

use cb_core::host::Action;
use cb_core::telemetry::{Level, Metric, Series, Telemetry};

use abi::{
    BodyStatus, ConfigEnvoyPtr, EnvoyBuffer, EnvoyHttpHeader, FilterEnvoyPtr, HeadersStatus,
    ModulePtr, TrailersStatus,
};
use config::ModuleConfig;
use filter::Stream;
use host::{ConfigTelemetry, NativeHost};

thread_local! {
    /// How many guarded hooks are running on this thread (a hook can be entered from another's
    /// callback): inside one, the panic hook records the panic for [`guard`] instead of printing it.
    static GUARDED: Cell<u32> = const { Cell::new(0) };
    /// What the panic hook saw of the last panic inside a guard: message and source location.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs a hook's `body`; on a panic returns `fail_open` instead, after a Critical log line naming the
/// hook and the panic's place, and a count in `circuit_breaker_panics_total` when `config` is known.
pub fn guard<T>(
    hook: &str,
    fail_open: T,
    config: Option<&ModuleConfig>,
    body: impl FnOnce() -> T,
) -> T {
    GUARDED.with(|g| g.set(g.get().saturating_add(1)));
    let result = panic::catch_unwind(AssertUnwindSafe(body));
    GUARDED.with(|g| g.set(g.get().saturating_sub(1)));
    let payload = match result {
        Ok(out) => return out,
        Err(payload) => payload,
    };
    let what = LAST_PANIC
        .with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.take()))
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into());
    // Dropping the payload runs code of whoever panicked, which could panic again, outside any guard:
    // it is leaked instead (a few bytes, once per panic).
    std::mem::forget(payload);
    host::log_with(Level::Critical, || {
        format!("circuit breaker: hook {hook} panicked ({what}); failing open: the stream goes on without the breaker")
    });
    if let Some(config) = config {
        ConfigTelemetry::new(config).add(&Series::global(Metric::Panics), 1);
    }
    fail_open
}

/// Replaces the default panic hook (which would print to Envoy's stderr) with one that hands the
/// panic's message and place to [`guard`]. A panic outside every guard still goes to the default hook.
fn install_panic_hook() {
    let default = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if GUARDED.with(Cell::get) == 0 {
            return default(info);
        }
        let what = info.to_string().replace('\n', " ");
        LAST_PANIC.with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                *p = Some(what);
            }
        });
    }));
}

/// Runs a stream hook: the stream's own object and a host for it, behind [`guard`]. A stream whose
/// earlier hook panicked, or the pass-through object, gets `fail_open` without running anything.
fn on_stream<T>(
    hook: &str,
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
    fail_open: T,
    body: impl FnOnce(&mut Stream, &mut NativeHost<'_>) -> T,
) -> T {
    let Some(stream) = host::stream_mut(module).filter(|s| !s.failed) else {
        return fail_open;
    };
    let Some(config) = stream.config() else {
        return fail_open;
    };
    let mut panicked = true;
    let out = guard(hook, fail_open, Some(config), || {
        let out = body(stream, &mut NativeHost::new(envoy, config));
        panicked = false;
        out
    });
    if panicked {
        stream.failed = true;
    }
    out
}

fn headers_status(action: Action) -> HeadersStatus {
    match action {
        Action::Continue => HeadersStatus::Continue,
        Action::Stop => HeadersStatus::StopIteration,
    }
}

fn trailers_status(action: Action) -> TrailersStatus {
    match action {
        Action::Continue => TrailersStatus::Continue,
        Action::Stop => TrailersStatus::StopIteration,
    }
}

// ---- Module and configuration -------------------------------------------------------------------

/// Called once when Envoy loads the module: the ABI version this module targets, `v0.2.0`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    guard("program_init", abi::ABI_VERSION.as_ptr(), None, || {
        install_panic_hook();
        host::now_ms(); // the process-wide clock's origin
        abi::ABI_VERSION.as_ptr()
    })
}

/// A filter configuration (main thread): the module's configuration, or null to refuse it.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ModulePtr {
    guard("config_new", std::ptr::null(), None, || {
        if cfg!(panic = "abort") {
            host::log(Level::Warn, "circuit breaker: this build aborts on a panic (build it with `--profile release-native`)");
        }
        host::log_with(Level::Info, || {
            format!(
                "circuit breaker: native module, dynamic-module ABI {}",
                abi::ABI_VERSION.to_string_lossy()
            )
        });
        match config::config_new(envoy, host::lent(name), host::lent(config)) {
            Some(c) => host::config_into_ptr(Box::new(c)),
            None => std::ptr::null(),
        }
    })
}

/// An event committed to the configuration's scheduler, on the main thread: the stuck-call check.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _envoy: ConfigEnvoyPtr,
    config: ModulePtr,
    event_id: u64,
) {
    let config = host::config_ref(config);
    guard("config_scheduled", (), config, || {
        if let (Some(config), ticker::STUCK_CHECK) = (config, event_id) {
            config.check_stuck();
        }
    });
}

/// The configuration is gone (after its last stream; on whichever thread dropped it last).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ModulePtr) {
    guard("config_destroy", (), None, || host::drop_config(config));
}

// ---- Stream lifetime ----------------------------------------------------------------------------

/// A new stream, on its worker. On a panic it gets the pass-through object (a null would close it).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ModulePtr,
    _envoy: FilterEnvoyPtr,
) -> ModulePtr {
    let config = host::config_ref(config);
    guard("new", host::stream_into_ptr(None), config, || {
        host::stream_into_ptr(config.map(|c| Box::new(Stream::new(c))))
    })
}

/// Frees the stream (once, after `stream_complete`; Envoy 1.40 defers it to the worker's next turn).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: ModulePtr) {
    let config = host::stream_mut(module).and_then(|s| s.config());
    guard("destroy", (), config, || host::drop_stream(module));
}

/// The stream is complete, before access logs.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
) {
    on_stream("stream_complete", envoy, module, (), |s, h| {
        s.stream_complete(h)
    });
}

// ---- The four hooks the breaker works in ----------------------------------------------------------

/// Request headers: admission.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
    end_of_stream: bool,
) -> HeadersStatus {
    on_stream(
        "request_headers",
        envoy,
        module,
        HeadersStatus::Continue,
        |s, h| headers_status(s.request_headers(h, end_of_stream)),
    )
}

/// Response headers: an HTTP or trailers-only gRPC outcome.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
    end_of_stream: bool,
) -> HeadersStatus {
    on_stream(
        "response_headers",
        envoy,
        module,
        HeadersStatus::Continue,
        |s, h| headers_status(s.response_headers(h, end_of_stream)),
    )
}

/// Response trailers: a gRPC outcome.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
) -> TrailersStatus {
    on_stream(
        "response_trailers",
        envoy,
        module,
        TrailersStatus::Continue,
        |s, h| trailers_status(s.response_trailers(h)),
    )
}

// ---- Hooks Envoy requires and the breaker does not use: they pass everything through --------------

/// Request body: passed through.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
    _end_of_stream: bool,
) -> BodyStatus {
    guard("request_body", BodyStatus::Continue, None, || {
        BodyStatus::Continue
    })
}

/// Request trailers: passed through.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
) -> TrailersStatus {
    guard("request_trailers", TrailersStatus::Continue, None, || {
        TrailersStatus::Continue
    })
}

/// Response body: passed through.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
    _end_of_stream: bool,
) -> BodyStatus {
    guard("response_body", BodyStatus::Continue, None, || {
        BodyStatus::Continue
    })
}

/// An event the module scheduled on the stream's worker (none yet).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
    _event_id: u64,
) {
    guard("scheduled", (), None, || ());
}

/// An HTTP callout finished (the module makes none).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
    _callout_id: u64,
    _result: u32,
    _headers: *const EnvoyHttpHeader,
    _headers_count: usize,
    _chunks: *const EnvoyBuffer,
    _chunks_count: usize,
) {
    guard("http_callout_done", (), None, || ());
}

/// Response headers of a module-made stream (none).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _headers: *const EnvoyHttpHeader,
    _headers_count: usize,
    _end_stream: bool,
) {
    guard("http_stream_headers", (), None, || ());
}

/// Response data of a module-made stream (none).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
    guard("http_stream_data", (), None, || ());
}

/// Response trailers of a module-made stream (none).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _trailers: *const EnvoyHttpHeader,
    _trailers_count: usize,
) {
    guard("http_stream_trailers", (), None, || ());
}

/// A module-made stream completed (none).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
) {
    guard("http_stream_complete", (), None, || ());
}

/// A module-made stream was reset (none). The reason is a plain number: it comes from Envoy.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
    guard("http_stream_reset", (), None, || ());
}

/// The downstream's write buffer is full (nothing buffered by the module).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
) {
    guard(
        "downstream_above_write_buffer_high_watermark",
        (),
        None,
        || (),
    );
}

/// The downstream's write buffer drained.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: FilterEnvoyPtr,
    _module: ModulePtr,
) {
    guard(
        "downstream_below_write_buffer_low_watermark",
        (),
        None,
        || (),
    );
}

#[cfg(test)]
mod tests;
