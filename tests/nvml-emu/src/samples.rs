//! `nvmlDeviceGetSamples` for `NVML_TOTAL_POWER_SAMPLES`: the driver's buffered power samples,
//! each the mean power over the 20 ms before its stamp (`tracer_emugpu::POWER_SAMPLE_PERIOD_US`),
//! the newest [`tracer_emugpu::MAX_POWER_SAMPLES`] kept.

use std::ffi::{c_uint, c_ulonglong};

use crate::ffi::{
    NVML_ERROR_INSUFFICIENT_SIZE, NVML_ERROR_INVALID_ARGUMENT, NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_UNKNOWN, NVML_VALUE_TYPE_UNSIGNED_INT, nvmlDevice_t,
    nvmlReturn_t, nvmlValue_t, nvmlValueType_t, ret,
};
use crate::state;

/// `nvmlSamplingType_t`.
pub type nvmlSamplingType_t = c_uint;
/// `NVML_TOTAL_POWER_SAMPLES`: total power drawn by the GPU, mW.
pub const NVML_TOTAL_POWER_SAMPLES: nvmlSamplingType_t = 0;

/// `nvmlSample_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct nvmlSample_t {
    /// CPU timestamp of the sample, µs (here of `CLOCK_MONOTONIC`).
    pub timeStamp: c_ulonglong,
    pub sampleValue: nvmlValue_t,
}

/// `nvmlDeviceGetSamples`. With `samples` null, `*sample_count` is set to the buffer's
/// capacity (what a caller allocates); otherwise the samples newer than `last_seen_time_stamp`
/// are written oldest first, up to `*sample_count`, and `*sample_count` says how many.
/// `NVML_ERROR_NOT_FOUND` when there is none newer; only `NVML_TOTAL_POWER_SAMPLES` is
/// supported (others: `NVML_ERROR_NOT_SUPPORTED`).
///
/// # Safety
/// `sample_val_type` is null or valid for a write; `sample_count` is null or valid for reads
/// and writes; `samples` is null or valid for `*sample_count` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSamples(
    device: nvmlDevice_t,
    sample_type: nvmlSamplingType_t,
    last_seen_time_stamp: c_ulonglong,
    sample_val_type: *mut nvmlValueType_t,
    sample_count: *mut c_uint,
    samples: *mut nvmlSample_t,
) -> nvmlReturn_t {
    crate::cost::pay(crate::cost::Call::Samples);
    ret((|| {
        let (r, index) = state::device(device)?;
        if sample_count.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        if sample_type != NVML_TOTAL_POWER_SAMPLES {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        }
        if samples.is_null() {
            // SAFETY: non-null, valid per the caller.
            unsafe { *sample_count = tracer_emugpu::MAX_POWER_SAMPLES as c_uint };
            return Ok(());
        }
        let all = r.power_samples(index).map_err(|_| NVML_ERROR_UNKNOWN)?;
        let fresh: Vec<_> = all
            .iter()
            .filter(|s| s.timestamp_us > last_seen_time_stamp)
            .collect();
        // SAFETY: non-null, valid per the caller.
        let capacity = unsafe { *sample_count } as usize;
        if fresh.is_empty() {
            // SAFETY: as above.
            unsafe { *sample_count = 0 };
            return Err(NVML_ERROR_NOT_FOUND);
        }
        if capacity == 0 {
            return Err(NVML_ERROR_INSUFFICIENT_SIZE);
        }
        let n = fresh.len().min(capacity);
        for (k, s) in fresh[..n].iter().enumerate() {
            // SAFETY: k < n <= capacity elements, valid per the caller.
            unsafe {
                samples.add(k).write(nvmlSample_t {
                    timeStamp: s.timestamp_us,
                    sampleValue: nvmlValue_t {
                        uiVal: s.mw.min(u64::from(u32::MAX)) as c_uint,
                    },
                });
            }
        }
        // SAFETY: as above.
        unsafe { *sample_count = n as c_uint };
        if !sample_val_type.is_null() {
            // SAFETY: non-null, valid per the caller.
            unsafe { *sample_val_type = NVML_VALUE_TYPE_UNSIGNED_INT };
        }
        Ok(())
    })())
}
