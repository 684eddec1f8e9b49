//! NVIDIA GPUs through NVML (nvml-wrapper): the total energy counter (mJ) and the instant power
//! field, per GPU, with identity (index, UUID, minor number, PCI bus id).
//!
//! Clocks: counter readings are stamped with `CLOCK_MONOTONIC` at the read. NVML stamps field
//! values in microseconds — Unix time on real drivers — so each poll measures the offset between
//! `CLOCK_REALTIME` and `CLOCK_MONOTONIC` and converts; a stamp that is closer to the monotonic
//! clock than to wall time is taken as monotonic already (emulations), and the first poll logs
//! which one was seen. Stamps further than a second from both clocks are not trusted: the read
//! time is used instead.

use std::{ffi::OsStr, path::PathBuf};

use nvml_wrapper::{
    Nvml, enums::device::SampleValue, error::NvmlError, struct_wrappers::device::FieldValueSample,
    structs::device::FieldId,
};

use super::{PowerDevice, PowerError, PowerSource, Reading, monotonic_ns, realtime_ns};
use crate::ledger::DeviceKind;

/// Stamps further than this from both clocks are not trusted.
const TRUST_NS: u64 = 1_000_000_000;
/// `NVML_FI_DEV_POWER_INSTANT`.
const FIELD_POWER_INSTANT: u32 = 186;

/// The NVML power source.
pub struct NvmlSource {
    nvml: Nvml,
    devices: Vec<PowerDevice>,
    lost: Vec<bool>,
    instant_supported: Vec<bool>,
    clock_logged: bool,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: &NvmlError) -> PowerError {
    PowerError::NvmlUnavailable(e.to_string())
}

impl NvmlSource {
    /// Loads NVML (`lib`: a path to `libnvidia-ml.so.1`, or the system's) and lists its GPUs.
    pub fn open(lib: Option<&PathBuf>) -> Result<Self, PowerError> {
        let nvml = match lib {
            Some(path) => Nvml::builder()
                .lib_path(OsStr::new(path.as_os_str()))
                .init(),
            None => Nvml::init(),
        }
        .map_err(|e| unavailable(&e))?;
        let count = nvml.device_count().map_err(|e| unavailable(&e))?;
        let mut devices = Vec::new();
        for index in 0..count {
            let d = nvml.device_by_index(index).map_err(|e| PowerError::Nvml {
                index,
                detail: e.to_string(),
            })?;
            devices.push(PowerDevice {
                name: format!("gpu{index}"),
                kind: DeviceKind::Gpu,
                estimated: false,
                minor: d.minor_number().ok(),
                uuid: d.uuid().ok(),
                pci_bus_id: d.pci_info().ok().map(|p| p.bus_id),
                wrap_uj: None,
            });
        }
        let n = devices.len();
        Ok(Self {
            nvml,
            devices,
            lost: vec![false; n],
            instant_supported: vec![true; n],
            clock_logged: false,
        })
    }

    /// Converts an NVML µs stamp to `CLOCK_MONOTONIC` ns (see the module docs).
    fn stamp_to_monotonic(&mut self, stamp_us: i64, mono_now: u64, real_now: u64) -> u64 {
        let stamp = u64::try_from(stamp_us).unwrap_or(0).saturating_mul(1000);
        let from_real = stamp.abs_diff(real_now);
        let from_mono = stamp.abs_diff(mono_now);
        let (ts, which) = if from_real <= from_mono && from_real < TRUST_NS {
            (
                mono_now.saturating_sub(real_now.saturating_sub(stamp)),
                "wall-clock",
            )
        } else if from_mono < TRUST_NS {
            (stamp, "monotonic")
        } else {
            (mono_now, "untrusted (read time used)")
        };
        if !self.clock_logged {
            self.clock_logged = true;
            tracing::info!("NVML field timestamps are {which}");
        }
        ts
    }
}

impl PowerSource for NvmlSource {
    fn devices(&self) -> &[PowerDevice] {
        &self.devices
    }

    fn poll(&mut self, out: &mut Vec<Reading>) {
        for index in 0..self.devices.len() {
            let mono = monotonic_ns();
            let real = realtime_ns();
            let result = self.nvml.device_by_index(index as u32).and_then(|d| {
                let energy_mj = d.total_energy_consumption()?;
                let fields = if self.instant_supported[index] {
                    d.field_values_for(&[FieldId(FIELD_POWER_INSTANT)])
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                let usage_mw = if fields.is_empty() {
                    d.power_usage().ok()
                } else {
                    None
                };
                Ok((energy_mj, fields, usage_mw))
            });
            match result {
                Ok((energy_mj, fields, usage_mw)) => {
                    self.lost[index] = false;
                    out.push(Reading::Counter {
                        device: index,
                        ts_ns: mono,
                        energy_uj: energy_mj.saturating_mul(1000),
                        wrap_uj: None,
                    });
                    let mut got_instant = false;
                    for sample in fields.into_iter().flatten() {
                        let FieldValueSample {
                            timestamp, value, ..
                        } = sample;
                        let watts = match value {
                            Ok(SampleValue::U32(mw)) => f64::from(mw) / 1000.0,
                            Ok(SampleValue::U64(mw)) => mw as f64 / 1000.0,
                            Ok(SampleValue::F64(mw)) => mw / 1000.0,
                            Ok(SampleValue::I64(mw)) => mw as f64 / 1000.0,
                            Err(_) => continue,
                        };
                        got_instant = true;
                        let ts_ns = self.stamp_to_monotonic(timestamp, mono, real);
                        out.push(Reading::Power {
                            device: index,
                            ts_ns,
                            watts,
                            window_ns: 0,
                        });
                    }
                    if !got_instant {
                        self.instant_supported[index] = false;
                    }
                    if let Some(mw) = usage_mw {
                        // power_usage: the sensor's short average (25 ms on A100/H100).
                        out.push(Reading::Power {
                            device: index,
                            ts_ns: mono,
                            watts: f64::from(mw) / 1000.0,
                            window_ns: 25_000_000,
                        });
                    }
                }
                Err(e) => {
                    if !self.lost[index] {
                        self.lost[index] = true;
                        tracing::warn!(
                            "NVML gpu{index}: {e}; its energy is a gap until it answers again"
                        );
                        out.push(Reading::Lost {
                            device: index,
                            ts_ns: mono,
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
    }
}
