//! The circuit-breaker core: everything the Envoy filter decides, with no proxy-wasm, no async runtime
//! and no clock. Time comes in as milliseconds from the host; storage comes in as a
//! [`store::BreakerStore`]. The same code runs inside the `.wasm` filter, the native Envoy module and
//! the tokio harness: each host implements [`host::Host`] and drives one [`session::Session`] per
//! stream over one [`worker::Worker`] per worker thread.
//!
//! - [`config`]: the filter's JSON, validated into [`config::FilterConfig`].
//! - [`classify`]: what a finished call counts as; [`deadline`]: `grpc-timeout` and deadline cancels.
//! - [`window`]: count and time sliding windows.
//! - [`breaker`]: the Closed → Open → HalfOpen → Closed state machine.
//! - [`codec`]: a breaker, and a table slot, as bytes in shared data.
//! - [`store`]: the breaker table, in shared data (bounded CAS loop) or in process memory.
//! - [`registry`]: which slot holds a key (probing, eviction); admit, record and health on a slot.
//! - [`worker`]: one worker's key cache, stuck-call table and record retries.
//! - [`session`]: one stream's rules, over a [`host::Host`].
//! - [`telemetry`]: the metric names, and events turned into metrics and log lines.
//! - [`reply`]: the rejection, fallback and health responses.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod breaker;
pub mod classify;
pub mod codec;
pub mod config;
pub mod deadline;
pub mod duration;
pub mod entropy;
pub mod host;
pub mod inflight;
pub mod key;
pub mod registry;
pub mod reply;
pub mod session;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod window;
pub mod worker;
