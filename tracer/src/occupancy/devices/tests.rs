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
            std::os::unix::fs::symlink(target, p.join("fd").join(fd.to_string())).expect("symlink");
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
