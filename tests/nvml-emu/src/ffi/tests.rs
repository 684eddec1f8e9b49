//! C-level checks: layouts against nvml-wrapper-sys, buffer and pointer edge cases.

use std::mem::{offset_of, size_of};
use std::ptr;

use nvml_wrapper_sys::bindings as sys;
use tracer_emugpu::{GpuSpec, ProcessEntry, SensorWriter, UtilSample};

use super::*;

macro_rules! same_layout {
    ($ours:ty, $theirs:ty, [$($field:ident),*]) => {
        assert_eq!(size_of::<$ours>(), size_of::<$theirs>(), stringify!($ours));
        assert_eq!(std::mem::align_of::<$ours>(), std::mem::align_of::<$theirs>(), stringify!($ours));
        $(assert_eq!(
            offset_of!($ours, $field),
            offset_of!($theirs, $field),
            concat!(stringify!($ours), ".", stringify!($field))
        );)*
    };
}

#[test]
fn layouts_match_nvml_wrapper_sys() {
    same_layout!(
        nvmlPciInfo_t,
        sys::nvmlPciInfo_t,
        [
            busIdLegacy,
            domain,
            bus,
            device,
            pciDeviceId,
            pciSubSystemId,
            busId
        ]
    );
    same_layout!(
        nvmlFieldValue_t,
        sys::nvmlFieldValue_t,
        [
            fieldId,
            scopeId,
            timestamp,
            latencyUsec,
            valueType,
            nvmlReturn,
            value
        ]
    );
    same_layout!(
        nvmlProcessInfo_t,
        sys::nvmlProcessInfo_t,
        [pid, usedGpuMemory, gpuInstanceId, computeInstanceId]
    );
    same_layout!(
        nvmlProcessUtilizationSample_t,
        sys::nvmlProcessUtilizationSample_t,
        [pid, timeStamp, smUtil, memUtil, encUtil, decUtil]
    );
    same_layout!(nvmlMemory_t, sys::nvmlMemory_t, [total, free, used]);
    same_layout!(
        nvmlMemory_v2_t,
        sys::nvmlMemory_v2_t,
        [version, total, reserved, free, used]
    );
    assert_eq!(size_of::<nvmlValue_t>(), size_of::<sys::nvmlValue_t>());
    assert_eq!(size_of::<nvmlFieldValue_t>(), 40);
    assert_eq!(size_of::<nvmlPciInfo_t>(), 68);
    assert_eq!(size_of::<nvmlProcessInfo_t>(), 24);
    assert_eq!(size_of::<nvmlProcessUtilizationSample_t>(), 32);
}

#[test]
fn constants_match_nvml_wrapper_sys() {
    use sys::field_id;
    assert_eq!(
        NVML_FI_DEV_POWER_INSTANT,
        field_id::NVML_FI_DEV_POWER_INSTANT
    );
    assert_eq!(
        NVML_FI_DEV_POWER_AVERAGE,
        field_id::NVML_FI_DEV_POWER_AVERAGE
    );
    assert_eq!(
        NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
        field_id::NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION
    );
    let codes = [
        (NVML_SUCCESS, sys::nvmlReturn_enum_NVML_SUCCESS),
        (
            NVML_ERROR_UNINITIALIZED,
            sys::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED,
        ),
        (
            NVML_ERROR_INVALID_ARGUMENT,
            sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT,
        ),
        (
            NVML_ERROR_NOT_SUPPORTED,
            sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED,
        ),
        (
            NVML_ERROR_NOT_FOUND,
            sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
        ),
        (
            NVML_ERROR_INSUFFICIENT_SIZE,
            sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE,
        ),
        (
            NVML_ERROR_DRIVER_NOT_LOADED,
            sys::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED,
        ),
        (
            NVML_ERROR_GPU_IS_LOST,
            sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST,
        ),
        (NVML_ERROR_UNKNOWN, sys::nvmlReturn_enum_NVML_ERROR_UNKNOWN),
    ];
    for (ours, theirs) in codes {
        assert_eq!(ours, theirs);
    }
    assert_eq!(
        NVML_VALUE_TYPE_UNSIGNED_INT,
        sys::nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT
    );
    assert_eq!(
        NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
        sys::nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    );
    assert_eq!(NVML_DEVICE_MIG_DISABLE, sys::NVML_DEVICE_MIG_DISABLE);
}

/// The library's state is global, so every stateful check lives in this one test.
#[test]
fn c_level_calls() {
    let dir = std::env::temp_dir().join(format!("nvml-emu-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("state");
    let specs = GpuSpec::h100s(2);
    let w = SensorWriter::create(&path, &specs).expect("writer");

    // SAFETY (whole block): every pointer passed points to live, correctly sized locals.
    unsafe {
        let mut count = 0;
        assert_eq!(
            nvmlDeviceGetCount_v2(&raw mut count),
            NVML_ERROR_UNINITIALIZED
        );
        assert_eq!(nvmlShutdown(), NVML_ERROR_UNINITIALIZED);
        assert_eq!(
            state::init_from(&dir.join("missing")),
            NVML_ERROR_DRIVER_NOT_LOADED
        );
        assert_eq!(state::init_from(&path), NVML_SUCCESS);
        assert_eq!(nvmlDeviceGetCount_v2(&raw mut count), NVML_SUCCESS);
        assert_eq!(count, 2);
        assert_eq!(
            nvmlDeviceGetCount_v2(ptr::null_mut()),
            NVML_ERROR_INVALID_ARGUMENT
        );

        let mut dev: nvmlDevice_t = ptr::null_mut();
        assert_eq!(
            nvmlDeviceGetHandleByIndex_v2(2, &raw mut dev),
            NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(nvmlDeviceGetHandleByIndex_v2(1, &raw mut dev), NVML_SUCCESS);
        let mut idx = 9;
        assert_eq!(nvmlDeviceGetIndex(dev, &raw mut idx), NVML_SUCCESS);
        assert_eq!(idx, 1);
        assert_eq!(
            nvmlDeviceGetIndex(ptr::null_mut(), &raw mut idx),
            NVML_ERROR_INVALID_ARGUMENT
        );

        // Strings: exact fit works, one byte short does not.
        let uuid_len = specs[1].uuid.len() as c_uint;
        let mut buf = [0 as c_char; 96];
        assert_eq!(
            nvmlDeviceGetUUID(dev, buf.as_mut_ptr(), uuid_len),
            NVML_ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(
            nvmlDeviceGetUUID(dev, buf.as_mut_ptr(), uuid_len + 1),
            NVML_SUCCESS
        );
        assert_eq!(
            CStr::from_ptr(buf.as_ptr()).to_str().expect("utf8"),
            specs[1].uuid
        );
        let c_uuid = std::ffi::CString::new(specs[1].uuid.clone()).expect("cstring");
        let mut by_uuid: nvmlDevice_t = ptr::null_mut();
        assert_eq!(
            nvmlDeviceGetHandleByUUID(c_uuid.as_ptr(), &raw mut by_uuid),
            NVML_SUCCESS
        );
        assert_eq!(by_uuid, dev);
        let mut by_bus: nvmlDevice_t = ptr::null_mut();
        assert_eq!(
            nvmlDeviceGetHandleByPciBusId_v2(c"0000:40:00.0".as_ptr(), &raw mut by_bus),
            NVML_SUCCESS
        );
        assert_eq!(by_bus, dev);
        assert_eq!(
            nvmlDeviceGetHandleByUUID(c"GPU-nope".as_ptr(), &raw mut by_uuid),
            NVML_ERROR_NOT_FOUND
        );

        let mut pci: nvmlPciInfo_t = std::mem::zeroed();
        assert_eq!(nvmlDeviceGetPciInfo_v3(dev, &raw mut pci), NVML_SUCCESS);
        assert_eq!(
            CStr::from_ptr(pci.busId.as_ptr()).to_str().expect("utf8"),
            "00000000:40:00.0"
        );
        assert_eq!(
            CStr::from_ptr(pci.busIdLegacy.as_ptr())
                .to_str()
                .expect("utf8"),
            "0000:40:00.0"
        );
        assert_eq!((pci.domain, pci.bus, pci.device), (0, 0x40, 0));

        // Processes: count query, too small, exact.
        let mut n = 0;
        assert_eq!(
            nvmlDeviceGetComputeRunningProcesses_v3(dev, &raw mut n, ptr::null_mut()),
            NVML_SUCCESS
        );
        assert_eq!(n, 0);
        let procs = [
            ProcessEntry {
                pid: 10,
                used_gpu_memory: 1 << 30,
            },
            ProcessEntry {
                pid: 11,
                used_gpu_memory: 2 << 30,
            },
        ];
        w.set_processes(1, &procs).expect("processes");
        n = 0;
        assert_eq!(
            nvmlDeviceGetComputeRunningProcesses_v3(dev, &raw mut n, ptr::null_mut()),
            NVML_ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(n, 2);
        let mut infos = [nvmlProcessInfo_t::default(); 4];
        n = 4;
        assert_eq!(
            nvmlDeviceGetComputeRunningProcesses_v3(dev, &raw mut n, infos.as_mut_ptr()),
            NVML_SUCCESS
        );
        assert_eq!(n, 2);
        assert_eq!((infos[1].pid, infos[1].usedGpuMemory), (11, 2 << 30));
        let mut mem = nvmlMemory_t::default();
        assert_eq!(nvmlDeviceGetMemoryInfo(dev, &raw mut mem), NVML_SUCCESS);
        assert_eq!(mem.used, 3 << 30);
        assert_eq!(mem.free, mem.total - mem.used);

        // Utilisation: NOT_FOUND, size query, filter by last seen.
        let mut m = 0;
        assert_eq!(
            nvmlDeviceGetProcessUtilization(dev, ptr::null_mut(), &raw mut m, 0),
            NVML_ERROR_NOT_FOUND
        );
        for ts in [100, 200, 300] {
            w.push_utilisation(
                1,
                UtilSample {
                    pid: 10,
                    timestamp_us: ts,
                    sm_util: 40,
                    mem_util: 10,
                },
            )
            .expect("push");
        }
        assert_eq!(
            nvmlDeviceGetProcessUtilization(dev, ptr::null_mut(), &raw mut m, 150),
            NVML_ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(m, 2);
        let mut samples = [nvmlProcessUtilizationSample_t::default(); 2];
        assert_eq!(
            nvmlDeviceGetProcessUtilization(dev, samples.as_mut_ptr(), &raw mut m, 150),
            NVML_SUCCESS
        );
        assert_eq!((samples[0].timeStamp, samples[1].timeStamp), (200, 300));
        assert_eq!(
            nvmlDeviceGetProcessUtilization(dev, samples.as_mut_ptr(), &raw mut m, 300),
            NVML_ERROR_NOT_FOUND
        );

        // Field values: supported, unsupported, bad arguments.
        let mut fv: [nvmlFieldValue_t; 3] = std::mem::zeroed();
        fv[0].fieldId = NVML_FI_DEV_POWER_INSTANT;
        fv[1].fieldId = NVML_FI_DEV_POWER_AVERAGE;
        fv[2].fieldId = 1;
        assert_eq!(
            nvmlDeviceGetFieldValues(dev, 3, fv.as_mut_ptr()),
            NVML_SUCCESS
        );
        assert_eq!(fv[0].nvmlReturn, NVML_SUCCESS);
        assert_eq!(fv[0].value.uiVal, 70_000);
        assert_eq!(fv[1].valueType, NVML_VALUE_TYPE_UNSIGNED_INT);
        assert_eq!(fv[2].nvmlReturn, NVML_ERROR_NOT_SUPPORTED);
        assert_eq!(
            nvmlDeviceGetFieldValues(dev, 0, fv.as_mut_ptr()),
            NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(
            nvmlDeviceGetFieldValues(dev, 1, ptr::null_mut()),
            NVML_ERROR_INVALID_ARGUMENT
        );

        let (mut cur, mut pend) = (9, 9);
        assert_eq!(
            nvmlDeviceGetMigMode(dev, &raw mut cur, &raw mut pend),
            NVML_SUCCESS
        );
        assert_eq!((cur, pend), (0, 0));
        w.set_mig(1, true).expect("mig");
        assert_eq!(
            nvmlDeviceGetMigMode(dev, &raw mut cur, &raw mut pend),
            NVML_SUCCESS
        );
        assert_eq!(
            (cur, pend),
            (NVML_DEVICE_MIG_ENABLE, NVML_DEVICE_MIG_ENABLE)
        );
        w.set_mig(1, false).expect("mig off");

        // Per-process queries failing: energy still answers.
        w.set_process_queries_failing(1, true).expect("fail");
        n = 4;
        assert_eq!(
            nvmlDeviceGetComputeRunningProcesses_v3(dev, &raw mut n, infos.as_mut_ptr()),
            NVML_ERROR_UNKNOWN
        );
        assert_eq!(
            nvmlDeviceGetProcessUtilization(dev, samples.as_mut_ptr(), &raw mut m, 0),
            NVML_ERROR_UNKNOWN
        );
        let mut joules = 0;
        assert_eq!(
            nvmlDeviceGetTotalEnergyConsumption(dev, &raw mut joules),
            NVML_SUCCESS
        );
        w.set_process_queries_failing(1, false).expect("answer");
        n = 4;
        assert_eq!(
            nvmlDeviceGetComputeRunningProcesses_v3(dev, &raw mut n, infos.as_mut_ptr()),
            NVML_SUCCESS
        );

        // Lost GPU: every device call says so; the other GPU is fine.
        w.set_lost(1, true).expect("lost");
        let mut energy = 0;
        assert_eq!(
            nvmlDeviceGetTotalEnergyConsumption(dev, &raw mut energy),
            NVML_ERROR_GPU_IS_LOST
        );
        assert_eq!(
            nvmlDeviceGetHandleByIndex_v2(1, &raw mut dev),
            NVML_ERROR_GPU_IS_LOST
        );
        let mut dev0: nvmlDevice_t = ptr::null_mut();
        assert_eq!(
            nvmlDeviceGetHandleByIndex_v2(0, &raw mut dev0),
            NVML_SUCCESS
        );
        assert_eq!(
            nvmlDeviceGetTotalEnergyConsumption(dev0, &raw mut energy),
            NVML_SUCCESS
        );
        assert_eq!(energy, specs[0].energy_offset_mj);

        assert_eq!(
            CStr::from_ptr(nvmlErrorString(NVML_ERROR_GPU_IS_LOST))
                .to_str()
                .expect("utf8"),
            "GPU is lost"
        );
        let mut version = [0 as c_char; 80];
        assert_eq!(
            nvmlSystemGetDriverVersion(version.as_mut_ptr(), 80),
            NVML_SUCCESS
        );
        assert_eq!(nvmlShutdown(), NVML_SUCCESS);
        assert_eq!(
            nvmlSystemGetDriverVersion(version.as_mut_ptr(), 80),
            NVML_ERROR_UNINITIALIZED
        );
        assert_eq!(
            nvmlDeviceGetTotalEnergyConsumption(dev0, &raw mut energy),
            NVML_ERROR_UNINITIALIZED
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
