//! The host, in one place: Envoy shared data as the core's [`SharedStore`], and one stream's view of
//! Envoy as the core's [`Host`]. Every host status (from [`abi`], which never panics) is turned into a
//! domain answer here, so the rest of the glue never sees one.

use cb_core::host::Host;
use cb_core::reply::LocalReply;
use cb_core::store::{CasToken, SharedStore, StoreError};
use cb_core::telemetry::{Level, Series, Telemetry};

use crate::abi::{self, Map, Status};
use crate::metrics::Metrics;

/// Envoy shared data of this plugin's `vm_id`.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, CasToken)>, StoreError> {
        // An existing zero-length value comes back as empty bytes with its token: it is there (and
        // corrupt), not missing.
        abi::get_shared_data(key)
            .map_err(|Status(s)| StoreError::Host(format!("get_shared_data({key}): status {s}")))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<CasToken>) -> Result<(), StoreError> {
        match abi::set_shared_data(key, value, cas.unwrap_or(0)) {
            Ok(()) => Ok(()),
            Err(Status::CAS_MISMATCH) => Err(StoreError::CasMismatch),
            Err(Status(s)) => Err(StoreError::Host(format!(
                "set_shared_data({key}): status {s}"
            ))),
        }
    }
}

/// Host time in ms since the Unix epoch; `None` if the host cannot say.
pub fn now_ms() -> Option<u64> {
    abi::now_ns().ok().map(|ns| ns / 1_000_000)
}

/// Logs a line; logging never fails a request.
pub fn log(level: Level, message: &str) {
    // proxy-wasm's levels: trace 0 ... critical 5.
    let level = match level {
        Level::Trace => 0,
        Level::Debug => 1,
        Level::Info => 2,
        Level::Warn => 3,
        Level::Error => 4,
        Level::Critical => 5,
    };
    let _ = abi::log(level, message);
}

/// The plugin configuration bytes (empty when none was given).
pub fn plugin_configuration() -> Vec<u8> {
    abi::plugin_configuration().unwrap_or_default()
}

/// An integer attribute: Envoy serialises them as 8 little-endian bytes.
fn property_u64(path: &[&str]) -> Option<u64> {
    let bytes = abi::property(path).ok().flatten()?;
    let arr: [u8; 8] = bytes.as_slice().try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}

/// One stream's Envoy, for the duration of one callback, with this VM's metric ids. Host calls act
/// on the callback's stream, or on the effective context the root set (a cut from its tick).
pub struct WasmHost<'a> {
    pub metrics: &'a mut Metrics,
    /// The stream's context id, which the root can make effective later (`None` outside a stream).
    pub stream: Option<u32>,
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
        abi::header(Map::RequestHeaders, name).ok().flatten()
    }
    fn response_header(&mut self, name: &str) -> Option<Vec<u8>> {
        abi::header(Map::ResponseHeaders, name).ok().flatten()
    }
    fn response_trailer(&mut self, name: &str) -> Option<Vec<u8>> {
        abi::header(Map::ResponseTrailers, name).ok().flatten()
    }
    fn cluster_name(&mut self) -> Option<Vec<u8>> {
        abi::property(&["xds", "cluster_name"]).ok().flatten()
    }
    fn response_code(&mut self) -> Option<u16> {
        property_u64(&["response", "code"]).and_then(|c| u16::try_from(c).ok())
    }
    fn response_flags(&mut self) -> Option<u64> {
        property_u64(&["response", "flags"])
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        let _ = abi::set_header(Map::RequestHeaders, name, value);
    }
    fn add_response_header(&mut self, name: &str, value: &str) {
        let _ = abi::add_header(Map::ResponseHeaders, name, value);
    }
    fn send_reply(&mut self, reply: LocalReply) -> bool {
        abi::send_local_response(
            u32::from(reply.status),
            &reply.headers,
            reply.body.as_bytes(),
        )
        .is_ok()
    }
    fn stream_token(&mut self) -> Option<u64> {
        self.stream.map(u64::from)
    }
}
