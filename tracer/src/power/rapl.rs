//! RAPL energy counters through the perf `power` PMU (`<sysfs_root>/bus/event_source/devices/
//! power`): one system-wide counter per package and domain, opened on the CPU the PMU's
//! `cpumask` names for that package. Counts × the event's `.scale` (joules per count) give
//! energy; the kernel accumulates them in 64 bits, so they do not wrap in practice.
//!
//! Domains: `energy-pkg` (device `cpuP`, [`DeviceKind::CpuPackage`]), `energy-ram` (`dramP`,
//! [`DeviceKind::Dram`]) and `energy-psys` (`psys`, [`DeviceKind::Other`], opened once: it is
//! the whole platform and *includes* the packages and DRAM, so it must not be added to them).
//! `energy-cores` and `energy-gpu` are skipped: both are inside their package's counter.
//!
//! The sysfs files are parsed here (not by perf-event2's `DynamicBuilder`) so the root is
//! configurable and the tests run against fake trees; the counter itself is opened with
//! perf-event2's [`Builder`] and a [`Raw`] event whose type is set to the PMU's.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
};

use perf_event::{Builder, events::Raw};

use super::{
    PowerDevice, PowerError, PowerSource, Reading, counter_or_lost,
    cpu::{package_of, parse_cpu_list, read_trimmed},
    monotonic_ns,
};
use crate::ledger::DeviceKind;

/// The power PMU's directory under the sysfs root.
pub const PMU_DIR: &str = "bus/event_source/devices/power";
/// RAPL counters update about every millisecond.
pub const RAPL_PERIOD_NS: u64 = 1_000_000;

/// One event of the PMU, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct PmuEvent {
    /// File name, e.g. `energy-pkg`.
    pub name: String,
    pub config: u64,
    pub config1: u64,
    pub config2: u64,
    /// Joules per count (`<event>.scale`).
    pub scale: f64,
    /// `<event>.unit`, when present (`Joules`).
    pub unit: Option<String>,
}

/// The power PMU as sysfs describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerPmu {
    pub path: PathBuf,
    /// perf event type (`type`).
    pub ty: u32,
    /// One CPU per package, to open that package's counters on (`cpumask`).
    pub cpus: Vec<usize>,
    /// Events that parsed, sorted by name.
    pub events: Vec<PmuEvent>,
    /// Events that were present but unusable, with the reason.
    pub skipped: Vec<(String, String)>,
}

impl PowerPmu {
    /// The event called `name`.
    pub fn event(&self, name: &str) -> Option<&PmuEvent> {
        self.events.iter().find(|e| e.name == name)
    }
}

/// Where a format field goes in `perf_event_attr`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct FormatField {
    /// 0: `config`, 1: `config1`, 2: `config2`.
    word: u8,
    lo: u32,
    hi: u32,
}

fn rapl_err(path: &Path, what: &str) -> PowerError {
    PowerError::Rapl(format!("{}: {what}", path.display()))
}

/// Parses a format file (`config:0-7`, `config1:3`).
fn parse_format(text: &str) -> Option<FormatField> {
    let (word, bits) = text.trim().split_once(':')?;
    let word = match word {
        "config" => 0,
        "config1" => 1,
        "config2" => 2,
        _ => return None,
    };
    // Only contiguous fields (`lo-hi` or a single bit); split fields (`0-7,32-35`) are rare
    // and absent from the power PMU.
    let (lo, hi) = if let Some((lo, hi)) = bits.split_once('-') {
        (lo.parse().ok()?, hi.parse().ok()?)
    } else {
        let b = bits.parse().ok()?;
        (b, b)
    };
    (lo <= hi && hi < 64).then_some(FormatField { word, lo, hi })
}

fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses an event file (`event=0x02`, `event=0x02,umask=0x1`, a bare `flag` meaning 1) into
/// `[config, config1, config2]` with the PMU's format fields. Without a `format` directory,
/// `event` is taken as the whole of `config` (the power PMU's only field).
fn parse_event_terms(
    text: &str,
    format: &HashMap<String, FormatField>,
) -> Result<[u64; 3], String> {
    let mut words = [0u64; 3];
    let mut any = false;
    for term in text
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let (name, value) = match term.split_once('=') {
            Some((_, "?")) => return Err(format!("`{term}` needs a parameter")),
            Some((name, value)) => (
                name.trim(),
                parse_number(value).ok_or_else(|| format!("bad value in `{term}`"))?,
            ),
            None => (term, 1),
        };
        let field = match format.get(name) {
            Some(f) => *f,
            None if format.is_empty() && name == "event" => FormatField {
                word: 0,
                lo: 0,
                hi: 63,
            },
            None => return Err(format!("unknown field `{name}`")),
        };
        let width = field.hi - field.lo + 1;
        if width < 64 && value >> width != 0 {
            return Err(format!("`{term}` does not fit {width} bits"));
        }
        let mask = (u64::MAX >> (63 - field.hi)) & (u64::MAX << field.lo);
        let w = &mut words[usize::from(field.word)];
        *w = (*w & !mask) | ((value << field.lo) & mask);
        any = true;
    }
    if any {
        Ok(words)
    } else {
        Err("empty event".to_owned())
    }
}

/// Reads and parses the power PMU under `sysfs_root`. No PMU directory gives
/// [`PowerError::NotPresent`] ("no power PMU"); a malformed one [`PowerError::Rapl`].
pub fn parse_pmu(sysfs_root: &Path) -> Result<PowerPmu, PowerError> {
    let path = sysfs_root.join(PMU_DIR);
    if !path.is_dir() {
        return Err(PowerError::NotPresent {
            what: "no power PMU",
            path,
        });
    }
    let ty_path = path.join("type");
    let ty = read_trimmed(&ty_path)?
        .parse()
        .map_err(|_| rapl_err(&ty_path, "not a PMU type number"))?;
    let mask_path = path.join("cpumask");
    let cpus = parse_cpu_list(&read_trimmed(&mask_path)?)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| rapl_err(&mask_path, "not a CPU list"))?;

    let mut format = HashMap::new();
    if let Ok(entries) = std::fs::read_dir(path.join("format")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            match parse_format(&text) {
                Some(f) => {
                    format.insert(name, f);
                }
                None => {
                    return Err(rapl_err(&entry.path(), "unsupported format"));
                }
            }
        }
    }

    let events_dir = path.join("events");
    let entries = std::fs::read_dir(&events_dir).map_err(|source| PowerError::Sysfs {
        path: events_dir.clone(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains('.'))
        .collect();
    names.sort();
    let mut events = Vec::new();
    let mut skipped = Vec::new();
    for name in names {
        match parse_event(&events_dir, &name, &format) {
            Ok(e) => events.push(e),
            Err(why) => skipped.push((name, why)),
        }
    }
    Ok(PowerPmu {
        path,
        ty,
        cpus,
        events,
        skipped,
    })
}

fn parse_event(
    dir: &Path,
    name: &str,
    format: &HashMap<String, FormatField>,
) -> Result<PmuEvent, String> {
    let text = std::fs::read_to_string(dir.join(name)).map_err(|e| e.to_string())?;
    let [config, config1, config2] = parse_event_terms(&text, format)?;
    let scale_text =
        std::fs::read_to_string(dir.join(format!("{name}.scale"))).map_err(|_| "no .scale")?;
    let scale: f64 = scale_text
        .trim()
        .parse()
        .map_err(|_| format!("bad scale `{}`", scale_text.trim()))?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(format!("bad scale `{}`", scale_text.trim()));
    }
    let unit = std::fs::read_to_string(dir.join(format!("{name}.unit")))
        .ok()
        .map(|u| u.trim().to_owned());
    if let Some(u) = &unit
        && u != "Joules"
    {
        return Err(format!("unit `{u}`, not Joules"));
    }
    Ok(PmuEvent {
        name: name.to_owned(),
        config,
        config1,
        config2,
        scale,
        unit,
    })
}

/// One counter to open: which device, event and CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedCounter {
    pub device: PowerDevice,
    pub event: PmuEvent,
    pub cpu: usize,
    /// A package counter: failing to open it fails the source (others are skipped).
    pub required: bool,
}

fn device(name: String, kind: DeviceKind) -> PowerDevice {
    PowerDevice {
        name,
        kind,
        estimated: false,
        minor: None,
        uuid: None,
        pci_bus_id: None,
        wrap_uj: None,
    }
}

/// The counters to open for `pmu`: per `cpumask` CPU (= package) its `energy-pkg` and
/// `energy-ram`, then `energy-psys` once. Packages are numbered by `physical_package_id`
/// (by position in `cpumask` when unknown or repeated, e.g. one CPU per die).
pub fn plan(pmu: &PowerPmu, sysfs_root: &Path) -> Result<Vec<PlannedCounter>, PowerError> {
    let Some(pkg) = pmu.event("energy-pkg") else {
        // E.g. a VM whose PMU offers only `energy-psys` (seen counting nothing on a KVM guest).
        let present: Vec<&str> = pmu.events.iter().map(|e| e.name.as_str()).collect();
        return Err(rapl_err(
            &pmu.path,
            &format!(
                "no usable energy-pkg event (usable events: [{}])",
                present.join(", ")
            ),
        ));
    };
    let Some(&first_cpu) = pmu.cpus.first() else {
        return Err(rapl_err(&pmu.path, "empty cpumask"));
    };
    let mut ids: Vec<u32> = pmu
        .cpus
        .iter()
        .enumerate()
        .map(|(i, &cpu)| package_of(sysfs_root, cpu).unwrap_or(i as u32))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != ids.len() {
        ids = (0..ids.len() as u32).collect();
    }
    let mut out = Vec::new();
    for (&cpu, &id) in pmu.cpus.iter().zip(&ids) {
        out.push(PlannedCounter {
            device: device(format!("cpu{id}"), DeviceKind::CpuPackage),
            event: pkg.clone(),
            cpu,
            required: true,
        });
        if let Some(ram) = pmu.event("energy-ram") {
            out.push(PlannedCounter {
                device: device(format!("dram{id}"), DeviceKind::Dram),
                event: ram.clone(),
                cpu,
                required: false,
            });
        }
    }
    if let Some(psys) = pmu.event("energy-psys") {
        out.push(PlannedCounter {
            device: device("psys".to_owned(), DeviceKind::Other),
            event: psys.clone(),
            cpu: first_cpu,
            required: false,
        });
    }
    Ok(out)
}

/// A cumulative energy counter in the PMU's counts.
pub trait CountReader: Send {
    fn read_count(&mut self) -> io::Result<u64>;
}

impl CountReader for perf_event::Counter {
    fn read_count(&mut self) -> io::Result<u64> {
        self.read()
    }
}

/// `EACCES`-style name of an errno, for log lines.
fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EACCES) => "EACCES".to_owned(),
        Some(libc::EPERM) => "EPERM".to_owned(),
        Some(libc::ENOENT) => "ENOENT".to_owned(),
        Some(libc::ENODEV) => "ENODEV".to_owned(),
        Some(libc::EINVAL) => "EINVAL".to_owned(),
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP".to_owned(),
        Some(libc::EBUSY) => "EBUSY".to_owned(),
        _ => e.to_string(),
    }
}

/// Opens one system-wide counter (pid −1) for `event` of PMU type `ty` on `cpu`, enabled.
fn open_perf(ty: u32, event: &PmuEvent, cpu: usize) -> Result<perf_event::Counter, PowerError> {
    let mut b = Builder::new(
        Raw::new(event.config)
            .config1(event.config1)
            .config2(event.config2),
    );
    b.attrs_mut().type_ = ty;
    // The RAPL PMU rejects events that exclude any mode.
    b.one_cpu(cpu)
        .any_pid()
        .exclude_kernel(false)
        .exclude_hv(false);
    let what = |e: &io::Error| {
        PowerError::Rapl(format!(
            "perf_event_open({}, type {ty}, config {:#x}, cpu {cpu}): {} ({e})",
            event.name,
            event.config,
            errno_name(e)
        ))
    };
    let mut counter = b.build().map_err(|e| what(&e))?;
    counter.enable().map_err(|e| what(&e))?;
    Ok(counter)
}

struct Channel {
    reader: Box<dyn CountReader>,
    /// Microjoules per count.
    uj_per_count: f64,
    lost: bool,
}

/// The RAPL (perf) power source.
pub struct RaplSource {
    devices: Vec<PowerDevice>,
    channels: Vec<Channel>,
}

impl std::fmt::Debug for RaplSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaplSource")
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl RaplSource {
    /// Parses the power PMU under `sysfs_root` and opens its counters (root or
    /// `CAP_PERFMON`). A package counter that fails to open fails the source; DRAM and psys
    /// counters that fail are skipped with a warning.
    pub fn open(sysfs_root: &Path) -> Result<Self, PowerError> {
        let pmu = parse_pmu(sysfs_root)?;
        let planned = plan(&pmu, sysfs_root)?;
        let mut opened = Vec::new();
        for p in planned {
            match open_perf(pmu.ty, &p.event, p.cpu) {
                Ok(counter) => opened.push((p, Box::new(counter) as Box<dyn CountReader>)),
                Err(e) if !p.required => {
                    tracing::warn!("RAPL {}: skipped: {e}", p.device.name);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Self::from_readers(opened))
    }

    /// A source over already-open readers (the tests' fakes).
    pub fn from_readers(opened: Vec<(PlannedCounter, Box<dyn CountReader>)>) -> Self {
        let mut devices = Vec::new();
        let mut channels = Vec::new();
        for (p, reader) in opened {
            channels.push(Channel {
                reader,
                uj_per_count: p.event.scale * 1e6,
                lost: false,
            });
            devices.push(p.device);
        }
        Self { devices, channels }
    }
}

impl PowerSource for RaplSource {
    fn devices(&self) -> &[PowerDevice] {
        &self.devices
    }

    fn poll(&mut self, out: &mut Vec<Reading>) {
        for (index, ch) in self.channels.iter_mut().enumerate() {
            let ts_ns = monotonic_ns();
            let read = ch
                .reader
                .read_count()
                .map(|count| (count as f64 * ch.uj_per_count).round() as u64)
                .map_err(|e| e.to_string());
            counter_or_lost(
                out,
                &mut ch.lost,
                index,
                ts_ns,
                read,
                None,
                &format!("RAPL {}", self.devices[index].name),
            );
        }
    }

    fn counter_period_ns(&self, device: usize) -> Option<u64> {
        (device < self.devices.len()).then_some(RAPL_PERIOD_NS)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::*;
    use crate::power::cpu::testutil::TempTree;

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
                    let (
                        Reading::Counter { energy_uj: a, .. },
                        Reading::Counter { energy_uj: b, .. },
                    ) = (a, b)
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
}
