//! Sliding windows of outcomes, over which the failure and slow-call rates are judged.
//!
//! Both kinds are fixed-size values with no heap, so that the whole breaker encodes into one small
//! shared-data entry and every update is O(1) (the time window sums a fixed 10 buckets).

use crate::config::WindowConfig;

/// Largest count window (bits per array below).
pub const MAX_WINDOW_SIZE: u16 = 1024;
const WORDS: usize = (MAX_WINDOW_SIZE as usize) / 64;
/// Buckets of a time window: the window forgets in steps of a tenth of its length.
pub const TIME_BUCKETS: usize = 10;

/// Totals of a window at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Calls recorded.
    pub calls: u32,
    /// Of which failures.
    pub failures: u32,
    /// Of which slow.
    pub slow: u32,
}

impl WindowStats {
    /// Failure fraction (0 when empty), for reports; decisions use [`WindowStats::failure_rate_reaches`].
    pub fn failure_rate(&self) -> f64 {
        ratio(self.failures, self.calls)
    }

    /// Slow fraction (0 when empty).
    pub fn slow_call_rate(&self) -> f64 {
        ratio(self.slow, self.calls)
    }

    /// Whether failures/calls ≥ threshold, compared exactly in integers.
    pub fn failure_rate_reaches(&self, threshold_ppm: u32) -> bool {
        reaches(self.failures, self.calls, threshold_ppm)
    }

    /// Whether slow/calls ≥ threshold, compared exactly in integers.
    pub fn slow_rate_reaches(&self, threshold_ppm: u32) -> bool {
        reaches(self.slow, self.calls, threshold_ppm)
    }
}

fn ratio(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) / f64::from(whole)
    }
}

fn reaches(part: u32, whole: u32, threshold_ppm: u32) -> bool {
    whole > 0 && u64::from(part) * 1_000_000 >= u64::from(threshold_ppm) * u64::from(whole)
}

/// The last `size` outcomes, as two ring buffers of bits (failure, slow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountWindow {
    size: u16,
    len: u16,
    head: u16,
    failures: u16,
    slow: u16,
    failure_bits: [u64; WORDS],
    slow_bits: [u64; WORDS],
}

impl CountWindow {
    /// An empty window of `size` calls (clamped to 1..=1024).
    pub fn new(size: u16) -> Self {
        Self {
            size: size.clamp(1, MAX_WINDOW_SIZE),
            len: 0,
            head: 0,
            failures: 0,
            slow: 0,
            failure_bits: [0; WORDS],
            slow_bits: [0; WORDS],
        }
    }

    /// Capacity in calls.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Calls held (≤ size).
    pub fn len(&self) -> u16 {
        self.len
    }

    /// True when no call is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Next slot to write.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The raw failure and slow bit arrays (for the codec).
    pub fn bits(&self) -> (&[u64; WORDS], &[u64; WORDS]) {
        (&self.failure_bits, &self.slow_bits)
    }

    /// Rebuilds a window from stored parts, checking every invariant; `None` if they do not hold.
    pub fn from_parts(
        size: u16,
        len: u16,
        head: u16,
        failure_bits: [u64; WORDS],
        slow_bits: [u64; WORDS],
    ) -> Option<Self> {
        if size == 0 || size > MAX_WINDOW_SIZE || len > size || head >= size {
            return None;
        }
        // A window that is not yet full has been written from slot 0 on, so head == len.
        if len < size && head != len {
            return None;
        }
        // Bits past the filled slots must be clear, or the counts would not match the window.
        let filled = usize::from(len);
        for (i, (f, s)) in failure_bits.iter().zip(slow_bits.iter()).enumerate() {
            let lo = i * 64;
            let mask = if filled >= lo + 64 {
                u64::MAX
            } else if filled <= lo {
                0
            } else {
                (1u64 << (filled - lo)) - 1
            };
            if f & !mask != 0 || s & !mask != 0 {
                return None;
            }
        }
        // Words past the filled slots are zero (checked above): count only the others. Without a
        // popcount instruction (x86-64's baseline has none) counting all 32 words cost more than
        // the rest of a decode.
        let used = filled.div_ceil(64);
        let count = |bits: &[u64; WORDS]| -> u16 {
            bits.iter().take(used).map(|w| w.count_ones()).sum::<u32>() as u16
        };
        let (failures, slow) = (count(&failure_bits), count(&slow_bits));
        Some(Self {
            size,
            len,
            head,
            failures,
            slow,
            failure_bits,
            slow_bits,
        })
    }

    /// Adds one outcome, evicting the oldest when full.
    pub fn record(&mut self, failure: bool, slow: bool) {
        let pos = usize::from(self.head);
        let (word, bit) = (pos / 64, 1u64 << (pos % 64));
        if let (Some(f), Some(s)) = (
            self.failure_bits.get_mut(word),
            self.slow_bits.get_mut(word),
        ) {
            if self.len == self.size {
                // The slot holds the oldest outcome: take it out of the totals before overwriting.
                self.failures -= u16::from(*f & bit != 0);
                self.slow -= u16::from(*s & bit != 0);
            }
            set_bit(f, bit, failure);
            set_bit(s, bit, slow);
        }
        self.failures += u16::from(failure);
        self.slow += u16::from(slow);
        self.head = (self.head + 1) % self.size;
        self.len = (self.len + 1).min(self.size);
    }

    /// Current totals.
    pub fn stats(&self) -> WindowStats {
        WindowStats {
            calls: self.len.into(),
            failures: self.failures.into(),
            slow: self.slow.into(),
        }
    }
}

fn set_bit(word: &mut u64, bit: u64, on: bool) {
    if on {
        *word |= bit;
    } else {
        *word &= !bit;
    }
}

/// One tenth of a time window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Which bucket-length period since the epoch this bucket counts (`now_ms / bucket_ms`).
    pub epoch: u64,
    /// Calls in that period.
    pub calls: u32,
    /// Failures in that period.
    pub failures: u32,
    /// Slow calls in that period.
    pub slow: u32,
}

/// The calls of the last `duration`, in 10 buckets of `duration / 10` each.
///
/// A bucket is reused when its period comes round again, so old buckets expire without any sweeping.
/// The window therefore covers between 9/10 and all of `duration`, depending on where in the current
/// bucket `now` is: the usual trade of a bucketed window for O(1) space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeWindow {
    bucket_ms: u64,
    buckets: [Bucket; TIME_BUCKETS],
}

impl TimeWindow {
    /// An empty window over `duration_ms`.
    pub fn new(duration_ms: u64) -> Self {
        Self {
            bucket_ms: bucket_ms_for(duration_ms),
            buckets: [Bucket::default(); TIME_BUCKETS],
        }
    }

    /// Length of one bucket in ms.
    pub fn bucket_ms(&self) -> u64 {
        self.bucket_ms
    }

    /// The buckets (for the codec).
    pub fn buckets(&self) -> &[Bucket; TIME_BUCKETS] {
        &self.buckets
    }

    /// Rebuilds a window from stored parts; `None` unless [`TimeWindow::record`] could have left
    /// them so: a bucket length a configured window can have, each counting bucket in the place its
    /// period maps to, never more failures or slow calls than calls, and unused buckets all zero.
    pub fn from_parts(bucket_ms: u64, buckets: [Bucket; TIME_BUCKETS]) -> Option<Self> {
        let length_ok = (1..=MAX_BUCKET_MS).contains(&bucket_ms);
        let placed = buckets.iter().enumerate().all(|(i, b)| {
            if b.calls == 0 {
                *b == Bucket::default()
            } else {
                b.epoch % TIME_BUCKETS as u64 == i as u64
                    && b.failures <= b.calls
                    && b.slow <= b.calls
            }
        });
        (length_ok && placed).then_some(Self { bucket_ms, buckets })
    }

    /// Adds one outcome at `now_ms`.
    pub fn record(&mut self, now_ms: u64, failure: bool, slow: bool) {
        let epoch = now_ms / self.bucket_ms;
        let slot = (epoch % TIME_BUCKETS as u64) as usize;
        if let Some(b) = self.buckets.get_mut(slot) {
            if b.epoch != epoch {
                *b = Bucket {
                    epoch,
                    ..Bucket::default()
                };
            }
            b.calls = b.calls.saturating_add(1);
            b.failures = b.failures.saturating_add(u32::from(failure));
            b.slow = b.slow.saturating_add(u32::from(slow));
        }
    }

    /// Totals of the buckets still inside the window at `now_ms`.
    pub fn stats(&self, now_ms: u64) -> WindowStats {
        let current = now_ms / self.bucket_ms;
        let oldest = current.saturating_sub(TIME_BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| b.calls > 0 && b.epoch >= oldest && b.epoch <= current)
            .fold(WindowStats::default(), |acc, b| WindowStats {
                calls: acc.calls.saturating_add(b.calls),
                failures: acc.failures.saturating_add(b.failures),
                slow: acc.slow.saturating_add(b.slow),
            })
    }
}

/// The longest bucket: a tenth of the longest `window_duration` (1 h).
const MAX_BUCKET_MS: u64 = 360_000;

fn bucket_ms_for(duration_ms: u64) -> u64 {
    duration_ms.div_ceil(TIME_BUCKETS as u64).max(1)
}

/// Either kind of window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Window {
    /// Last N calls.
    Count(CountWindow),
    /// Calls of the last duration.
    Time(TimeWindow),
}

impl Window {
    /// An empty window of the configured kind.
    pub fn new(cfg: WindowConfig) -> Self {
        match cfg {
            WindowConfig::Count(n) => Window::Count(CountWindow::new(n)),
            WindowConfig::Time { duration_ms } => Window::Time(TimeWindow::new(duration_ms)),
        }
    }

    /// Whether this window has the shape `cfg` asks for. A reconfiguration that changes the shape
    /// restarts the window (the breaker's state itself is kept).
    pub fn matches(&self, cfg: WindowConfig) -> bool {
        match (self, cfg) {
            (Window::Count(w), WindowConfig::Count(n)) => w.size == n,
            (Window::Time(w), WindowConfig::Time { duration_ms }) => {
                w.bucket_ms == bucket_ms_for(duration_ms)
            }
            _ => false,
        }
    }

    /// Adds one outcome.
    pub fn record(&mut self, now_ms: u64, failure: bool, slow: bool) {
        match self {
            Window::Count(w) => w.record(failure, slow),
            Window::Time(w) => w.record(now_ms, failure, slow),
        }
    }

    /// Current totals.
    pub fn stats(&self, now_ms: u64) -> WindowStats {
        match self {
            Window::Count(w) => w.stats(),
            Window::Time(w) => w.stats(now_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn count_window_evicts_oldest() {
        let mut w = CountWindow::new(4);
        for f in [true, true, false, false] {
            w.record(f, false);
        }
        assert_eq!(
            w.stats(),
            WindowStats {
                calls: 4,
                failures: 2,
                slow: 0
            }
        );
        w.record(false, true); // evicts the first failure
        assert_eq!(
            w.stats(),
            WindowStats {
                calls: 4,
                failures: 1,
                slow: 1
            }
        );
        w.record(false, false); // evicts the second failure
        w.record(false, false);
        w.record(false, false); // evicts the slow one? no: slow was the 5th call, still inside
        assert_eq!(
            w.stats(),
            WindowStats {
                calls: 4,
                failures: 0,
                slow: 1
            }
        );
        w.record(false, false);
        assert_eq!(w.stats().slow, 0);
    }

    #[test]
    fn count_window_of_max_size_wraps() {
        let mut w = CountWindow::new(1024);
        for i in 0..3000 {
            w.record(i % 3 == 0, i % 5 == 0);
        }
        let expect_f = (3000 - 1024..3000).filter(|i| i % 3 == 0).count() as u32;
        let expect_s = (3000 - 1024..3000).filter(|i| i % 5 == 0).count() as u32;
        assert_eq!(
            w.stats(),
            WindowStats {
                calls: 1024,
                failures: expect_f,
                slow: expect_s
            }
        );
    }

    #[test]
    fn from_parts_checks_invariants() {
        let w = CountWindow::new(10);
        let (f, s) = w.bits();
        assert!(CountWindow::from_parts(10, 0, 0, *f, *s).is_some());
        assert!(CountWindow::from_parts(10, 11, 0, *f, *s).is_none());
        assert!(CountWindow::from_parts(10, 3, 5, *f, *s).is_none());
        assert!(CountWindow::from_parts(0, 0, 0, *f, *s).is_none());
        let mut stray = [0u64; WORDS];
        stray[0] = 1 << 7;
        assert!(
            CountWindow::from_parts(10, 3, 3, stray, *s).is_none(),
            "bit past len"
        );
        assert!(CountWindow::from_parts(10, 8, 8, stray, *s).is_some());
    }

    #[test]
    fn time_window_forgets_old_buckets() {
        let mut w = TimeWindow::new(10_000); // 10 buckets of 1s
        w.record(500, true, false);
        w.record(1_500, false, true);
        assert_eq!(
            w.stats(1_600),
            WindowStats {
                calls: 2,
                failures: 1,
                slow: 1
            }
        );
        assert_eq!(w.stats(9_999).calls, 2);
        assert_eq!(
            w.stats(10_000),
            WindowStats {
                calls: 1,
                failures: 0,
                slow: 1
            },
            "bucket 0 expired"
        );
        assert_eq!(w.stats(11_000).calls, 0);
        // The slot of bucket 0 is reused by bucket 10.
        w.record(10_200, true, true);
        assert_eq!(
            w.stats(10_300),
            WindowStats {
                calls: 2,
                failures: 1,
                slow: 2
            }
        );
    }

    #[test]
    fn rates_compare_exactly() {
        let s = WindowStats {
            calls: 100,
            failures: 50,
            slow: 0,
        };
        assert!(s.failure_rate_reaches(500_000));
        assert!(!s.failure_rate_reaches(500_001));
        let s = WindowStats {
            calls: 10,
            failures: 3,
            slow: 0,
        };
        assert!(s.failure_rate_reaches(crate::config::ratio_to_ppm(0.3)));
        assert!(!WindowStats::default().failure_rate_reaches(1));
    }

    #[test]
    fn shape_matching() {
        let w = Window::new(WindowConfig::Count(100));
        assert!(w.matches(WindowConfig::Count(100)));
        assert!(!w.matches(WindowConfig::Count(50)));
        assert!(!w.matches(WindowConfig::Time {
            duration_ms: 10_000
        }));
    }

    #[test]
    fn impossible_time_layouts_are_refused() {
        let mut w = TimeWindow::new(10_000);
        for t in [0, 1_500, 2_500, 9_999] {
            w.record(t, t % 2 == 0, false);
        }
        let good = *w.buckets();
        assert!(TimeWindow::from_parts(w.bucket_ms(), good).is_some());
        let mut misplaced = good;
        misplaced.swap(1, 2);
        assert!(TimeWindow::from_parts(w.bucket_ms(), misplaced).is_none());
        let mut ghost = good;
        ghost[5] = Bucket {
            epoch: 7,
            ..Bucket::default()
        };
        assert!(
            TimeWindow::from_parts(w.bucket_ms(), ghost).is_none(),
            "an empty bucket with an epoch"
        );
        let mut too_many = good;
        too_many[0].failures = 9;
        assert!(TimeWindow::from_parts(w.bucket_ms(), too_many).is_none());
        assert!(TimeWindow::from_parts(0, good).is_none());
        assert!(TimeWindow::from_parts(MAX_BUCKET_MS + 1, good).is_none());
    }
}
