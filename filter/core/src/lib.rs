//! The circuit-breaker core: everything the Envoy filter decides, with no proxy-wasm, no async runtime
//! and no clock. Time comes in as milliseconds from the host; storage comes in as a [`store::SharedStore`]
//! with Envoy shared-data semantics. The same code runs inside the `.wasm` filter and under the native
//! tokio harness.
//!
//! - [`config`]: the filter's JSON, validated into [`config::FilterConfig`].
//! - [`classify`]: what a finished call counts as.
//! - [`window`]: count and time sliding windows.
//! - [`breaker`]: the Closed → Open → HalfOpen → Closed state machine.
//! - [`codec`]: a breaker as bytes in shared data.
//! - [`store`]: the store trait, an in-memory store, the bounded CAS loop.
//! - [`registry`]: one worker's view of all breakers: registration, admit, record, health snapshot.
//! - [`reply`]: the rejection, fallback and health responses.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod breaker;
pub mod classify;
pub mod codec;
pub mod config;
pub mod deadline;
pub mod duration;
pub mod host;
pub mod key;
pub mod registry;
pub mod reply;
pub mod store;
pub mod telemetry;
pub mod window;
