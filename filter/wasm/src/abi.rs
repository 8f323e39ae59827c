//! The proxy-wasm host calls this filter makes, declared here and wrapped so that every answer is a
//! `Result`: never a panic.
//!
//! The SDK's own `hostcalls` panic on any status they do not expect (52 places in proxy-wasm 0.2.5),
//! and in a VM a panic traps it: every request through that worker then fails. Envoy does answer
//! statuses the SDK does not expect: reading response headers from the trailers callback answers
//! `BadArgument`, which the reliability suite saw trap the VM. So the calls the filter makes are
//! declared here (the SDK still provides the exports: the callbacks and the memory allocator through
//! which Envoy hands bytes back), their status read as a plain number, and anything but success is
//! an error the caller turns into "absent" or "failed", as the core expects.

use std::ptr::{null, null_mut};

/// A host status that is not `Ok` (0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

impl Status {
    /// `NotFound`.
    pub const NOT_FOUND: Status = Status(1);
    /// `CasMismatch`.
    pub const CAS_MISMATCH: Status = Status(8);
}

/// The header maps (proxy-wasm `MapType`).
#[derive(Debug, Clone, Copy)]
pub enum Map {
    /// The request headers.
    RequestHeaders = 0,
    /// The response headers.
    ResponseHeaders = 2,
    /// The response trailers.
    ResponseTrailers = 3,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
}

fn ok(status: u32) -> Result<(), Status> {
    if status == 0 {
        Ok(())
    } else {
        Err(Status(status))
    }
}

/// Takes ownership of bytes the host wrote through the module's allocator (the SDK's
/// `proxy_on_memory_allocate`, which hands out a `Vec<u8>`'s buffer of exactly `size`).
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: `data` was allocated by this module's allocator for `size` bytes, which the host
    // filled; nothing else owns it.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// Writes a log line.
pub fn log(level: u32, message: &str) -> Result<(), Status> {
    // SAFETY: the pointer and length describe `message`, alive for the call.
    ok(unsafe { proxy_log(level, message.as_ptr(), message.len()) })
}

/// Host time, ns since the Unix epoch.
pub fn now_ns() -> Result<u64, Status> {
    let mut t = 0u64;
    // SAFETY: `t` is a valid place for the host to write.
    ok(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

/// Calls the root context's tick every `ms` milliseconds.
pub fn set_tick_period(ms: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    ok(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// The plugin configuration's bytes.
pub fn plugin_configuration() -> Result<Vec<u8>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: `data` and `size` are valid places for the host to write; 7 is PluginConfiguration.
    ok(unsafe { proxy_get_buffer_bytes(7, 0, usize::MAX, &mut data, &mut size) })?;
    Ok(owned(data, size))
}

/// A header's value; `Ok(None)` when there is no such header.
pub fn header(map: Map, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the key describes `name`; `data` and `size` are valid places to write.
    let status = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match ok(status) {
        Ok(()) => Ok(Some(owned(data, size))),
        Err(Status::NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets (replaces) a header.
pub fn set_header(map: Map, name: &str, value: &str) -> Result<(), Status> {
    // SAFETY: both buffers are alive for the call.
    ok(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Adds a header value.
pub fn add_header(map: Map, name: &str, value: &str) -> Result<(), Status> {
    // SAFETY: both buffers are alive for the call.
    ok(unsafe {
        proxy_add_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// An attribute (`["xds", "cluster_name"]`); `Ok(None)` when it has no value.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    // The path's segments, separated by NUL bytes.
    let serialized = path.join("\0");
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: the path is alive for the call; `data` and `size` are valid places to write.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    match ok(status) {
        Ok(()) if data.is_null() => Ok(None),
        Ok(()) => Ok(Some(owned(data, size))),
        Err(Status::NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A shared-data value and its CAS token; `Ok(None)` when the key does not exist. An existing empty
/// value comes back as empty bytes.
pub fn get_shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: the key is alive for the call; the three out-pointers are valid places to write.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match ok(status) {
        Ok(()) => Ok(Some((owned(data, size), cas))),
        Err(Status::NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a shared-data value; `cas` 0 writes unchecked.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: both buffers are alive for the call.
    ok(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
}

/// Makes the stream `context_id` of this VM the one later host calls act on, until the running
/// callback returns (a root context's tick answering a stream). `BadArgument` when the stream is gone.
pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    ok(unsafe { proxy_set_effective_context(context_id) })
}

/// Answers the stream locally (the effective one, when set).
pub fn send_local_response<K: AsRef<str>, V: AsRef<str>>(
    status: u32,
    headers: &[(K, V)],
    body: &[u8],
) -> Result<(), Status> {
    let serialized = serialize_map(headers);
    let (body_ptr, body_len) = if body.is_empty() {
        (null(), 0)
    } else {
        (body.as_ptr(), body.len())
    };
    // SAFETY: body and headers are alive for the call; -1: no gRPC status of the host's own.
    ok(unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body_ptr,
            body_len,
            serialized.as_ptr(),
            serialized.len(),
            -1,
        )
    })
}

/// A header map as proxy-wasm serialises it: the pair count, each pair's two lengths, then each name
/// and value followed by a NUL byte (all numbers u32, little-endian).
fn serialize_map<K: AsRef<str>, V: AsRef<str>>(map: &[(K, V)]) -> Vec<u8> {
    let size = 4 + map
        .iter()
        .map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 10)
        .sum::<usize>();
    let mut bytes = Vec::with_capacity(size);
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    bytes.extend_from_slice(&len(map.len()));
    for (name, value) in map {
        bytes.extend_from_slice(&len(name.as_ref().len()));
        bytes.extend_from_slice(&len(value.as_ref().len()));
    }
    for (name, value) in map {
        bytes.extend_from_slice(name.as_ref().as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(value.as_ref().as_bytes());
        bytes.push(0);
    }
    bytes
}

/// Defines a metric (0: counter, 1: gauge); its id.
pub fn define_metric(kind: u32, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: the name is alive for the call; `id` is a valid place to write.
    ok(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Adds to a counter.
pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    ok(unsafe { proxy_increment_metric(id, offset) })
}

/// Sets a gauge.
pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: no pointers.
    ok(unsafe { proxy_record_metric(id, value) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_serialised_as_proxy_wasm_reads_them() {
        let bytes = serialize_map(&[("a", "bc"), ("", "")]);
        assert_eq!(
            bytes,
            [
                2, 0, 0, 0, // two pairs
                1, 0, 0, 0, 2, 0, 0, 0, // "a", "bc"
                0, 0, 0, 0, 0, 0, 0, 0, // "", ""
                b'a', 0, b'b', b'c', 0, 0, 0,
            ]
        );
    }
}
