//! The cdylib, loaded as `libnvidia-ml.so.1` by nvml-wrapper, against a live sensor writer.
//!
//! Everything runs in one test: NVML reads `TRACER_EMU_STATE` at init, and the environment is
//! process-wide.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{NVML_FI_DEV_POWER_AVERAGE, NVML_FI_DEV_POWER_INSTANT};
use tracer_emugpu::{
    GpuSpec, ProcessEntry, STATE_ENV, SensorWriter, UtilSample, monotonic_us, spawn_ticker,
};

/// The cdylib of this package. `cargo test` builds it (one rustc run emits the rlib the test
/// links and the cdylib) into `target/<profile>/deps/`, next to this executable, but only
/// `cargo build` copies it up to `target/<profile>/`; so look in `deps/` first.
fn built_library() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .expect("test executable lives in target/<profile>/deps");
    let candidates = [
        deps.join("libnvidia_ml.so"),
        deps.parent()
            .map_or_else(PathBuf::new, |p| p.join("libnvidia_ml.so")),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .expect("libnvidia_ml.so not built")
}

fn set_state_env(value: Option<&Path>) {
    // SAFETY: this binary has a single test, and nothing else in it reads the environment
    // concurrently (the ticker thread never does).
    unsafe {
        match value {
            Some(v) => std::env::set_var(STATE_ENV, v),
            None => std::env::remove_var(STATE_ENV),
        }
    }
}

fn init(lib: &Path) -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(OsStr::new(lib)).init()
}

#[test]
fn nvml_wrapper_reads_the_emulated_gpus() {
    let dir = std::env::temp_dir().join(format!("nvml-emu-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let lib = dir.join("libnvidia-ml.so.1");
    std::fs::copy(built_library(), &lib).expect("copy the library");
    let state = dir.join("state");

    // No driver: no variable, or a variable naming nothing.
    set_state_env(None);
    let no_env = init(&lib);
    assert!(
        matches!(no_env, Err(NvmlError::DriverNotLoaded)),
        "{no_env:?}"
    );
    set_state_env(Some(&dir.join("missing")));
    assert!(matches!(init(&lib), Err(NvmlError::DriverNotLoaded)));

    let specs = GpuSpec::h100s(2);
    let writer = Arc::new(SensorWriter::create(&state, &specs).expect("sensor writer"));
    let t0 = monotonic_us();
    writer.set_power(0, t0, 300.0).expect("power 0");
    writer.set_power(1, t0, 150.0).expect("power 1");
    writer
        .set_processes(
            0,
            &[ProcessEntry {
                pid: 4242,
                used_gpu_memory: 5 << 30,
            }],
        )
        .expect("processes");
    let ticker = spawn_ticker(Arc::clone(&writer), Duration::from_millis(1)).expect("ticker");

    set_state_env(Some(&state));
    let nvml = init(&lib).expect("nvml init");
    assert!(
        nvml.sys_driver_version()
            .expect("driver version")
            .starts_with("550.")
    );
    assert_eq!(nvml.device_count().expect("count"), 2);

    for (i, spec) in specs.iter().enumerate() {
        let dev = nvml.device_by_index(i as u32).expect("device");
        assert_eq!(dev.name().expect("name"), spec.name);
        assert_eq!(dev.uuid().expect("uuid"), spec.uuid);
        assert_eq!(dev.minor_number().expect("minor"), spec.minor);
        assert_eq!(dev.index().expect("index"), i as u32);
        let pci = dev.pci_info().expect("pci");
        assert_eq!(pci.bus_id, spec.pci_bus_id);
        assert_eq!(Some(pci.bus), spec.pci_bus());
        assert_eq!(pci.pci_device_id, spec.pci_device_id);
        assert_eq!(dev.mig_mode().expect("mig").current, 0);
        let by_uuid = nvml.device_by_uuid(spec.uuid.as_str()).expect("by uuid");
        assert_eq!(by_uuid.index().expect("index"), i as u32);
    }

    // The energy counter moves in ~100 ms steps of ~30 J (300 W).
    let dev = nvml.device_by_index(0).expect("device 0");
    let start = Instant::now();
    let mut readings = vec![dev.total_energy_consumption().expect("energy")];
    while start.elapsed() < Duration::from_millis(450) {
        std::thread::sleep(Duration::from_millis(2));
        let e = dev.total_energy_consumption().expect("energy");
        assert!(
            e >= *readings.last().expect("a reading"),
            "energy went backwards"
        );
        if e != *readings.last().expect("a reading") {
            readings.push(e);
        }
    }
    assert!(readings.len() >= 3, "{readings:?}");
    // The first reading may predate the switch from idle to 300 W; after it every step is a
    // whole number of 100 ms periods at 300 W (more than one only if the ticker was starved).
    for pair in readings[1..].windows(2) {
        let step = pair[1] - pair[0];
        let periods = (step as f64 / 30_000.0).round() as u64;
        assert!(
            periods >= 1 && step.abs_diff(periods * 30_000) <= periods,
            "step of {step} mJ in {readings:?}"
        );
    }

    // Instant and average power through field values, with timestamps.
    let before = monotonic_us() as i64;
    let fields = dev
        .field_values_for(&[
            FieldId(NVML_FI_DEV_POWER_INSTANT),
            FieldId(NVML_FI_DEV_POWER_AVERAGE),
        ])
        .expect("field values");
    let after = monotonic_us() as i64;
    let instant = fields[0].as_ref().expect("instant power");
    assert_eq!(instant.field.0, NVML_FI_DEV_POWER_INSTANT);
    assert!(
        matches!(instant.value, Ok(SampleValue::U32(300_000))),
        "{:?}",
        instant.value
    );
    assert!((before..=after).contains(&instant.timestamp));
    let average = fields[1].as_ref().expect("average power");
    assert!(
        matches!(average.value, Ok(SampleValue::U32(300_000))),
        "{:?}",
        average.value
    );
    // Refreshed every 100 ms (slack for a starved ticker on a loaded machine).
    assert!(
        average.timestamp <= after && average.timestamp > after - 1_000_000,
        "{average:?}"
    );
    assert_eq!(dev.power_usage().expect("power usage"), 300_000);
    let dev1 = nvml.device_by_index(1).expect("device 1");
    assert_eq!(dev1.power_usage().expect("power usage"), 150_000);

    // Processes and utilisation.
    let procs = dev.running_compute_processes().expect("processes");
    assert_eq!(procs.len(), 1);
    assert_eq!(procs[0].pid, 4242);
    assert_eq!(procs[0].used_gpu_memory, UsedGpuMemory::Used(5 << 30));
    assert!(
        dev1.running_compute_processes()
            .expect("no processes")
            .is_empty()
    );
    assert!(matches!(
        dev.process_utilization_stats(None),
        Err(NvmlError::NotFound)
    ));
    let ts = monotonic_us();
    for (k, sm) in [(0, 55), (1, 65)] {
        writer
            .push_utilisation(
                0,
                UtilSample {
                    pid: 4242,
                    timestamp_us: ts + k,
                    sm_util: sm,
                    mem_util: 20,
                },
            )
            .expect("utilisation");
    }
    let samples = dev.process_utilization_stats(None).expect("samples");
    assert_eq!(samples.len(), 2);
    assert_eq!(
        (samples[1].pid, samples[1].sm_util, samples[1].mem_util),
        (4242, 65, 20)
    );
    let newer = dev.process_utilization_stats(ts).expect("newer samples");
    assert_eq!(newer.len(), 1);
    assert!(matches!(
        dev.process_utilization_stats(ts + 1),
        Err(NvmlError::NotFound)
    ));

    // GPU 1 falls off the bus mid-run.
    writer.set_lost(1, true).expect("lost");
    assert!(matches!(
        dev1.total_energy_consumption(),
        Err(NvmlError::GpuLost)
    ));
    assert!(matches!(dev1.power_usage(), Err(NvmlError::GpuLost)));
    assert!(matches!(nvml.device_by_index(1), Err(NvmlError::GpuLost)));
    assert!(dev.total_energy_consumption().is_ok());

    drop(nvml);
    ticker.stop();
    std::fs::remove_dir_all(&dir).ok();
}
