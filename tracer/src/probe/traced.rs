//! The probes' `TRACED` bytes (their not-a-target check: `tracer-ebpf/src/probes/mod.rs`),
//! mapped into the daemon's memory so that it marks a process with a byte store, as the probes
//! do. A map update would rewrite the whole 8-byte value, and with it the bytes of the 7 other
//! processes that share it: one the probes set in between (a connection just accepted) would
//! be undone, and that process's syscalls skipped.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU8, Ordering},
};

use aya::maps::{Map, MapData};

use super::ProbeError;

/// The mapped array: one byte per tgid, at offset tgid (8 per 8-byte value, little end first,
/// as the probes index it).
pub(super) struct TracedBytes {
    base: NonNull<AtomicU8>,
    len: usize,
}

// SAFETY: the mapping is shared memory written only with atomic byte stores; the pointer is
// owned by this value and unmapped once, at drop.
unsafe impl Send for TracedBytes {}
// SAFETY: as above.
unsafe impl Sync for TracedBytes {}

impl TracedBytes {
    /// Maps the loaded `TRACED` array (created mmapable by the probes' definition).
    pub(super) fn map(map: Option<&Map>) -> Result<Self, ProbeError> {
        let err = |detail: String| ProbeError::Map {
            name: "TRACED",
            detail,
        };
        let Some(Map::Array(data)) = map else {
            return Err(err("missing, or not an array".into()));
        };
        let len = Self::len_of(data).map_err(|e| err(e.to_string()))?;
        // SAFETY: a fresh shared mapping of the map's fd, checked below; the kernel bounds it to
        // the map's value area.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(err(format!("mmap: {}", std::io::Error::last_os_error())));
        }
        let base = NonNull::new(ptr.cast::<AtomicU8>()).ok_or_else(|| err("mmap: null".into()))?;
        Ok(Self { base, len })
    }

    fn len_of(data: &MapData) -> Result<usize, aya::maps::MapError> {
        let info = data.info()?;
        Ok(info.max_entries() as usize * info.value_size() as usize)
    }

    /// Marks process `tgid` as the probes would before adding an entry of it (a tgid beyond
    /// the array, never expected, is left: the probes then treat it as traced anyway).
    pub(super) fn mark(&self, tgid: u32) {
        let i = tgid as usize;
        if i < self.len {
            // SAFETY: within the mapping; byte stores are atomic on every target.
            unsafe { (*self.base.as_ptr().add(i)).store(1, Ordering::Relaxed) };
        }
    }
}

impl Drop for TracedBytes {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
