//! The perf `power` PMU as sysfs describes it (`type`, `cpumask`, `format/`, `events/` with
//! their `.scale` and `.unit`), parsed here rather than by perf-event2's `DynamicBuilder` so the
//! root is configurable and the tests run against fake trees; and the plan of which counter to
//! open on which CPU for which device.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use crate::{
    ledger::DeviceKind,
    power::{
        PowerDevice, PowerError,
        sysfs::{package_of, parse_cpu_list, read_trimmed},
    },
};

/// The power PMU's directory under the sysfs root.
pub const PMU_DIR: &str = "bus/event_source/devices/power";

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
pub(super) struct FormatField {
    /// 0: `config`, 1: `config1`, 2: `config2`.
    pub(super) word: u8,
    pub(super) lo: u32,
    pub(super) hi: u32,
}

fn rapl_err(path: &Path, what: &str) -> PowerError {
    PowerError::Rapl(format!("{}: {what}", path.display()))
}

/// Parses a format file (`config:0-7`, `config1:3`).
pub(super) fn parse_format(text: &str) -> Option<FormatField> {
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
pub(super) fn parse_event_terms(
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
