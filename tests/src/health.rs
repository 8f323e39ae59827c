//! The health endpoint (contract section 5) as a test reads it: the answer, and one breaker's entry.

use serde_json::Value;

use crate::{Envoy, Error, Result};

/// `GET path` through the listener: the health endpoint's status and JSON body. Fails when the answer
/// is not `application/json`, as the contract has it.
pub async fn health(envoy: &Envoy, path: &str) -> Result<(u16, Value)> {
    let response = envoy.get(path).await?;
    if response.header("content-type") != Some("application/json") {
        return Err(Error(format!(
            "{path}: not the health endpoint's JSON: {response:?}"
        )));
    }
    Ok((response.status, response.json()?))
}

/// The entry of breaker `upstream` in a health answer.
pub fn health_entry<'a>(health: &'a Value, upstream: &str) -> Option<&'a Value> {
    health["circuit_breakers"]
        .as_array()?
        .iter()
        .find(|b| b["upstream"] == upstream)
}
