//! One upstream's [`Breaker`] as bytes in Envoy shared data: versioned, fixed layout, little-endian.
//!
//! ```text
//! offset size  field
//!      0    1  magic 0xCB
//!      1    1  version (2)
//!      2    1  state: 0 closed, 1 open, 2 half-open
//!      3    1  window: 0 count, 1 time
//!      4    4  generation
//!      8    4  consecutive failures
//!     12    8  open time in force (ms)
//!     20    8  open: until (ms); half-open: last permit (ms); closed: 0
//!     28    2  half-open permits in flight
//!     30    2  half-open successes
//!     32    8  recovery ramp: start (ms)          \
//!     40    8  recovery ramp: until (ms)           |
//!     48    4  recovery ramp: epoch                | all zero: no ramp (closed only)
//!     52    4  recovery ramp: calls seen (epoch)   |
//!     56    4  recovery ramp: admitted (epoch)    /
//!     60       count window: size u16, len u16, head u16, failure bits, slow bits (⌈size/8⌉ bytes each)
//!              time window: bucket length u64, then 10 × (epoch u64, calls u32, failures u32, slow u32)
//! ```
//!
//! A count window of 100 takes 92 bytes in all; of 1024, 322; a time window, 268. Bytes that are not
//! exactly this layout (foreign data, another version, a truncated write, an impossible window) decode
//! to a [`CodecError`]: the caller starts the breaker afresh, counts it and logs it. Never a panic.
//!
//! A table slot ([`Slot`]) wraps a breaker with its upstream key:
//!
//! ```text
//! offset size  field
//!      0    1  magic 0xCB
//!      1    1  'S'
//!      2    1  slot version (2)
//!      3    2  key length (0: an empty slot, and nothing follows)
//!      5    n  key (UTF-8, at most 512 bytes)
//!    5+n    8  last call (ms)
//!   13+n    8  window shaped by the configuration of (ms)
//!   21+n       the breaker, as above
//! ```

use std::fmt;

use crate::breaker::{Breaker, BreakerState, Ramp};
use crate::config::MAX_KEY_LEN;
use crate::store::Slot;
use crate::window::{Bucket, CountWindow, TimeWindow, Window, TIME_BUCKETS};

const MAGIC: u8 = 0xCB;
/// Layout version written by this build.
pub const VERSION: u8 = 2;
const HEADER_LEN: usize = 60;

/// Why stored bytes could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecError {
    /// Too short, too long, or not starting with the magic byte.
    Malformed,
    /// Written by another layout version: the one found, and the one this build reads.
    Version {
        /// The version in the bytes.
        found: u8,
        /// The version this build reads.
        reads: u8,
    },
    /// The fields are individually readable but describe an impossible breaker.
    Invalid(&'static str),
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecError::Malformed => write!(f, "not a breaker state (bad length or magic)"),
            CodecError::Version { found, reads } => write!(
                f,
                "breaker state of unknown version {found} (this build reads {reads})"
            ),
            CodecError::Invalid(why) => write!(f, "impossible breaker state: {why}"),
        }
    }
}

impl std::error::Error for CodecError {}

/// The longest encoding: a count window of 1024 (header, 6 bytes of window header, 2 × 128 bytes of
/// bits). A time window takes 308.
pub const MAX_ENCODED_LEN: usize = HEADER_LEN + 6 + 2 * 128;

/// An encoding held on the stack: the filter encodes on every recorded call, and a heap allocation
/// there is a round trip through the VM's allocator for nothing.
#[derive(Clone)]
pub struct Encoded {
    buf: [u8; MAX_ENCODED_LEN],
    len: usize,
}

impl Encoded {
    /// An empty buffer, for [`encode_into`].
    pub fn new() -> Self {
        Self {
            buf: [0; MAX_ENCODED_LEN],
            len: 0,
        }
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        // Cannot overflow: the layout is at most MAX_ENCODED_LEN bytes (checked by the tests).
        if let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    /// The first `n` bytes of the little-endian bit words, eight at a time.
    fn put_words(&mut self, words: &[u64], n: usize) {
        for (i, w) in words.iter().enumerate().take(n.div_ceil(8)) {
            let bytes = w.to_le_bytes();
            self.put(bytes.get(..(n - i * 8).min(8)).unwrap_or_default());
        }
    }
}

impl Default for Encoded {
    fn default() -> Self {
        Self::new()
    }
}

/// Encodes a breaker.
pub fn encode(b: &Breaker) -> Vec<u8> {
    let mut out = Encoded::new();
    encode_into(b, &mut out);
    out.as_bytes().to_vec()
}

/// Encodes a breaker into `out` (replacing what it held), without allocating.
pub fn encode_into(b: &Breaker, out: &mut Encoded) {
    out.len = 0;
    let (tag, time, in_flight, successes) = match b.state {
        BreakerState::Closed => (0u8, 0u64, 0u16, 0u16),
        BreakerState::Open { until_ms } => (1, until_ms, 0, 0),
        BreakerState::HalfOpen {
            in_flight,
            successes,
            last_permit_ms,
        } => (2, last_permit_ms, in_flight, successes),
    };
    out.put(&[
        MAGIC,
        VERSION,
        tag,
        matches!(b.window, Window::Time(_)) as u8,
    ]);
    out.put(&b.generation.to_le_bytes());
    out.put(&b.consecutive_failures.to_le_bytes());
    out.put(&b.open_timeout_ms.to_le_bytes());
    out.put(&time.to_le_bytes());
    out.put(&in_flight.to_le_bytes());
    out.put(&successes.to_le_bytes());
    let ramp = b.ramp.unwrap_or(Ramp {
        start_ms: 0,
        until_ms: 0,
        epoch: 0,
        calls: 0,
        admitted: 0,
    });
    out.put(&ramp.start_ms.to_le_bytes());
    out.put(&ramp.until_ms.to_le_bytes());
    out.put(&ramp.epoch.to_le_bytes());
    out.put(&ramp.calls.to_le_bytes());
    out.put(&ramp.admitted.to_le_bytes());
    match &b.window {
        Window::Count(w) => {
            out.put(&w.size().to_le_bytes());
            out.put(&w.len().to_le_bytes());
            out.put(&w.head().to_le_bytes());
            let n = bit_bytes(w.size());
            let (f, s) = w.bits();
            out.put_words(f, n);
            out.put_words(s, n);
        }
        Window::Time(w) => {
            out.put(&w.bucket_ms().to_le_bytes());
            for bucket in w.buckets() {
                out.put(&bucket.epoch.to_le_bytes());
                out.put(&bucket.calls.to_le_bytes());
                out.put(&bucket.failures.to_le_bytes());
                out.put(&bucket.slow.to_le_bytes());
            }
        }
    }
}

/// Decodes bytes written by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Breaker, CodecError> {
    let mut r = Reader(bytes);
    if r.u8()? != MAGIC {
        return Err(CodecError::Malformed);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(CodecError::Version {
            found: version,
            reads: VERSION,
        });
    }
    let tag = r.u8()?;
    let window_tag = r.u8()?;
    let generation = r.u32()?;
    let consecutive_failures = r.u32()?;
    let open_timeout_ms = r.u64()?;
    let time = r.u64()?;
    let in_flight = r.u16()?;
    let successes = r.u16()?;
    // Fields a state does not use are written as zeros; anything else there means the bytes are not
    // ours (or not whole), and accepting them would make the encoding ambiguous.
    let state = match tag {
        0 if time == 0 && in_flight == 0 && successes == 0 => BreakerState::Closed,
        1 if in_flight == 0 && successes == 0 => BreakerState::Open { until_ms: time },
        0 | 1 => return Err(CodecError::Invalid("unused state fields are not zero")),
        2 => BreakerState::HalfOpen {
            in_flight,
            successes,
            last_permit_ms: time,
        },
        _ => return Err(CodecError::Invalid("unknown state tag")),
    };
    let ramp = Ramp {
        start_ms: r.u64()?,
        until_ms: r.u64()?,
        epoch: r.u32()?,
        calls: r.u32()?,
        admitted: r.u32()?,
    };
    let ramp = match ramp {
        Ramp {
            start_ms: 0,
            until_ms: 0,
            epoch: 0,
            calls: 0,
            admitted: 0,
        } => None,
        r if tag == 0 && r.start_ms < r.until_ms && r.admitted <= r.calls => Some(r),
        _ => return Err(CodecError::Invalid("recovery ramp")),
    };
    let window = match window_tag {
        0 => {
            let (size, len, head) = (r.u16()?, r.u16()?, r.u16()?);
            let n = bit_bytes(size);
            let failure_bits = r.words(n)?;
            let slow_bits = r.words(n)?;
            Window::Count(
                CountWindow::from_parts(size, len, head, failure_bits, slow_bits)
                    .ok_or(CodecError::Invalid("count window"))?,
            )
        }
        1 => {
            let bucket_ms = r.u64()?;
            let mut buckets = [Bucket::default(); TIME_BUCKETS];
            for b in buckets.iter_mut() {
                *b = Bucket {
                    epoch: r.u64()?,
                    calls: r.u32()?,
                    failures: r.u32()?,
                    slow: r.u32()?,
                };
                if b.failures > b.calls || b.slow > b.calls {
                    return Err(CodecError::Invalid("time bucket counts"));
                }
            }
            Window::Time(
                TimeWindow::from_parts(bucket_ms, buckets)
                    .ok_or(CodecError::Invalid("time window"))?,
            )
        }
        _ => return Err(CodecError::Invalid("unknown window tag")),
    };
    if !r.0.is_empty() {
        return Err(CodecError::Malformed);
    }
    Ok(Breaker {
        state,
        generation,
        consecutive_failures,
        open_timeout_ms,
        window,
        ramp,
    })
}

const SLOT_MAGIC: [u8; 3] = [MAGIC, b'S', SLOT_VERSION];
/// Slot layout version written by this build.
pub const SLOT_VERSION: u8 = 2;

/// Encodes a slot (`None`: empty) into `out`, replacing what it held.
pub fn encode_slot_into(slot: Option<&Slot>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&SLOT_MAGIC);
    let Some(slot) = slot else {
        out.extend_from_slice(&0u16.to_le_bytes());
        return;
    };
    // Keys are bounded by MAX_KEY_LEN before they get a slot, so the length always fits.
    out.extend_from_slice(&(slot.key.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    out.extend_from_slice(slot.key.as_bytes());
    out.extend_from_slice(&slot.last_call_ms.to_le_bytes());
    out.extend_from_slice(&slot.shaped_ms.to_le_bytes());
    let mut breaker = Encoded::new();
    encode_into(&slot.breaker, &mut breaker);
    out.extend_from_slice(breaker.as_bytes());
}

/// Encodes a slot (`None`: empty).
pub fn encode_slot(slot: Option<&Slot>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_slot_into(slot, &mut out);
    out
}

/// Decodes bytes written by [`encode_slot`]: `None` for an empty slot.
pub fn decode_slot(bytes: &[u8]) -> Result<Option<Slot>, CodecError> {
    let mut r = Reader(bytes);
    let [magic, kind, version] = r.take::<3>()?;
    if [magic, kind] != [MAGIC, b'S'] {
        return Err(CodecError::Malformed);
    }
    if version != SLOT_VERSION {
        return Err(CodecError::Version {
            found: version,
            reads: SLOT_VERSION,
        });
    }
    let key_len = usize::from(r.u16()?);
    if key_len == 0 {
        return if r.0.is_empty() {
            Ok(None)
        } else {
            Err(CodecError::Malformed)
        };
    }
    if key_len > MAX_KEY_LEN {
        return Err(CodecError::Invalid("key longer than 512 bytes"));
    }
    let (key, rest) = r.0.split_at_checked(key_len).ok_or(CodecError::Malformed)?;
    let key = std::str::from_utf8(key)
        .map_err(|_| CodecError::Invalid("key is not UTF-8"))?
        .to_string();
    r.0 = rest;
    let last_call_ms = r.u64()?;
    let shaped_ms = r.u64()?;
    Ok(Some(Slot {
        key,
        last_call_ms,
        shaped_ms,
        breaker: decode(r.0)?,
    }))
}

fn bit_bytes(size: u16) -> usize {
    usize::from(size).div_ceil(8)
}

/// A cursor that answers `Malformed` instead of reading past the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(CodecError::Malformed)?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        self.take().map(u64::from_le_bytes)
    }

    /// `n` bytes of little-endian bit words, zero-padded to the full array.
    fn words(&mut self, n: usize) -> Result<[u64; 16], CodecError> {
        if n > 128 {
            return Err(CodecError::Invalid("count window size"));
        }
        let (bytes, rest) = self.0.split_at_checked(n).ok_or(CodecError::Malformed)?;
        self.0 = rest;
        // Whole words straight from the bytes; only the last, partial one is padded (a byte-at-a-time
        // loop here was a tenth of an admit + record).
        let mut words = [0u64; 16];
        let mut chunks = bytes.chunks_exact(8);
        for (word, chunk) in words.iter_mut().zip(&mut chunks) {
            *word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        }
        let tail = chunks.remainder();
        if let Some(word) = words.get_mut(n / 8).filter(|_| !tail.is_empty()) {
            // Assembled in a register: a short copy into a buffer read back as a word stalls the load.
            *word = tail
                .iter()
                .rev()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        }
        Ok(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BreakerConfig, WindowConfig};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn sample(window: WindowConfig) -> Breaker {
        let cfg = BreakerConfig {
            window,
            ..BreakerConfig::default()
        };
        let mut b = Breaker::new(&cfg);
        for i in 0..150u64 {
            b.window.record(i * 37, i % 3 == 0, i % 7 == 0);
        }
        b.generation = 7;
        b.consecutive_failures = 3;
        b.state = BreakerState::HalfOpen {
            in_flight: 2,
            successes: 1,
            last_permit_ms: 1_234_567,
        };
        b
    }

    #[test]
    fn round_trips_both_window_kinds() {
        for w in [
            WindowConfig::Count(100),
            WindowConfig::Count(1),
            WindowConfig::Count(1024),
            WindowConfig::Time {
                duration_ms: 60_000,
            },
        ] {
            let b = sample(w);
            assert_eq!(decode(&encode(&b)), Ok(b), "{w:?}");
        }
    }

    #[test]
    fn encoded_sizes_fit_the_budget() {
        assert_eq!(
            encode(&sample(WindowConfig::Count(1024))).len(),
            MAX_ENCODED_LEN
        );
        assert_eq!(encode(&sample(WindowConfig::Count(100))).len(), 92);
        assert!(encode(&sample(WindowConfig::Count(100))).len() <= 200);
        assert_eq!(encode(&sample(WindowConfig::Count(1024))).len(), 322);
        assert_eq!(
            encode(&sample(WindowConfig::Time {
                duration_ms: 10_000
            }))
            .len(),
            268
        );
    }

    /// Found by the `state_decode` fuzz target: a Closed state with bytes in its unused fields decoded,
    /// but re-encoded differently. Such bytes are not ours, and are now refused.
    #[test]
    fn regression_fuzz_closed_state_with_unused_fields_set() {
        let crash: [u8; 40] = [
            0xcb, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x21, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        match decode(&crash) {
            Ok(b) => assert_eq!(encode(&b), crash, "whatever decodes must re-encode alike"),
            Err(e) => assert!(matches!(e, CodecError::Invalid(_) | CodecError::Malformed)),
        }
    }

    #[test]
    fn corrupt_bytes_are_errors() {
        let good = encode(&sample(WindowConfig::Count(100)));
        assert_eq!(decode(&[]), Err(CodecError::Malformed));
        assert_eq!(decode(b"hello world"), Err(CodecError::Malformed));
        assert_eq!(decode(&good[..good.len() - 1]), Err(CodecError::Malformed));
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(CodecError::Malformed));
        let mut v1 = good.clone();
        v1[1] = 1;
        assert_eq!(decode(&v1), Err(CodecError::Version { found: 1, reads: 2 }));
        let mut bad_state = good.clone();
        bad_state[2] = 9;
        assert!(matches!(decode(&bad_state), Err(CodecError::Invalid(_))));
        let mut closed_with_time = encode(&Breaker::new(&BreakerConfig::default()));
        closed_with_time[20] = 1;
        assert!(matches!(
            decode(&closed_with_time),
            Err(CodecError::Invalid(_))
        ));
        let mut bad_len = good.clone();
        bad_len[62] = 200; // len > size
        assert!(matches!(decode(&bad_len), Err(CodecError::Invalid(_))));
        // A ramp on a breaker that is not closed, or admitting more than it saw, is not ours.
        let mut open_with_ramp = encode(&sample(WindowConfig::Count(100)));
        open_with_ramp[40] = 1;
        assert!(matches!(
            decode(&open_with_ramp),
            Err(CodecError::Invalid(_))
        ));
        let mut ramped = Breaker::new(&BreakerConfig::default());
        ramped.ramp = Some(Ramp {
            start_ms: 10,
            until_ms: 20,
            epoch: 2,
            calls: 3,
            admitted: 1,
        });
        let mut bytes = encode(&ramped);
        assert_eq!(decode(&bytes), Ok(ramped.clone()), "a ramp round-trips");
        bytes[56] = 9; // admitted 9 of 3
        assert!(matches!(decode(&bytes), Err(CodecError::Invalid(_))));
    }

    #[test]
    fn slots_round_trip_and_refuse_what_is_not_theirs() {
        let slot = Slot {
            key: "outbound|8080||content.svc".to_string(),
            last_call_ms: 1_700_000_000_123,
            shaped_ms: 42,
            breaker: sample(WindowConfig::Count(100)),
        };
        let bytes = encode_slot(Some(&slot));
        assert_eq!(bytes.len(), 5 + slot.key.len() + 16 + 92);
        assert_eq!(decode_slot(&bytes), Ok(Some(slot.clone())));
        assert_eq!(decode_slot(&encode_slot(None)), Ok(None));
        assert_eq!(decode_slot(&[]), Err(CodecError::Malformed));
        assert_eq!(
            decode_slot(&encode(&slot.breaker)),
            Err(CodecError::Malformed),
            "a bare breaker is not a slot"
        );
        let mut v3 = bytes.clone();
        v3[2] = 3;
        assert_eq!(
            decode_slot(&v3),
            Err(CodecError::Version { found: 3, reads: 2 })
        );
        assert_eq!(
            decode_slot(&bytes[..bytes.len() - 1]),
            Err(CodecError::Malformed)
        );
        let mut empty_with_tail = encode_slot(None);
        empty_with_tail.push(1);
        assert_eq!(decode_slot(&empty_with_tail), Err(CodecError::Malformed));
        let mut not_utf8 = bytes.clone();
        not_utf8[5] = 0xFF;
        assert!(matches!(
            decode_slot(&not_utf8),
            Err(CodecError::Invalid(_))
        ));
        let mut huge_key = bytes;
        huge_key[3..5].copy_from_slice(&600u16.to_le_bytes());
        assert!(matches!(
            decode_slot(&huge_key),
            Err(CodecError::Invalid(_))
        ));
    }
}
