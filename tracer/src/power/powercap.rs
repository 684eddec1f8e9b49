//! RAPL energy counters through powercap sysfs (`<sysfs_root>/class/powercap/*rapl*:N[:M]`):
//! each zone's `energy_uj`, wrapping at `max_energy_range_uj`.
//!
//! Zones reported (no double counting):
//! - `package-N` (top-level) → device `cpuN`, [`DeviceKind::CpuPackage`];
//! - `dram` → `dramP` ([`DeviceKind::Dram`]), `P` its parent package's number (DRAM is a
//!   sibling domain, not part of the package counter, on every RAPL implementation);
//! - `psys` → `psys`, [`DeviceKind::Other`]: the whole platform, which *includes* the
//!   packages and DRAM — reported separately and must never be added to them.
//!
//! Skipped: `core` and `uncore` subzones (PP0/PP1) are inside their package's counter, so
//! adding them would count that energy twice; zones with other names are unknown; a zone whose
//! device name is already taken (e.g. `intel-rapl-mmio:0`, the same package through MMIO) is a
//! duplicate. Zone directories are visited in order (`intel-rapl:0` before
//! `intel-rapl-mmio:0`), so the MSR zone wins.
//!
//! `energy_uj` is root-only on kernels since the 2020 RAPL side-channel fix (CVE-2020-8694).

use std::path::{Path, PathBuf};

use super::{
    PowerDevice, PowerError, PowerSource, Reading, counter_or_lost, monotonic_ns,
    rapl::RAPL_PERIOD_NS, sysfs::read_trimmed,
};
use crate::ledger::DeviceKind;

/// The powercap class directory under the sysfs root.
pub const POWERCAP_DIR: &str = "class/powercap";

/// A zone to read.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    /// Zone directory, e.g. `/sys/class/powercap/intel-rapl:0`.
    pub dir: PathBuf,
    pub device: PowerDevice,
    pub max_energy_range_uj: u64,
}

/// What [`discover`] found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Discovery {
    pub zones: Vec<Zone>,
    /// Zone directory name and why it is not read.
    pub skipped: Vec<(String, String)>,
}

/// Splits `intel-rapl:0:1` into (`intel-rapl`, [0, 1]); `None` if not a zone name.
fn zone_key(name: &str) -> Option<(String, Vec<u32>)> {
    let mut parts = name.split(':');
    let prefix = parts.next()?;
    if !prefix.contains("rapl") {
        return None;
    }
    let idx: Option<Vec<u32>> = parts.map(|p| p.parse().ok()).collect();
    let idx = idx?;
    (!idx.is_empty()).then(|| (prefix.to_owned(), idx))
}

fn device(name: String, kind: DeviceKind, wrap: u64) -> PowerDevice {
    PowerDevice {
        name,
        kind,
        estimated: false,
        minor: None,
        uuid: None,
        pci_bus_id: None,
        wrap_uj: Some(wrap),
    }
}

/// Finds the RAPL zones under `sysfs_root` (see the module docs for which are kept). No
/// powercap directory or no RAPL zone gives [`PowerError::NotPresent`].
pub fn discover(sysfs_root: &Path) -> Result<Discovery, PowerError> {
    let root = sysfs_root.join(POWERCAP_DIR);
    let not_present = || PowerError::NotPresent {
        what: "no RAPL powercap zone",
        path: root.clone(),
    };
    let entries = std::fs::read_dir(&root).map_err(|_| not_present())?;
    let mut dirs: Vec<((String, Vec<u32>), String)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            zone_key(&name).map(|k| (k, name))
        })
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(not_present());
    }

    let mut found = Discovery::default();
    // Package number of each top-level zone, by (prefix, index), for its DRAM subzone.
    let mut packages: Vec<((String, u32), u32)> = Vec::new();
    let mut drams = 0u32;
    for ((prefix, idx), dir_name) in dirs {
        let dir = root.join(&dir_name);
        let skip = |found: &mut Discovery, why: String| found.skipped.push((dir_name.clone(), why));
        let zone_name = match read_trimmed(&dir.join("name")) {
            Ok(n) => n,
            Err(e) => {
                skip(&mut found, e.to_string());
                continue;
            }
        };
        let top = idx.len() == 1;
        let (name, kind) = if let Some(n) = zone_name.strip_prefix("package-") {
            if !top {
                skip(&mut found, format!("`{zone_name}` as a subzone"));
                continue;
            }
            let n: u32 = n.parse().unwrap_or(idx[0]);
            packages.push(((prefix.clone(), idx[0]), n));
            (format!("cpu{n}"), DeviceKind::CpuPackage)
        } else if zone_name == "dram" {
            let parent = packages
                .iter()
                .find(|(k, _)| !top && k.0 == prefix && k.1 == idx[0])
                .map(|(_, n)| *n);
            let n = parent.unwrap_or(drams);
            drams += 1;
            (format!("dram{n}"), DeviceKind::Dram)
        } else if zone_name == "psys" {
            ("psys".to_owned(), DeviceKind::Other)
        } else if zone_name == "core" || zone_name == "uncore" {
            skip(
                &mut found,
                format!("`{zone_name}` is inside its package (would double count)"),
            );
            continue;
        } else {
            skip(&mut found, format!("unknown zone `{zone_name}`"));
            continue;
        };
        if let Some(z) = found.zones.iter().find(|z| z.device.name == name) {
            let first = z
                .dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            skip(&mut found, format!("`{zone_name}` duplicates {first}"));
            continue;
        }
        let max_path = dir.join("max_energy_range_uj");
        let max = match read_trimmed(&max_path).map(|s| s.parse::<u64>()) {
            Ok(Ok(m)) if m > 0 => m,
            Ok(_) => {
                skip(&mut found, format!("bad {}", max_path.display()));
                continue;
            }
            Err(e) => {
                skip(&mut found, e.to_string());
                continue;
            }
        };
        found.zones.push(Zone {
            dir,
            device: device(name, kind, max),
            max_energy_range_uj: max,
        });
    }
    if found.zones.is_empty() {
        let why: Vec<String> = found
            .skipped
            .iter()
            .map(|(d, w)| format!("{d}: {w}"))
            .collect();
        return Err(PowerError::Powercap(format!(
            "no usable zone under {} ({})",
            root.display(),
            why.join("; ")
        )));
    }
    Ok(found)
}

fn read_energy(dir: &Path) -> Result<u64, String> {
    let path = dir.join("energy_uj");
    match std::fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{}: not a number: `{}`", path.display(), s.trim())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The powercap power source.
#[derive(Debug)]
pub struct PowercapSource {
    zones: Vec<Zone>,
    devices: Vec<PowerDevice>,
    lost: Vec<bool>,
    skipped: Vec<(String, String)>,
}

impl PowercapSource {
    /// Discovers the zones and checks that every `energy_uj` reads (it is root-only on current
    /// kernels).
    pub fn open(sysfs_root: &Path) -> Result<Self, PowerError> {
        let found = discover(sysfs_root)?;
        for z in &found.zones {
            if let Err(e) = read_energy(&z.dir) {
                return Err(PowerError::Powercap(format!(
                    "{e} (energy_uj is root-only on current kernels)"
                )));
            }
        }
        for (dir, why) in &found.skipped {
            tracing::debug!("powercap: {dir} skipped: {why}");
        }
        let devices = found.zones.iter().map(|z| z.device.clone()).collect();
        Ok(Self {
            lost: vec![false; found.zones.len()],
            zones: found.zones,
            devices,
            skipped: found.skipped,
        })
    }

    /// Zone directories not read, and why.
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }
}

impl PowerSource for PowercapSource {
    fn devices(&self) -> &[PowerDevice] {
        &self.devices
    }

    fn poll(&mut self, out: &mut Vec<Reading>) {
        for (index, zone) in self.zones.iter().enumerate() {
            let ts_ns = monotonic_ns();
            counter_or_lost(
                out,
                &mut self.lost[index],
                index,
                ts_ns,
                read_energy(&zone.dir),
                Some(zone.max_energy_range_uj),
                &format!("powercap {}", zone.device.name),
            );
        }
    }

    fn counter_period_ns(&self, device: usize) -> Option<u64> {
        (device < self.devices.len()).then_some(RAPL_PERIOD_NS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::testutil::TempTree;

    const MAX: &str = "262143328850";

    fn zone(t: &TempTree, dir: &str, name: &str, energy: &str) {
        let d = format!("sys/{POWERCAP_DIR}/{dir}");
        t.write(&format!("{d}/name"), &format!("{name}\n"));
        t.write(&format!("{d}/energy_uj"), &format!("{energy}\n"));
        t.write(&format!("{d}/max_energy_range_uj"), &format!("{MAX}\n"));
    }

    /// A two-socket server: packages with core/uncore/dram subzones, psys, an MMIO duplicate
    /// and the control-type directory.
    fn server(t: &TempTree) {
        t.write(&format!("sys/{POWERCAP_DIR}/intel-rapl/enabled"), "1\n");
        zone(t, "intel-rapl:0", "package-0", "100");
        zone(t, "intel-rapl:0:0", "core", "10");
        zone(t, "intel-rapl:0:1", "uncore", "11");
        zone(t, "intel-rapl:0:2", "dram", "20");
        zone(t, "intel-rapl:1", "package-1", "200");
        zone(t, "intel-rapl:1:0", "dram", "40");
        zone(t, "intel-rapl:2", "psys", "500");
        zone(t, "intel-rapl-mmio:0", "package-0", "101");
        t.write(&format!("sys/{POWERCAP_DIR}/dtpm/enabled"), "1\n");
    }

    #[test]
    fn discovers_packages_dram_psys_and_skips_subzones() {
        let t = TempTree::new("pc-discover");
        server(&t);
        let found = discover(&t.path().join("sys")).expect("discovers");
        let got: Vec<(&str, DeviceKind, Option<u64>)> = found
            .zones
            .iter()
            .map(|z| (z.device.name.as_str(), z.device.kind, z.device.wrap_uj))
            .collect();
        let w = Some(262_143_328_850);
        assert_eq!(
            got,
            [
                ("cpu0", DeviceKind::CpuPackage, w),
                ("dram0", DeviceKind::Dram, w),
                ("cpu1", DeviceKind::CpuPackage, w),
                ("dram1", DeviceKind::Dram, w),
                ("psys", DeviceKind::Other, w),
            ]
        );
        let skipped: Vec<&str> = found.skipped.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(
            skipped,
            ["intel-rapl:0:0", "intel-rapl:0:1", "intel-rapl-mmio:0"]
        );
        assert!(found.skipped[0].1.contains("double count"));
        assert!(found.skipped[2].1.contains("duplicates intel-rapl:0"));
        assert!(found.zones.iter().all(|z| !z.device.estimated));
    }

    #[test]
    fn no_powercap_is_not_present() {
        let t = TempTree::new("pc-none");
        let e = discover(t.path()).expect_err("nothing");
        assert!(matches!(e, PowerError::NotPresent { .. }), "{e}");
        t.write(&format!("{POWERCAP_DIR}/dtpm/enabled"), "1\n");
        let e = discover(t.path()).expect_err("no rapl");
        assert!(matches!(e, PowerError::NotPresent { .. }), "{e}");
        // Only subzones that must be skipped: an error that says why.
        zone(&t, "intel-rapl:0:0", "core", "1");
        let e = discover(&t.path().join("sys")).expect_err("only core");
        assert!(e.to_string().contains("double count"), "{e}");
    }

    #[test]
    fn readings_carry_wrap_and_counter_wraps() {
        let t = TempTree::new("pc-wrap");
        zone(&t, "intel-rapl:0", "package-0", "262143328850");
        let mut src = PowercapSource::open(&t.path().join("sys")).expect("opens");
        assert_eq!(src.counter_period_ns(0), Some(1_000_000));
        let mut out = Vec::new();
        src.poll(&mut out);
        t.write(
            &format!("sys/{POWERCAP_DIR}/intel-rapl:0/energy_uj"),
            "1234\n",
        );
        src.poll(&mut out);
        assert_eq!(out.len(), 2);
        let Reading::Counter {
            energy_uj: a,
            wrap_uj: wa,
            ts_ns: ta,
            ..
        } = out[0]
        else {
            panic!("{out:?}")
        };
        let Reading::Counter {
            energy_uj: b,
            wrap_uj: wb,
            ts_ns: tb,
            ..
        } = out[1]
        else {
            panic!("{out:?}")
        };
        assert_eq!((a, b), (262_143_328_850, 1234));
        assert_eq!(wa, Some(262_143_328_850));
        assert_eq!(wb, Some(262_143_328_850));
        assert!(tb >= ta);
    }

    #[test]
    fn vanishing_counter_is_lost_once_then_recovers() {
        let t = TempTree::new("pc-lost");
        zone(&t, "intel-rapl:0", "package-0", "100");
        zone(&t, "intel-rapl:0:0", "dram", "5");
        let mut src = PowercapSource::open(&t.path().join("sys")).expect("opens");
        let energy = format!("sys/{POWERCAP_DIR}/intel-rapl:0/energy_uj");
        let mut out = Vec::new();
        src.poll(&mut out);
        assert_eq!(out.len(), 2);
        t.remove(&energy);
        out.clear();
        src.poll(&mut out);
        src.poll(&mut out);
        src.poll(&mut out);
        let lost: Vec<&Reading> = out
            .iter()
            .filter(|r| matches!(r, Reading::Lost { .. }))
            .collect();
        assert_eq!(lost.len(), 1, "{out:?}");
        assert!(matches!(lost[0], Reading::Lost { device: 0, .. }));
        // The DRAM zone kept reading.
        assert_eq!(
            out.iter()
                .filter(|r| matches!(r, Reading::Counter { device: 1, .. }))
                .count(),
            3
        );
        t.write(&energy, "150\n");
        out.clear();
        src.poll(&mut out);
        assert!(matches!(
            out[0],
            Reading::Counter {
                device: 0,
                energy_uj: 150,
                ..
            }
        ));
        // And a second loss is reported again.
        t.write(&energy, "garbage\n");
        out.clear();
        src.poll(&mut out);
        assert!(
            matches!(&out[0], Reading::Lost { device: 0, reason, .. } if reason.contains("not a number"))
        );
    }

    #[test]
    fn unreadable_energy_fails_open() {
        let t = TempTree::new("pc-unreadable");
        zone(&t, "intel-rapl:0", "package-0", "100");
        t.remove(&format!("sys/{POWERCAP_DIR}/intel-rapl:0/energy_uj"));
        let e = PowercapSource::open(&t.path().join("sys")).expect_err("unreadable");
        assert!(matches!(e, PowerError::Powercap(_)), "{e}");
    }
}
