//! Sending a local reply: the last thing a hook does with its stream.
//!
//! Inside `send_response` Envoy finishes the stream: it encodes the reply (the module's own response
//! hooks are skipped for it), runs the module's `stream_complete` hook for the same stream, and may
//! destroy the stream before returning. So a hook never sends while it holds its stream or a worker's
//! lock: the session's reply is handed back out of the hook's work ([`crate::filter::Pending`]), and
//! the `extern "C"` hook sends it here once its [`crate::objects::StreamLease`] and every lock are
//! released. [`send_local_reply`] consumes the hook's [`FilterEnvoy`], so nothing can reach Envoy's
//! filter through it afterwards either.
#![deny(unsafe_code)]

use cb_core::reply::LocalReply;

use crate::abi::ModuleHttpHeader;
use crate::host::FilterEnvoy;

/// `details` of the module's local replies (Envoy's `%RESPONSE_CODE_DETAILS%`).
pub const REPLY_DETAILS: &[u8] = b"circuit_breaker";

/// Headers passed on the stack up to this many (every answer of the filter but a fallback with many
/// headers of its own).
const INLINE_HEADERS: usize = 8;

/// Sends `reply` on the stream of `envoy`, which may be complete and destroyed when this returns.
pub fn send_local_reply(envoy: FilterEnvoy<'_>, reply: &LocalReply) {
    // The core's gRPC answer carries `grpc-status: 14` itself: without it, Envoy's trailers-only reply
    // would say 0 (OK).
    let header = |(k, v): &(cb_core::reply::Text, cb_core::reply::Text)| ModuleHttpHeader {
        key_ptr: k.as_str().as_ptr().cast(),
        key_length: k.as_str().len(),
        value_ptr: v.as_str().as_ptr().cast(),
        value_length: v.as_str().len(),
    };
    let none = ModuleHttpHeader {
        key_ptr: std::ptr::null(),
        key_length: 0,
        value_ptr: std::ptr::null(),
        value_length: 0,
    };
    let mut inline = [none; INLINE_HEADERS];
    let spilled: Vec<ModuleHttpHeader>;
    let headers: &[ModuleHttpHeader] = if reply.headers.len() <= INLINE_HEADERS {
        for (slot, h) in inline.iter_mut().zip(reply.headers.iter()) {
            *slot = header(h);
        }
        inline.get(..reply.headers.len()).unwrap_or_default()
    } else {
        spilled = reply.headers.iter().map(header).collect();
        &spilled
    };
    envoy.send_response(reply.status, headers, reply.body.as_bytes(), REPLY_DETAILS);
}
