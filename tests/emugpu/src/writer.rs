//! The engine side: integrates true energy and publishes what NVML would show.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::shm::{
    BUS_ID_LEN, COUNTER_PERIOD_US, HEADER_SIZE, MAX_POWER_SAMPLES, MAX_PROCESSES, MAX_UTIL_SAMPLES,
    Mapping, NAME_LEN, POWER_AVG_PERIOD_US, POWER_AVG_WINDOW_US, POWER_SAMPLE_PERIOD_US,
    ProcessEntry, SLOT_SIZE, STATE_MAGIC, STATE_VERSION, Slot, UUID_LEN, UtilSample, file_size,
    put_str,
};
use crate::{EmuError, GpuSpec, monotonic_us};

/// Slack added before flooring the true energy (mJ) into the counter.
const COUNTER_SLACK_MJ: f64 = 1e-6;

/// A change point of the true power: from `t_us` on the GPU drew `watts`; the true energy at
/// `t_us` was `energy_j`.
#[derive(Debug, Clone, Copy)]
struct Change {
    t_us: u64,
    energy_j: f64,
    watts: f64,
}

/// Per-GPU ground truth and sensor schedule (guarded by a mutex: one writer per slot).
#[derive(Debug)]
struct GpuState {
    last_us: u64,
    watts: f64,
    energy_j: f64,
    history: VecDeque<Change>,
    offset_mj: u64,
    next_counter_us: u64,
    next_avg_us: u64,
    counter_mj: u64,
    counter_us: u64,
    avg_mw: u64,
    avg_us: u64,
    instant_mw: u64,
    instant_us: u64,
    util_next: u32,
    n_util: u32,
    next_sample_us: u64,
    /// Power samples taken since the last publish (at most a ring's worth are kept).
    new_samples: VecDeque<(u64, u64)>,
    /// Samples ever taken (the ring's write position is this modulo its capacity).
    samples_taken: u64,
}

impl GpuState {
    /// Integrate the current power from `last_us` to `t_us` (`t_us >= last_us`).
    fn integrate_to(&mut self, t_us: u64) {
        if t_us > self.last_us {
            self.energy_j += self.watts * (t_us - self.last_us) as f64 / 1e6;
            self.last_us = t_us;
        }
    }

    /// True energy at `t_us`, which must not be later than `last_us` (or lies in the current
    /// segment). Before the first change point the first segment's power is extrapolated.
    fn energy_at(&self, t_us: u64) -> f64 {
        let idx = self.history.partition_point(|c| c.t_us <= t_us);
        let c = if idx == 0 {
            self.history[0]
        } else {
            self.history[idx - 1]
        };
        c.energy_j + c.watts * (t_us as f64 - c.t_us as f64) / 1e6
    }

    /// Advance ground truth to `to_us`, firing every counter and average update on the way.
    fn advance(&mut self, to_us: u64) {
        let to_us = to_us.max(self.last_us);
        loop {
            let next = self
                .next_counter_us
                .min(self.next_avg_us)
                .min(self.next_sample_us);
            if next > to_us {
                break;
            }
            self.integrate_to(next);
            if next == self.next_counter_us {
                // floor(mJ), with a nano-millijoule of slack so that an exact value reached
                // through inexact f64 sums (216.365 J as 216.364999…) is not floored a step low.
                self.counter_mj =
                    self.offset_mj + (self.energy_j * 1000.0 + COUNTER_SLACK_MJ).floor() as u64;
                self.counter_us = next;
                self.next_counter_us += COUNTER_PERIOD_US;
            }
            if next == self.next_avg_us {
                let start = next - POWER_AVG_WINDOW_US;
                let joules = self.energy_at(next) - self.energy_at(start);
                let watts = joules / (POWER_AVG_WINDOW_US as f64 / 1e6);
                self.avg_mw = (watts * 1000.0).round().max(0.0) as u64;
                self.avg_us = next;
                self.next_avg_us += POWER_AVG_PERIOD_US;
            }
            if next == self.next_sample_us {
                // The driver's buffered power sample: the mean over the period before it.
                let start = next - POWER_SAMPLE_PERIOD_US;
                let joules = self.energy_at(next) - self.energy_at(start);
                let watts = joules / (POWER_SAMPLE_PERIOD_US as f64 / 1e6);
                if self.new_samples.len() == MAX_POWER_SAMPLES {
                    self.new_samples.pop_front();
                }
                self.new_samples
                    .push_back((next, (watts * 1000.0).round().max(0.0) as u64));
                self.samples_taken += 1;
                self.next_sample_us += POWER_SAMPLE_PERIOD_US;
            }
        }
        self.integrate_to(to_us);
        // Keep just enough history for any window that can still be asked for.
        let keep_from = self
            .last_us
            .saturating_sub(POWER_AVG_WINDOW_US.max(POWER_SAMPLE_PERIOD_US));
        while self.history.len() >= 2 && self.history[1].t_us <= keep_from {
            self.history.pop_front();
        }
    }

    fn set_power(&mut self, now_us: u64, watts: f64) {
        self.advance(now_us);
        let now_us = self.last_us;
        self.watts = watts;
        match self.history.back_mut() {
            Some(c) if c.t_us == now_us => c.watts = watts,
            _ => self.history.push_back(Change {
                t_us: now_us,
                energy_j: self.energy_j,
                watts,
            }),
        }
        self.instant_mw = (watts * 1000.0).round().max(0.0) as u64;
        self.instant_us = now_us;
    }
}

/// The writing side of the shared sensor state, owned by the (emulated) engine process.
///
/// The engine reports the true instantaneous power of each GPU with
/// [`SensorWriter::set_power`] (piecewise constant between calls) and calls
/// [`SensorWriter::tick`] often (or lets [`spawn_ticker`] do it) so that sensor updates are
/// published on time. All methods take `&self`; share the writer through an [`Arc`].
pub struct SensorWriter {
    map: Mapping,
    path: PathBuf,
    gpus: Vec<Mutex<GpuState>>,
}

impl std::fmt::Debug for SensorWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SensorWriter")
            .field("path", &self.path)
            .field("gpus", &self.gpus.len())
            .finish_non_exhaustive()
    }
}

impl SensorWriter {
    /// Create the state file at `path` (replacing any old one) for `specs`, starting now.
    pub fn create(path: impl AsRef<Path>, specs: &[GpuSpec]) -> Result<Self, EmuError> {
        Self::create_at(path, specs, monotonic_us())
    }

    /// Create the state file at `path` for `specs` with the clock starting at `now_us`
    /// (µs of `CLOCK_MONOTONIC`, or any synthetic time base if every later call passes times
    /// from the same base). Every GPU starts idle at its `idle_w`.
    ///
    /// The file is built under a temporary name and renamed into place, so a reader never
    /// sees it half initialised. GPU `i` counts its energy from `specs[i].energy_offset_mj`;
    /// its counter updates at `now_us + phase + k * 100 ms` with a per-GPU phase.
    pub fn create_at(
        path: impl AsRef<Path>,
        specs: &[GpuSpec],
        now_us: u64,
    ) -> Result<Self, EmuError> {
        let path = path.as_ref().to_path_buf();
        if specs.is_empty() {
            return Err(EmuError::Invalid("no GPUs".to_owned()));
        }
        let count = u32::try_from(specs.len())
            .map_err(|_| EmuError::Invalid("too many GPUs".to_owned()))?;
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| EmuError::Io("create state file", e))?;
        let len = file_size(specs.len());
        file.set_len(len as u64)
            .map_err(|e| EmuError::Io("size state file", e))?;
        let map = Mapping::map(&file, len, true)?;
        drop(file);

        let mut gpus = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let idx = i as u64;
            let counter_phase = (idx * 37_000 + 10_000) % COUNTER_PERIOD_US;
            let avg_phase =
                POWER_AVG_WINDOW_US + (idx * 29_000) % (POWER_AVG_PERIOD_US - POWER_AVG_WINDOW_US);
            let watts = spec.idle_w;
            let mut st = GpuState {
                last_us: now_us,
                watts,
                energy_j: 0.0,
                history: VecDeque::from([Change {
                    t_us: now_us,
                    energy_j: 0.0,
                    watts,
                }]),
                offset_mj: spec.energy_offset_mj,
                next_counter_us: now_us + counter_phase,
                next_avg_us: now_us + avg_phase,
                counter_mj: spec.energy_offset_mj,
                counter_us: now_us,
                avg_mw: (watts * 1000.0).round() as u64,
                avg_us: now_us,
                instant_mw: (watts * 1000.0).round() as u64,
                instant_us: now_us,
                util_next: 0,
                n_util: 0,
                next_sample_us: now_us + POWER_SAMPLE_PERIOD_US,
                new_samples: VecDeque::new(),
                samples_taken: 0,
            };
            // SAFETY: the file is not published yet: nobody else maps it, and the slot is in
            // bounds; the fresh file is zero-filled, a valid Slot.
            let slot = unsafe { &mut *map.slot_ptr(i) };
            write_static(slot, spec, i)?;
            publish(slot, &mut st, None);
            gpus.push(Mutex::new(st));
        }
        // SAFETY: as above, the header of the unpublished file is ours alone.
        let header = unsafe { &mut *map.header_ptr() };
        header.version = STATE_VERSION;
        header.gpu_count = count;
        header.hdr_size = HEADER_SIZE as u32;
        header.slot_size = SLOT_SIZE as u32;
        header.created_us = now_us;
        header.magic.store(STATE_MAGIC, Ordering::Release);
        fs::rename(&tmp, &path).map_err(|e| EmuError::Io("publish state file", e))?;
        Ok(Self { map, path, gpus })
    }

    /// Path of the state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of GPUs.
    pub fn count(&self) -> usize {
        self.gpus.len()
    }

    fn gpu(&self, gpu: usize) -> Result<(MutexGuard<'_, GpuState>, &Slot), EmuError> {
        let m = self.gpus.get(gpu).ok_or(EmuError::NoSuchGpu(gpu))?;
        // A panic while holding the lock leaves consistent-enough state: keep going.
        let st = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok((st, self.map.slot(gpu)))
    }

    /// From `now_us` on, GPU `gpu` draws `watts` (total, idle included). Times earlier than
    /// the last update are treated as that update's time.
    pub fn set_power(&self, gpu: usize, now_us: u64, watts: f64) -> Result<(), EmuError> {
        if !watts.is_finite() || watts < 0.0 {
            return Err(EmuError::Invalid(format!("power {watts} W")));
        }
        let (mut st, slot) = self.gpu(gpu)?;
        st.set_power(now_us, watts);
        publish(slot, &mut st, None);
        Ok(())
    }

    /// Bring every GPU's ground truth and published sensors up to `now_us`.
    pub fn tick(&self, now_us: u64) {
        for (i, m) in self.gpus.iter().enumerate() {
            let mut st = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = (st.counter_us, st.avg_us, st.samples_taken);
            st.advance(now_us);
            if (st.counter_us, st.avg_us, st.samples_taken) != before {
                publish(self.map.slot(i), &mut st, None);
            }
        }
    }

    /// Exact true energy of GPU `gpu` since creation, in joules, as of its last update.
    pub fn true_energy_j(&self, gpu: usize) -> Result<f64, EmuError> {
        Ok(self.gpu(gpu)?.0.energy_j)
    }

    /// Advance GPU `gpu` to `now_us` and return its exact true energy since creation (J).
    pub fn true_energy_at(&self, gpu: usize, now_us: u64) -> Result<f64, EmuError> {
        let (mut st, slot) = self.gpu(gpu)?;
        st.advance(now_us);
        publish(slot, &mut st, None);
        Ok(st.energy_j)
    }

    /// The true power GPU `gpu` draws now, in watts.
    pub fn power_w(&self, gpu: usize) -> Result<f64, EmuError> {
        Ok(self.gpu(gpu)?.0.watts)
    }

    /// Replace GPU `gpu`'s running compute processes (at most [`MAX_PROCESSES`]).
    pub fn set_processes(&self, gpu: usize, procs: &[ProcessEntry]) -> Result<(), EmuError> {
        if procs.len() > MAX_PROCESSES {
            return Err(EmuError::Invalid(format!(
                "{} processes, at most {MAX_PROCESSES}",
                procs.len()
            )));
        }
        let (mut st, slot) = self.gpu(gpu)?;
        publish(
            slot,
            &mut st,
            Some(&|slot| {
                for (dst, p) in slot.processes.iter().zip(procs) {
                    dst.pid.store(p.pid, Ordering::Relaxed);
                    dst.used_gpu_memory
                        .store(p.used_gpu_memory, Ordering::Relaxed);
                }
                slot.n_processes
                    .store(procs.len() as u32, Ordering::Relaxed);
            }),
        );
        Ok(())
    }

    /// Replace GPU `gpu`'s utilisation samples (at most [`MAX_UTIL_SAMPLES`]).
    pub fn set_utilisation(&self, gpu: usize, samples: &[UtilSample]) -> Result<(), EmuError> {
        if samples.len() > MAX_UTIL_SAMPLES {
            return Err(EmuError::Invalid(format!(
                "{} samples, at most {MAX_UTIL_SAMPLES}",
                samples.len()
            )));
        }
        let (mut st, slot) = self.gpu(gpu)?;
        st.n_util = samples.len() as u32;
        st.util_next = st.n_util % MAX_UTIL_SAMPLES as u32;
        publish(
            slot,
            &mut st,
            Some(&|slot| {
                for (dst, s) in slot.util.iter().zip(samples) {
                    write_util(dst, s);
                }
            }),
        );
        Ok(())
    }

    /// Append one utilisation sample to GPU `gpu`'s ring (the oldest is overwritten when full).
    pub fn push_utilisation(&self, gpu: usize, sample: UtilSample) -> Result<(), EmuError> {
        let (mut st, slot) = self.gpu(gpu)?;
        let at = st.util_next as usize;
        st.util_next = ((at + 1) % MAX_UTIL_SAMPLES) as u32;
        st.n_util = (st.n_util + 1).min(MAX_UTIL_SAMPLES as u32);
        publish(
            slot,
            &mut st,
            Some(&|slot| write_util(&slot.util[at], &sample)),
        );
        Ok(())
    }

    /// Mark GPU `gpu` as fallen off the bus (NVML then answers `NVML_ERROR_GPU_IS_LOST`), or
    /// back.
    pub fn set_lost(&self, gpu: usize, lost: bool) -> Result<(), EmuError> {
        let (mut st, slot) = self.gpu(gpu)?;
        publish(
            slot,
            &mut st,
            Some(&|slot| {
                slot.lost.store(u32::from(lost), Ordering::Relaxed);
            }),
        );
        Ok(())
    }

    /// Put GPU `gpu` in MIG mode or out of it (NVML's `nvmlDeviceGetMigMode` then reports it
    /// as current and pending mode). Real GPUs change mode only across a reset; set it before
    /// the reader opens the GPU.
    pub fn set_mig(&self, gpu: usize, enabled: bool) -> Result<(), EmuError> {
        let (_st, slot) = self.gpu(gpu)?;
        slot.mig_enabled
            .store(u32::from(enabled), Ordering::Release);
        Ok(())
    }

    /// Make GPU `gpu`'s per-process queries (running compute processes, process
    /// utilisation) fail with an unknown error while its energy and power keep answering, or
    /// answer again: a driver that cannot list processes (containers, permissions).
    pub fn set_process_queries_failing(&self, gpu: usize, failing: bool) -> Result<(), EmuError> {
        let (_st, slot) = self.gpu(gpu)?;
        slot.fail_process_queries
            .store(u32::from(failing), Ordering::Release);
        Ok(())
    }
}

fn write_util(dst: &crate::shm::UtilSlot, s: &UtilSample) {
    dst.pid.store(s.pid, Ordering::Relaxed);
    dst.sm_util.store(s.sm_util, Ordering::Relaxed);
    dst.mem_util.store(s.mem_util, Ordering::Relaxed);
    dst.timestamp_us.store(s.timestamp_us, Ordering::Relaxed);
}

fn write_static(slot: &mut Slot, spec: &GpuSpec, i: usize) -> Result<(), EmuError> {
    let bad = |what: &str| EmuError::Invalid(format!("{what} of GPU {i}: {:?}", spec.pci_bus_id));
    slot.index = spec.index;
    slot.minor = spec.minor;
    slot.pci_domain = spec.pci_domain().ok_or_else(|| bad("PCI domain"))?;
    slot.pci_bus = spec.pci_bus().ok_or_else(|| bad("PCI bus"))?;
    slot.pci_device = spec.pci_device().ok_or_else(|| bad("PCI device"))?;
    slot.pci_device_id = spec.pci_device_id;
    slot.pci_subsystem_id = spec.pci_subsystem_id;
    slot.memory_total_bytes = spec.memory_total_bytes;
    slot.idle_mw = (spec.idle_w * 1000.0).round() as u32;
    slot.max_mw = (spec.max_w * 1000.0).round() as u32;
    put_str::<UUID_LEN>(&mut slot.uuid, &spec.uuid, "uuid")?;
    put_str::<NAME_LEN>(&mut slot.name, &spec.name, "name")?;
    put_str::<BUS_ID_LEN>(&mut slot.pci_bus_id, &spec.pci_bus_id, "PCI bus id")?;
    Ok(())
}

/// Write `st`'s published values (and whatever `extra` writes) into `slot` under its seqlock.
/// Callers hold the GPU's mutex, so there is a single writer per slot.
fn publish(slot: &Slot, st: &mut GpuState, extra: Option<&dyn Fn(&Slot)>) {
    let seq = slot.seq.load(Ordering::Relaxed);
    slot.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
    fence(Ordering::Release);
    slot.energy_mj.store(st.counter_mj, Ordering::Relaxed);
    slot.counter_update_us
        .store(st.counter_us, Ordering::Relaxed);
    slot.power_instant_mw
        .store(st.instant_mw, Ordering::Relaxed);
    slot.power_instant_us
        .store(st.instant_us, Ordering::Relaxed);
    slot.power_avg_mw.store(st.avg_mw, Ordering::Relaxed);
    slot.power_avg_us.store(st.avg_us, Ordering::Relaxed);
    slot.power_usage_mw.store(st.avg_mw, Ordering::Relaxed);
    slot.n_util.store(st.n_util, Ordering::Relaxed);
    slot.util_next.store(st.util_next, Ordering::Relaxed);
    let first = st.samples_taken - st.new_samples.len() as u64;
    for (k, (ts_us, mw)) in st.new_samples.drain(..).enumerate() {
        let dst = &slot.power[((first + k as u64) % MAX_POWER_SAMPLES as u64) as usize];
        dst.mw.store(mw, Ordering::Relaxed);
        dst.timestamp_us.store(ts_us, Ordering::Relaxed);
    }
    slot.power_next.store(
        (st.samples_taken % MAX_POWER_SAMPLES as u64) as u32,
        Ordering::Relaxed,
    );
    slot.n_power.store(
        st.samples_taken.min(MAX_POWER_SAMPLES as u64) as u32,
        Ordering::Relaxed,
    );
    if let Some(f) = extra {
        f(slot);
    }
    slot.seq.store(seq.wrapping_add(2), Ordering::Release);
}

/// A background thread calling [`SensorWriter::tick`] with the current monotonic time;
/// stopped (and joined) by [`Ticker::stop`] or on drop.
#[derive(Debug)]
pub struct Ticker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            // A panicking ticker already reported its panic; nothing more to do here.
            let _ = h.join();
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Tick `writer` every `period` (1 ms is a good choice) on a background thread.
pub fn spawn_ticker(writer: Arc<SensorWriter>, period: Duration) -> Result<Ticker, EmuError> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::Builder::new()
        .name("emugpu-ticker".to_owned())
        .spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                writer.tick(monotonic_us());
                std::thread::sleep(period);
            }
        })
        .map_err(|e| EmuError::Io("spawn ticker thread", e))?;
    Ok(Ticker {
        stop,
        handle: Some(handle),
    })
}
