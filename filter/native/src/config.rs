//! One filter configuration (`config_new`, on Envoy's main thread): the JSON validated by the core,
//! refused whole with the same line as the wasm build, and the metrics defined, since Envoy lets a
//! module define metrics nowhere else.
#![deny(unsafe_code)]

use cb_core::config::{ConfigError, FilterConfig};
use cb_core::telemetry::Level;

use crate::abi;
use crate::host::{self, ConfigEnvoy, MetricIds};

/// The only `filter_name` this module serves (contract section 7).
pub const FILTER_NAME: &str = "circuit_breaker";

/// What every stream of one filter configuration shares. Immutable once built: streams on every worker
/// read it at once.
pub struct ModuleConfig {
    /// The validated configuration.
    pub filter: FilterConfig,
    /// Ids of the metrics defined for this configuration.
    pub metrics: MetricIds,
    /// Envoy's worker count when the configuration was made, for per-worker state.
    pub concurrency: u32,
    /// Envoy's object for this configuration, to count and log outside streams.
    pub(crate) envoy: ConfigEnvoy,
}

// Streams on every worker read one configuration at once, and it may be dropped on any of them.
const _: fn() = || {
    fn shared_across_workers<T: Send + Sync>() {}
    shared_across_workers::<ModuleConfig>();
};

/// Parses and validates the configuration bytes (the `filter_config` StringValue, or a Struct as
/// JSON). Safe and free of Envoy calls, so it can be fuzzed.
pub fn config_from_bytes(bytes: &[u8]) -> Result<FilterConfig, ConfigError> {
    FilterConfig::from_json(bytes)
}

/// The line logged for an accepted configuration (the wasm build logs the same).
pub fn configured_line(config: &FilterConfig) -> String {
    format!(
        "circuit breaker configured: upstream_key={} mode={} overrides={} max_upstreams={}",
        config.upstream_key,
        config.defaults.mode.as_str(),
        config.override_count(),
        config.max_upstreams
    )
}

/// The line logged for a refused configuration (the wasm build logs the same).
pub fn rejected_line(error: &ConfigError) -> String {
    format!("circuit breaker configuration rejected: {error}")
}

/// `config_new`: the configuration for Envoy to keep, or `None` to make Envoy refuse it (at start-up,
/// or as a NACK of an update while the previous configuration keeps serving).
pub fn config_new(envoy: abi::ConfigEnvoyPtr, name: &[u8], bytes: &[u8]) -> Option<ModuleConfig> {
    let parsed = if name == FILTER_NAME.as_bytes() {
        config_from_bytes(bytes)
    } else {
        Err(ConfigError {
            field: "filter_name".into(),
            value: format!("{:?}", String::from_utf8_lossy(name)),
            allowed: format!("{FILTER_NAME:?}"),
        })
    };
    let filter = match parsed {
        Ok(filter) => filter,
        Err(e) => {
            host::log(Level::Error, &rejected_line(&e));
            return None;
        }
    };
    host::log_with(Level::Info, || configured_line(&filter));
    let envoy = ConfigEnvoy::new(envoy);
    Some(ModuleConfig {
        filter,
        metrics: MetricIds::define(envoy),
        concurrency: host::concurrency(),
        envoy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{stubs, LogLevel};
    use cb_core::telemetry::Metric;

    #[test]
    fn a_bad_configuration_is_refused_with_the_wasm_line() {
        stubs::take();
        let refused = config_new(
            stubs::fake_envoy_ptr(),
            b"circuit_breaker",
            br#"{"failure_threshold": -1}"#,
        );
        assert!(refused.is_none());
        let logs = stubs::take().logs;
        let (level, line) = logs.first().unwrap();
        assert_eq!(*level, LogLevel::Error);
        let expected =
            rejected_line(&config_from_bytes(br#"{"failure_threshold": -1}"#).unwrap_err());
        assert_eq!(line, &expected);
        assert!(
            line.starts_with("circuit breaker configuration rejected: failure_threshold"),
            "{line}"
        );
    }

    #[test]
    fn another_filter_name_is_refused() {
        stubs::take();
        assert!(config_new(stubs::fake_envoy_ptr(), b"other", b"{}").is_none());
        let logs = stubs::take().logs;
        assert!(logs.iter().any(|(l, m)| *l == LogLevel::Error
            && m == r#"circuit breaker configuration rejected: filter_name must be "circuit_breaker", got "other""#), "{logs:?}");
    }

    #[test]
    fn a_good_configuration_logs_and_defines_every_metric_with_its_labels() {
        stubs::take();
        let config = config_new(
            stubs::fake_envoy_ptr(),
            b"circuit_breaker",
            br#"{"failure_threshold": 3}"#,
        )
        .unwrap();
        assert_eq!(config.filter.defaults.failure_threshold, 3);
        assert_eq!(config.concurrency, 2, "the stub Envoy has two workers");
        let recorded = stubs::take();
        assert!(
            recorded.logs.iter().any(|(l, m)| *l == LogLevel::Info
                && m.starts_with("circuit breaker configured: upstream_key=cluster mode=enforce")),
            "{:?}",
            recorded.logs
        );
        let expected: Vec<(String, Vec<String>)> = Metric::ALL
            .iter()
            .map(|m| {
                (
                    m.name().to_string(),
                    m.labels().iter().map(|l| l.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(recorded.defined, expected);
    }
}
