//! The module's objects as Envoy holds them: a configuration and a stream each become a pointer Envoy
//! keeps and hands back to every hook, until the hook that destroys it. Turning such a pointer back
//! into a Rust value is only as sound as Envoy's promises about it, so every function here that does
//! so is `unsafe`, and its `# Safety` section says which promise the caller relies on; the hooks in
//! `lib.rs` are the only callers.
//!
//! A stream is reached only through a [`StreamLease`]: a borrow of the stream for the running hook that
//! the thread records, so that a second lease of the same stream on the thread (a hook re-entered from
//! a call into Envoy made while the first is held) is refused instead of aliasing it, and a stream that
//! is lent is never freed under its borrower (see [`free_stream`]).

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::abi::ModulePtr;
use crate::config::ModuleConfig;
use crate::filter::Stream;

/// The stream object handed to Envoy when `filter_new` failed: every hook passes it through and
/// `filter_destroy` leaves it alone. (A null pointer would make Envoy close the stream.)
static PASS_THROUGH: u8 = 0;

thread_local! {
    /// The stream lent to the running hook on this thread, if any.
    static LENT: Cell<ModulePtr> = const { Cell::new(std::ptr::null()) };
}

fn is_ours(ptr: ModulePtr) -> bool {
    !ptr.is_null() && !std::ptr::eq(ptr.cast::<u8>(), &PASS_THROUGH)
}

// ---- Configurations ---------------------------------------------------------------------------------

/// The pointer Envoy keeps for a configuration; [`config_ref`] reads it, [`drop_config`] frees it.
pub fn config_into_ptr(config: Box<ModuleConfig>) -> ModulePtr {
    Box::into_raw(config).cast_const().cast()
}

/// The configuration behind a pointer from [`config_into_ptr`]; `None` for null.
///
/// # Safety
///
/// `ptr` is null or came from [`config_into_ptr`] and has not been passed to [`drop_config`], and the
/// reference is not used after it is. Envoy guarantees this for the pointer it hands a hook, for the
/// duration of that hook: it keeps the configuration until `config_destroy`, which comes after the
/// last stream made under it is destroyed.
pub unsafe fn config_ref<'a>(ptr: ModulePtr) -> Option<&'a ModuleConfig> {
    // SAFETY: per this function's contract, a live `Box<ModuleConfig>` or null; only shared
    // references are ever made to it.
    unsafe { ptr.cast::<ModuleConfig>().as_ref() }
}

/// Frees a configuration (`config_destroy`).
///
/// # Safety
///
/// `ptr` is null or came from [`config_into_ptr`], is freed once, and nothing refers to the
/// configuration afterwards: Envoy calls `config_destroy` once per configuration, after the last stream
/// made under it is destroyed.
pub unsafe fn drop_config(ptr: ModulePtr) {
    if !ptr.is_null() {
        // SAFETY: per this function's contract.
        drop(unsafe { Box::from_raw(ptr.cast_mut().cast::<ModuleConfig>()) });
    }
}

/// A stream's way back to its configuration: a plain pointer rather than a reference count that
/// every worker would contend on, since Envoy keeps a configuration alive longer than its streams
/// (each filter holds a reference to its configuration).
#[derive(Debug, Clone, Copy)]
pub struct ConfigHandle(NonNull<ModuleConfig>);

// SAFETY: a shared reference to a `Sync` configuration, alive (per `ConfigHandle::new`) while used.
unsafe impl Send for ConfigHandle {}
// SAFETY: as for `Send`.
unsafe impl Sync for ConfigHandle {}

impl ConfigHandle {
    /// A handle on `config`.
    ///
    /// # Safety
    ///
    /// `config` outlives every use of the handle and its copies: true of the configuration a stream
    /// is made under, used by that stream until it is destroyed.
    pub unsafe fn new(config: &ModuleConfig) -> Self {
        Self(NonNull::from(config))
    }

    /// The configuration.
    pub fn get(&self) -> &ModuleConfig {
        // SAFETY: alive while the handle is used (`ConfigHandle::new`'s contract).
        unsafe { self.0.as_ref() }
    }
}

// ---- Streams ----------------------------------------------------------------------------------------

/// The pointer Envoy keeps for a stream; `None` hands Envoy the pass-through object.
pub fn stream_into_ptr(stream: Option<Box<Stream>>) -> ModulePtr {
    match stream {
        Some(s) => Box::into_raw(s).cast_const().cast(),
        None => std::ptr::from_ref(&PASS_THROUGH).cast(),
    }
}

/// What a hook finds behind its stream pointer.
pub enum Lease<'hook> {
    /// The stream, lent to this hook.
    Lent(StreamLease<'hook>),
    /// The pass-through object (or null): nothing to run.
    PassThrough,
    /// The stream is lent already, to a hook further up this thread's stack: this one was re-entered
    /// from a call into Envoy made while that hook holds it. Nothing may touch the stream.
    Busy,
}

/// The stream behind a pointer from [`stream_into_ptr`], lent to the running hook until the lease
/// drops. The stream is reachable only through the lease, so no reference to it outlives the lease.
pub struct StreamLease<'hook> {
    stream: NonNull<Stream>,
    /// What [`LENT`] held before: restored when the lease ends.
    outer: ModulePtr,
    /// Borrows for the hook only; and the lease is not `Send` (the pointer field already forbids it).
    _hook: PhantomData<&'hook mut Stream>,
}

/// Lends the running hook the stream behind `ptr`.
///
/// # Safety
///
/// `ptr` is null, the pass-through object, or came from [`stream_into_ptr`] and has not been freed
/// with [`free_stream`]; the lease is used on the stream's own worker thread, within the running hook.
/// Envoy guarantees this for the pointer it hands a stream hook: it runs one stream's hooks on its
/// worker, one at a time (a hook can only be re-entered through a call the module makes into Envoy,
/// which the lease detects), and calls `filter_destroy` last, once.
pub unsafe fn lease_stream<'hook>(ptr: ModulePtr) -> Lease<'hook> {
    if !is_ours(ptr) {
        return Lease::PassThrough;
    }
    // Hooks nest on a thread only through the module's own calls into Envoy from a stream's hook, and
    // those re-enter that same stream (`send_response` runs its `stream_complete`, and may destroy it),
    // so the innermost lease is the only one a new lease can collide with.
    let outer = LENT.with(|l| l.replace(ptr));
    if outer == ptr {
        LENT.with(|l| l.set(outer));
        return Lease::Busy;
    }
    let Some(stream) = NonNull::new(ptr.cast_mut().cast::<Stream>()) else {
        return Lease::PassThrough;
    };
    Lease::Lent(StreamLease {
        stream,
        outer,
        _hook: PhantomData,
    })
}

impl StreamLease<'_> {
    /// The stream, for as long as the lease is borrowed.
    pub fn stream(&mut self) -> &mut Stream {
        // SAFETY: a live stream (`lease_stream`'s contract), and the only reference to it: the thread
        // refuses a second lease of it while this one lives, and no other thread runs its hooks.
        unsafe { self.stream.as_mut() }
    }
}

impl Drop for StreamLease<'_> {
    fn drop(&mut self) {
        LENT.with(|l| l.set(self.outer));
    }
}

/// Frees a stream (`filter_destroy`), ending its lease first.
///
/// # Safety
///
/// Envoy hands the stream's pointer to no hook after this one: true of `filter_destroy`, called once
/// per stream (since 1.40 from the worker's deferred-delete list, after `stream_complete`).
pub unsafe fn free_stream(lease: StreamLease<'_>) {
    let stream = lease.stream;
    drop(lease);
    // SAFETY: a pointer from `stream_into_ptr` (the lease's contract), freed once (this function's);
    // the lease just ended was the only reference to it.
    drop(unsafe { Box::from_raw(stream.as_ptr()) });
}

/// Bytes Envoy lent to a hook (`config_new`'s name and configuration).
///
/// # Safety
///
/// `buffer` holds `length` readable bytes at `ptr` (or a null `ptr`), valid until the running hook
/// returns, and the slice is not used after it does.
pub unsafe fn lent<'a>(buffer: crate::abi::EnvoyBuffer) -> &'a [u8] {
    if buffer.ptr.is_null() || buffer.length == 0 {
        return &[];
    }
    // SAFETY: per this function's contract.
    unsafe { std::slice::from_raw_parts(buffer.ptr.cast::<u8>(), buffer.length) }
}
