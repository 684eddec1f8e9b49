//! Layout of the shared sensor state file and the mapping that holds it.
//!
//! The file is a [`Header`] followed by `gpu_count` [`Slot`]s. The static part of a slot
//! (identity) is written once, before the file is renamed into place, and never changes.
//! The dynamic part is protected by a seqlock: the single writer makes `seq` odd, updates the
//! fields (all atomics, so concurrent reads are defined behaviour), then makes `seq` even again;
//! a reader retries until it read the same even `seq` before and after copying the fields.
//! Atomics in a shared mapping work across processes on x86-64 Linux (plain loads and stores,
//! `lock`-prefixed read-modify-writes), which is what the emulation targets.

use std::fs::File;
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::EmuError;

/// Environment variable naming the state file (read by `nvml-emu` at `nvmlInit`).
pub const STATE_ENV: &str = "TRACER_EMU_STATE";
/// First eight bytes of a state file: `"TREMUGPU"`, little-endian.
pub const STATE_MAGIC: u64 = u64::from_le_bytes(*b"TREMUGPU");
/// Layout version; bump on any change to [`Header`] or [`Slot`].
pub const STATE_VERSION: u32 = 2;
/// Period of NVML's total-energy counter updates, in µs.
pub const COUNTER_PERIOD_US: u64 = 100_000;
/// Period at which the averaged power is refreshed, in µs.
pub const POWER_AVG_PERIOD_US: u64 = 100_000;
/// Window of the averaged power, in µs.
pub const POWER_AVG_WINDOW_US: u64 = 25_000;
/// Period of the driver's buffered power samples (`nvmlDeviceGetSamples` with
/// `NVML_TOTAL_POWER_SAMPLES`), in µs: each sample is the mean power over the period before its
/// stamp.
pub const POWER_SAMPLE_PERIOD_US: u64 = 20_000;
/// Capacity of the power-sample ring of a GPU (2.4 s at the period above, about what an A100's
/// `nvidia-smi -q -d POWER` reports as its sample buffer).
pub const MAX_POWER_SAMPLES: usize = 120;
/// Capacity of the running-process table of a GPU.
pub const MAX_PROCESSES: usize = 32;
/// Capacity of the utilisation-sample ring of a GPU.
pub const MAX_UTIL_SAMPLES: usize = 64;

pub(crate) const UUID_LEN: usize = 96;
pub(crate) const NAME_LEN: usize = 96;
pub(crate) const BUS_ID_LEN: usize = 32;

/// A process with a compute context on a GPU (`nvmlProcessInfo_t`'s pid and memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessEntry {
    /// Process id.
    pub pid: u32,
    /// GPU memory used by the process, in bytes.
    pub used_gpu_memory: u64,
}

/// One per-process utilisation sample (`nvmlProcessUtilizationSample_t`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UtilSample {
    /// Process id.
    pub pid: u32,
    /// When the sample was taken, µs of `CLOCK_MONOTONIC`.
    pub timestamp_us: u64,
    /// SM utilisation, percent.
    pub sm_util: u32,
    /// Memory utilisation, percent.
    pub mem_util: u32,
}

/// File header.
#[repr(C, align(64))]
pub(crate) struct Header {
    pub magic: AtomicU64,
    pub version: u32,
    pub gpu_count: u32,
    pub hdr_size: u32,
    pub slot_size: u32,
    pub created_us: u64,
}

#[repr(C)]
pub(crate) struct ProcSlot {
    pub pid: AtomicU32,
    pub _pad: u32,
    pub used_gpu_memory: AtomicU64,
}

#[repr(C)]
pub(crate) struct PowerSlot {
    pub mw: AtomicU64,
    pub timestamp_us: AtomicU64,
}

#[repr(C)]
pub(crate) struct UtilSlot {
    pub pid: AtomicU32,
    pub sm_util: AtomicU32,
    pub mem_util: AtomicU32,
    pub _pad: u32,
    pub timestamp_us: AtomicU64,
}

/// Per-GPU slot.
#[repr(C, align(64))]
pub(crate) struct Slot {
    // Static identity, written before the file is published.
    pub index: u32,
    pub minor: u32,
    pub pci_domain: u32,
    pub pci_bus: u32,
    pub pci_device: u32,
    pub pci_device_id: u32,
    pub pci_subsystem_id: u32,
    pub _pad0: u32,
    pub memory_total_bytes: u64,
    pub idle_mw: u32,
    pub max_mw: u32,
    pub uuid: [u8; UUID_LEN],
    pub name: [u8; NAME_LEN],
    pub pci_bus_id: [u8; BUS_ID_LEN],
    // Dynamic state, under the seqlock.
    pub seq: AtomicU64,
    pub energy_mj: AtomicU64,
    pub counter_update_us: AtomicU64,
    pub power_instant_mw: AtomicU64,
    pub power_instant_us: AtomicU64,
    pub power_avg_mw: AtomicU64,
    pub power_avg_us: AtomicU64,
    pub power_usage_mw: AtomicU64,
    pub lost: AtomicU32,
    pub n_processes: AtomicU32,
    pub n_util: AtomicU32,
    pub util_next: AtomicU32,
    pub processes: [ProcSlot; MAX_PROCESSES],
    pub util: [UtilSlot; MAX_UTIL_SAMPLES],
    // Added after version 1 shipped, inside what was the slot's tail padding: `SLOT_SIZE` is
    // unchanged, so files from older writers read as zeros here (MIG off, queries answering)
    // and older readers ignore the fields.
    /// MIG mode (non-zero: enabled), as `nvmlDeviceGetMigMode` reports it.
    pub mig_enabled: AtomicU32,
    /// Non-zero: the per-process queries (running processes, process utilisation) fail.
    pub fail_process_queries: AtomicU32,
    // Version 2: the power-sample ring.
    pub n_power: AtomicU32,
    pub power_next: AtomicU32,
    pub power: [PowerSlot; MAX_POWER_SAMPLES],
}

pub(crate) const HEADER_SIZE: usize = size_of::<Header>();
pub(crate) const SLOT_SIZE: usize = size_of::<Slot>();

pub(crate) fn file_size(gpu_count: usize) -> usize {
    HEADER_SIZE + gpu_count * SLOT_SIZE
}

/// A `MAP_SHARED` mapping of a whole file, unmapped on drop.
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all concurrently mutated data in it is accessed
// through atomics, and the static parts are immutable once published.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn map(file: &File, len: usize, writable: bool) -> Result<Self, EmuError> {
        use std::os::fd::AsRawFd;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: mapping a file we hold open; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(EmuError::Io("mmap", std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    // mmap returns page-aligned memory and every offset is a multiple of 64.
    #[allow(clippy::cast_ptr_alignment)]
    pub fn header(&self) -> &Header {
        // SAFETY: every mapping is at least HEADER_SIZE long (checked by the callers) and page
        // aligned; Header is plain integers and atomics, valid for any bit pattern.
        unsafe { &*self.ptr.cast::<Header>() }
    }

    /// Slot `i`; the caller checked `i < gpu_count` and the mapping length.
    // mmap returns page-aligned memory and every offset is a multiple of 64.
    #[allow(clippy::cast_ptr_alignment)]
    pub fn slot(&self, i: usize) -> &Slot {
        debug_assert!(HEADER_SIZE + (i + 1) * SLOT_SIZE <= self.len);
        // SAFETY: in bounds (above), aligned (header and slot sizes are multiples of 64 and the
        // mapping is page aligned); Slot is valid for any bit pattern.
        unsafe { &*self.ptr.add(HEADER_SIZE + i * SLOT_SIZE).cast::<Slot>() }
    }

    /// Raw pointer to slot `i`, for writing its static part before the file is published.
    // mmap returns page-aligned memory and every offset is a multiple of 64.
    #[allow(clippy::cast_ptr_alignment)]
    pub fn slot_ptr(&self, i: usize) -> *mut Slot {
        debug_assert!(HEADER_SIZE + (i + 1) * SLOT_SIZE <= self.len);
        // SAFETY: in bounds, as in `slot`.
        unsafe { self.ptr.add(HEADER_SIZE + i * SLOT_SIZE).cast::<Slot>() }
    }

    // mmap returns page-aligned memory and every offset is a multiple of 64.
    #[allow(clippy::cast_ptr_alignment)]
    pub fn header_ptr(&self) -> *mut Header {
        self.ptr.cast()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; no references outlive `self`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Copy `s` into a NUL-terminated fixed array; errors if it does not fit.
pub(crate) fn put_str<const N: usize>(
    dst: &mut [u8; N],
    s: &str,
    what: &str,
) -> Result<(), EmuError> {
    let bytes = s.as_bytes();
    if bytes.len() >= N || bytes.contains(&0) {
        return Err(EmuError::Invalid(format!(
            "{what} {s:?} does not fit in {} bytes",
            N - 1
        )));
    }
    dst.fill(0);
    dst[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// The string in a NUL-terminated fixed array (lossy on invalid UTF-8).
pub(crate) fn get_str(src: &[u8]) -> String {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_aligned() {
        assert_eq!(HEADER_SIZE % 64, 0);
        assert_eq!(SLOT_SIZE % 64, 0);
        assert_eq!(size_of::<ProcSlot>(), 16);
        assert_eq!(size_of::<UtilSlot>(), 24);
    }

    #[test]
    fn version_2_appends_the_power_ring_to_version_1s_slot() {
        // Version 1's fields (the last two added inside its 2432-byte slot's tail padding)
        // keep their offsets; the power ring follows them.
        assert!(std::mem::offset_of!(Slot, fail_process_queries) + 4 <= 2432);
        assert!(
            std::mem::offset_of!(Slot, n_power)
                >= std::mem::offset_of!(Slot, fail_process_queries) + 4
        );
        assert_eq!(size_of::<PowerSlot>(), 16);
        assert_eq!(
            SLOT_SIZE,
            (std::mem::offset_of!(Slot, power) + MAX_POWER_SAMPLES * 16).next_multiple_of(64)
        );
    }
}
