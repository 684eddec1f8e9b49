use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use super::*;
use crate::power::testutil::TempTree;

#[test]
fn config_defaults_and_keys() {
    let cfg: CpuPowerConfig = toml::from_str("").expect("empty config");
    assert_eq!(cfg, CpuPowerConfig::default());
    assert_eq!(cfg.source, CpuSource::Auto);
    assert_eq!(cfg.sysfs_root, PathBuf::from("/sys"));
    assert_eq!(cfg.proc_root, PathBuf::from("/proc"));
    assert!((cfg.model_idle_watts - 40.0).abs() < f64::EPSILON);
    assert!((cfg.model_max_watts - 200.0).abs() < f64::EPSILON);
    let cfg: CpuPowerConfig = toml::from_str(
        "source = \"powercap\"\nsysfs_root = \"/x\"\nproc_root = \"/y\"\n\
         model_idle_watts = 10.0\nmodel_max_watts = 90.0\n",
    )
    .expect("full config");
    assert_eq!(cfg.source, CpuSource::Powercap);
    for s in ["auto", "rapl", "powercap", "model", "off"] {
        let c: Result<CpuPowerConfig, _> = toml::from_str(&format!("source = \"{s}\""));
        assert!(c.is_ok(), "{s}");
    }
    assert!(toml::from_str::<CpuPowerConfig>("sauce = \"auto\"").is_err());
}

fn fake_proc(t: &TempTree) {
    t.write(
        "proc/stat",
        "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 10 0 10 80 0 0 0 0 0 0\n",
    );
}

fn cfg_for(t: &TempTree, source: CpuSource) -> CpuPowerConfig {
    CpuPowerConfig {
        source,
        sysfs_root: t.path().join("sys"),
        proc_root: t.path().join("proc"),
        ..CpuPowerConfig::default()
    }
}

#[test]
fn chooser_picks_model_without_rapl_or_powercap() {
    let t = TempTree::new("choose-model");
    fake_proc(&t);
    t.write("sys/devices/system/cpu/online", "0\n");
    let cfg = cfg_for(&t, CpuSource::Auto);
    let (source, kind) = open(&cfg).expect("model opens");
    assert_eq!(kind, CpuSourceKind::Model);
    assert_eq!(source.devices().len(), 1);
    assert!(source.devices()[0].estimated);
    assert_eq!(source.devices()[0].name, "cpu0-model");
    let report = probe_report(&cfg);
    println!("{}", report.join("\n"));
    assert!(report[0].starts_with("rapl: unavailable: no power PMU at "));
    assert!(report[1].starts_with("powercap: unavailable: "));
    assert!(report[2].starts_with("model: ok: cpu0-model (CpuPackage, estimated)"));
    assert_eq!(report[3], "chosen: model");
}

/// Advances a fake `energy_uj` every millisecond (atomic rename) until dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    fn new(file: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let tmp = file.with_extension("tmp");
            let mut uj = 1000u64;
            while !flag.load(Ordering::Relaxed) {
                uj += 5000;
                if std::fs::write(&tmp, format!("{uj}\n")).is_ok() {
                    let _ = std::fs::rename(&tmp, &file);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const ZONE: &str = "sys/class/powercap/intel-rapl:0";

fn fake_powercap(t: &TempTree) {
    t.write(&format!("{ZONE}/name"), "package-0\n");
    t.write(&format!("{ZONE}/energy_uj"), "1000\n");
    t.write(&format!("{ZONE}/max_energy_range_uj"), "262143328850\n");
}

#[test]
fn chooser_picks_powercap_when_only_powercap_exists() {
    let t = TempTree::new("choose-powercap");
    fake_proc(&t);
    fake_powercap(&t);
    let _tick = Ticker::new(t.path().join(ZONE).join("energy_uj"));
    let (source, kind) = open(&cfg_for(&t, CpuSource::Auto)).expect("powercap opens");
    assert_eq!(kind, CpuSourceKind::Powercap);
    assert_eq!(source.devices()[0].name, "cpu0");
    assert_eq!(source.devices()[0].kind, DeviceKind::CpuPackage);
    assert!(!source.devices()[0].estimated);
    let report = probe_report(&cfg_for(&t, CpuSource::Auto));
    assert_eq!(report.last().map(String::as_str), Some("chosen: powercap"));
}

#[test]
fn chooser_skips_counters_that_do_not_move() {
    let t = TempTree::new("choose-dead");
    fake_proc(&t);
    fake_powercap(&t); // energy_uj never changes: emulated
    let (source, kind) = open(&cfg_for(&t, CpuSource::Auto)).expect("model opens");
    assert_eq!(kind, CpuSourceKind::Model);
    assert!(source.devices()[0].estimated);
    let e = open(&cfg_for(&t, CpuSource::Powercap))
        .err()
        .expect("dead powercap");
    assert!(matches!(e, PowerError::Powercap(_)), "{e}");
    assert!(e.to_string().contains("did not advance"), "{e}");
}

/// This host: every source is reported; the model always opens on Linux, so `auto` always
/// chooses something. Printed for the record (which source this machine would use).
#[test]
fn real_host_probe_report() {
    let report = probe_report(&CpuPowerConfig::default());
    println!("CPU power probe on this host:\n  {}", report.join("\n  "));
    assert_eq!(report.len(), 4, "{report:?}");
    assert!(report[0].starts_with("rapl: "));
    assert!(report[1].starts_with("powercap: "));
    assert!(report[2].starts_with("model: ok: cpu"), "{report:?}");
    assert!(report[3].starts_with("chosen: "));
    assert_ne!(report[3], "chosen: none (no allowed source opened)");
}

#[test]
fn chooser_respects_explicit_source_and_off() {
    let t = TempTree::new("choose-explicit");
    fake_proc(&t);
    // Only the model is possible: asking for powercap must fail rather than fall back.
    let e = open(&cfg_for(&t, CpuSource::Powercap))
        .err()
        .expect("no powercap here");
    assert!(matches!(e, PowerError::NotPresent { .. }), "{e}");
    let e = open(&cfg_for(&t, CpuSource::Off)).err().expect("off");
    assert!(matches!(e, PowerError::Disabled(_)), "{e}");
    let (_, kind) = open(&cfg_for(&t, CpuSource::Model)).expect("model");
    assert_eq!(kind, CpuSourceKind::Model);
    let report = probe_report(&cfg_for(&t, CpuSource::Off));
    assert_eq!(
        report.last().map(String::as_str),
        Some("chosen: none (source = off)")
    );
}
