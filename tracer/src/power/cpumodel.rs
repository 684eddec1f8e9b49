//! Modelled CPU power for hosts without RAPL (VMs): per package,
//! `idle_w + (max_w − idle_w) × busy fraction` over the time since the previous poll, the busy
//! fraction from `<proc_root>/stat`'s per-CPU jiffies summed over the package's CPUs.
//!
//! Busy is `user + nice + system + irq + softirq` (guest time is already inside user/nice);
//! not busy is `idle + iowait`. `steal` (the hypervisor running someone else on our vCPU) is
//! neither: the fraction is of the time the vCPUs actually had. Packages come from
//! `<sysfs_root>/devices/system/cpu/cpuN/topology/physical_package_id`; a CPU without one is in
//! package 0 (typical for VMs: one package).
//!
//! Every device is marked estimated and named `cpuN-model`. The idle and busy watts are
//! configured guesses (`model_idle_watts`, `model_max_watts` in `[power.cpu]`); the readings are
//! [`Reading::Power`] averages whose window is the time since the previous poll. A poll that
//! comes before any jiffy has passed emits nothing and widens the next window; a package whose
//! CPUs counted no jiffy while others did (all offline) gets no reading for that window. CPUs
//! that come online later are placed by their package id, or in the first package when that
//! package was not seen at open.
//! When `/proc/stat` cannot be read every device gets one [`Reading::Lost`]; the next good read
//! starts a fresh window (nothing is emitted for the gap), and readings resume after it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use super::{PowerDevice, PowerError, PowerSource, Reading, monotonic_ns, sysfs::package_of};
use crate::ledger::DeviceKind;

/// Busy and not-busy jiffies of one CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub idle: u64,
}

/// Parses `/proc/stat`'s per-CPU lines (`cpuN user nice system idle iowait irq softirq steal
/// ...`). Lines with fewer than four numbers are ignored; missing later fields count as zero.
pub fn parse_stat(text: &str) -> BTreeMap<usize, CpuTimes> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let Some(label) = it.next() else { continue };
        let Some(cpu) = label
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let v: Vec<u64> = it.map_while(|f| f.parse().ok()).collect();
        if v.len() < 4 {
            continue;
        }
        let f = |i: usize| v.get(i).copied().unwrap_or(0);
        out.insert(
            cpu,
            CpuTimes {
                busy: f(0)
                    .saturating_add(f(1))
                    .saturating_add(f(2))
                    .saturating_add(f(5))
                    .saturating_add(f(6)),
                idle: f(3).saturating_add(f(4)),
            },
        );
    }
    out
}

/// `/proc/stat`, kept open and read again from offset 0 at every poll (a seq file starts over
/// there) into a buffer kept between polls: at 50 polls a second the open, `statx`, close and
/// allocation of a fresh read cost as much as the read. A failed read closes it; the next poll
/// opens it again.
#[derive(Debug)]
struct StatFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    buf: Vec<u8>,
}

impl StatFile {
    fn read(&mut self) -> std::io::Result<&str> {
        use std::os::unix::fs::FileExt as _;

        let file = match &self.file {
            Some(f) => f,
            None => self.file.insert(std::fs::File::open(&self.path)?),
        };
        let mut n = 0;
        let got = loop {
            if n == self.buf.len() {
                self.buf.resize((2 * n).max(4096), 0);
            }
            match file.read_at(&mut self.buf[n..], n as u64) {
                Ok(0) => break Ok(n),
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        match got {
            Ok(n) => std::str::from_utf8(&self.buf[..n])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) => {
                self.file = None;
                Err(e)
            }
        }
    }
}

/// The modelled CPU power source.
#[derive(Debug)]
pub struct CpuModelSource {
    stat: StatFile,
    sysfs_root: PathBuf,
    idle_w: f64,
    max_w: f64,
    devices: Vec<PowerDevice>,
    /// Device index of each package id.
    package_device: BTreeMap<u32, usize>,
    /// Device index of each CPU seen.
    cpu_device: BTreeMap<usize, usize>,
    prev: Option<(u64, BTreeMap<usize, CpuTimes>)>,
    lost: bool,
}

impl CpuModelSource {
    /// Reads the CPU topology and a first `/proc/stat` snapshot (the first poll's window
    /// starts here). `idle_w`/`max_w`: watts per package idle and fully busy.
    pub fn open(
        sysfs_root: &Path,
        proc_root: &Path,
        idle_w: f64,
        max_w: f64,
    ) -> Result<Self, PowerError> {
        if !(idle_w.is_finite() && max_w.is_finite() && idle_w >= 0.0 && max_w >= idle_w) {
            return Err(PowerError::CpuModel(format!(
                "model watts must satisfy 0 <= idle ({idle_w}) <= max ({max_w})"
            )));
        }
        let stat_path = proc_root.join("stat");
        let ts = monotonic_ns();
        let text = std::fs::read_to_string(&stat_path).map_err(|source| PowerError::Sysfs {
            path: stat_path.clone(),
            source,
        })?;
        let snap = parse_stat(&text);
        if snap.is_empty() {
            return Err(PowerError::CpuModel(format!(
                "no per-CPU lines in {}",
                stat_path.display()
            )));
        }
        let packages: BTreeMap<usize, u32> = snap
            .keys()
            .map(|&cpu| (cpu, package_of(sysfs_root, cpu).unwrap_or(0)))
            .collect();
        let mut ids: Vec<u32> = packages.values().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        let devices: Vec<PowerDevice> = ids
            .iter()
            .map(|id| PowerDevice {
                name: format!("cpu{id}-model"),
                kind: DeviceKind::CpuPackage,
                estimated: true,
                minor: None,
                uuid: None,
                pci_bus_id: None,
                wrap_uj: None,
            })
            .collect();
        let package_device: BTreeMap<u32, usize> =
            ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let cpu_device = packages
            .iter()
            .map(|(&cpu, id)| (cpu, package_device.get(id).copied().unwrap_or(0)))
            .collect();
        Ok(Self {
            stat: StatFile {
                path: stat_path,
                file: None,
                buf: Vec::new(),
            },
            sysfs_root: sysfs_root.to_owned(),
            idle_w,
            max_w,
            devices,
            package_device,
            cpu_device,
            prev: Some((ts, snap)),
            lost: false,
        })
    }

    /// The device of `cpu`, learning CPUs that came online after `open`.
    fn device_of(&mut self, cpu: usize) -> usize {
        if let Some(&d) = self.cpu_device.get(&cpu) {
            return d;
        }
        let id = package_of(&self.sysfs_root, cpu).unwrap_or(0);
        let d = self.package_device.get(&id).copied().unwrap_or(0);
        self.cpu_device.insert(cpu, d);
        d
    }
}

impl PowerSource for CpuModelSource {
    fn devices(&self) -> &[PowerDevice] {
        &self.devices
    }

    fn poll(&mut self, out: &mut Vec<Reading>) {
        let ts_ns = monotonic_ns();
        let snap = match self.stat.read() {
            Ok(text) => parse_stat(text),
            Err(e) => {
                if !self.lost {
                    self.lost = true;
                    self.prev = None;
                    tracing::warn!(
                        "CPU model: {}: {e}; a gap until it reads again",
                        self.stat.path.display()
                    );
                    for device in 0..self.devices.len() {
                        out.push(Reading::Lost {
                            device,
                            ts_ns,
                            reason: e.to_string(),
                        });
                    }
                }
                return;
            }
        };
        self.lost = false;
        let Some((prev_ts, prev)) = self.prev.take() else {
            // First good read after a loss: a fresh window starts here.
            self.prev = Some((ts_ns, snap));
            return;
        };
        let mut busy = vec![0u64; self.devices.len()];
        let mut total = vec![0u64; self.devices.len()];
        for (&cpu, now) in &snap {
            let Some(before) = prev.get(&cpu) else {
                continue;
            };
            let d = self.device_of(cpu);
            let b = now.busy.saturating_sub(before.busy);
            let i = now.idle.saturating_sub(before.idle);
            busy[d] += b;
            total[d] += b + i;
        }
        if total.iter().all(|&t| t == 0) {
            // Too soon for a jiffy: keep the old baseline, widen the window.
            self.prev = Some((prev_ts, prev));
            return;
        }
        let window_ns = ts_ns.saturating_sub(prev_ts);
        for (device, (&b, &t)) in busy.iter().zip(&total).enumerate() {
            if t == 0 {
                // No jiffy on this package (all its CPUs offline): no figure for this window.
                continue;
            }
            let fraction = (b as f64 / t as f64).clamp(0.0, 1.0);
            out.push(Reading::Power {
                device,
                ts_ns,
                watts: self.idle_w + (self.max_w - self.idle_w) * fraction,
                window_ns,
            });
        }
        self.prev = Some((ts_ns, snap));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::testutil::TempTree;

    /// `/proc/stat` with per-CPU (busy-ish user, idle) jiffies.
    fn stat(cpus: &[(u64, u64)]) -> String {
        use std::fmt::Write as _;

        let mut s = String::from("cpu  0 0 0 0 0 0 0 0 0 0\n");
        for (n, (user, idle)) in cpus.iter().enumerate() {
            // user nice system idle iowait irq softirq steal guest guest_nice
            let _ = writeln!(s, "cpu{n} {user} 0 0 {idle} 0 0 0 7 0 0");
        }
        s.push_str("intr 1 2 3\nctxt 5\nbtime 1\n");
        s
    }

    fn two_packages(t: &TempTree) {
        for (cpu, pkg) in [(0, 0), (1, 0), (2, 1), (3, 1)] {
            t.write(
                &format!("sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id"),
                &format!("{pkg}\n"),
            );
        }
    }

    fn watts(r: &Reading) -> (usize, f64, u64, u64) {
        match r {
            Reading::Power {
                device,
                watts,
                ts_ns,
                window_ns,
            } => (*device, *watts, *ts_ns, *window_ns),
            other => panic!("not power: {other:?}"),
        }
    }

    #[test]
    fn parses_proc_stat() {
        let m = parse_stat(
            "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\ncpu1 1 1 1 1\ncpu2 1 1\n\
             cpufreq 1 2 3 4\nintr 1\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[&0],
            CpuTimes {
                busy: 1 + 2 + 3 + 6 + 7,
                idle: 4 + 5
            }
        );
        assert_eq!(m[&1], CpuTimes { busy: 3, idle: 1 });
    }

    #[test]
    fn model_watts_per_package_from_busy_fraction() {
        let t = TempTree::new("model");
        two_packages(&t);
        t.write("proc/stat", &stat(&[(0, 0), (0, 0), (0, 0), (0, 0)]));
        let mut src =
            CpuModelSource::open(&t.path().join("sys"), &t.path().join("proc"), 40.0, 200.0)
                .expect("opens");
        let names: Vec<&str> = src.devices().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["cpu0-model", "cpu1-model"]);
        assert!(
            src.devices()
                .iter()
                .all(|d| d.estimated && d.kind == DeviceKind::CpuPackage)
        );
        assert_eq!(src.counter_period_ns(0), None);

        // Package 0: 100 busy of 200 → 50 % → 120 W. Package 1: 50 of 200 → 25 % → 80 W.
        t.write(
            "proc/stat",
            &stat(&[(100, 0), (0, 100), (50, 50), (0, 100)]),
        );
        let mut out = Vec::new();
        src.poll(&mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        let (d0, w0, ts1, win1) = watts(&out[0]);
        let (d1, w1, _, _) = watts(&out[1]);
        assert_eq!((d0, d1), (0, 1));
        assert!((w0 - 120.0).abs() < 1e-9, "{w0}");
        assert!((w1 - 80.0).abs() < 1e-9, "{w1}");
        assert!(win1 > 0 && win1 <= ts1);

        // All busy, then all idle: max and idle watts; windows tile.
        t.write(
            "proc/stat",
            &stat(&[(200, 0), (100, 100), (150, 50), (100, 100)]),
        );
        out.clear();
        src.poll(&mut out);
        let (_, w0, ts2, win2) = watts(&out[0]);
        assert!((w0 - 200.0).abs() < 1e-9);
        assert!((watts(&out[1]).1 - 200.0).abs() < 1e-9);
        assert_eq!(ts2 - win2, ts1);

        // No jiffy passed: nothing now, and the next window covers both polls.
        out.clear();
        src.poll(&mut out);
        assert!(out.is_empty(), "{out:?}");
        t.write(
            "proc/stat",
            &stat(&[(200, 100), (100, 200), (150, 150), (100, 200)]),
        );
        src.poll(&mut out);
        let (_, w0, ts3, win3) = watts(&out[0]);
        assert!((w0 - 40.0).abs() < 1e-9);
        assert_eq!(ts3 - win3, ts2);
    }

    #[test]
    fn one_package_without_topology() {
        let t = TempTree::new("model-vm");
        t.write("proc/stat", &stat(&[(0, 0), (0, 0)]));
        let mut src =
            CpuModelSource::open(&t.path().join("sys"), &t.path().join("proc"), 10.0, 30.0)
                .expect("opens");
        assert_eq!(src.devices().len(), 1);
        assert_eq!(src.devices()[0].name, "cpu0-model");
        // 30 busy of 40 → 75 % → 10 + 20 × 0.75 = 25 W.
        t.write("proc/stat", &stat(&[(20, 0), (10, 10)]));
        let mut out = Vec::new();
        src.poll(&mut out);
        assert!((watts(&out[0]).1 - 25.0).abs() < 1e-9, "{out:?}");
    }

    #[test]
    fn unreadable_stat_is_lost_once_then_recovers() {
        let t = TempTree::new("model-lost");
        t.write("proc/stat", &stat(&[(0, 0)]));
        let mut src =
            CpuModelSource::open(&t.path().join("sys"), &t.path().join("proc"), 40.0, 200.0)
                .expect("opens");
        t.remove("proc/stat");
        let mut out = Vec::new();
        src.poll(&mut out);
        src.poll(&mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(matches!(out[0], Reading::Lost { device: 0, .. }));
        out.clear();
        t.write("proc/stat", &stat(&[(10, 10)]));
        src.poll(&mut out); // fresh baseline
        assert!(out.is_empty(), "{out:?}");
        t.write("proc/stat", &stat(&[(20, 20)]));
        src.poll(&mut out);
        assert!((watts(&out[0]).1 - 120.0).abs() < 1e-9, "{out:?}");
    }

    #[test]
    fn bad_config_or_stat_fails_open() {
        let t = TempTree::new("model-bad");
        let sys = t.path().join("sys");
        let proc = t.path().join("proc");
        assert!(matches!(
            CpuModelSource::open(&sys, &proc, 40.0, 200.0),
            Err(PowerError::Sysfs { .. })
        ));
        t.write("proc/stat", "cpu  1 2 3 4\n");
        assert!(matches!(
            CpuModelSource::open(&sys, &proc, 40.0, 200.0),
            Err(PowerError::CpuModel(_))
        ));
        t.write("proc/stat", &stat(&[(0, 0)]));
        assert!(matches!(
            CpuModelSource::open(&sys, &proc, 200.0, 40.0),
            Err(PowerError::CpuModel(_))
        ));
        assert!(matches!(
            CpuModelSource::open(&sys, &proc, f64::NAN, 40.0),
            Err(PowerError::CpuModel(_))
        ));
    }
}
