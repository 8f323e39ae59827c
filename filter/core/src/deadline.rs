//! gRPC deadlines: the `grpc-timeout` request header, and whether a call that the client cancelled had
//! run into its deadline (contract section 3).
//!
//! A hung upstream answers nothing, and a gRPC client gives up at its deadline: Envoy sees a downstream
//! cancel and nothing else. A cancel that comes at the deadline is therefore the upstream's fault, and
//! counts as `DEADLINE_EXCEEDED`; one that comes well before it is the client changing its mind.

/// Parses a `grpc-timeout` value into microseconds: 1 to 8 ASCII digits, then one unit of `H`
/// (hours), `M` (minutes), `S`, `m` (milliseconds), `u` (microseconds) or `n` (nanoseconds, rounded
/// up to a whole microsecond). Anything else is malformed and yields `None`: the header is then treated
/// as absent, never trusted.
pub fn parse_grpc_timeout(raw: &[u8]) -> Option<u64> {
    let (unit, digits) = raw.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 99 999 999, so every product below fits easily in a u64 (99 999 999 h is 3.6e17 µs).
    let n = digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => n * 3_600_000_000,
        b'M' => n * 60_000_000,
        b'S' => n * 1_000_000,
        b'm' => n * 1_000,
        b'u' => n,
        b'n' => n.div_ceil(1_000),
        _ => return None,
    })
}

/// How early a cancel may come and still count as the deadline: 5 % of the deadline or 20 ms,
/// whichever is larger, but never more than a quarter of the deadline. Clients start their timer
/// before the request reaches Envoy, so Envoy sees the cancel a little before the deadline it was sent
/// with, never after. The quarter keeps tiny deadlines honest: with a flat 20 ms, every cancel of a
/// call whose deadline is 20 ms or less (a hedged request, say) would count as the deadline.
pub fn tolerance_us(deadline_us: u64) -> u64 {
    (deadline_us / 20).max(20_000.min(deadline_us / 4))
}

/// Whether a call cancelled after `elapsed_ms` had reached its deadline of `deadline_us`.
pub fn deadline_reached(deadline_us: u64, elapsed_ms: u64) -> bool {
    elapsed_ms.saturating_mul(1_000) >= deadline_us.saturating_sub(tolerance_us(deadline_us))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn every_unit_parses() {
        assert_eq!(parse_grpc_timeout(b"2H"), Some(7_200_000_000));
        assert_eq!(parse_grpc_timeout(b"3M"), Some(180_000_000));
        assert_eq!(parse_grpc_timeout(b"1S"), Some(1_000_000));
        assert_eq!(parse_grpc_timeout(b"300m"), Some(300_000));
        assert_eq!(parse_grpc_timeout(b"250u"), Some(250));
        assert_eq!(parse_grpc_timeout(b"1500n"), Some(2), "rounded up");
        assert_eq!(parse_grpc_timeout(b"0m"), Some(0));
        assert_eq!(parse_grpc_timeout(b"00000001S"), Some(1_000_000));
    }

    #[test]
    fn malformed_values_are_absent() {
        for raw in [
            &b""[..],
            b"m",
            b"10",
            b"10s",
            b"10ms",
            b" 10m",
            b"10m ",
            b"-1m",
            b"+1m",
            b"1.5S",
            b"123456789m",
            b"10X",
            b"\xff\xfem",
            b"1 0m",
        ] {
            assert_eq!(parse_grpc_timeout(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn the_largest_values_do_not_overflow() {
        assert_eq!(
            parse_grpc_timeout(b"99999999H"),
            Some(99_999_999 * 3_600_000_000)
        );
        assert_eq!(parse_grpc_timeout(b"99999999n"), Some(100_000));
        assert!(!deadline_reached(u64::MAX, u64::MAX / 2_000));
        assert!(deadline_reached(u64::MAX, u64::MAX));
    }

    #[test]
    fn a_cancel_counts_from_a_little_before_the_deadline() {
        // 300 ms: the tolerance is 20 ms (5 % would be 15).
        assert!(!deadline_reached(300_000, 279));
        assert!(deadline_reached(300_000, 280));
        assert!(deadline_reached(300_000, 5_000));
        // 2 s: 5 % is 100 ms.
        assert!(!deadline_reached(2_000_000, 1_899));
        assert!(deadline_reached(2_000_000, 1_900));
        // Tiny deadlines get a quarter of themselves, not 20 ms: a hedged request cancelled early
        // is not a deadline.
        assert_eq!(tolerance_us(10_000), 2_500);
        assert!(!deadline_reached(10_000, 0));
        assert!(!deadline_reached(10_000, 7));
        assert!(deadline_reached(10_000, 8));
        assert!(!deadline_reached(20_000, 14));
        assert!(deadline_reached(20_000, 15));
        // From 80 ms up, the 20 ms floor applies again.
        assert_eq!(tolerance_us(80_000), 20_000);
        assert_eq!(tolerance_us(0), 0);
    }
}
