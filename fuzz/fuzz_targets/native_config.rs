//! Any bytes as the native module's configuration, through its `config_new` over the stub callbacks:
//! it never panics; it keeps a configuration exactly when the core's parser accepts the bytes, and
//! then has defined every metric; otherwise it refuses with one Error line naming the field, the line
//! the wasm build logs, of bounded length.
#![no_main]

use circuit_breaker::abi::{stubs, LogLevel};
use circuit_breaker::config::{config_from_bytes, config_new};
use circuit_breaker::host::ConfigEnvoy;
use cb_core::telemetry::Metric;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stubs::take();
    let kept = config_new(ConfigEnvoy::stub(), b"circuit_breaker", data);
    let recorded = stubs::take();
    match config_from_bytes(data) {
        Ok(_) => {
            assert!(kept.is_some());
            assert_eq!(recorded.defined.len(), Metric::ALL.len());
        }
        Err(e) => {
            assert!(kept.is_none());
            let line = e.rejected_line();
            assert!(line.len() < 4 * 1024, "a {}-byte log line", line.len());
            assert_eq!(recorded.logs, vec![(LogLevel::Error, line)]);
            assert!(recorded.defined.is_empty(), "metrics defined for a refused configuration");
        }
    }
});
