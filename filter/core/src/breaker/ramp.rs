//! `recovery_ramp`: after HalfOpen closes the breaker, a share of calls rising linearly from 10 % to
//! all over the ramp's length is admitted; the others get the breaker's answer, marked `recovering`.
//!
//! The share is kept by counting, in the breaker itself: each call of the ramp is counted, and it is
//! admitted when the admitted count is still below the share of the calls seen. Since the breaker is
//! shared by every worker of the Envoy (shared data, or the native table), the workers keep the share
//! together, not each on its own, and a burst lands on the share exactly rather than by chance.
//!
//! The counts start over every twentieth of the ramp (an *epoch*, 100 ms to 5 s): counted over the
//! whole ramp, a share that rose would be met by admitting the deficit of the earlier, smaller shares
//! in a burst, which is what the ramp is there to prevent.

/// Share admitted when the ramp starts, in parts per million.
pub const RAMP_START_PPM: u32 = 100_000;
/// Epochs in a ramp (see the module's documentation).
const EPOCHS: u64 = 20;

/// A recovery ramp in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ramp {
    /// When the breaker closed (host ms).
    pub start_ms: u64,
    /// When every call is admitted again.
    pub until_ms: u64,
    /// The epoch the counts below are of.
    pub epoch: u32,
    /// Calls seen during the epoch.
    pub calls: u32,
    /// Of those, admitted.
    pub admitted: u32,
}

impl Ramp {
    /// A ramp of `length_ms` starting at `now_ms`.
    pub fn new(now_ms: u64, length_ms: u64) -> Self {
        Self {
            start_ms: now_ms,
            until_ms: now_ms.saturating_add(length_ms.max(1)),
            epoch: 0,
            calls: 0,
            admitted: 0,
        }
    }

    /// The share admitted at `now_ms`, in parts per million: 10 % at the start, all at the end.
    pub fn share_ppm(&self, now_ms: u64) -> u32 {
        let span = self.until_ms.saturating_sub(self.start_ms).max(1);
        let elapsed = now_ms.saturating_sub(self.start_ms).min(span);
        let rise = u128::from(1_000_000 - RAMP_START_PPM) * u128::from(elapsed) / u128::from(span);
        RAMP_START_PPM.saturating_add(rise as u32).min(1_000_000)
    }

    /// Counts a call at `now_ms` (before `until_ms`): `None` when it is admitted, else how long the
    /// caller is told to wait. The wait is a tenth of the ramp (100 ms to 5 s), never past its end:
    /// by then a client retrying finds a larger share, and at the end, every call admitted.
    pub fn admit(&mut self, now_ms: u64) -> Option<u64> {
        let epoch = self.epoch_at(now_ms);
        if epoch != self.epoch {
            self.epoch = epoch;
            self.calls = 0;
            self.admitted = 0;
        }
        self.calls = self.calls.saturating_add(1);
        let share = u128::from(self.share_ppm(now_ms));
        if u128::from(self.admitted) * 1_000_000 < share * u128::from(self.calls) {
            self.admitted = self.admitted.saturating_add(1);
            return None;
        }
        let remaining = self.until_ms.saturating_sub(now_ms).max(1);
        let tenth = (self.until_ms.saturating_sub(self.start_ms) / 10).clamp(100, 5_000);
        Some(tenth.min(remaining))
    }

    /// The epoch `now_ms` falls in.
    fn epoch_at(&self, now_ms: u64) -> u32 {
        let span = self.until_ms.saturating_sub(self.start_ms);
        let length = (span / EPOCHS).clamp(100, 5_000);
        let epoch = now_ms.saturating_sub(self.start_ms) / length;
        u32::try_from(epoch).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_share_rises_linearly_from_a_tenth_to_all() {
        let r = Ramp::new(1_000, 10_000);
        assert_eq!(r.share_ppm(1_000), 100_000);
        assert_eq!(r.share_ppm(6_000), 550_000);
        assert_eq!(r.share_ppm(11_000), 1_000_000);
        assert_eq!(r.share_ppm(50_000), 1_000_000);
        assert_eq!(
            r.share_ppm(0),
            100_000,
            "a clock behind the start is the start"
        );
    }

    #[test]
    fn counting_keeps_the_share_over_any_run_of_calls() {
        let mut r = Ramp::new(0, 10_000);
        let admitted = (0..1_000).filter(|_| r.admit(0).is_none()).count();
        assert_eq!(admitted, 100, "10 % at the start");
        assert_eq!(
            r.admit(0),
            None,
            "the 1001st: 100 of 1001 is below the share"
        );
        assert_eq!(r.admit(0), Some(1_000), "a tenth of the ramp");
        // Half-way, the share of the calls seen from then on is about 55 %.
        let mut r = Ramp::new(0, 10_000);
        let admitted = (0..1_000).filter(|_| r.admit(5_000).is_none()).count();
        assert_eq!(admitted, 550);
        // Calls that came at 10 % earlier are no debt to pay now: the counts start over each epoch.
        let mut r = Ramp::new(0, 10_000);
        (0..1_000).for_each(|_| {
            r.admit(0);
        });
        let admitted = (0..100).filter(|_| r.admit(5_000).is_none()).count();
        assert_eq!(admitted, 55, "not a burst to catch up");
        // The very first call of a ramp is admitted: the share is reached from above.
        let mut r = Ramp::new(0, 10_000);
        assert_eq!(r.admit(0), None);
        assert!(r.admit(0).is_some());
    }

    #[test]
    fn the_wait_never_runs_past_the_ramp() {
        let mut r = Ramp::new(0, 60_000);
        r.admit(0);
        assert_eq!(r.admit(0), Some(5_000), "a tenth, at most 5 s");
        // Near the end nearly every call is admitted; one that is not waits only what is left.
        let mut late = Ramp {
            epoch: 19,
            calls: 100_000,
            admitted: 100_000,
            ..r
        };
        assert_eq!(late.admit(59_990), Some(10), "no longer than what is left");
        let mut short = Ramp::new(0, 500);
        short.admit(0);
        assert_eq!(
            short.admit(0),
            Some(100),
            "at least 100 ms while that much is left"
        );
    }
}
