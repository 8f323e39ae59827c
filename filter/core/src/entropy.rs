//! Randomness for the jittered open time, without reading any source of it: the host hands each
//! [`crate::worker::Worker`] a seed (WASI `random_get` in wasm, the OS in the native module, a seeded
//! generator in the harness, so scenarios replay exactly), and the worker draws from this generator.
//! Every Envoy, and every worker of one, draws its own sequence, so breakers opened together in a fleet
//! come out of Open at different times.

/// SplitMix64: tiny, fast, and good enough to spread probe times (it is no cryptographic generator,
/// and nothing here needs one).
#[derive(Debug, Clone)]
pub struct Entropy(u64);

impl Entropy {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A draw uniform in `0..=max`, from 64 random bits (multiply-shift, so no modulo bias worth a
/// thought and no division).
pub fn uniform_up_to(bits: u64, max: u64) -> u64 {
    ((u128::from(bits) * (u128::from(max) + 1)) >> 64) as u64
}

/// `fraction_ppm` parts per million of `ms`, rounded down.
pub fn share_of(ms: u64, fraction_ppm: u32) -> u64 {
    ((u128::from(ms) * u128::from(fraction_ppm)) / 1_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn draws_stay_in_bounds_and_cover_them() {
        let mut e = Entropy::new(7);
        let mut seen = [false; 11];
        for _ in 0..10_000 {
            let d = uniform_up_to(e.next_u64(), 10);
            assert!(d <= 10);
            if let Some(s) = seen.get_mut(d as usize) {
                *s = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
        assert_eq!(uniform_up_to(u64::MAX, 0), 0);
        assert_eq!(uniform_up_to(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(uniform_up_to(0, 1_000), 0);
    }

    #[test]
    fn seeds_give_their_own_sequences() {
        let a: Vec<u64> = (0..4)
            .scan(Entropy::new(1), |e, _| Some(e.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .scan(Entropy::new(2), |e, _| Some(e.next_u64()))
            .collect();
        let a2: Vec<u64> = (0..4)
            .scan(Entropy::new(1), |e, _| Some(e.next_u64()))
            .collect();
        assert_ne!(a, b);
        assert_eq!(a, a2, "a seed replays exactly");
    }

    #[test]
    fn shares_round_down_and_never_overflow() {
        assert_eq!(share_of(60_000, 200_000), 12_000);
        assert_eq!(share_of(999, 1), 0);
        assert_eq!(share_of(u64::MAX, 1_000_000), u64::MAX);
    }
}
