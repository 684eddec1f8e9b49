//! `libnvidia-ml.so.1` built from Rust, backed by the emulated GPUs' sensor state.
//!
//! The library exports the NVML entry points tracer uses, with the C ABI of `nvml.h`
//! (structures laid out as in nvml-wrapper-sys 0.10's bindings). `nvmlInit_v2` maps the state
//! file named by `TRACER_EMU_STATE` (written by a [`tracer_emugpu::SensorWriter`]); without it
//! NVML answers `NVML_ERROR_DRIVER_NOT_LOADED`, as it does on a machine without the driver.
//! A GPU flagged lost answers `NVML_ERROR_GPU_IS_LOST` to every device query.
//!
//! Device handles are `index + 1` cast to a pointer; they stay valid across re-initialisation.
//! Calls are free unless `TRACER_EMU_NVML_COSTS=h200` makes them cost what an H200's driver
//! costs (`cost.rs`).
#![allow(non_snake_case, non_camel_case_types)]

mod cost;
mod ffi;
mod samples;
mod state;

pub use cost::{COSTS_ENV, SAMPLES_COST_ENV};
pub use ffi::*;
pub use samples::*;
