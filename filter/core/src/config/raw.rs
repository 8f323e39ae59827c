//! The configuration as written: serde forms in which every breaker field is optional, so that an
//! override can name just a few. Nothing here is validated beyond JSON types; [`super::validate`]
//! compiles these into the checked form.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::{strip_position, ConfigError};
use super::Mode;

/// A field that may be `null` in an override (meaning "unset it") as well as absent.
pub(crate) type Nullable<T> = Option<Option<T>>;

fn nullable<'de, D, T>(d: D) -> Result<Nullable<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A number or a string, as status lists accept both.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum NameOrNumber {
    Number(i64),
    Name(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFallback {
    pub status: u16,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
}

/// The breaker fields as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    pub failure_threshold: Option<u32>,
    pub error_rate_threshold: Option<f64>,
    pub window_size: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub window_duration: Nullable<String>,
    pub minimum_requests: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub slow_call_duration: Nullable<String>,
    pub slow_call_rate_threshold: Option<f64>,
    #[serde(default, deserialize_with = "nullable")]
    pub stuck_call_duration: Nullable<String>,
    pub cut_stuck_calls: Option<bool>,
    pub open_timeout: Option<String>,
    pub backoff_multiplier: Option<f64>,
    pub max_open_timeout: Option<String>,
    pub open_timeout_jitter: Option<f64>,
    #[serde(default, deserialize_with = "nullable")]
    pub recovery_ramp: Nullable<String>,
    pub half_open_max_requests: Option<u32>,
    pub success_threshold: Option<u32>,
    pub failure_grpc_statuses: Option<Vec<NameOrNumber>>,
    pub failure_http_statuses: Option<Vec<NameOrNumber>>,
    #[serde(default, deserialize_with = "nullable")]
    pub call_timeout: Nullable<String>,
    pub mode: Option<Mode>,
    #[serde(default, deserialize_with = "nullable")]
    pub fallback: Nullable<RawFallback>,
}

impl RawBreaker {
    /// Reads the breaker fields of one object; `prefix` is the object's path for messages.
    pub fn from_map(map: Map<String, Value>, prefix: &str) -> Result<Self, ConfigError> {
        serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde's "unknown field `x`, expected one of ..." already lists what is allowed.
            let field = if path == "." {
                prefix.trim_end_matches('.').to_string()
            } else {
                format!("{prefix}{path}")
            };
            let field = if field.is_empty() {
                "configuration".to_string()
            } else {
                field
            };
            ConfigError::new(field, "", strip_position(&inner))
        })
    }
}
