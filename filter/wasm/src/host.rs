//! The host, in one place: Envoy shared data as the core's [`SharedStore`], the clock, properties and
//! headers as bytes, local replies. Every host status is turned into a domain answer here, so the rest
//! of the glue never sees a `Status` (and never unwraps one).

use std::time::UNIX_EPOCH;

use cb_core::reply::LocalReply;
use cb_core::store::{CasToken, SharedStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, Status};

/// Envoy shared data of this plugin's `vm_id`.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), cas)) => Ok(Some((bytes, cas.unwrap_or(0)))),
            // Envoy answers an existing zero-length value with a CAS token and no data, which the SDK
            // turns into `None`: it is there (and corrupt), not missing.
            Ok((None, Some(cas))) => Ok(Some((Vec::new(), cas))),
            Ok((None, None)) => Ok(None),
            Err(status) => Err(StoreError::Host(format!(
                "get_shared_data({key}): {status:?}"
            ))),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(status) => Err(StoreError::Host(format!(
                "set_shared_data({key}): {status:?}"
            ))),
        }
    }
}

/// Host time in ms since the Unix epoch; `None` if the host cannot say (the call then fails open).
pub fn now_ms() -> Option<u64> {
    let t = hostcalls::get_current_time().ok()?;
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

/// Logs a line; logging never fails a request.
pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// A request header's value, as bytes (header values need not be UTF-8).
pub fn request_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

/// Sets (replaces) a request header.
pub fn set_request_header(name: &str, value: &str) {
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
}

/// A response header's value, as bytes.
pub fn response_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// Adds a response header.
pub fn add_response_header(name: &str, value: &str) {
    let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
}

/// A response trailer's value, as bytes.
pub fn response_trailer(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseTrailers, name)
        .ok()
        .flatten()
}

/// An attribute as raw bytes (`["xds", "cluster_name"]`, `["response", "flags"]`...).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// An integer attribute: Envoy serialises them as 8 little-endian bytes.
pub fn property_u64(path: &[&str]) -> Option<u64> {
    let bytes = property(path)?;
    let arr: [u8; 8] = bytes.as_slice().try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}

/// The plugin configuration bytes (empty when none was given).
pub fn plugin_configuration() -> Vec<u8> {
    hostcalls::get_buffer(
        proxy_wasm::types::BufferType::PluginConfiguration,
        0,
        usize::MAX,
    )
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// Sends a reply built by the core. `false` if the host refused (the request then continues upstream).
pub fn send_reply(reply: &LocalReply) -> bool {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let body = if reply.body.is_empty() {
        None
    } else {
        Some(reply.body.as_slice())
    };
    hostcalls::send_http_response(u32::from(reply.status), headers, body).is_ok()
}
