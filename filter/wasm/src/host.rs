//! The host, in one place: Envoy shared data as the core's [`SharedStore`], and one stream's view of
//! Envoy as the core's [`Host`]. Every host status is turned into a domain answer here, so the rest of
//! the glue never sees a `Status` (and never unwraps one).

use std::time::UNIX_EPOCH;

use cb_core::host::Host;
use cb_core::reply::LocalReply;
use cb_core::store::{CasToken, SharedStore, StoreError};
use cb_core::telemetry::{Level, Series, Telemetry};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MapType, Status};

use crate::metrics::Metrics;

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

/// Host time in ms since the Unix epoch; `None` if the host cannot say.
pub fn now_ms() -> Option<u64> {
    let t = hostcalls::get_current_time().ok()?;
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
}

/// Logs a line; logging never fails a request.
pub fn log(level: Level, message: &str) {
    let level = match level {
        Level::Trace => LogLevel::Trace,
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
        Level::Critical => LogLevel::Critical,
    };
    let _ = hostcalls::log(level, message);
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

fn map_value(map: MapType, name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten()
}

fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// An integer attribute: Envoy serialises them as 8 little-endian bytes.
fn property_u64(path: &[&str]) -> Option<u64> {
    let bytes = property(path)?;
    let arr: [u8; 8] = bytes.as_slice().try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}

/// One stream's Envoy, for the duration of one callback, with this VM's metric ids.
pub struct WasmHost<'a> {
    pub metrics: &'a mut Metrics,
}

impl Telemetry for WasmHost<'_> {
    fn add(&mut self, series: &Series<'_>, n: u64) {
        self.metrics.add(series, n);
    }
    fn set(&mut self, series: &Series<'_>, value: u64) {
        self.metrics.set(series, value);
    }
    fn log(&mut self, level: Level, message: &str) {
        log(level, message);
    }
}

impl Host for WasmHost<'_> {
    fn now_ms(&mut self) -> Option<u64> {
        now_ms()
    }
    fn request_header(&mut self, name: &str) -> Option<Vec<u8>> {
        map_value(MapType::HttpRequestHeaders, name)
    }
    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        map_value(MapType::HttpResponseHeaders, name)
    }
    fn response_trailer(&mut self, name: &str) -> Option<Vec<u8>> {
        map_value(MapType::HttpResponseTrailers, name)
    }
    fn cluster_name(&mut self) -> Option<Vec<u8>> {
        property(&["xds", "cluster_name"])
    }
    fn response_code(&mut self) -> Option<u16> {
        property_u64(&["response", "code"]).and_then(|c| u16::try_from(c).ok())
    }
    fn response_flags(&mut self) -> Option<u64> {
        property_u64(&["response", "flags"])
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }
    fn add_response_header(&mut self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
    }
    fn send_reply(&mut self, reply: &LocalReply) -> bool {
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let body = (!reply.body.is_empty()).then_some(reply.body.as_slice());
        hostcalls::send_http_response(u32::from(reply.status), headers, body).is_ok()
    }
}
