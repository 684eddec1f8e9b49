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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evidence {
    /// An open fd on the node.
    Fd { fd: u32, node: Node },
    /// The node is mapped into the address space (one entry per node, however many mappings).
    Map { node: Node },
}

/// What one process uses of the driver.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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
mod tests {
    use super::*;

    const DEVICES: &str = "Character devices:
  1 mem
  4 /dev/vc/0
  4 tty
 10 misc
195 nvidia-frontend
195 nvidia-modeset
507 nvidia-uvm
508 nvidia-nvlink
509 nvidia-caps

Block devices:
  7 loop
195 nvidia-uvm
";

    const INFORMATION: &str = "Model: \t\t NVIDIA H100 80GB HBM3
IRQ:   \t\t 377
GPU UUID: \t GPU-6f1a3c12-95b4-7e0d-2a8b-3c4d5e6f7a8b
Video BIOS: \t 96.00.99.00.01
Bus Type: \t PCIe
DMA Size: \t 52 bits
DMA Mask: \t 0xfffffffffffff
Bus Location: \t 0000:18:00.0
Device Minor: \t 3
GPU Firmware: \t 570.86.15
GPU Excluded:\t No
";

    /// Captured on an H200, driver 580.159.04.
    const H200_DEVICES: &str = "Character devices:\n  1 mem\n195 nvidia\n195 nvidiactl\n238 nvidia-uvm\n239 nvidia-nvswitch\n240 nvidia-nvlink\n241 nvidia-caps\n242 nvidia-caps-imex-channels\n\nBlock devices:\n  7 loop\n";
    const H200_INFORMATION: &str = "Model: \t\t NVIDIA H200\nIRQ:   \t\t 41\nGPU UUID: \t GPU-3cfe8311-52c8-3083-3d26-2dd162a534e4\nVideo BIOS: \t 96.00.a5.00.1a\nBus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\nBus Location: \t 0000:00:06.0\nDevice Minor: \t 0\nGPU Firmware: \t 580.159.04\nGPU Excluded:\t No\n";

    #[test]
    fn real_h200_captures() {
        assert_eq!(
            parse_proc_devices(H200_DEVICES),
            Majors {
                nvidia: Some(195),
                uvm: Some(238)
            }
        );
        assert_eq!(
            parse_information(H200_INFORMATION),
            Some(GpuInfo {
                minor: 0,
                uuid: "GPU-3cfe8311-52c8-3083-3d26-2dd162a534e4".into(),
                model: "NVIDIA H200".into(),
                bus: "0000:00:06.0".into(),
            })
        );
    }

    #[test]
    fn proc_devices_with_and_without_uvm() {
        assert_eq!(
            parse_proc_devices(DEVICES),
            Majors {
                nvidia: Some(195),
                uvm: Some(507)
            }
        );
        let newer = "Character devices:\n195 nvidia\n195 nvidiactl\n\nBlock devices:\n";
        assert_eq!(
            parse_proc_devices(newer),
            Majors {
                nvidia: Some(195),
                uvm: None
            }
        );
        let none = "Character devices:\n  1 mem\n\nBlock devices:\n  7 loop\n";
        assert_eq!(parse_proc_devices(none), Majors::default());
        // Entries in the block section do not count.
        assert_eq!(
            parse_proc_devices("Block devices:\n195 nvidia\n"),
            Majors::default()
        );
    }

    #[test]
    fn information_real_format_and_missing_fields() {
        let info = parse_information(INFORMATION).expect("parses");
        assert_eq!(
            info,
            GpuInfo {
                minor: 3,
                uuid: "GPU-6f1a3c12-95b4-7e0d-2a8b-3c4d5e6f7a8b".into(),
                model: "NVIDIA H100 80GB HBM3".into(),
                bus: "0000:18:00.0".into(),
            }
        );
        for drop in ["Device Minor", "GPU UUID", "Model", "Bus Location"] {
            let text: String = INFORMATION
                .lines()
                .filter(|l| !l.starts_with(drop))
                .flat_map(|l| [l, "\n"])
                .collect();
            assert_eq!(parse_information(&text), None, "without {drop}");
        }
        assert_eq!(
            parse_information(&INFORMATION.replace("Minor: \t 3", "Minor: \t x")),
            None
        );
    }

    #[test]
    fn inventory_scans_every_gpu_sorted_by_minor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gpus = dir.path().join("driver/nvidia/gpus");
        for (pci, minor) in [
            ("0000:3b:00.0", 1),
            ("0000:18:00.0", 0),
            ("0000:99:00.0", 9),
        ] {
            fs::create_dir_all(gpus.join(pci)).expect("mkdir");
            let text = if minor == 9 {
                "Model: broken\n".to_string()
            } else {
                INFORMATION
                    .replace("Minor: \t 3", &format!("Minor: \t {minor}"))
                    .replace("0000:18:00.0", pci)
            };
            fs::write(gpus.join(pci).join("information"), text).expect("write");
        }
        let inv = inventory(dir.path());
        assert_eq!(inv.iter().map(|g| g.minor).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(inv[1].bus, "0000:3b:00.0");
        assert!(inventory(&dir.path().join("nothing")).is_empty());
    }

    #[test]
    fn paths_and_rdevs_classify() {
        let root = Path::new("/tmp/devroot");
        assert_eq!(
            node_from_path(&root.join("nvidia7"), root),
            Some(Node::Gpu(7))
        );
        assert_eq!(
            node_from_path(Path::new("/dev/nvidiactl"), root),
            Some(Node::Ctl)
        );
        assert_eq!(
            node_from_path(Path::new("/dev/nvidia-uvm"), root),
            Some(Node::Uvm)
        );
        for no in [
            "/dev/nvidia-modeset",
            "/dev/nvidia-uvm-tools",
            "/dev/nvidia",
            "/dev/nvidia248",
            "/dev/nvidia1x",
            "/home/nvidia0",
            "/dev/dri/nvidia0",
        ] {
            assert_eq!(node_from_path(Path::new(no), root), None, "{no}");
        }
        let majors = Majors {
            nvidia: Some(195),
            uvm: Some(507),
        };
        assert_eq!(
            node_from_rdev(libc::makedev(195, 2), majors),
            Some(Node::Gpu(2))
        );
        assert_eq!(
            node_from_rdev(libc::makedev(195, 255), majors),
            Some(Node::Ctl)
        );
        assert_eq!(node_from_rdev(libc::makedev(195, 254), majors), None);
        assert_eq!(
            node_from_rdev(libc::makedev(507, 0), majors),
            Some(Node::Uvm)
        );
        assert_eq!(node_from_rdev(libc::makedev(507, 1), majors), None);
        assert_eq!(node_from_rdev(libc::makedev(1, 3), majors), None);
        assert_eq!(
            node_from_rdev(libc::makedev(195, 0), Majors::default()),
            None
        );
    }

    /// A fake procfs root and device root with plain files standing in for device nodes.
    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let dev = dir.path().join("dev");
            fs::create_dir_all(&dev).expect("mkdir");
            for name in ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null"] {
                fs::write(dev.join(name), "").expect("write");
            }
            Self { dir }
        }
        fn procfs(&self) -> ProcFs {
            ProcFs {
                proc_root: self.dir.path().join("proc"),
                cgroup_root: self.dir.path().join("cgroup"),
            }
        }
        fn dev(&self) -> PathBuf {
            self.dir.path().join("dev")
        }
        fn process(&self, pid: u32, fds: &[(u32, &str)], maps: &str) {
            let p = self.dir.path().join(format!("proc/{pid}"));
            fs::create_dir_all(p.join("fd")).expect("mkdir");
            fs::write(p.join("stat"), format!("{pid} (p{pid}) S 1 0 0")).expect("write");
            fs::write(p.join("maps"), maps).expect("write");
            for (fd, target) in fds {
                let target = if target.contains(':') {
                    PathBuf::from(target)
                } else {
                    self.dev().join(target)
                };
                std::os::unix::fs::symlink(target, p.join("fd").join(fd.to_string()))
                    .expect("symlink");
            }
        }
    }

    #[test]
    fn fds_by_name_under_the_device_root() {
        let f = Fake::new();
        f.process(
            10,
            &[
                (0, "null"),
                (3, "socket:[1234]"),
                (7, "nvidiactl"),
                (8, "nvidia1"),
                (9, "nvidia-uvm"),
            ],
            "",
        );
        let g = process_gpus(&f.procfs(), 10, Majors::default(), &f.dev());
        assert_eq!(g.minors, BTreeSet::from([1]));
        assert!(g.ctl && g.uvm);
        assert_eq!(
            g.evidence,
            vec![
                Evidence::Fd {
                    fd: 7,
                    node: Node::Ctl
                },
                Evidence::Fd {
                    fd: 8,
                    node: Node::Gpu(1)
                },
                Evidence::Fd {
                    fd: 9,
                    node: Node::Uvm
                },
            ]
        );
        assert!(g.mapped().is_empty());
        // Majors known but the stand-ins are plain files: names still count.
        let majors = Majors {
            nvidia: Some(195),
            uvm: Some(507),
        };
        assert_eq!(
            process_gpus(&f.procfs(), 10, majors, &f.dev()).minors,
            BTreeSet::from([1])
        );
        // A gone process uses nothing.
        assert!(process_gpus(&f.procfs(), 99, majors, &f.dev()).is_empty());
    }

    #[test]
    fn maps_show_gpus_after_fds_are_closed() {
        let f = Fake::new();
        let dev = f.dev();
        let maps = format!(
            "7f00a0000000-7f00a0200000 rw-s 00000000 00:05 812 {dev}/nvidia0
7f00a0200000-7f00a0400000 rw-s 00000000 00:05 812 {dev}/nvidia0
7f00a0400000-7f00a0600000 rw-s 00000000 00:05 810 /dev/nvidiactl
7f00a0600000-7f00a0800000 rw-s 00000000 00:05 813 /dev/nvidia1 (deleted)
7f00a0800000-7f00a0a00000 r-xp 00000000 103:02 4242 /usr/lib/x86_64-linux-gnu/libcuda.so.570.86.15
7f00a0a00000-7f00a0c00000 rw-p 00000000 00:00 0
7ffd4c1e0000-7ffd4c201000 rw-p 00000000 00:00 0 [stack]
",
            dev = dev.display()
        );
        f.process(20, &[], &maps);
        let g = process_gpus(&f.procfs(), 20, Majors::default(), &dev);
        assert_eq!(g.minors, BTreeSet::from([0]));
        assert!(g.ctl && !g.uvm);
        assert_eq!(
            g.evidence,
            vec![
                Evidence::Map { node: Node::Gpu(0) },
                Evidence::Map { node: Node::Ctl }
            ]
        );
        assert_eq!(g.mapped(), BTreeSet::from([0]));
        assert_eq!(maps_entry("garbage"), None);
        assert_eq!(
            maps_entry("1-2 r--p 0 fd:0a 77 /a path/with spaces"),
            Some(((0xfd, 0x0a, 77), "/a path/with spaces"))
        );
    }

    #[test]
    fn maps_of_a_renamed_node_follow_the_fd_that_identified_it() {
        let f = Fake::new();
        let meta = fs::metadata(f.dev().join("nvidia1")).expect("stat");
        let maps = format!(
            "7f00a0000000-7f00a0200000 rw-s 00000000 {:02x}:{:02x} {} /container/dev/gpu-b\n",
            libc::major(meta.dev()),
            libc::minor(meta.dev()),
            meta.ino()
        );
        f.process(40, &[(5, "nvidia1")], &maps);
        // Real lines (H200, torch): the node's filesystem device and inode, then its path.
        let real =
            "200600000-200800000 rw-s 00000000 00:06 143                              /dev/nvidia0
204a00000-204c00000 rw-s 204a00000 00:06 144                             /dev/nvidia-uvm
";
        assert_eq!(
            maps_entry(real.lines().next().expect("line")),
            Some(((0, 6, 143), "/dev/nvidia0"))
        );
        assert_eq!(
            maps_nodes(real, &f.dev(), &BTreeMap::new()),
            BTreeSet::from([Node::Gpu(0), Node::Uvm])
        );
        let g = process_gpus(&f.procfs(), 40, Majors::default(), &f.dev());
        assert_eq!(g.mapped(), BTreeSet::from([1]));
        // Without the fd, an unknown name maps to nothing.
        f.process(41, &[], &maps);
        assert!(process_gpus(&f.procfs(), 41, Majors::default(), &f.dev()).is_empty());
    }

    #[test]
    fn holders_over_all_processes() {
        let f = Fake::new();
        let dev = f.dev();
        f.process(30, &[(5, "nvidia0")], "");
        f.process(31, &[(5, "nvidia0"), (6, "nvidia1")], "");
        f.process(32, &[(5, "nvidiactl")], "");
        f.process(
            33,
            &[],
            &format!("1-2 rw-s 0 00:05 1 {}/nvidia1\n", dev.display()),
        );
        let holders = gpu_holders(&f.procfs(), Majors::default(), &dev).expect("holders");
        assert_eq!(
            holders,
            BTreeMap::from([(0, BTreeSet::from([30, 31])), (1, BTreeSet::from([31, 33]))])
        );
    }

    #[test]
    #[ignore = "needs a live CUDA process: set TRACER_LIVE_GPU_PID"]
    fn live_gpu_process() {
        let Ok(pid) = std::env::var("TRACER_LIVE_GPU_PID") else {
            return;
        };
        let pid: u32 = pid.parse().expect("pid");
        let procfs = ProcFs::default();
        let majors = Majors::read(Path::new("/proc"));
        let g = process_gpus(&procfs, pid, majors, Path::new("/dev"));
        let holders = gpu_holders(&procfs, majors, Path::new("/dev")).expect("holders");
        println!(
            "{majors:?}\n{g:?}\n{holders:?}\n{:?}",
            inventory(Path::new("/proc"))
        );
        assert!(majors.nvidia.is_some() && majors.uvm.is_some());
        assert!(!g.mapped().is_empty(), "a CUDA process maps its GPU");
        assert!(g.evidence.iter().any(|e| matches!(e, Evidence::Fd { .. })));
    }

    #[test]
    fn real_char_device_is_classified_by_rdev() {
        // /dev/null is 1:3 everywhere; pretend the driver's major is 1 to exercise the rdev path
        // on a host without NVIDIA nodes.
        let file = fs::File::open("/dev/null").expect("open /dev/null");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file) as u32;
        let procfs = ProcFs::default();
        let majors = Majors {
            nvidia: Some(1),
            uvm: None,
        };
        let g = process_gpus(
            &procfs,
            std::process::id(),
            majors,
            Path::new("/nonexistent"),
        );
        assert!(
            g.evidence.contains(&Evidence::Fd {
                fd,
                node: Node::Gpu(3)
            }),
            "{g:?}"
        );
    }
}
