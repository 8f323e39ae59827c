//! The native harness: the same breaker core as the `.wasm` filter, run under tokio.
//!
//! - [`sim`]: simulated Envoy workers racing on an in-memory CAS store, with paused time and scripted
//!   upstreams.
//! - [`services`]: the demo gRPC services (user, content, feed, auth) with a fault mode that can be
//!   switched while they run.
//! - [`simulate`]: replays an access log or a scenario through the core, offline.
//! - [`demo`]: the outage demo behind `make demo`.
#![forbid(unsafe_code)]

pub mod demo;
pub mod services;
pub mod sim;
pub mod simulate;
