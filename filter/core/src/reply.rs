//! The responses the filter sends itself (contract sections 4 and 5): the rejection of a call while the
//! breaker is open (and the same answer for a stuck call it cuts), the fallback that replaces it, and
//! the health endpoint's JSON ([`health`]).
//!
//! A rejection is the Open state's hot path, so it is built from parts made once: what never changes
//! for an upstream (its `grpc-message`, its JSON body) is made once per key ([`RejectParts`]), a
//! fallback's headers once per configuration, and only the pushback is written per call, on the stack.
//! A [`LocalReply`] holds its headers inline and is handed to the host by value.

mod health;

use std::fmt;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::classify::{grpc_code_for_http, GRPC_UNAVAILABLE};
use crate::config::Fallback;

pub use health::{health, health_unknown, MAX_HEALTH_ENTRIES};

/// A header name, value or body: a literal, text shared with the key's cache, or a number written on
/// the stack. Cloning one never copies text.
#[derive(Clone)]
pub enum Text {
    /// A literal.
    Static(&'static str),
    /// Text made once and shared.
    Shared(Arc<str>),
    /// A number.
    Number(Digits),
}

impl Text {
    /// The text.
    pub fn as_str(&self) -> &str {
        match self {
            Text::Static(s) => s,
            Text::Shared(s) => s,
            Text::Number(d) => d.as_str(),
        }
    }

    /// The text's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.as_str().as_bytes()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.as_str().is_empty()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// Texts are equal when they read the same, however they are held.
impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text::Shared(Arc::from(s))
    }
}

/// A `u64` in decimal, held inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digits {
    buf: [u8; 20],
    start: u8,
}

impl Digits {
    /// `n` in decimal.
    pub fn new(mut n: u64) -> Self {
        let mut buf = [b'0'; 20];
        let mut start = buf.len();
        loop {
            start -= 1;
            if let Some(b) = buf.get_mut(start) {
                *b = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || start == 0 {
                break;
            }
        }
        Self {
            buf,
            start: start as u8,
        }
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        let digits = self.buf.get(usize::from(self.start)..).unwrap_or_default();
        std::str::from_utf8(digits).unwrap_or_default()
    }
}

/// Header lists as replies carry them: inline up to six, which every answer of the filter but a
/// fallback with many headers of its own fits in.
pub type Headers = SmallVec<[(Text, Text); 6]>;

/// A response for the host to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Headers,
    /// Body; empty for a gRPC trailers-only response.
    pub body: Text,
}

impl LocalReply {
    /// The value of header `name`, if the reply has one.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether a request is gRPC, from its `content-type`.
pub fn is_grpc(content_type: Option<&[u8]>) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    content_type.is_some_and(|ct| {
        let ct = ct.trim_ascii_start();
        ct.get(..GRPC.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(GRPC))
    })
}

/// What an upstream's rejection says that never changes: made once per key and kept with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectParts {
    /// `circuit breaker open for <key>`, percent-encoded as gRPC requires.
    grpc_message: Arc<str>,
    /// `{"error":"circuit breaker open","upstream":"<key>"}`.
    http_body: Arc<str>,
}

impl RejectParts {
    /// The parts for `upstream`.
    pub fn new(upstream: &str) -> Self {
        let body = serde_json::json!({"error": "circuit breaker open", "upstream": upstream});
        Self {
            grpc_message: percent_encode(&format!("circuit breaker open for {upstream}")).into(),
            http_body: body.to_string().into(),
        }
    }
}

/// The answer to a call turned away (or a stuck call cut): `marker` is the `x-circuit-breaker` value
/// (`open`, `half_open`, `recovering`, `cut`), `retry_after_ms` the pushback when known.
pub fn rejection(
    grpc: bool,
    parts: &RejectParts,
    marker: &'static str,
    retry_after_ms: Option<u64>,
    fallback: Option<&Fallback>,
) -> LocalReply {
    match (fallback, grpc) {
        (Some(fb), false) => http_fallback(fb, marker),
        (Some(fb), true) => grpc_fallback(fb, marker),
        (None, true) => {
            let mut headers = Headers::new();
            headers.push((
                Text::Static("content-type"),
                Text::Static("application/grpc"),
            ));
            headers.push((
                Text::Static("grpc-status"),
                Text::Number(Digits::new(u64::from(GRPC_UNAVAILABLE))),
            ));
            headers.push((
                Text::Static("grpc-message"),
                Text::Shared(Arc::clone(&parts.grpc_message)),
            ));
            if let Some(ms) = retry_after_ms {
                headers.push((
                    Text::Static("grpc-retry-pushback-ms"),
                    Text::Number(Digits::new(ms)),
                ));
            }
            headers.push((Text::Static("x-circuit-breaker"), Text::Static(marker)));
            // No body: headers with end-of-stream make a gRPC trailers-only response.
            LocalReply {
                status: 200,
                headers,
                body: Text::Static(""),
            }
        }
        (None, false) => {
            let mut headers = Headers::new();
            headers.push((
                Text::Static("content-type"),
                Text::Static("application/json"),
            ));
            // A call the recovery ramp turned away may try again at once, as far as seconds go: the
            // share grows all the time (contract: `retry-after: 1`).
            let seconds = if marker == "recovering" {
                1
            } else {
                retry_after_seconds(retry_after_ms)
            };
            headers.push((
                Text::Static("retry-after"),
                Text::Number(Digits::new(seconds)),
            ));
            headers.push((Text::Static("x-circuit-breaker"), Text::Static(marker)));
            LocalReply {
                status: 503,
                headers,
                body: Text::Shared(Arc::clone(&parts.http_body)),
            }
        }
    }
}

fn http_fallback(fb: &Fallback, marker: &'static str) -> LocalReply {
    let mut headers = fallback_headers(fb);
    set_default(&mut headers, "x-circuit-breaker", Text::Static(marker));
    LocalReply {
        status: fb.status,
        headers,
        body: Text::Shared(Arc::clone(&fb.body)),
    }
}

/// A fallback for a gRPC call. Envoy turns every local reply to a gRPC request into a trailers-only
/// response, so a body can never reach the client as a message; what a user writing `status: 200`
/// means is "answer OK". So: `grpc-status` from the fallback's headers when they set it, else `0` for
/// status 200, else the code gRPC derives from that HTTP status (503 → UNAVAILABLE); the body, if
/// any, becomes the `grpc-message`.
fn grpc_fallback(fb: &Fallback, marker: &'static str) -> LocalReply {
    let mut headers = fallback_headers(fb);
    let code = match fb.status {
        200 => 0,
        other => grpc_code_for_http(other),
    };
    set_default(
        &mut headers,
        "content-type",
        Text::Static("application/grpc"),
    );
    set_default(
        &mut headers,
        "grpc-status",
        Text::Number(Digits::new(u64::from(code))),
    );
    if let Some(message) = &fb.grpc_message {
        set_default(
            &mut headers,
            "grpc-message",
            Text::Shared(Arc::clone(message)),
        );
    }
    set_default(&mut headers, "x-circuit-breaker", Text::Static(marker));
    LocalReply {
        status: 200,
        headers,
        body: Text::Static(""),
    }
}

fn fallback_headers(fb: &Fallback) -> Headers {
    fb.headers
        .iter()
        .map(|(k, v)| (Text::Shared(Arc::clone(k)), Text::Shared(Arc::clone(v))))
        .collect()
}

/// Adds `name: value` unless a header of that name is there already.
fn set_default(headers: &mut Headers, name: &'static str, value: Text) {
    if !headers.iter().any(|(k, _)| k.as_str() == name) {
        headers.push((Text::Static(name), value));
    }
}

/// `retry-after` in whole seconds, rounded up so a client never comes back before probes start, and at
/// least 1 (when the time is unknown, a second is a fair guess).
fn retry_after_seconds(retry_after_ms: Option<u64>) -> u64 {
    retry_after_ms.map_or(1, |ms| ms.div_ceil(1000)).max(1)
}

/// Percent-encodes a `grpc-message` as the gRPC spec asks: every byte outside printable ASCII
/// (0x20..=0x7E), and `%` itself.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7E).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
