//! NVIDIA GPU discovery from procfs: which GPUs the machine has, and which processes hold which
//! GPU now.
//!
//! Sources (facts in `shared/notes/nvidia-driver.md`):
//! - `/proc/devices` gives the driver's character-device majors: 195 for the GPUs and the control
//!   node (registered as `nvidia-frontend` by older drivers, `nvidia`/`nvidiactl` by newer ones),
//!   and a dynamic one for `nvidia-uvm`.
//! - `/proc/driver/nvidia/gpus/<pci>/information` maps each device minor to the GPU's UUID, model
//!   and bus location. The minor is *not* the CUDA ordinal.
//! - A process uses GPU `N` when it has `/dev/nvidiaN` (195:N, N < 248) open, or when its address
//!   space still maps pages of it (`/proc/<pid>/maps`: user-mode doorbell and `USERD` pages outlive
//!   the fd). `/dev/nvidiactl` (195:255) and `/dev/nvidia-uvm` are recorded but are not occupancy:
//!   NVML-only processes open the control node without ever running work.
//!
//! Identity is taken from the device number (`st_rdev`) when the fd's target is a character
//! device, because containers rename nodes; otherwise from the node's name under the device root
//! (`/dev` in production; a temp directory of plain files in tests). A mapping is tied to the node
//! an fd of the same process identified when its file key (filesystem device and inode, the
//! `dev` and `inode` columns) matches that fd's target; otherwise it is matched by name.
//!
//! Checked on an H200 with driver 580.159.04: `/proc/devices` lists `195 nvidia`,
//! `195 nvidiactl` and `238 nvidia-uvm`; an NVML-only process (`nvidia-smi dmon`) holds fds on
//! `/dev/nvidia0`, `nvidiactl` and `nvidia-uvm` but maps only `nvidiactl`; a CUDA process (torch)
//! maps `/dev/nvidia0` (3 mappings), `nvidiactl` and `nvidia-uvm`. So an fd on a GPU is not a
//! context, a mapping is: [`ProcessGpus::mapped`] tells them apart. The mappings' `dev inode`
//! columns (`00:06 143`) equal the `st_dev`/`st_ino` of the fds' targets (rdev `c3:0`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::procfs::{ProcError, ProcFs};

/// The major number of the NVIDIA GPU and control nodes on Linux.
pub const NVIDIA_MAJOR: u32 = 195;
/// Device minors below this are GPUs (`/dev/nvidia0` … `/dev/nvidia247`).
pub const GPU_MINOR_LIMIT: u32 = 248;
/// The minor of `/dev/nvidiactl`.
pub const CTL_MINOR: u32 = 255;
/// The minor of `/dev/nvidia-uvm` (minor 1, `nvidia-uvm-tools`, is a profiling node, ignored).
pub const UVM_MINOR: u32 = 0;

/// Character-device majors of the NVIDIA driver, from `/proc/devices`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Majors {
    /// GPU and control nodes (195 when the driver is loaded).
    pub nvidia: Option<u32>,
    /// `nvidia-uvm` (dynamic).
    pub uvm: Option<u32>,
}

impl Majors {
    /// Reads `<proc_root>/devices`; a missing or unreadable file gives no majors.
    pub fn read(proc_root: &Path) -> Self {
        fs::read_to_string(proc_root.join("devices"))
            .map(|t| parse_proc_devices(&t))
            .unwrap_or_default()
    }
}

/// Parses the "Character devices:" section of `/proc/devices`.
pub fn parse_proc_devices(text: &str) -> Majors {
    let mut majors = Majors::default();
    let mut in_char = false;
    for line in text.lines() {
        let line = line.trim();
        if line.ends_with(':') {
            in_char = line == "Character devices:";
            continue;
        }
        if !in_char {
            continue;
        }
        let mut cols = line.split_whitespace();
        let (Some(num), Some(name), None) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        let Ok(num) = num.parse::<u32>() else {
            continue;
        };
        match name {
            "nvidia-frontend" | "nvidia" | "nvidiactl" => {
                majors.nvidia.get_or_insert(num);
            }
            "nvidia-uvm" => {
                majors.uvm.get_or_insert(num);
            }
            _ => {}
        }
    }
    majors
}

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct GpuInfo {
    /// Device minor (`/dev/nvidia<minor>`).
    pub minor: u32,
    /// `GPU-xxxxxxxx-…`.
    pub uuid: String,
    /// e.g. `NVIDIA H100 80GB HBM3`.
    pub model: String,
    /// PCI location, e.g. `0000:18:00.0`.
    pub bus: String,
}

/// Parses `/proc/driver/nvidia/gpus/<pci>/information`. All four fields are required.
pub fn parse_information(text: &str) -> Option<GpuInfo> {
    let (mut minor, mut uuid, mut model, mut bus) = (None, None, None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        match key.trim() {
            "Model" => model = Some(value.to_string()),
            "GPU UUID" => uuid = Some(value.to_string()),
            "Bus Location" => bus = Some(value.to_string()),
            "Device Minor" => minor = value.parse().ok(),
            _ => {}
        }
    }
    Some(GpuInfo {
        minor: minor?,
        uuid: uuid?,
        model: model?,
        bus: bus?,
    })
}

/// Every GPU under `<proc_root>/driver/nvidia/gpus/*/information`, by minor. Unreadable or
/// incomplete entries are skipped; no driver gives an empty list.
pub fn inventory(proc_root: &Path) -> Vec<GpuInfo> {
    let Ok(dir) = fs::read_dir(proc_root.join("driver/nvidia/gpus")) else {
        return Vec::new();
    };
    let mut gpus: Vec<GpuInfo> = dir
        .filter_map(Result::ok)
        .filter_map(|e| parse_information(&fs::read_to_string(e.path().join("information")).ok()?))
        .collect();
    gpus.sort_by_key(|g| g.minor);
    gpus.dedup_by_key(|g| g.minor);
    gpus
}

/// Which driver node something refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Node {
    /// `/dev/nvidia<minor>`.
    Gpu(u32),
    /// `/dev/nvidiactl`.
    Ctl,
    /// `/dev/nvidia-uvm`.
    Uvm,
}

/// Why a process is said to use a node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evidence {
    /// An open fd on the node.
    Fd { fd: u32, node: Node },
    /// The node is mapped into the address space (one entry per node, however many mappings).
    Map { node: Node },
}

/// What one process uses of the driver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProcessGpus {
    /// GPU minors held through fds or mappings.
    pub minors: BTreeSet<u32>,
    /// Holds or maps `/dev/nvidiactl` (not occupancy by itself).
    pub ctl: bool,
    /// Holds or maps `/dev/nvidia-uvm`.
    pub uvm: bool,
    pub evidence: Vec<Evidence>,
}

impl ProcessGpus {
    /// Whether nothing of the driver was found.
    pub fn is_empty(&self) -> bool {
        self.minors.is_empty() && !self.ctl && !self.uvm
    }

    /// GPU minors the process maps (a context exists, not only an fd).
    pub fn mapped(&self) -> BTreeSet<u32> {
        self.evidence
            .iter()
            .filter_map(|e| match e {
                Evidence::Map {
                    node: Node::Gpu(minor),
                } => Some(*minor),
                _ => None,
            })
            .collect()
    }

    fn add(&mut self, evidence: Evidence) {
        let (Evidence::Fd { node, .. } | Evidence::Map { node }) = evidence;
        match node {
            Node::Gpu(minor) => {
                self.minors.insert(minor);
            }
            Node::Ctl => self.ctl = true,
            Node::Uvm => self.uvm = true,
        }
        if !self.evidence.contains(&evidence) {
            self.evidence.push(evidence);
        }
    }
}

/// Classifies a device number by the driver's majors.
pub fn node_from_rdev(rdev: u64, majors: Majors) -> Option<Node> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    if majors.nvidia == Some(major) {
        if minor < GPU_MINOR_LIMIT {
            return Some(Node::Gpu(minor));
        }
        return (minor == CTL_MINOR).then_some(Node::Ctl);
    }
    (majors.uvm == Some(major) && minor == UVM_MINOR).then_some(Node::Uvm)
}

/// Classifies a path by name: `nvidia<N>`, `nvidiactl` or `nvidia-uvm` directly under
/// `device_root` or `/dev`.
pub fn node_from_path(path: &Path, device_root: &Path) -> Option<Node> {
    let parent = path.parent()?;
    if parent != device_root && parent != Path::new("/dev") {
        return None;
    }
    match path.file_name()?.to_str()? {
        "nvidiactl" => Some(Node::Ctl),
        "nvidia-uvm" => Some(Node::Uvm),
        name => {
            let digits = name.strip_prefix("nvidia")?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let minor: u32 = digits.parse().ok()?;
            (minor < GPU_MINOR_LIMIT).then_some(Node::Gpu(minor))
        }
    }
}

/// A file as `/proc/<pid>/maps` identifies it: the filesystem's device (major, minor) and the
/// inode. An fd's target gives the same key from `stat`, so a mapping can be tied to the node an
/// fd identified by device number even when the node's name says nothing (containers).
pub type FileKey = (u32, u32, u64);

/// One `/proc/<pid>/maps` line: the file key and the pathname, for file-backed mappings.
fn maps_entry(line: &str) -> Option<(FileKey, &str)> {
    // address perms offset dev inode [pathname]; the pathname may contain spaces.
    let mut cols = Vec::with_capacity(5);
    let mut rest = line.trim_start();
    for _ in 0..5 {
        let end = rest.find(char::is_whitespace)?;
        cols.push(rest.get(..end)?);
        rest = rest.get(end..)?.trim_start();
    }
    if rest.is_empty() {
        return None;
    }
    let (major, minor) = cols[3].split_once(':')?;
    let key = (
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
        cols[4].parse().ok()?,
    );
    Some((key, rest))
}

/// Driver nodes mapped in `/proc/<pid>/maps` text: by file key when an fd of the process
/// identified that file (`known`), else by name. Deleted files are skipped.
pub fn maps_nodes(
    text: &str,
    device_root: &Path,
    known: &BTreeMap<FileKey, Node>,
) -> BTreeSet<Node> {
    text.lines()
        .filter_map(maps_entry)
        .filter(|(_, p)| p.starts_with('/') && !p.ends_with(" (deleted)"))
        .filter_map(|(key, p)| {
            known
                .get(&key)
                .copied()
                .or_else(|| node_from_path(Path::new(p), device_root))
        })
        .collect()
}

/// The driver nodes a process uses now, from its fds and its maps. A gone or unreadable process
/// uses nothing.
pub fn process_gpus(procfs: &ProcFs, pid: u32, majors: Majors, device_root: &Path) -> ProcessGpus {
    let mut out = ProcessGpus::default();
    let mut known: BTreeMap<FileKey, Node> = BTreeMap::new();
    let fd_dir = procfs.proc_root.join(format!("{pid}/fd"));
    for (fd, link) in procfs.fd_links(pid) {
        // Sockets, pipes and anon inodes link to `type:[…]`, never to a path.
        if !link.is_absolute() {
            continue;
        }
        let meta = fs::metadata(fd_dir.join(fd.to_string())).ok();
        let by_rdev = meta
            .as_ref()
            .filter(|m| m.file_type().is_char_device())
            .and_then(|m| node_from_rdev(m.rdev(), majors));
        let Some(node) = by_rdev.or_else(|| node_from_path(&link, device_root)) else {
            continue;
        };
        if let Some(m) = &meta {
            known.insert((libc::major(m.dev()), libc::minor(m.dev()), m.ino()), node);
        }
        out.add(Evidence::Fd { fd, node });
    }
    if let Ok(maps) = fs::read_to_string(procfs.proc_root.join(format!("{pid}/maps"))) {
        for node in maps_nodes(&maps, device_root, &known) {
            out.add(Evidence::Map { node });
        }
    }
    out.evidence.sort();
    out
}

/// The driver use of every process that uses any (unreadable processes are skipped).
pub fn all_process_gpus(
    procfs: &ProcFs,
    majors: Majors,
    device_root: &Path,
) -> Result<BTreeMap<u32, ProcessGpus>, ProcError> {
    Ok(procfs
        .pids()?
        .into_iter()
        .filter_map(|pid| {
            let g = process_gpus(procfs, pid, majors, device_root);
            (!g.is_empty()).then_some((pid, g))
        })
        .collect())
}

/// Every process holding each GPU now (by fd or mapping), by minor.
pub fn gpu_holders(
    procfs: &ProcFs,
    majors: Majors,
    device_root: &Path,
) -> Result<BTreeMap<u32, BTreeSet<u32>>, ProcError> {
    Ok(holders_by_minor(&all_process_gpus(
        procfs,
        majors,
        device_root,
    )?))
}

/// Inverts per-process GPU use into holders by minor.
pub fn holders_by_minor(uses: &BTreeMap<u32, ProcessGpus>) -> BTreeMap<u32, BTreeSet<u32>> {
    let mut out: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for (&pid, g) in uses {
        for &minor in &g.minors {
            out.entry(minor).or_default().insert(pid);
        }
    }
    out
}

/// The default device root.
pub fn default_device_root() -> PathBuf {
    PathBuf::from("/dev")
}

#[cfg(test)]
mod tests;
