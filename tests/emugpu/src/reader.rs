//! The reading side: consistent snapshots of the shared sensor state.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{Ordering, fence};

use crate::shm::{
    HEADER_SIZE, MAX_POWER_SAMPLES, MAX_PROCESSES, MAX_UTIL_SAMPLES, Mapping, ProcessEntry,
    SLOT_SIZE, STATE_MAGIC, STATE_VERSION, Slot, UtilSample, file_size, get_str,
};
use crate::{EmuError, monotonic_us};

/// How long a reader waits for a writer stuck mid-update (a crashed engine) before giving up.
const STUCK_WRITER_US: u64 = 200_000;

/// Static identity of a GPU, as stored in the state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuIdentity {
    /// NVML index.
    pub index: u32,
    /// Minor number.
    pub minor: u32,
    /// `GPU-…` UUID.
    pub uuid: String,
    /// Marketing name.
    pub name: String,
    /// `"00000000:1A:00.0"`.
    pub pci_bus_id: String,
    /// PCI domain.
    pub pci_domain: u32,
    /// PCI bus.
    pub pci_bus: u32,
    /// PCI device.
    pub pci_device: u32,
    /// `pciDeviceId`.
    pub pci_device_id: u32,
    /// `pciSubSystemId`.
    pub pci_subsystem_id: u32,
    /// Frame-buffer size, bytes.
    pub memory_total_bytes: u64,
    /// Idle power, mW.
    pub idle_mw: u32,
    /// Power limit, mW.
    pub max_mw: u32,
}

/// A consistent copy of a GPU's dynamic sensor state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuSnapshot {
    /// Total energy counter, mJ (what `nvmlDeviceGetTotalEnergyConsumption` returns).
    pub energy_mj: u64,
    /// When the counter last changed value, µs of `CLOCK_MONOTONIC`.
    pub counter_update_us: u64,
    /// Instantaneous power, mW (`NVML_FI_DEV_POWER_INSTANT`).
    pub power_instant_mw: u64,
    /// When the instantaneous power was sampled.
    pub power_instant_us: u64,
    /// Average power over the 25 ms before `power_avg_us`, mW (`NVML_FI_DEV_POWER_AVERAGE`).
    pub power_avg_mw: u64,
    /// End of the averaging window.
    pub power_avg_us: u64,
    /// What `nvmlDeviceGetPowerUsage` returns, mW.
    pub power_usage_mw: u64,
    /// The GPU fell off the bus.
    pub lost: bool,
    /// Running compute processes.
    pub processes: Vec<ProcessEntry>,
    /// Buffered utilisation samples, oldest first.
    pub utilisation: Vec<UtilSample>,
    /// The seqlock sequence number the snapshot was taken at (even; grows with every update).
    pub seq: u64,
}

/// One of the driver's buffered power samples: the mean power over the
/// [`crate::POWER_SAMPLE_PERIOD_US`] before `timestamp_us` (µs of `CLOCK_MONOTONIC`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PowerSample {
    pub timestamp_us: u64,
    pub mw: u64,
}

/// Read-only view of a state file created by a [`crate::SensorWriter`], possibly in another
/// process.
pub struct SensorReader {
    map: Mapping,
    count: usize,
}

impl std::fmt::Debug for SensorReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SensorReader")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl SensorReader {
    /// Map the state file at `path` read-only and check its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, EmuError> {
        let file = File::open(path.as_ref()).map_err(|e| EmuError::Io("open state file", e))?;
        let len = file
            .metadata()
            .map_err(|e| EmuError::Io("stat state file", e))?
            .len();
        let len = usize::try_from(len)
            .map_err(|_| EmuError::BadFormat(format!("{len} bytes is too big")))?;
        if len < HEADER_SIZE {
            return Err(EmuError::BadFormat(format!("only {len} bytes")));
        }
        let map = Mapping::map(&file, len, false)?;
        let h = map.header();
        let magic = h.magic.load(Ordering::Acquire);
        if magic != STATE_MAGIC {
            return Err(EmuError::BadFormat(format!("magic {magic:#x}")));
        }
        if h.version != STATE_VERSION
            || h.hdr_size as usize != HEADER_SIZE
            || h.slot_size as usize != SLOT_SIZE
        {
            return Err(EmuError::BadFormat(format!(
                "version {} header {} slot {}, expected {STATE_VERSION} {HEADER_SIZE} {SLOT_SIZE}",
                h.version, h.hdr_size, h.slot_size
            )));
        }
        let count = h.gpu_count as usize;
        if len < file_size(count) {
            return Err(EmuError::BadFormat(format!(
                "{len} bytes for {count} GPUs, need {}",
                file_size(count)
            )));
        }
        Ok(Self { map, count })
    }

    /// Number of GPUs in the file.
    pub fn count(&self) -> usize {
        self.count
    }

    /// When the writer created the file, µs of its clock.
    pub fn created_us(&self) -> u64 {
        self.map.header().created_us
    }

    fn slot(&self, gpu: usize) -> Result<&Slot, EmuError> {
        if gpu < self.count {
            Ok(self.map.slot(gpu))
        } else {
            Err(EmuError::NoSuchGpu(gpu))
        }
    }

    /// Static identity of GPU `gpu`.
    pub fn identity(&self, gpu: usize) -> Result<GpuIdentity, EmuError> {
        let s = self.slot(gpu)?;
        Ok(GpuIdentity {
            index: s.index,
            minor: s.minor,
            uuid: get_str(&s.uuid),
            name: get_str(&s.name),
            pci_bus_id: get_str(&s.pci_bus_id),
            pci_domain: s.pci_domain,
            pci_bus: s.pci_bus,
            pci_device: s.pci_device,
            pci_device_id: s.pci_device_id,
            pci_subsystem_id: s.pci_subsystem_id,
            memory_total_bytes: s.memory_total_bytes,
            idle_mw: s.idle_mw,
            max_mw: s.max_mw,
        })
    }

    /// Whether GPU `gpu` is flagged lost (a cheap check without a full snapshot).
    pub fn is_lost(&self, gpu: usize) -> Result<bool, EmuError> {
        Ok(self.slot(gpu)?.lost.load(Ordering::Acquire) != 0)
    }

    /// Whether GPU `gpu` is in MIG mode (see [`crate::SensorWriter::set_mig`]).
    pub fn mig_enabled(&self, gpu: usize) -> Result<bool, EmuError> {
        Ok(self.slot(gpu)?.mig_enabled.load(Ordering::Acquire) != 0)
    }

    /// Whether GPU `gpu`'s per-process queries are to fail (see
    /// [`crate::SensorWriter::set_process_queries_failing`]).
    pub fn process_queries_fail(&self, gpu: usize) -> Result<bool, EmuError> {
        Ok(self.slot(gpu)?.fail_process_queries.load(Ordering::Acquire) != 0)
    }

    /// A consistent snapshot of GPU `gpu`'s dynamic state (seqlock read; retries while the
    /// writer updates, fails if the writer stays mid-update for 200 ms, e.g. it crashed).
    pub fn snapshot(&self, gpu: usize) -> Result<GpuSnapshot, EmuError> {
        let mut out = GpuSnapshot::default();
        out.seq = self.consistent(gpu, |s| {
            out.energy_mj = s.energy_mj.load(Ordering::Relaxed);
            out.counter_update_us = s.counter_update_us.load(Ordering::Relaxed);
            out.power_instant_mw = s.power_instant_mw.load(Ordering::Relaxed);
            out.power_instant_us = s.power_instant_us.load(Ordering::Relaxed);
            out.power_avg_mw = s.power_avg_mw.load(Ordering::Relaxed);
            out.power_avg_us = s.power_avg_us.load(Ordering::Relaxed);
            out.power_usage_mw = s.power_usage_mw.load(Ordering::Relaxed);
            out.lost = s.lost.load(Ordering::Relaxed) != 0;
            let n_proc = (s.n_processes.load(Ordering::Relaxed) as usize).min(MAX_PROCESSES);
            out.processes.clear();
            out.processes
                .extend(s.processes[..n_proc].iter().map(|p| ProcessEntry {
                    pid: p.pid.load(Ordering::Relaxed),
                    used_gpu_memory: p.used_gpu_memory.load(Ordering::Relaxed),
                }));
            let n_util = (s.n_util.load(Ordering::Relaxed) as usize).min(MAX_UTIL_SAMPLES);
            let next = s.util_next.load(Ordering::Relaxed) as usize % MAX_UTIL_SAMPLES;
            // Oldest first: the ring's oldest entry is `next - n_util` (mod capacity).
            let first = (next + MAX_UTIL_SAMPLES - n_util) % MAX_UTIL_SAMPLES;
            out.utilisation.clear();
            out.utilisation.extend((0..n_util).map(|k| {
                let u = &s.util[(first + k) % MAX_UTIL_SAMPLES];
                UtilSample {
                    pid: u.pid.load(Ordering::Relaxed),
                    timestamp_us: u.timestamp_us.load(Ordering::Relaxed),
                    sm_util: u.sm_util.load(Ordering::Relaxed),
                    mem_util: u.mem_util.load(Ordering::Relaxed),
                }
            }));
        })?;
        Ok(out)
    }

    /// GPU `gpu`'s buffered power samples, oldest first (the ring holds the newest
    /// [`crate::MAX_POWER_SAMPLES`]); kept apart from [`Self::snapshot`], which every NVML call
    /// takes.
    pub fn power_samples(&self, gpu: usize) -> Result<Vec<PowerSample>, EmuError> {
        let mut out = Vec::new();
        self.consistent(gpu, |s| {
            let n = (s.n_power.load(Ordering::Relaxed) as usize).min(MAX_POWER_SAMPLES);
            let next = s.power_next.load(Ordering::Relaxed) as usize % MAX_POWER_SAMPLES;
            let first = (next + MAX_POWER_SAMPLES - n) % MAX_POWER_SAMPLES;
            out.clear();
            out.extend((0..n).map(|k| {
                let p = &s.power[(first + k) % MAX_POWER_SAMPLES];
                PowerSample {
                    timestamp_us: p.timestamp_us.load(Ordering::Relaxed),
                    mw: p.mw.load(Ordering::Relaxed),
                }
            }));
        })?;
        Ok(out)
    }

    /// Runs `read` on GPU `gpu`'s slot until it saw one unchanged even sequence number before
    /// and after (the seqlock), and returns that number; fails if the writer stays mid-update
    /// for 200 ms (it crashed).
    fn consistent(&self, gpu: usize, mut read: impl FnMut(&Slot)) -> Result<u64, EmuError> {
        let s = self.slot(gpu)?;
        let mut spins = 0_u32;
        let mut since = None;
        loop {
            let seq1 = s.seq.load(Ordering::Acquire);
            if seq1 & 1 == 0 {
                read(s);
                fence(Ordering::Acquire);
                let seq2 = s.seq.load(Ordering::Relaxed);
                if seq1 == seq2 {
                    return Ok(seq1);
                }
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                let now = monotonic_us();
                let start = *since.get_or_insert(now);
                if now.saturating_sub(start) > STUCK_WRITER_US {
                    return Err(EmuError::BadFormat(format!(
                        "writer of GPU {gpu} stuck mid-update (seq {seq1})"
                    )));
                }
                std::thread::yield_now();
            }
        }
    }
}
