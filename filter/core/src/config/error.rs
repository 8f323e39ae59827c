//! A refused configuration: which field, what it held, and what would have been accepted, as one log
//! line that stays short whatever the input.

use std::fmt;

use serde_json::Value;

/// A configuration that was refused: which field, what it held, and what would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the field, e.g. `error_rate_threshold` or `upstreams."*media*".open_timeout`.
    pub field: String,
    /// The offending value as it appeared (JSON text), or empty when the problem is structural.
    pub value: String,
    /// What is allowed instead.
    pub allowed: String,
}

/// Longest part (field, value, allowed) of a [`ConfigError`]: the message is one log line, and a
/// multi-megabyte value in a refused configuration must not become a multi-megabyte line. Above
/// [`super::MAX_KEY_LEN`], so no real upstream key in a field path is cut.
pub(crate) const MAX_ERROR_PART: usize = 1024;

impl ConfigError {
    pub(crate) fn new(
        field: impl Into<String>,
        value: impl fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        Self {
            field: cut(field.into()),
            value: cut(value.to_string()),
            allowed: cut(allowed.into()),
        }
    }
}

/// `s`, cut to [`MAX_ERROR_PART`] bytes at a character boundary, with `...` when cut, and with line
/// breaks and other control characters escaped: the error is one log line, whatever a value held.
fn cut(s: String) -> String {
    let mut s = if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| match c {
                '\n' => "\\n".to_string(),
                '\r' => "\\r".to_string(),
                '\t' => "\\t".to_string(),
                c if c.is_control() => format!("\\u{{{:04x}}}", u32::from(c)),
                c => c.to_string(),
            })
            .collect()
    } else {
        s
    };
    if s.len() > MAX_ERROR_PART {
        let mut end = MAX_ERROR_PART;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.field, self.allowed)
        } else {
            write!(
                f,
                "{} must be {}, got {}",
                self.field, self.allowed, self.value
            )
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// The line every host logs when it refuses a configuration.
    pub fn rejected_line(&self) -> String {
        format!("circuit breaker configuration rejected: {self}")
    }
}

/// Removes serde_json's " at line 1 column 7" suffix, meaningless once the value came through a `Value`.
pub(crate) fn strip_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

/// A string as JSON text, for messages (`"soon"`).
pub(crate) fn json_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A value rendered for an error message, cut short so a huge value cannot flood the log.
pub(crate) fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 80 {
        return s;
    }
    let mut end = 77;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or(""))
}
