use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{
    pmu::{FormatField, parse_event_terms, parse_format},
    *,
};
use crate::{ledger::DeviceKind, power::testutil::TempTree};

const SCALE: &str = "2.3283064365386962890625e-10";

fn fake_pmu(t: &TempTree, cpumask: &str, events: &[(&str, &str)]) {
    let d = format!("sys/{PMU_DIR}");
    t.write(&format!("{d}/type"), "23\n");
    t.write(&format!("{d}/cpumask"), &format!("{cpumask}\n"));
    t.write(&format!("{d}/format/event"), "config:0-7\n");
    for (name, text) in events {
        t.write(&format!("{d}/events/{name}"), &format!("{text}\n"));
        t.write(&format!("{d}/events/{name}.scale"), &format!("{SCALE}\n"));
        t.write(&format!("{d}/events/{name}.unit"), "Joules\n");
    }
}

#[test]
fn parses_power_pmu() {
    let t = TempTree::new("pmu");
    fake_pmu(
        &t,
        "0,36",
        &[
            ("energy-pkg", "event=0x02"),
            ("energy-ram", "event=0x03"),
            ("energy-cores", "event=0x01"),
            ("energy-psys", "event=0x05"),
        ],
    );
    let pmu = parse_pmu(&t.path().join("sys")).expect("parses");
    assert_eq!(pmu.ty, 23);
    assert_eq!(pmu.cpus, vec![0, 36]);
    let pkg = pmu.event("energy-pkg").expect("pkg");
    assert_eq!(pkg.config, 2);
    assert_eq!((pkg.config1, pkg.config2), (0, 0));
    assert!((pkg.scale - 2.328_306_436_538_696_3e-10).abs() < 1e-25);
    assert_eq!(pkg.unit.as_deref(), Some("Joules"));
    assert_eq!(pmu.event("energy-ram").map(|e| e.config), Some(3));
    assert!(pmu.event("energy-gpu").is_none());
    assert!(pmu.skipped.is_empty());
}

#[test]
fn pmu_cpumask_ranges_and_missing_pmu() {
    let t = TempTree::new("pmu-range");
    fake_pmu(&t, "0-1", &[("energy-pkg", "event=0x02")]);
    let pmu = parse_pmu(&t.path().join("sys")).expect("parses");
    assert_eq!(pmu.cpus, vec![0, 1]);

    let empty = TempTree::new("pmu-none");
    let e = parse_pmu(empty.path()).expect_err("no PMU");
    assert!(matches!(
        e,
        PowerError::NotPresent {
            what: "no power PMU",
            ..
        }
    ));
    assert!(e.to_string().starts_with("no power PMU at "), "{e}");

    let bad = TempTree::new("pmu-bad");
    fake_pmu(&bad, "zero", &[("energy-pkg", "event=0x02")]);
    assert!(matches!(
        parse_pmu(&bad.path().join("sys")),
        Err(PowerError::Rapl(_))
    ));
}

#[test]
fn event_terms() {
    let mut format = HashMap::new();
    format.insert(
        "event".to_owned(),
        FormatField {
            word: 0,
            lo: 0,
            hi: 7,
        },
    );
    format.insert(
        "umask".to_owned(),
        FormatField {
            word: 0,
            lo: 8,
            hi: 15,
        },
    );
    format.insert(
        "edge".to_owned(),
        FormatField {
            word: 1,
            lo: 3,
            hi: 3,
        },
    );
    assert_eq!(parse_event_terms("event=0x02", &format), Ok([2, 0, 0]));
    assert_eq!(
        parse_event_terms("event=0x02,umask=0x1\n", &format),
        Ok([0x102, 0, 0])
    );
    assert_eq!(parse_event_terms("event=2,edge", &format), Ok([2, 8, 0]));
    assert!(parse_event_terms("event=0x1ff", &format).is_err());
    assert!(parse_event_terms("event=?", &format).is_err());
    assert!(parse_event_terms("period=1", &format).is_err());
    assert!(parse_event_terms("", &format).is_err());
    // No format directory: `event` is the whole config.
    assert_eq!(
        parse_event_terms("event=0x02", &HashMap::new()),
        Ok([2, 0, 0])
    );
    assert_eq!(
        parse_format("config:0-7"),
        Some(FormatField {
            word: 0,
            lo: 0,
            hi: 7
        })
    );
    assert_eq!(
        parse_format("config1:5\n"),
        Some(FormatField {
            word: 1,
            lo: 5,
            hi: 5
        })
    );
    assert_eq!(parse_format("config3:0-7"), None);
}

#[test]
fn missing_scale_or_wrong_unit_skips_event() {
    let t = TempTree::new("pmu-skip");
    fake_pmu(
        &t,
        "0",
        &[("energy-pkg", "event=0x02"), ("energy-ram", "event=0x03")],
    );
    let d = format!("sys/{PMU_DIR}/events");
    t.remove(&format!("{d}/energy-ram.scale"));
    t.write(&format!("{d}/energy-gpu"), "event=0x04\n");
    t.write(&format!("{d}/energy-gpu.scale"), &format!("{SCALE}\n"));
    t.write(&format!("{d}/energy-gpu.unit"), "Watts\n");
    let pmu = parse_pmu(&t.path().join("sys")).expect("parses");
    assert_eq!(
        pmu.events
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["energy-pkg"]
    );
    let skipped: Vec<&str> = pmu.skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(skipped, ["energy-gpu", "energy-ram"]);

    // Without energy-pkg there is nothing to measure.
    let t2 = TempTree::new("pmu-nopkg");
    fake_pmu(&t2, "0", &[("energy-ram", "event=0x03")]);
    let sys = t2.path().join("sys");
    let pmu = parse_pmu(&sys).expect("parses");
    assert!(matches!(plan(&pmu, &sys), Err(PowerError::Rapl(_))));
}

/// As seen on a KVM guest (H200 host, kernel 6.18): type 9, cpumask 0, psys only.
#[test]
fn psys_only_pmu_has_no_package_counter() {
    let t = TempTree::new("pmu-psys");
    fake_pmu(&t, "0", &[("energy-psys", "event=0x05")]);
    let sys = t.path().join("sys");
    let pmu = parse_pmu(&sys).expect("parses");
    assert_eq!(pmu.event("energy-psys").map(|e| e.config), Some(5));
    let e = plan(&pmu, &sys).expect_err("no package");
    assert!(
        e.to_string()
            .contains("no usable energy-pkg event (usable events: [energy-psys])"),
        "{e}"
    );
}

#[test]
fn plan_per_package_skips_cores_and_gpu() {
    let t = TempTree::new("pmu-plan");
    fake_pmu(
        &t,
        "0,36",
        &[
            ("energy-pkg", "event=0x02"),
            ("energy-ram", "event=0x03"),
            ("energy-cores", "event=0x01"),
            ("energy-gpu", "event=0x04"),
            ("energy-psys", "event=0x05"),
        ],
    );
    t.write(
        "sys/devices/system/cpu/cpu0/topology/physical_package_id",
        "0\n",
    );
    t.write(
        "sys/devices/system/cpu/cpu36/topology/physical_package_id",
        "1\n",
    );
    let sys = t.path().join("sys");
    let pmu = parse_pmu(&sys).expect("parses");
    let planned = plan(&pmu, &sys).expect("plan");
    let got: Vec<(&str, DeviceKind, usize, u64)> = planned
        .iter()
        .map(|p| (p.device.name.as_str(), p.device.kind, p.cpu, p.event.config))
        .collect();
    assert_eq!(
        got,
        [
            ("cpu0", DeviceKind::CpuPackage, 0, 2),
            ("dram0", DeviceKind::Dram, 0, 3),
            ("cpu1", DeviceKind::CpuPackage, 36, 2),
            ("dram1", DeviceKind::Dram, 36, 3),
            ("psys", DeviceKind::Other, 0, 5),
        ]
    );
    assert!(
        planned
            .iter()
            .all(|p| !p.device.estimated && p.device.wrap_uj.is_none())
    );
}

/// A fake counter: a shared script of results.
struct Scripted(Arc<Mutex<Vec<io::Result<u64>>>>);

impl CountReader for Scripted {
    fn read_count(&mut self) -> io::Result<u64> {
        let mut v = self.0.lock().expect("lock");
        if v.is_empty() {
            Err(io::Error::other("script ended"))
        } else {
            v.remove(0)
        }
    }
}

#[test]
fn counts_scale_to_microjoules_and_read_failure_is_lost_once() {
    let t = TempTree::new("pmu-poll");
    fake_pmu(&t, "0", &[("energy-pkg", "event=0x02")]);
    let sys = t.path().join("sys");
    let planned = plan(&parse_pmu(&sys).expect("parses"), &sys).expect("plan");
    let script = Arc::new(Mutex::new(vec![
        Ok(1u64 << 32), // 1 J
        Err(io::Error::other("gone")),
        Err(io::Error::other("gone")),
        Ok(3u64 << 32),
    ]));
    let reader: Box<dyn CountReader> = Box::new(Scripted(script));
    let mut src = RaplSource::from_readers(vec![(planned[0].clone(), reader)]);
    assert_eq!(src.counter_period_ns(0), Some(1_000_000));
    assert_eq!(src.counter_period_ns(1), None);
    let mut out = Vec::new();
    for _ in 0..4 {
        src.poll(&mut out);
    }
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(matches!(
        out[0],
        Reading::Counter {
            device: 0,
            energy_uj: 1_000_000,
            wrap_uj: None,
            ..
        }
    ));
    assert!(matches!(&out[1], Reading::Lost { device: 0, reason, .. } if reason == "gone"));
    assert!(matches!(
        out[2],
        Reading::Counter {
            energy_uj: 3_000_000,
            ..
        }
    ));
}

/// The real path: against this host's /sys, either RAPL opens and counts up, or the host
/// has no power PMU (VMs), or perf refuses (not root). Each outcome is asserted and printed.
#[test]
fn real_rapl_open_works_or_says_why() {
    match RaplSource::open(Path::new("/sys")) {
        Ok(mut src) => {
            assert!(!src.devices().is_empty());
            let mut first = Vec::new();
            src.poll(&mut first);
            std::thread::sleep(Duration::from_millis(50));
            let mut second = Vec::new();
            src.poll(&mut second);
            assert_eq!(first.len(), src.devices().len(), "{first:?}");
            assert_eq!(second.len(), src.devices().len(), "{second:?}");
            for (a, b) in first.iter().zip(&second) {
                let (Reading::Counter { energy_uj: a, .. }, Reading::Counter { energy_uj: b, .. }) =
                    (a, b)
                else {
                    panic!("not counters: {a:?} {b:?}");
                };
                assert!(b >= a, "counter went backwards: {a} -> {b}");
            }
            println!(
                "real RAPL: opened {:?}, readings {first:?} then {second:?}",
                src.devices().iter().map(|d| &d.name).collect::<Vec<_>>()
            );
        }
        Err(
            e @ PowerError::NotPresent {
                what: "no power PMU",
                ..
            },
        ) => {
            println!("real RAPL: {e} (expected on VMs)");
        }
        Err(PowerError::Rapl(msg)) if msg.contains("no usable energy-pkg event") => {
            // Seen on a KVM guest: the PMU offers only energy-psys, which counts nothing.
            println!("real RAPL: power PMU without a package counter: {msg}");
        }
        Err(PowerError::Rapl(msg))
            if msg.contains("perf_event_open")
                && (msg.contains("EACCES") || msg.contains("EPERM")) =>
        {
            println!("real RAPL: power PMU present but not permitted: {msg}");
        }
        Err(e) => panic!("real RAPL: unexpected error: {e}"),
    }
}
