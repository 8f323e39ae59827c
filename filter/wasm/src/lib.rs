//! The circuit-breaker proxy-wasm HTTP filter: thin glue that turns Envoy host calls into calls of the
//! breaker core (`cb_core`).
//!
//! - [`root`]: one per plugin configuration and worker: parses the configuration, owns this worker's
//!   [`cb_core::worker::Worker`] and metric ids, runs the stuck-call check on its tick, creates the
//!   per-stream contexts.
//! - [`http`]: one per stream: each callback is one call of the core's [`cb_core::session::Session`].
//! - [`abi`]: the proxy-wasm host calls, declared here so that none can panic (the SDK's do on any
//!   status they do not expect); the SDK provides the exports.
//! - [`host`]: the host calls, each answer translated once: shared data as the core's store, the
//!   stream as the core's `Host`.
//! - [`metrics`]: the Prometheus metrics of the contract, as stats whose names carry their labels.

pub mod abi;
pub mod host;
pub mod http;
pub mod metrics;
pub mod root;

use cb_core::telemetry::Level;

proxy_wasm::main! {{
    // The SDK's `set_log_level` is not called: its logger and panic hook unwrap host results. We log
    // through `host::log`, and install our own hook.
    // A panic traps this worker's VM and fails every request through it; if one ever happens, say so
    // loudly and with the location (the release build aborts right after the hook).
    std::panic::set_hook(Box::new(|info| {
        host::log(Level::Critical, &format!("circuit breaker filter panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|_| Box::new(root::Root::default()));
}}
