//! Any bytes found in shared data, as a breaker state or as a table slot: decoding never panics, and
//! whatever decodes re-encodes to the same bytes and keeps working under admit and record.
#![no_main]

use cb_core::breaker::Ticket;
use cb_core::classify::{Classification, Outcome};
use cb_core::codec;
use cb_core::config::BreakerConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut breaker) = codec::decode(data) {
        assert_eq!(codec::encode(&breaker), data, "decode/encode must round-trip");
        let cfg = BreakerConfig::default();
        breaker.conform(&cfg);
        let (_, _) = breaker.admit(&cfg, u64::MAX / 2, u64::MAX);
        let ticket = Ticket { generation: breaker.generation, probe: true };
        let fail = Classification { outcome: Outcome::Failure, slow: true };
        let _ = breaker.record(&cfg, ticket, u64::MAX / 2, fail, u64::MAX);
        let _ = breaker.stats(u64::MAX);
        assert!(codec::decode(&codec::encode(&breaker)).is_ok());
    }
    if let Ok(slot) = codec::decode_slot(data) {
        assert_eq!(codec::encode_slot(slot.as_ref()), data, "slots round-trip too");
    }
});
