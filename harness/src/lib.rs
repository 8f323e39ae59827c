//! The native harness: the same breaker core as the `.wasm` filter, run under tokio.
//!
//! - [`sim`]: simulated Envoy workers racing on an in-memory CAS store, with paused time and scripted
//!   upstreams.
//! - [`services`]: the demo gRPC services (user, content, feed, auth) with a fault mode that can be
//!   switched while they run, and [`services::Upstreams`], which starts them all (demo and tests).
//! - [`envoy`]: a real Envoy with the built filter, started by one launcher, for the e2e tests, the demo
//!   and the bench.
//! - [`simulate`]: replays an access log or a scenario through the core, offline.
//! - [`svg`]: a dependency-free SVG timeline of breaker states, error rate and latency (simulate, demo).
//! - [`demo`]: the outage demo behind `make demo`.
//! - [`bench`]: the benchmarks behind `make bench` (the filter in Envoy against Envoy's own floor).
#![forbid(unsafe_code)]

pub mod bench;
pub mod demo;
pub mod envoy;
pub mod services;
pub mod sim;
pub mod simulate;
pub mod svg;
