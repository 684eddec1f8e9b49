//! What each call costs the caller's CPU, as a real driver makes it pay: none by default (the
//! emulation answers from shared memory), or the per-call CPU measured on a lent H200 (driver
//! 580.159.04, BENCHMARKS "Real: NVIDIA H200") with `TRACER_EMU_NVML_COSTS=h200`. The real
//! driver spins while it waits for the GPU, so the cost is spent here spinning, not sleeping.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

/// Selects the cost model: unset or `none`, or `h200`.
pub const COSTS_ENV: &str = "TRACER_EMU_NVML_COSTS";

/// A call whose cost the model knows.
#[derive(Clone, Copy)]
pub(crate) enum Call {
    /// `nvmlDeviceGetTotalEnergyConsumption`.
    TotalEnergy,
    /// `nvmlDeviceGetFieldValues` asking for the energy counter (with or without more).
    FieldsWithEnergy,
    /// `nvmlDeviceGetFieldValues` for power fields only.
    FieldsPower,
    /// `nvmlDeviceGetPowerUsage`.
    PowerUsage,
    /// `nvmlDeviceGetComputeRunningProcesses` and the per-process utilisation.
    Processes,
    /// `nvmlDeviceGetSamples` (buffered power samples).
    Samples,
}

/// Overrides the modelled cost of one `nvmlDeviceGetSamples` call, µs (see [`h200_us`]).
pub const SAMPLES_COST_ENV: &str = "TRACER_EMU_NVML_SAMPLES_US";

/// The H200's measured CPU per call, µs.
fn h200_us(call: Call) -> u64 {
    match call {
        Call::TotalEnergy => 4_257,
        Call::FieldsWithEnergy => 4_041,
        Call::FieldsPower => 111,
        Call::PowerUsage => 1,
        Call::Processes => 6,
        // Not measured on the H200 (the lent run predates its use): assumed to cost what the
        // instant-power field costs, a driver control answered from data the driver already
        // holds. `TRACER_EMU_NVML_SAMPLES_US` sets another figure to see how the sampler's
        // cost moves with it.
        Call::Samples => samples_us(),
    }
}

fn samples_us() -> u64 {
    static US: OnceLock<u64> = OnceLock::new();
    *US.get_or_init(|| {
        std::env::var(SAMPLES_COST_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(111)
    })
}

fn model() -> bool {
    static H200: OnceLock<bool> = OnceLock::new();
    *H200.get_or_init(|| std::env::var(COSTS_ENV).is_ok_and(|v| v == "h200"))
}

/// Spends `call`'s CPU cost (nothing without a cost model).
pub(crate) fn pay(call: Call) {
    if !model() {
        return;
    }
    let until = Instant::now() + Duration::from_micros(h200_us(call));
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}
