//! The exported NVML C ABI.
//!
//! Types and constants follow `nvml.h` (checked against nvml-wrapper-sys 0.10's bindings).
//! Every function is `unsafe extern "C"`: callers pass raw pointers as C code would.

use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong};

use tracer_emugpu::{GpuSnapshot, monotonic_us};

use crate::state;

/// `nvmlReturn_t`.
pub type nvmlReturn_t = c_uint;
/// `nvmlValueType_t`.
pub type nvmlValueType_t = c_uint;

pub const NVML_SUCCESS: nvmlReturn_t = 0;
pub const NVML_ERROR_UNINITIALIZED: nvmlReturn_t = 1;
pub const NVML_ERROR_INVALID_ARGUMENT: nvmlReturn_t = 2;
pub const NVML_ERROR_NOT_SUPPORTED: nvmlReturn_t = 3;
pub const NVML_ERROR_NO_PERMISSION: nvmlReturn_t = 4;
pub const NVML_ERROR_ALREADY_INITIALIZED: nvmlReturn_t = 5;
pub const NVML_ERROR_NOT_FOUND: nvmlReturn_t = 6;
pub const NVML_ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = 7;
pub const NVML_ERROR_INSUFFICIENT_POWER: nvmlReturn_t = 8;
pub const NVML_ERROR_DRIVER_NOT_LOADED: nvmlReturn_t = 9;
pub const NVML_ERROR_TIMEOUT: nvmlReturn_t = 10;
pub const NVML_ERROR_IRQ_ISSUE: nvmlReturn_t = 11;
pub const NVML_ERROR_LIBRARY_NOT_FOUND: nvmlReturn_t = 12;
pub const NVML_ERROR_FUNCTION_NOT_FOUND: nvmlReturn_t = 13;
pub const NVML_ERROR_CORRUPTED_INFOROM: nvmlReturn_t = 14;
pub const NVML_ERROR_GPU_IS_LOST: nvmlReturn_t = 15;
pub const NVML_ERROR_UNKNOWN: nvmlReturn_t = 999;

pub const NVML_VALUE_TYPE_DOUBLE: nvmlValueType_t = 0;
pub const NVML_VALUE_TYPE_UNSIGNED_INT: nvmlValueType_t = 1;
pub const NVML_VALUE_TYPE_UNSIGNED_LONG: nvmlValueType_t = 2;
pub const NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: nvmlValueType_t = 3;
pub const NVML_VALUE_TYPE_SIGNED_LONG_LONG: nvmlValueType_t = 4;

/// Total energy since driver load, mJ (`unsigned long long`).
pub const NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: c_uint = 83;
/// Power averaged over a short window (25 ms here), mW (`unsigned int`).
pub const NVML_FI_DEV_POWER_AVERAGE: c_uint = 185;
/// Instantaneous power, mW (`unsigned int`).
pub const NVML_FI_DEV_POWER_INSTANT: c_uint = 186;

/// `NVML_DEVICE_MIG_DISABLE`.
pub const NVML_DEVICE_MIG_DISABLE: c_uint = 0;
/// `NVML_DEVICE_MIG_ENABLE`.
pub const NVML_DEVICE_MIG_ENABLE: c_uint = 1;

/// The driver this library pretends to be (before 580.82: nvml-wrapper's V12 field-id scheme).
pub const DRIVER_VERSION: &CStr = c"550.127.05";
/// NVML version string matching [`DRIVER_VERSION`].
pub const NVML_VERSION: &CStr = c"12.550.127.05";
/// CUDA driver API version (`nvmlSystemGetCudaDriverVersion`): 12.4.
pub const CUDA_DRIVER_VERSION: c_int = 12_040;

/// Opaque device structure (`struct nvmlDevice_st`).
#[repr(C)]
pub struct nvmlDevice_st {
    _private: [u8; 0],
}
/// `nvmlDevice_t`: here `index + 1` cast to a pointer.
pub type nvmlDevice_t = *mut nvmlDevice_st;

/// `nvmlPciInfo_t` (v3 layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlPciInfo_t {
    pub busIdLegacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pciDeviceId: c_uint,
    pub pciSubSystemId: c_uint,
    pub busId: [c_char; 32],
}

/// `nvmlValue_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union nvmlValue_t {
    pub dVal: f64,
    pub siVal: c_int,
    pub uiVal: c_uint,
    pub ulVal: std::ffi::c_ulong,
    pub ullVal: c_ulonglong,
    pub sllVal: std::ffi::c_longlong,
    pub usVal: std::ffi::c_ushort,
}

/// `nvmlFieldValue_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct nvmlFieldValue_t {
    pub fieldId: c_uint,
    pub scopeId: c_uint,
    /// CPU timestamp of the value, µs (here of `CLOCK_MONOTONIC`).
    pub timestamp: std::ffi::c_longlong,
    pub latencyUsec: std::ffi::c_longlong,
    pub valueType: nvmlValueType_t,
    pub nvmlReturn: nvmlReturn_t,
    pub value: nvmlValue_t,
}

/// `nvmlProcessInfo_t` (= `nvmlProcessInfo_v2_t`, used by the `_v3` process queries).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct nvmlProcessInfo_t {
    pub pid: c_uint,
    pub usedGpuMemory: c_ulonglong,
    pub gpuInstanceId: c_uint,
    pub computeInstanceId: c_uint,
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct nvmlProcessUtilizationSample_t {
    pub pid: c_uint,
    pub timeStamp: c_ulonglong,
    pub smUtil: c_uint,
    pub memUtil: c_uint,
    pub encUtil: c_uint,
    pub decUtil: c_uint,
}

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct nvmlMemory_t {
    pub total: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct nvmlMemory_v2_t {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `NVML_VALUE_NOT_AVAILABLE` for `usedGpuMemory`, and the instance ids of a non-MIG GPU.
const NOT_AVAILABLE_U32: c_uint = 0xFFFF_FFFF;

/// Turn a `Result` whose error is an NVML code into the code.
pub(crate) fn ret(r: Result<(), nvmlReturn_t>) -> nvmlReturn_t {
    r.err().unwrap_or(NVML_SUCCESS)
}

/// Write `value` through `out`, or fail with `INVALID_ARGUMENT` if it is null.
///
/// # Safety
/// `out` is null or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T) -> Result<(), nvmlReturn_t> {
    if out.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    // SAFETY: non-null, and valid per the caller.
    unsafe { out.write(value) };
    Ok(())
}

/// Copy `s` and its NUL into `buf` of `len` bytes (`INSUFFICIENT_SIZE` if it does not fit).
///
/// # Safety
/// `buf` is null or valid for `len` bytes of writes.
unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &[u8]) -> Result<(), nvmlReturn_t> {
    if buf.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    if s.len() + 1 > len as usize {
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: `buf` holds at least `s.len() + 1` bytes (checked above, valid per the caller).
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

/// Copy `s` into a fixed C array, NUL-terminated, truncating if needed.
fn fill_array<const N: usize>(dst: &mut [c_char; N], s: &str) {
    dst.fill(0);
    for (d, b) in dst.iter_mut().zip(s.bytes().take(N - 1)) {
        *d = b as c_char;
    }
}

fn snapshot(device: nvmlDevice_t) -> Result<GpuSnapshot, nvmlReturn_t> {
    let (r, index) = state::device(device)?;
    r.snapshot(index).map_err(|_| NVML_ERROR_UNKNOWN)
}

/// The snapshot behind a per-process query: `NVML_ERROR_UNKNOWN` while the writer makes those
/// queries fail (`SensorWriter::set_process_queries_failing`).
fn process_snapshot(device: nvmlDevice_t) -> Result<GpuSnapshot, nvmlReturn_t> {
    let (r, index) = state::device(device)?;
    if r.process_queries_fail(index)
        .map_err(|_| NVML_ERROR_UNKNOWN)?
    {
        return Err(NVML_ERROR_UNKNOWN);
    }
    r.snapshot(index).map_err(|_| NVML_ERROR_UNKNOWN)
}

// ---------------------------------------------------------------------------------------------
// Initialisation and system queries
// ---------------------------------------------------------------------------------------------

/// Initialise NVML: map the state file named by `TRACER_EMU_STATE`.
///
/// # Safety
/// Always safe to call; `unsafe` only because it is part of the C ABI.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    state::init()
}

/// Legacy `nvmlInit` (same as `nvmlInit_v2`).
///
/// # Safety
/// Always safe to call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit() -> nvmlReturn_t {
    state::init()
}

/// `nvmlInitWithFlags`: flags are accepted and ignored (the state file always lists its GPUs).
///
/// # Safety
/// Always safe to call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    state::init()
}

/// `nvmlShutdown`.
///
/// # Safety
/// Always safe to call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    state::shutdown()
}

/// `nvmlErrorString`: a static string describing `result`.
///
/// # Safety
/// Always safe to call; the result points to static storage.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let s: &'static CStr = match result {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        NVML_ERROR_NO_PERMISSION => c"Insufficient Permissions",
        NVML_ERROR_ALREADY_INITIALIZED => c"Already Initialized",
        NVML_ERROR_NOT_FOUND => c"Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_INSUFFICIENT_POWER => c"Insufficient External Power",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        NVML_ERROR_TIMEOUT => c"Timeout",
        NVML_ERROR_IRQ_ISSUE => c"Interrupted by an IRQ",
        NVML_ERROR_LIBRARY_NOT_FOUND => c"NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND => c"Function Not Found",
        NVML_ERROR_CORRUPTED_INFOROM => c"Corrupted infoROM",
        NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// `nvmlSystemGetDriverVersion`.
///
/// # Safety
/// `version` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    ret(state::reader().and_then(|_| {
        // SAFETY: per the caller.
        unsafe { put_str(version, length, DRIVER_VERSION.to_bytes()) }
    }))
}

/// `nvmlSystemGetNVMLVersion` (answers before `nvmlInit` too, like NVML).
///
/// # Safety
/// `version` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: per the caller.
    ret(unsafe { put_str(version, length, NVML_VERSION.to_bytes()) })
}

/// `nvmlSystemGetCudaDriverVersion`.
///
/// # Safety
/// `cuda_driver_version` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(
    cuda_driver_version: *mut c_int,
) -> nvmlReturn_t {
    // SAFETY: per the caller.
    ret(unsafe { put(cuda_driver_version, CUDA_DRIVER_VERSION) })
}

/// `nvmlSystemGetCudaDriverVersion_v2`.
///
/// # Safety
/// `cuda_driver_version` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(
    cuda_driver_version: *mut c_int,
) -> nvmlReturn_t {
    // SAFETY: per the caller.
    ret(unsafe { put(cuda_driver_version, CUDA_DRIVER_VERSION) })
}

// ---------------------------------------------------------------------------------------------
// Device enumeration
// ---------------------------------------------------------------------------------------------

/// `nvmlDeviceGetCount_v2`.
///
/// # Safety
/// `device_count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(device_count: *mut c_uint) -> nvmlReturn_t {
    ret(state::reader().and_then(|r| {
        // SAFETY: per the caller.
        unsafe { put(device_count, r.count() as c_uint) }
    }))
}

/// Legacy `nvmlDeviceGetCount`.
///
/// # Safety
/// `device_count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(device_count: *mut c_uint) -> nvmlReturn_t {
    // SAFETY: per the caller.
    unsafe { nvmlDeviceGetCount_v2(device_count) }
}

/// `nvmlDeviceGetHandleByIndex_v2`.
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    ret(state::reader().and_then(|_| {
        let handle = state::handle(index as usize);
        state::device(handle)?;
        // SAFETY: per the caller.
        unsafe { put(device, handle) }
    }))
}

/// Legacy `nvmlDeviceGetHandleByIndex`.
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: per the caller.
    unsafe { nvmlDeviceGetHandleByIndex_v2(index, device) }
}

/// Find a GPU whose identity matches `pred`.
///
/// # Safety
/// `key` is null or a NUL-terminated string; `device` is null or valid for a write.
unsafe fn handle_by(
    key: *const c_char,
    device: *mut nvmlDevice_t,
    pred: impl Fn(&tracer_emugpu::GpuIdentity, &str) -> bool,
) -> nvmlReturn_t {
    if key.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: NUL-terminated per the caller.
    let key = unsafe { CStr::from_ptr(key) }.to_string_lossy();
    ret(state::reader().and_then(|r| {
        for i in 0..r.count() {
            let id = r.identity(i).map_err(|_| NVML_ERROR_UNKNOWN)?;
            if pred(&id, &key) {
                let handle = state::handle(i);
                state::device(handle)?;
                // SAFETY: per the caller.
                return unsafe { put(device, handle) };
            }
        }
        Err(NVML_ERROR_NOT_FOUND)
    }))
}

/// `nvmlDeviceGetHandleByUUID`.
///
/// # Safety
/// `uuid` is null or NUL-terminated; `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: per the caller.
    unsafe { handle_by(uuid, device, |id, key| id.uuid == key) }
}

/// `nvmlDeviceGetHandleByPciBusId_v2` (accepts the full and the legacy bus-id forms).
///
/// # Safety
/// `pci_bus_id` is null or NUL-terminated; `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    pci_bus_id: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: per the caller.
    unsafe {
        handle_by(pci_bus_id, device, |id, key| {
            id.pci_bus_id.eq_ignore_ascii_case(key)
                || legacy_bus_id(&id.pci_bus_id).eq_ignore_ascii_case(key)
        })
    }
}

/// `"00000000:1A:00.0"` → `"0000:1A:00.0"`.
fn legacy_bus_id(bus_id: &str) -> String {
    match bus_id.split_once(':') {
        Some((domain, rest)) if domain.len() > 4 => {
            format!("{}:{rest}", &domain[domain.len() - 4..])
        }
        _ => bus_id.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

/// `nvmlDeviceGetName`.
///
/// # Safety
/// `name` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    ret(state::device(device).and_then(|(r, i)| {
        let id = r.identity(i).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: per the caller.
        unsafe { put_str(name, length, id.name.as_bytes()) }
    }))
}

/// `nvmlDeviceGetUUID`.
///
/// # Safety
/// `uuid` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    ret(state::device(device).and_then(|(r, i)| {
        let id = r.identity(i).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: per the caller.
        unsafe { put_str(uuid, length, id.uuid.as_bytes()) }
    }))
}

/// `nvmlDeviceGetMinorNumber`.
///
/// # Safety
/// `minor_number` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: nvmlDevice_t,
    minor_number: *mut c_uint,
) -> nvmlReturn_t {
    ret(state::device(device).and_then(|(r, i)| {
        let id = r.identity(i).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: per the caller.
        unsafe { put(minor_number, id.minor) }
    }))
}

/// `nvmlDeviceGetIndex`.
///
/// # Safety
/// `index` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    ret(state::device(device).and_then(|(_, i)| {
        // SAFETY: per the caller.
        unsafe { put(index, i as c_uint) }
    }))
}

/// `nvmlDeviceGetPciInfo_v3`.
///
/// # Safety
/// `pci` is null or valid for a write of `nvmlPciInfo_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    ret(state::device(device).and_then(|(r, i)| {
        let id = r.identity(i).map_err(|_| NVML_ERROR_UNKNOWN)?;
        let mut info = nvmlPciInfo_t {
            busIdLegacy: [0; 16],
            domain: id.pci_domain,
            bus: id.pci_bus,
            device: id.pci_device,
            pciDeviceId: id.pci_device_id,
            pciSubSystemId: id.pci_subsystem_id,
            busId: [0; 32],
        };
        fill_array(&mut info.busIdLegacy, &legacy_bus_id(&id.pci_bus_id));
        fill_array(&mut info.busId, &id.pci_bus_id);
        // SAFETY: per the caller.
        unsafe { put(pci, info) }
    }))
}

/// `nvmlDeviceGetMigMode`: the mode the writer set (`SensorWriter::set_mig`; disabled unless
/// set), as both current and pending mode.
///
/// # Safety
/// `current_mode` and `pending_mode` are null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current_mode: *mut c_uint,
    pending_mode: *mut c_uint,
) -> nvmlReturn_t {
    ret(state::device(device).and_then(|(r, i)| {
        if current_mode.is_null() || pending_mode.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let mode = if r.mig_enabled(i).map_err(|_| NVML_ERROR_UNKNOWN)? {
            NVML_DEVICE_MIG_ENABLE
        } else {
            NVML_DEVICE_MIG_DISABLE
        };
        // SAFETY: per the caller.
        unsafe {
            put(current_mode, mode)?;
            put(pending_mode, mode)
        }
    }))
}

fn memory(device: nvmlDevice_t) -> Result<(u64, u64), nvmlReturn_t> {
    let (r, i) = state::device(device)?;
    let total = r
        .identity(i)
        .map_err(|_| NVML_ERROR_UNKNOWN)?
        .memory_total_bytes;
    let snap = r.snapshot(i).map_err(|_| NVML_ERROR_UNKNOWN)?;
    let used: u64 = snap.processes.iter().map(|p| p.used_gpu_memory).sum();
    Ok((total, used.min(total)))
}

/// `nvmlDeviceGetMemoryInfo`: used memory is the sum over running processes.
///
/// # Safety
/// `memory` is null or valid for a write of `nvmlMemory_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory_out: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    ret(memory(device).and_then(|(total, used)| {
        // SAFETY: per the caller.
        unsafe {
            put(
                memory_out,
                nvmlMemory_t {
                    total,
                    free: total - used,
                    used,
                },
            )
        }
    }))
}

/// `nvmlDeviceGetMemoryInfo_v2` (`version` is kept as the caller set it).
///
/// # Safety
/// `memory` is null or valid for reads and writes of `nvmlMemory_v2_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory_out: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    ret(memory(device).and_then(|(total, used)| {
        if memory_out.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: non-null and valid per the caller.
        let version = unsafe { (*memory_out).version };
        // SAFETY: per the caller.
        unsafe {
            put(
                memory_out,
                nvmlMemory_v2_t {
                    version,
                    total,
                    reserved: 0,
                    free: total - used,
                    used,
                },
            )
        }
    }))
}

// ---------------------------------------------------------------------------------------------
// Power and energy
// ---------------------------------------------------------------------------------------------

/// `nvmlDeviceGetTotalEnergyConsumption`: mJ since "driver load"; moves in ~100 ms steps.
///
/// # Safety
/// `energy` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    crate::cost::pay(crate::cost::Call::TotalEnergy);
    ret(snapshot(device).and_then(|s| {
        // SAFETY: per the caller.
        unsafe { put(energy, s.energy_mj) }
    }))
}

/// `nvmlDeviceGetPowerUsage`: mW, the 25 ms average refreshed every 100 ms.
///
/// # Safety
/// `power` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    crate::cost::pay(crate::cost::Call::PowerUsage);
    ret(snapshot(device).and_then(|s| {
        // SAFETY: per the caller.
        unsafe { put(power, s.power_usage_mw.min(u64::from(u32::MAX)) as c_uint) }
    }))
}

/// `nvmlDeviceGetPowerManagementLimit`: the GPU's `max_w`, mW.
///
/// # Safety
/// `limit` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    ret(state::device(device).and_then(|(r, i)| {
        let id = r.identity(i).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: per the caller.
        unsafe { put(limit, id.max_mw) }
    }))
}

/// `nvmlDeviceGetEnforcedPowerLimit`: the GPU's `max_w`, mW.
///
/// # Safety
/// `limit` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: per the caller.
    unsafe { nvmlDeviceGetPowerManagementLimit(device, limit) }
}

/// `nvmlDeviceGetFieldValues`. Supported (GPU scope, `scopeId` 0):
/// `NVML_FI_DEV_POWER_INSTANT` (mW, `unsigned int`, timestamped at the query: the true power
/// is piecewise constant and the writer publishes every change at once),
/// `NVML_FI_DEV_POWER_AVERAGE` (mW, `unsigned int`, timestamped at the end of its 25 ms window)
/// and `NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (mJ, `unsigned long long`, timestamped at the
/// query like a real driver's: on an H200 the stamp advances with every read while the value
/// holds between the counter's 100 ms updates, so the stamp says nothing about when the
/// counter last moved). Any other field gets `NVML_ERROR_NOT_SUPPORTED` in its own
/// `nvmlReturn`; the call itself succeeds.
///
/// # Safety
/// `values` is null or valid for reads and writes of `values_count` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    values_count: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    ret(snapshot(device).and_then(|s| {
        let Ok(n) = usize::try_from(values_count) else {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        };
        if n == 0 || values.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let now = monotonic_us();
        // SAFETY: valid for `n` elements per the caller.
        let values = unsafe { std::slice::from_raw_parts_mut(values, n) };
        crate::cost::pay(
            if values
                .iter()
                .any(|v| v.fieldId == NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION)
            {
                crate::cost::Call::FieldsWithEnergy
            } else {
                crate::cost::Call::FieldsPower
            },
        );
        for v in values {
            v.latencyUsec = 0;
            let answer = if v.scopeId == 0 {
                match v.fieldId {
                    NVML_FI_DEV_POWER_INSTANT => Some((
                        now,
                        NVML_VALUE_TYPE_UNSIGNED_INT,
                        nvmlValue_t {
                            uiVal: s.power_instant_mw.min(u64::from(u32::MAX)) as c_uint,
                        },
                    )),
                    NVML_FI_DEV_POWER_AVERAGE => Some((
                        s.power_avg_us,
                        NVML_VALUE_TYPE_UNSIGNED_INT,
                        nvmlValue_t {
                            uiVal: s.power_avg_mw.min(u64::from(u32::MAX)) as c_uint,
                        },
                    )),
                    NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION => Some((
                        now,
                        NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
                        nvmlValue_t {
                            ullVal: s.energy_mj,
                        },
                    )),
                    _ => None,
                }
            } else {
                None
            };
            let (ts, ty, code, value) = answer.map_or(
                (
                    now,
                    NVML_VALUE_TYPE_UNSIGNED_INT,
                    NVML_ERROR_NOT_SUPPORTED,
                    nvmlValue_t { ullVal: 0 },
                ),
                |(ts, ty, value)| (ts, ty, NVML_SUCCESS, value),
            );
            v.timestamp = ts as i64;
            v.valueType = ty;
            v.nvmlReturn = code;
            v.value = value;
        }
        Ok(())
    }))
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// `nvmlDeviceGetComputeRunningProcesses_v3`. With `*info_count` too small (0 and `infos`
/// null to ask for the count) it sets `*info_count` to the number of processes and returns
/// `NVML_ERROR_INSUFFICIENT_SIZE`; with no processes it returns success and 0.
///
/// # Safety
/// `info_count` is null or valid for reads and writes; `infos` is null or valid for
/// `*info_count` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    crate::cost::pay(crate::cost::Call::Processes);
    ret(process_snapshot(device).and_then(|s| {
        if info_count.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: non-null, valid per the caller.
        let capacity = unsafe { *info_count } as usize;
        let n = s.processes.len();
        // SAFETY: as above.
        unsafe { *info_count = n as c_uint };
        if n > capacity {
            return Err(NVML_ERROR_INSUFFICIENT_SIZE);
        }
        if n == 0 {
            return Ok(());
        }
        if infos.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        for (k, p) in s.processes.iter().enumerate() {
            // SAFETY: k < n <= capacity elements, valid per the caller.
            unsafe {
                infos.add(k).write(nvmlProcessInfo_t {
                    pid: p.pid,
                    usedGpuMemory: p.used_gpu_memory,
                    gpuInstanceId: NOT_AVAILABLE_U32,
                    computeInstanceId: NOT_AVAILABLE_U32,
                });
            }
        }
        Ok(())
    }))
}

/// `nvmlDeviceGetProcessUtilization`: the buffered samples newer than `last_seen_time_stamp`
/// (µs). `NVML_ERROR_NOT_FOUND` if there are none; with `utilization` null or
/// `*process_samples_count` too small, sets the count and returns
/// `NVML_ERROR_INSUFFICIENT_SIZE`.
///
/// # Safety
/// `process_samples_count` is null or valid for reads and writes; `utilization` is null or
/// valid for `*process_samples_count` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    utilization: *mut nvmlProcessUtilizationSample_t,
    process_samples_count: *mut c_uint,
    last_seen_time_stamp: c_ulonglong,
) -> nvmlReturn_t {
    crate::cost::pay(crate::cost::Call::Processes);
    ret(process_snapshot(device).and_then(|s| {
        if process_samples_count.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let fresh: Vec<_> = s
            .utilisation
            .iter()
            .filter(|u| u.timestamp_us > last_seen_time_stamp)
            .collect();
        if fresh.is_empty() {
            // SAFETY: non-null, valid per the caller.
            unsafe { *process_samples_count = 0 };
            return Err(NVML_ERROR_NOT_FOUND);
        }
        // SAFETY: as above.
        let capacity = unsafe { *process_samples_count } as usize;
        // SAFETY: as above.
        unsafe { *process_samples_count = fresh.len() as c_uint };
        if utilization.is_null() || capacity < fresh.len() {
            return Err(NVML_ERROR_INSUFFICIENT_SIZE);
        }
        for (k, u) in fresh.iter().enumerate() {
            // SAFETY: k < fresh.len() <= capacity elements, valid per the caller.
            unsafe {
                utilization.add(k).write(nvmlProcessUtilizationSample_t {
                    pid: u.pid,
                    timeStamp: u.timestamp_us,
                    smUtil: u.sm_util,
                    memUtil: u.mem_util,
                    encUtil: 0,
                    decUtil: 0,
                });
            }
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests;
