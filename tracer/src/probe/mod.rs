//! Loading, configuring and attaching the eBPF probes, and access to their maps.
//!
//! Dropping [`Probes`] detaches every program (aya closes the links), so a clean shutdown is
//! simply letting it go out of scope.
//!
//! Submodules: [`decode`] turns ring-buffer records into typed events; [`targets`] resolves what
//! the operator asked to trace into processes.

mod cuda;
pub mod decode;
mod floor;
mod stats;
pub mod targets;
mod tls;
mod traced;
mod uprobes;

pub use self::{cuda::CUDA_SYMBOLS, floor::Floor, stats::KernelStats, tls::TLS_SYMBOLS};

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use tracer_ebpf::abi::{self, ConnState, FdKey, GpuKey, GpuUse, ProbeConfig, STAT_SLOTS, UvmKey};

/// The compiled probes, embedded at build time.
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-probes"));

/// Where tracefs is expected (and mounted if missing).
const TRACEFS: &str = "/sys/kernel/tracing";

/// `(category, tracepoint)` pairs the daemon attaches, each to the program of the same name.
pub const TRACEPOINTS: &[(&str, &str)] = &[
    ("syscalls", "sys_enter_fcntl"),
    ("syscalls", "sys_exit_fcntl"),
    ("syscalls", "sys_enter_dup"),
    ("syscalls", "sys_exit_dup"),
    ("syscalls", "sys_enter_dup2"),
    ("syscalls", "sys_exit_dup2"),
    ("syscalls", "sys_enter_dup3"),
    ("syscalls", "sys_exit_dup3"),
    ("syscalls", "sys_enter_socket"),
    ("syscalls", "sys_exit_socket"),
    ("syscalls", "sys_enter_accept"),
    ("syscalls", "sys_exit_accept"),
    ("syscalls", "sys_enter_accept4"),
    ("syscalls", "sys_exit_accept4"),
    ("syscalls", "sys_enter_connect"),
    ("syscalls", "sys_exit_connect"),
    ("syscalls", "sys_enter_read"),
    ("syscalls", "sys_exit_read"),
    ("syscalls", "sys_enter_readv"),
    ("syscalls", "sys_exit_readv"),
    ("syscalls", "sys_enter_recvfrom"),
    ("syscalls", "sys_exit_recvfrom"),
    ("syscalls", "sys_enter_recvmsg"),
    ("syscalls", "sys_exit_recvmsg"),
    ("syscalls", "sys_enter_write"),
    ("syscalls", "sys_exit_write"),
    ("syscalls", "sys_enter_writev"),
    ("syscalls", "sys_exit_writev"),
    ("syscalls", "sys_enter_sendto"),
    ("syscalls", "sys_exit_sendto"),
    ("syscalls", "sys_enter_sendmsg"),
    ("syscalls", "sys_exit_sendmsg"),
    ("syscalls", "sys_enter_close"),
    ("syscalls", "sys_enter_openat"),
    ("syscalls", "sys_exit_openat"),
    ("syscalls", "sys_enter_ioctl"),
    ("syscalls", "sys_exit_ioctl"),
    ("sched", "sched_process_fork"),
    ("sched", "sched_process_exec"),
    ("sched", "sched_process_exit"),
];

/// Errors from loading or driving the probes.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel refused the object (verifier, missing privileges, no BTF...).
    #[error("loading the eBPF object failed (are you root? is BPF enabled?): {0}")]
    Load(#[from] aya::EbpfError),
    /// A program named in [`TRACEPOINTS`] is not in the object (build mismatch).
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    /// A program could not be loaded into the kernel or attached to its tracepoint.
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map the daemon needs is missing or has the wrong type.
    #[error("map {name}: {detail}")]
    Map { name: &'static str, detail: String },
    /// Reading or updating a map failed.
    #[error("map operation on {name}: {source}")]
    MapOp {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// tracefs is not mounted and could not be mounted.
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed: {0}")]
    Tracefs(std::io::Error),
    /// The configured device root does not fit the probe's prefix buffer.
    #[error("device root prefix {0:?} is longer than {max} bytes", max = abi::DEV_PREFIX_MAX)]
    DevicePrefixTooLong(PathBuf),
    /// No symbol of a uprobe family (CUDA driver API, OpenSSL) could be probed in a library
    /// (not that library, or uprobes unavailable); the error of the last symbol tried.
    #[error("no {family} uprobe attached to {}: {source}", library.display())]
    Library {
        family: &'static str,
        library: PathBuf,
        #[source]
        source: Box<ProbeError>,
    },
}

/// What the loader configures in the probes.
#[derive(Debug, Clone)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches, each a config key"
)]
pub struct ProbeSettings {
    /// Ring-buffer size in bytes (a power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Payload bytes copied per socket syscall.
    pub capture_bytes: u32,
    /// Bytes copied per read of a request on a server connection (in records of
    /// `capture_bytes`).
    pub request_capture_bytes: u32,
    /// Directory holding the GPU device nodes (`/dev` on a real host).
    pub device_root: PathBuf,
    /// Whether the cgroup map will hold targets.
    pub filter_cgroup: bool,
    /// Whether the comm map will hold targets.
    pub filter_comm: bool,
    /// Also report every ioctl on a device fd (debugging; the GPU state changes are always
    /// reported).
    pub ioctl_events: bool,
    /// The device nodes are stand-in files (an emulated host): decode their ioctls although
    /// the kernel rejects them with `ENOTTY`.
    pub standin_devices: bool,
    /// Follow targets' Unix-socket connections as IPC (timing and length, no payload).
    pub ipc: bool,
}

/// Mounts tracefs if it is not mounted (syscall tracepoints are found through it).
pub fn ensure_tracefs() -> Result<(), ProbeError> {
    let events = Path::new(TRACEFS).join("events");
    if events.is_dir() {
        return Ok(());
    }
    let target = CString::new(TRACEFS).map_err(|e| ProbeError::Tracefs(e.into()))?;
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ProbeError::Tracefs(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted tracefs at {TRACEFS}");
    Ok(())
}

/// The object's tracepoint program `name`, loaded into the kernel (not yet attached).
fn loaded_tracepoint<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut TracePoint, ProbeError> {
    let program: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(ProbeError::MissingProgram(name))?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })?;
    program
        .load()
        .map_err(|source| ProbeError::Program { name, source })?;
    Ok(program)
}

/// The kernel's largest pid plus one (`/proc/sys/kernel/pid_max`; its 64-bit ceiling when
/// unreadable): `TRACED` has a byte per possible tgid.
fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_194_304)
}

/// The loaded and attached probes.
pub struct Probes {
    ebpf: Ebpf,
    /// Uprobe families' links (see [`Probes::attach_cuda`], [`Probes::attach_tls`]).
    uprobes: std::collections::BTreeMap<&'static str, uprobes::Links>,
    /// IPC fds seeded so far (their connection generations are this many apart).
    ipc_seeded: u64,
    /// The probes' not-a-target bytes, marked before the daemon adds a process's entry.
    traced: traced::TracedBytes,
}

impl Probes {
    /// Loads the object with `settings`, then loads and attaches every program.
    pub fn load(settings: &ProbeSettings) -> Result<Self, ProbeError> {
        ensure_tracefs()?;
        let mut config = ProbeConfig::DEFAULT;
        config.self_tgid = std::process::id();
        config.filter_cgroup = u32::from(settings.filter_cgroup);
        config.filter_comm = u32::from(settings.filter_comm);
        config.capture_bytes = settings.capture_bytes.min(abi::CAPTURE_MAX as u32);
        config.request_capture_bytes = settings
            .request_capture_bytes
            .clamp(config.capture_bytes, abi::REQUEST_CAPTURE_MAX as u32);
        // Force a consumer wakeup once a quarter of the ring is waiting; below that the daemon's
        // poll timer drains it, so a busy server pays no wakeup per event.
        config.wakeup_bytes = u64::from(settings.ring_bytes / 4);
        let prefix = settings.device_root.join("nvidia");
        let prefix_bytes = prefix.as_os_str().as_encoded_bytes();
        if prefix_bytes.len() > abi::DEV_PREFIX_MAX {
            return Err(ProbeError::DevicePrefixTooLong(prefix));
        }
        config.dev_prefix[..prefix_bytes.len()].copy_from_slice(prefix_bytes);
        config.dev_prefix_len = prefix_bytes.len() as u32;
        if settings.ioctl_events {
            config.flags |= abi::CONFIG_IOCTL_EVENTS;
        }
        if settings.standin_devices {
            config.flags |= abi::CONFIG_STANDIN_DEVICES;
        }
        if settings.ipc {
            config.flags |= abi::CONFIG_IPC;
        }

        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .map_max_entries("EVENTS", settings.ring_bytes)
            .map_max_entries("TRACED", pid_max().div_ceil(8))
            .load(PROBES_OBJECT)?;
        for &(category, name) in TRACEPOINTS {
            loaded_tracepoint(&mut ebpf, name)?
                .attach(category, name)
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        let traced = traced::TracedBytes::map(ebpf.map("TRACED"))?;
        Ok(Self {
            ebpf,
            uprobes: std::collections::BTreeMap::new(),
            ipc_seeded: 0,
            traced,
        })
    }

    /// Starts forwarding the probes' aya-log records to the `log` facade.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!("eBPF log forwarding unavailable: {e}");
                None
            }
        }
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self.ebpf.take_map("EVENTS").ok_or(ProbeError::Map {
            name: "EVENTS",
            detail: "missing or already taken".into(),
        })?;
        RingBuf::try_from(map).map_err(|e| ProbeError::Map {
            name: "EVENTS",
            detail: e.to_string(),
        })
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, ProbeError> {
        let map = self.ebpf.map_mut(name).ok_or(ProbeError::Map {
            name,
            detail: "missing".into(),
        })?;
        HashMap::try_from(map).map_err(|e| ProbeError::Map {
            name,
            detail: e.to_string(),
        })
    }

    /// Adds a process to the in-kernel target filter.
    pub fn add_target(&mut self, tgid: u32, reason: u32) -> Result<(), ProbeError> {
        self.traced.mark(tgid);
        let mut map = self.hash::<u32, u32>("TARGETS")?;
        let reason = reason | map.get(&tgid, 0).unwrap_or(0);
        map.insert(tgid, reason, 0)
            .map_err(|source| ProbeError::MapOp {
                name: "TARGETS",
                source,
            })
    }

    /// The processes the kernel currently traces (by tgid), with their reason bits.
    pub fn targets(&mut self) -> Result<Vec<(u32, u32)>, ProbeError> {
        let map = self.hash::<u32, u32>("TARGETS")?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Adds a cgroup (by id, the cgroup directory's inode) to the filter.
    pub fn add_cgroup(&mut self, cgroup_id: u64) -> Result<(), ProbeError> {
        let mut map = self.hash::<u64, u32>("CGROUPS")?;
        map.insert(cgroup_id, 1, 0)
            .map_err(|source| ProbeError::MapOp {
                name: "CGROUPS",
                source,
            })
    }

    /// Adds a process name (as `comm`, at most 15 bytes) that makes processes targets at exec.
    pub fn add_comm(&mut self, comm: &str) -> Result<(), ProbeError> {
        let mut key = [0u8; abi::COMM_LEN];
        let bytes = comm.as_bytes();
        let n = bytes.len().min(abi::COMM_LEN - 1);
        key[..n].copy_from_slice(&bytes[..n]);
        let mut map = self.hash::<[u8; abi::COMM_LEN], u32>("COMMS")?;
        map.insert(key, 1, 0).map_err(|source| ProbeError::MapOp {
            name: "COMMS",
            source,
        })
    }

    /// Starts capturing data on a socket the target already had when the daemon attached.
    pub fn seed_connection(
        &mut self,
        tgid: u32,
        fd: u32,
        state: ConnState,
    ) -> Result<(), ProbeError> {
        self.traced.mark(tgid);
        let mut map = self.hash::<FdKey, ConnState>("CONNS")?;
        map.insert(FdKey { tgid, fd }, state, 0)
            .map_err(|source| ProbeError::MapOp {
                name: "CONNS",
                source,
            })
    }

    /// Follows a Unix-socket fd between service members as IPC (timing, direction and length,
    /// no payload), e.g. one the process had before the daemon attached. A fd already followed
    /// keeps its connection.
    pub fn track_ipc_fd(&mut self, tgid: u32, fd: u32) -> Result<bool, ProbeError> {
        // A generation unique per (tgid, fd) lifetime, like the probes' (monotonic time).
        let conn_id = crate::power::monotonic_ns() + self.ipc_seeded;
        self.ipc_seeded += 1;
        self.traced.mark(tgid);
        let mut map = self.hash::<FdKey, ConnState>("CONNS")?;
        let key = FdKey { tgid, fd };
        if map.get(&key, 0).is_ok() {
            return Ok(false);
        }
        let state = ConnState {
            conn_id,
            family: libc::AF_UNIX as u16,
            role: abi::ROLE_IPC,
            pad: [0; 5],
        };
        map.insert(key, state, 0)
            .map_err(|source| ProbeError::MapOp {
                name: "CONNS",
                source,
            })?;
        let adopted = self.adopt_blocked_reads(tgid, fd, conn_id);
        if adopted > 0 {
            tracing::debug!("process {tgid}: {adopted} read(s) already waiting on IPC fd {fd}");
        }
        Ok(true)
    }

    /// A thread already blocked reading `fd` when it was followed (an API process waiting for
    /// the engine's next message since before the daemon attached) entered its read unseen, so
    /// the probes would drop the read when it returns: the engine's first step after attach
    /// would be missed. Such reads are found in `/proc/<tgid>/task/*/syscall` and stashed as
    /// the probes would have, so their return is reported. A thread that returned between the
    /// look and the stash has its entry taken back; the window left is a few microseconds, and
    /// what a stale entry could cause is one extra IPC read record of that thread.
    fn adopt_blocked_reads(&mut self, tgid: u32, fd: u32, conn_id: u64) -> usize {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{tgid}/task")) else {
            return 0;
        };
        // The probes look for a stashed entry only in processes whose byte is set.
        self.traced.mark(tgid);
        let Ok(mut stash) = self.hash::<u64, abi::Stash>("STASH") else {
            return 0;
        };
        let mut adopted = 0;
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let path = task.path().join("syscall");
            let Some(blocked) = blocked_read(&path, fd) else {
                continue;
            };
            let key = (u64::from(tgid) << 32) | u64::from(tid);
            let entry = abi::Stash {
                fd: i64::from(fd),
                ptr: blocked.1,
                arg: blocked.2,
                conn_id,
                syscall: blocked.0 as u8,
                role: abi::ROLE_IPC,
                pad: [0; 6],
            };
            // BPF_NOEXIST: a read the probes saw entering keeps its own entry.
            if stash.insert(key, entry, 1).is_err() {
                continue;
            }
            if blocked_read(&path, fd) == Some(blocked) {
                adopted += 1;
            } else {
                let _ = stash.remove(&key);
            }
        }
        adopted
    }

    /// Removes every kernel entry of a process that exited (its fds died with it, and its tgid
    /// may be reused by an unrelated process).
    pub fn forget_process(&mut self, tgid: u32) -> Result<(), ProbeError> {
        self.detach_cuda(crate::ids::Pid(tgid))?;
        self.detach_tls(crate::ids::Pid(tgid))?;
        self.remove_fds_of::<ConnState>("CONNS", tgid)?;
        self.remove_fds_of::<u32>("DEV_FDS", tgid)?;
        let mut gpu = self.hash::<GpuKey, GpuUse>("GPU_USE")?;
        let stale: Vec<GpuKey> = gpu
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for key in &stale {
            let _ = gpu.remove(key);
        }
        let mut uvm = self.hash::<UvmKey, u32>("UVM_REGS")?;
        let stale: Vec<UvmKey> = uvm
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for key in &stale {
            let _ = uvm.remove(key);
        }
        let mut cuda = self.hash::<u32, abi::CudaCounts>("CUDA_COUNTS")?;
        let _ = cuda.remove(&tgid);
        // RM_HANDLES is an LRU map: an exited process's handles age out.
        let mut targets = self.hash::<u32, u32>("TARGETS")?;
        let _ = targets.remove(&tgid);
        Ok(())
    }

    /// The kernel's per-(process, device) GPU counters: ioctls, failures, live contexts.
    pub fn gpu_use(&mut self) -> Result<Vec<(GpuKey, GpuUse)>, ProbeError> {
        let map = self.hash::<GpuKey, GpuUse>("GPU_USE")?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    fn remove_fds_of<V: aya::Pod>(
        &mut self,
        name: &'static str,
        tgid: u32,
    ) -> Result<(), ProbeError> {
        let mut map = self.hash::<FdKey, V>(name)?;
        let stale: Vec<FdKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for key in &stale {
            // Already gone is fine: the process may have closed it meanwhile.
            let _ = map.remove(key);
        }
        Ok(())
    }

    /// Sums the per-CPU statistics counters.
    pub fn stats(&mut self) -> Result<KernelStats, ProbeError> {
        let map = self.ebpf.map("STATS").ok_or(ProbeError::Map {
            name: "STATS",
            detail: "missing".into(),
        })?;
        let array: PerCpuArray<&MapData, [u64; STAT_SLOTS as usize]> =
            PerCpuArray::try_from(map).map_err(|e| ProbeError::Map {
                name: "STATS",
                detail: e.to_string(),
            })?;
        let per_cpu = array.get(&0, 0).map_err(|source| ProbeError::MapOp {
            name: "STATS",
            source,
        })?;
        let mut slots = [0u64; STAT_SLOTS as usize];
        for cpu in per_cpu.iter() {
            for (slot, v) in slots.iter_mut().zip(cpu) {
                *slot += v;
            }
        }
        Ok(KernelStats { slots })
    }
}

/// The read a thread is blocked in on `fd`, from its `/proc/.../syscall` line (syscall number
/// then arguments in hex): the syscall, buffer and length, as the probes stash them.
fn blocked_read(path: &Path, fd: u32) -> Option<(abi::Syscall, u64, u64)> {
    let line = std::fs::read_to_string(path).ok()?;
    let mut f = line.split_whitespace();
    let nr: i64 = f.next()?.parse().ok()?;
    let mut arg = || u64::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok();
    let (a0, a1, a2) = (arg()?, arg()?, arg()?);
    let syscall = match nr {
        libc::SYS_read => abi::Syscall::Read,
        libc::SYS_readv => abi::Syscall::Readv,
        libc::SYS_recvfrom => abi::Syscall::Recvfrom,
        libc::SYS_recvmsg => abi::Syscall::Recvmsg,
        _ => return None,
    };
    (a0 == u64::from(fd)).then_some((syscall, a1, a2))
}
