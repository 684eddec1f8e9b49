//! The library's global state: the mapped sensor file while NVML is initialised.

use std::sync::{Arc, Mutex, PoisonError};

use tracer_emugpu::{STATE_ENV, SensorReader};

use crate::ffi::{
    NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_GPU_IS_LOST, NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_UNINITIALIZED, NVML_ERROR_UNKNOWN, NVML_SUCCESS, nvmlDevice_t, nvmlReturn_t,
};

struct Global {
    reader: Option<Arc<SensorReader>>,
    refcount: u32,
}

static GLOBAL: Mutex<Global> = Mutex::new(Global {
    reader: None,
    refcount: 0,
});

fn global() -> std::sync::MutexGuard<'static, Global> {
    GLOBAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `nvmlInit`: the first call maps the state file named by `TRACER_EMU_STATE`; later calls
/// count references, like NVML.
pub(crate) fn init() -> nvmlReturn_t {
    let mut g = global();
    if g.reader.is_none() {
        let Some(path) = std::env::var_os(STATE_ENV) else {
            return NVML_ERROR_DRIVER_NOT_LOADED;
        };
        match SensorReader::open(&path) {
            Ok(r) => g.reader = Some(Arc::new(r)),
            Err(tracer_emugpu::EmuError::Io(..)) => return NVML_ERROR_DRIVER_NOT_LOADED,
            Err(_) => return NVML_ERROR_UNKNOWN,
        }
    }
    g.refcount += 1;
    NVML_SUCCESS
}

/// `nvmlInit` from an explicit path (for in-crate tests that must not touch the environment).
#[cfg(test)]
pub(crate) fn init_from(path: &std::path::Path) -> nvmlReturn_t {
    let mut g = global();
    if g.reader.is_none() {
        match SensorReader::open(path) {
            Ok(r) => g.reader = Some(Arc::new(r)),
            Err(_) => return NVML_ERROR_DRIVER_NOT_LOADED,
        }
    }
    g.refcount += 1;
    NVML_SUCCESS
}

/// `nvmlShutdown`: the last one unmaps the state file.
pub(crate) fn shutdown() -> nvmlReturn_t {
    let mut g = global();
    if g.refcount == 0 {
        return NVML_ERROR_UNINITIALIZED;
    }
    g.refcount -= 1;
    if g.refcount == 0 {
        g.reader = None;
    }
    NVML_SUCCESS
}

/// The mapped state, or `NVML_ERROR_UNINITIALIZED`.
pub(crate) fn reader() -> Result<Arc<SensorReader>, nvmlReturn_t> {
    global().reader.clone().ok_or(NVML_ERROR_UNINITIALIZED)
}

/// Handle for GPU `index`.
pub(crate) fn handle(index: usize) -> nvmlDevice_t {
    std::ptr::without_provenance_mut(index + 1)
}

/// The state and GPU index behind `device`, checking initialisation, the handle and the lost
/// flag.
pub(crate) fn device(device: nvmlDevice_t) -> Result<(Arc<SensorReader>, usize), nvmlReturn_t> {
    let r = reader()?;
    let index = (device as usize).wrapping_sub(1);
    if index >= r.count() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    if r.is_lost(index).unwrap_or(true) {
        return Err(NVML_ERROR_GPU_IS_LOST);
    }
    Ok((r, index))
}
