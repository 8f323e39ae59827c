//! The circuit breaker as a native Envoy dynamic module (`libcircuit_breaker.so`): thin glue from
//! Envoy's dynamic-module ABI to the breaker core (`cb_core`), the same core the wasm filter drives.
//!
//! Targets Envoy 1.40's ABI, version string **`v0.2.0`** ([`abi::ABI_VERSION`]), which
//! [`envoy_dynamic_module_on_program_init`] returns; Envoy logs "Dynamic module ABI version v0.2.0
//! matched." when it agrees, and only warns when it does not.
//!
//! - [`abi`]: the types and callbacks of the ABI this module uses, declared here.
//! - [`host`]: every call into Envoy: one stream's view of it ([`host::NativeHost`]), metrics, logs.
//! - [`objects`]: the module's objects as Envoy keeps them, and the lease through which a hook
//!   reaches its stream.
//! - [`config`]: `config_new`: the configuration validated, the metrics defined, one core worker per
//!   Envoy worker; and the tick over them.
//! - [`filter`]: the per-stream object: each hook one call of the core's `Session`.
//! - [`reply`]: sending a local reply, the last thing a hook does with its stream.
//! - [`scheduler`]: Envoy's schedulers, and why no commit can reach a deleted one.
//! - [`ticker`]: the module's one clock thread, which ticks every configuration.
//! - [`tables`]: the process-wide breaker tables, shared by the configurations that use them.
//! - [`guard`]: the panic guard.
//!
//! This file holds the hooks Envoy resolves by name: Envoy refuses a module that lacks any of the 20
//! `envoy_dynamic_module_on_http_filter_*` hooks below ("Failed to resolve symbol"), so the ones the
//! breaker has no use for are here too, and do nothing. Each runs its body behind [`guard()`]: a panic
//! is caught, logged, counted, and the stream goes on as if the filter were not there. The hooks are
//! where Envoy's promises about the pointers it passes enter the module: each `unsafe` block here
//! turns one into a value, citing the promise.
#![deny(unsafe_op_in_unsafe_fn)]

// Unsafe code lives in `abi` (the declarations, and the test stubs), `host`, `objects` and `scheduler`
// (the callers of Envoy and the owners of its pointers), and the hooks below; the other modules deny
// it.
pub mod abi;
pub mod config;
pub mod filter;
pub mod guard;
pub mod host;
pub mod objects;
pub mod reply;
pub mod scheduler;
pub mod tables;
pub mod ticker;

use cb_core::host::Action;
use cb_core::telemetry::Level;

use abi::{
    BodyStatus, ConfigEnvoyPtr, EnvoyBuffer, EnvoyHttpHeader, FilterEnvoyPtr, HeadersStatus,
    ModulePtr, TrailersStatus,
};
use filter::{Pending, Stream};
pub use guard::guard;
use host::{ConfigEnvoy, FilterEnvoy};
use objects::{ConfigHandle, Lease};

/// Runs a stream hook's `work` on the stream lent to it, behind [`guard()`]; then, once the lease is
/// over and nothing refers to the stream, sends the local reply the work asked for (Envoy completes
/// the stream inside that call, and may destroy it). A stream whose earlier hook panicked, the
/// pass-through object, or a stream another hook on this thread holds gets `fail_open` without
/// running anything.
fn on_stream<T: Copy>(
    hook: &str,
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
    fail_open: T,
    work: impl FnOnce(&mut Stream, &FilterEnvoy<'_>) -> (T, Pending),
) -> T {
    // SAFETY: the filter pointer Envoy passed to this hook; the value lives in this frame only.
    let envoy = unsafe { FilterEnvoy::new(envoy) };
    let (out, reply) = {
        // SAFETY: the stream pointer Envoy passed to this stream hook, on the stream's worker.
        let mut lease = match unsafe { objects::lease_stream(module) } {
            Lease::Lent(lease) => lease,
            Lease::PassThrough => return fail_open,
            Lease::Busy => {
                host::log_with(Level::Critical, || {
                    format!("circuit breaker: hook {hook} re-entered for a stream another hook holds; passing it through")
                });
                return fail_open;
            }
        };
        let stream = lease.stream();
        if stream.failed {
            return fail_open;
        }
        let config = stream.config_handle();
        let mut panicked = true;
        let result = guard(hook, (fail_open, None), Some(config.get()), || {
            let result = work(stream, &envoy);
            panicked = false;
            result
        });
        if panicked {
            stream.failed = true;
        }
        result
    }; // the lease ends: from here on nothing refers to the stream
    if let Some(reply) = reply {
        guard("send_response", (), None, || {
            reply::send_local_reply(envoy, &reply);
        });
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
        guard::install_panic_hook();
        host::now_ms(); // the process-wide clock's origin
        abi::ABI_VERSION.as_ptr()
    })
}

/// A filter configuration (main thread): the module's configuration, or null to refuse it.
// Envoy's entry point: Envoy hands it the pointer, under the promise the SAFETY comment cites.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
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
        // SAFETY: the configuration object Envoy passed to this `config_new`; only the configuration
        // returned keeps it, and Envoy keeps the object until that configuration's `config_destroy`.
        let envoy = unsafe { ConfigEnvoy::new(envoy) };
        // SAFETY: Envoy lends both buffers for this hook; `config_new` keeps nothing of them.
        let (name, config) = unsafe { (objects::lent(name), objects::lent(config)) };
        match config::config_new(envoy, name, config) {
            Some(c) => objects::config_into_ptr(Box::new(c)),
            None => std::ptr::null(),
        }
    })
}

/// An event committed to the configuration's scheduler, on the main thread: the tick.
// Envoy's entry point: Envoy hands it the pointer, under the promise the SAFETY comment cites.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _envoy: ConfigEnvoyPtr,
    config: ModulePtr,
    event_id: u64,
) {
    // SAFETY: the pointer `config_new` returned; Envoy delivers a configuration's events only while it
    // lives (its scheduler holds a weak reference to it).
    let config = unsafe { objects::config_ref(config) };
    guard("config_scheduled", (), config, || {
        if let (Some(config), ticker::TICK) = (config, event_id) {
            config.tick(host::now_ms());
        }
    });
}

/// The configuration is gone (after its last stream; on whichever thread dropped it last).
// Envoy's entry point: Envoy hands it the pointer, under the promise the SAFETY comment cites.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ModulePtr) {
    guard("config_destroy", (), None, || {
        // SAFETY: `config_destroy` comes once per configuration, after its last stream is destroyed.
        unsafe { objects::drop_config(config) }
    });
}

// ---- Stream lifetime ----------------------------------------------------------------------------

/// A new stream, on its worker. On a panic it gets the pass-through object (a null would close it).
// Envoy's entry point: Envoy hands it the pointer, under the promise the SAFETY comment cites.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ModulePtr,
    _envoy: FilterEnvoyPtr,
) -> ModulePtr {
    // SAFETY: the pointer `config_new` returned, alive while Envoy makes streams under it.
    let config = unsafe { objects::config_ref(config) };
    guard("new", objects::stream_into_ptr(None), config, || {
        let stream = config.map(|c| {
            // SAFETY: Envoy destroys a configuration only after the last stream made under it.
            Box::new(Stream::new(unsafe { ConfigHandle::new(c) }))
        });
        objects::stream_into_ptr(stream)
    })
}

/// Frees the stream (once, after `stream_complete`; Envoy 1.40 defers it to the worker's next turn).
/// Its scheduler leaves its worker's table first, and is deleted once.
// Envoy's entry point: Envoy hands it the pointer, under the promise the SAFETY comment cites.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: ModulePtr) {
    // SAFETY: the stream pointer Envoy passed to this stream hook, on the stream's worker.
    let mut lease = match unsafe { objects::lease_stream(module) } {
        Lease::Lent(lease) => lease,
        Lease::PassThrough => return,
        Lease::Busy => {
            // Freeing it would pull it from under the hook that holds it: leaked instead.
            host::log(
                Level::Critical,
                "circuit breaker: a stream destroyed while a hook holds it is leaked",
            );
            return;
        }
    };
    let config = lease.stream().config_handle();
    let scheduler = guard("destroy", None, Some(config.get()), || {
        lease.stream().release()
    });
    // Deleted out of its worker's table, and after the worker's lock is released.
    drop(scheduler);
    // SAFETY: `filter_destroy`: Envoy hands this stream's pointer to no hook after this one.
    unsafe { objects::free_stream(lease) };
}

/// The stream is complete, before access logs. Inside `send_response` when the module answered it.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
) {
    on_stream("stream_complete", envoy, module, (), |s, e| {
        s.stream_complete(e);
        ((), None)
    });
}

// ---- The hooks the breaker works in ---------------------------------------------------------------

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
        |s, e| {
            let (action, reply) = s.request_headers(e, end_of_stream);
            (headers_status(action), reply)
        },
    )
}

/// Request body: its last chunk ends the request.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
    end_of_stream: bool,
) -> BodyStatus {
    if !end_of_stream {
        return BodyStatus::Continue;
    }
    on_stream(
        "request_body",
        envoy,
        module,
        BodyStatus::Continue,
        |s, _| {
            s.request_end();
            (BodyStatus::Continue, None)
        },
    )
}

/// Request trailers: they end the request.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
) -> TrailersStatus {
    on_stream(
        "request_trailers",
        envoy,
        module,
        TrailersStatus::Continue,
        |s, _| {
            s.request_end();
            (TrailersStatus::Continue, None)
        },
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
        |s, e| (headers_status(s.response_headers(e, end_of_stream)), None),
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
        |s, e| (trailers_status(s.response_trailers(e)), None),
    )
}

/// An event on the stream's scheduler, on its worker: the tick ordered its stuck call cut (the event
/// is the call's id). The breaker's answer is sent once the stream is let go.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    envoy: FilterEnvoyPtr,
    module: ModulePtr,
    event_id: u64,
) {
    on_stream("scheduled", envoy, module, (), |s, e| {
        ((), s.scheduled(e, event_id))
    });
}

// ---- Hooks Envoy requires and the breaker does not use: they pass everything through --------------

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
