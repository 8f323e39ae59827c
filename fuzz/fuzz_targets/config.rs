//! Any bytes as the plugin configuration: parsing either succeeds or names a field; it never panics,
//! and an accepted configuration answers `breaker_for` for any key.
#![no_main]

use cb_core::config::FilterConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match FilterConfig::from_json(data) {
        Ok(config) => {
            let key = String::from_utf8_lossy(data);
            let b = config.breaker_for(&key);
            assert!(b.half_open_max_requests >= 1 && b.success_threshold >= 1);
            assert!(b.open_timeout_ms <= b.max_open_timeout_ms);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
