//! Resolving what the operator asked to trace (`--pid`, `--port`, `--cgroup`, `--comm`) into the
//! processes that exist now, from procfs. The kernel follows them from there (forks, execs).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use tracer_ebpf::abi::{TARGET_CHILD, TARGET_COMM, TARGET_PID, TARGET_PORT};

/// Errors from resolving targets.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// `--pid` names a process that does not exist.
    #[error("no process with pid {0}")]
    NoSuchPid(u32),
    /// `--port` names a port nothing listens on (in this network namespace).
    #[error("no process listens on TCP port {0}")]
    NoListener(u16),
    /// `--cgroup` names a directory that is not a cgroup v2 directory.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `--pid` or `--port` resolved to the daemon itself.
    #[error("refusing to trace the tracer itself (pid {0})")]
    IsSelf(u32),
    /// Reading procfs failed.
    #[error("reading {path}: {source}")]
    Proc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where procfs and cgroupfs live (configurable so tests can use fake trees).
#[derive(Debug, Clone)]
pub struct ProcFs {
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

/// A TCP socket from `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    /// Kernel TCP state (1 = established, 10 = listen).
    pub state: u8,
    pub inode: u64,
    /// Whether it came from `tcp6`.
    pub v6: bool,
}

/// TCP state number of a listening socket.
pub const TCP_LISTEN: u8 = 0x0A;
/// TCP state number of an established connection.
pub const TCP_ESTABLISHED: u8 = 0x01;

/// Parses `/proc/net/tcp` or `tcp6` text. Malformed lines are skipped.
pub fn parse_tcp(text: &str, v6: bool) -> Vec<TcpSocket> {
    fn port(addr: &str) -> Option<u16> {
        u16::from_str_radix(addr.rsplit(':').next()?, 16).ok()
    }
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let remote = cols.next()?;
            let state = u8::from_str_radix(cols.next()?, 16).ok()?;
            let inode = cols.nth(5)?.parse().ok()?;
            Some(TcpSocket {
                local_port: port(local)?,
                remote_port: port(remote)?,
                state,
                inode,
                v6,
            })
        })
        .collect()
}

/// Parses `/proc/<pid>/stat` into (comm, ppid). The comm may contain spaces and parentheses.
pub fn parse_stat(text: &str) -> Option<(String, u32)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, ppid))
}

impl ProcFs {
    fn read(&self, rel: impl AsRef<Path>) -> Result<String, TargetError> {
        let path = self.proc_root.join(rel);
        fs::read_to_string(&path).map_err(|source| TargetError::Proc { path, source })
    }

    /// Every process id in procfs.
    pub fn pids(&self) -> Result<Vec<u32>, TargetError> {
        let dir = fs::read_dir(&self.proc_root).map_err(|source| TargetError::Proc {
            path: self.proc_root.clone(),
            source,
        })?;
        Ok(dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect())
    }

    /// (comm, ppid) of a process, or None if it is gone.
    pub fn stat(&self, pid: u32) -> Option<(String, u32)> {
        parse_stat(&self.read(format!("{pid}/stat")).ok()?)
    }

    /// The TCP sockets of a network namespace: the daemon's own (`None`), or a process's.
    pub fn tcp_sockets(&self, pid: Option<u32>) -> Vec<TcpSocket> {
        let dir = pid.map_or_else(|| "net".to_string(), |p| format!("{p}/net"));
        [("tcp", false), ("tcp6", true)]
            .iter()
            .filter_map(|(f, v6)| Some(parse_tcp(&self.read(format!("{dir}/{f}")).ok()?, *v6)))
            .flatten()
            .collect()
    }

    /// Established TCP connections a process holds now, with the role it plays in each (server
    /// when the local port is one of the process's listening ports), for seeding the probes.
    pub fn established_connections(&self, pid: u32) -> Vec<SeedConnection> {
        let fds = self.socket_fds(pid);
        if fds.is_empty() {
            return Vec::new();
        }
        let sockets = self.tcp_sockets(Some(pid));
        let by_inode: BTreeMap<u64, &TcpSocket> = sockets.iter().map(|s| (s.inode, s)).collect();
        let listening: BTreeSet<u16> = fds
            .iter()
            .filter_map(|(_, inode)| by_inode.get(inode))
            .filter(|s| s.state == TCP_LISTEN)
            .map(|s| s.local_port)
            .collect();
        fds.iter()
            .filter_map(|&(fd, inode)| {
                let s = by_inode.get(&inode)?;
                (s.state == TCP_ESTABLISHED).then(|| SeedConnection {
                    fd,
                    server: listening.contains(&s.local_port),
                    v6: s.v6,
                })
            })
            .collect()
    }

    /// Every fd of a process with what it links to (gone processes have none).
    pub fn fd_links(&self, pid: u32) -> Vec<(u32, PathBuf)> {
        let dir = self.proc_root.join(format!("{pid}/fd"));
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let fd = e.file_name().to_str()?.parse().ok()?;
                Some((fd, fs::read_link(e.path()).ok()?))
            })
            .collect()
    }

    /// Socket inodes a process holds, by fd.
    pub fn socket_fds(&self, pid: u32) -> Vec<(u32, u64)> {
        self.fd_links(pid)
            .into_iter()
            .filter_map(|(fd, link)| {
                let inode = link
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()?;
                Some((fd, inode))
            })
            .collect()
    }

    /// Paths of the fds a process holds under `root` (device nodes it has open).
    pub fn fds_under(&self, pid: u32, root: &Path) -> Vec<(u32, PathBuf)> {
        self.fd_links(pid)
            .into_iter()
            .filter(|(_, link)| link.starts_with(root))
            .collect()
    }

    /// Processes holding a socket with one of `inodes`.
    pub fn holders_of(&self, inodes: &BTreeSet<u64>) -> Result<BTreeSet<u32>, TargetError> {
        Ok(self
            .pids()?
            .into_iter()
            .filter(|&pid| {
                self.socket_fds(pid)
                    .iter()
                    .any(|(_, inode)| inodes.contains(inode))
            })
            .collect())
    }

    /// All descendants of `roots` (not including them), from the ppid links.
    pub fn descendants(&self, roots: &BTreeSet<u32>) -> Result<BTreeSet<u32>, TargetError> {
        let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for pid in self.pids()? {
            if let Some((_, ppid)) = self.stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
        let mut out = BTreeSet::new();
        let mut stack: Vec<u32> = roots.iter().copied().collect();
        while let Some(pid) = stack.pop() {
            for &child in children.get(&pid).map_or(&[][..], Vec::as_slice) {
                if !roots.contains(&child) && out.insert(child) {
                    stack.push(child);
                }
            }
        }
        Ok(out)
    }

    /// The cgroup v2 id of a cgroup directory (its inode), path absolute or under the root.
    pub fn cgroup_id(&self, path: &Path) -> Result<u64, TargetError> {
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.cgroup_root.join(path)
        };
        let meta = fs::metadata(&full).map_err(|source| TargetError::Cgroup {
            path: full.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(TargetError::Cgroup {
                path: full,
                source: std::io::Error::other("not a directory"),
            });
        }
        Ok(meta.ino())
    }
}

/// A connection a target already had when the daemon attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedConnection {
    pub fd: u32,
    /// The process accepted it (its local port is one the process listens on).
    pub server: bool,
    pub v6: bool,
}

/// What to trace, as the operator said it.
#[derive(Debug, Clone, Default)]
pub struct TargetSpec {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub cgroups: Vec<PathBuf>,
    pub comms: Vec<String>,
}

impl TargetSpec {
    /// Whether anything is selected at all.
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
            && self.ports.is_empty()
            && self.cgroups.is_empty()
            && self.comms.is_empty()
    }
}

/// The resolved selection: processes with reason bits, and cgroup ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub processes: BTreeMap<u32, u32>,
    pub cgroup_ids: Vec<u64>,
}

/// Resolves `spec` against procfs now. `self_pid` is never selected.
pub fn resolve(procfs: &ProcFs, spec: &TargetSpec, self_pid: u32) -> Result<Resolved, TargetError> {
    let mut processes: BTreeMap<u32, u32> = BTreeMap::new();
    for &pid in &spec.pids {
        if pid == self_pid {
            return Err(TargetError::IsSelf(pid));
        }
        if procfs.stat(pid).is_none() {
            return Err(TargetError::NoSuchPid(pid));
        }
        *processes.entry(pid).or_default() |= TARGET_PID;
    }
    if !spec.ports.is_empty() {
        let sockets = procfs.tcp_sockets(None);
        for &port in &spec.ports {
            let inodes: BTreeSet<u64> = sockets
                .iter()
                .filter(|l| l.state == TCP_LISTEN && l.local_port == port)
                .map(|l| l.inode)
                .collect();
            let holders = if inodes.is_empty() {
                BTreeSet::new()
            } else {
                procfs.holders_of(&inodes)?
            };
            let holders: BTreeSet<u32> = holders.into_iter().filter(|&p| p != self_pid).collect();
            if holders.is_empty() {
                return Err(TargetError::NoListener(port));
            }
            for pid in holders {
                *processes.entry(pid).or_default() |= TARGET_PORT;
            }
        }
    }
    if !spec.comms.is_empty() {
        for pid in procfs.pids()? {
            if pid == self_pid {
                continue;
            }
            if let Some((comm, _)) = procfs.stat(pid)
                && spec.comms.iter().any(|c| comm_matches(c, &comm))
            {
                *processes.entry(pid).or_default() |= TARGET_COMM;
            }
        }
    }
    let roots: BTreeSet<u32> = processes.keys().copied().collect();
    for child in procfs.descendants(&roots)? {
        if child != self_pid {
            *processes.entry(child).or_default() |= TARGET_CHILD;
        }
    }
    let cgroup_ids = spec
        .cgroups
        .iter()
        .map(|p| procfs.cgroup_id(p))
        .collect::<Result<_, _>>()?;
    Ok(Resolved {
        processes,
        cgroup_ids,
    })
}

/// Whether `wanted` names `comm` (the kernel truncates comm to 15 bytes).
pub fn comm_matches(wanted: &str, comm: &str) -> bool {
    let wanted = wanted.as_bytes();
    let n = wanted.len().min(15);
    comm.as_bytes() == &wanted[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A2C4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 20 4 30 10 -1
   garbage line
";

    #[test]
    fn tcp_table_is_parsed_and_garbage_skipped() {
        assert_eq!(
            parse_tcp(TCP, false),
            vec![
                TcpSocket {
                    local_port: 8080,
                    remote_port: 0,
                    state: TCP_LISTEN,
                    inode: 12345,
                    v6: false
                },
                TcpSocket {
                    local_port: 0xA2C4,
                    remote_port: 8080,
                    state: TCP_ESTABLISHED,
                    inode: 23456,
                    v6: false
                }
            ]
        );
    }

    #[test]
    fn stat_handles_spaces_and_parens_in_comm() {
        assert_eq!(
            parse_stat("123 (my (odd) name) S 77 1 1 0"),
            Some(("my (odd) name".to_string(), 77))
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn comm_match_truncates_like_the_kernel() {
        assert!(comm_matches("text-generation-router", "text-generation"));
        assert!(comm_matches("python3", "python3"));
        assert!(!comm_matches("python", "python3"));
    }

    fn fake_proc(dir: &Path, procs: &[(u32, &str, u32)]) {
        for (pid, comm, ppid) in procs {
            let p = dir.join(pid.to_string());
            fs::create_dir_all(p.join("fd")).expect("mkdir");
            fs::write(p.join("stat"), format!("{pid} ({comm}) S {ppid} 0 0")).expect("write");
        }
    }

    #[test]
    fn resolve_follows_descendants_and_refuses_self() {
        let dir = std::env::temp_dir().join(format!("tracer-proc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fake_proc(
            &dir,
            &[
                (10, "api", 1),
                (11, "engine", 10),
                (12, "worker", 11),
                (20, "other", 1),
            ],
        );
        let procfs = ProcFs {
            proc_root: dir.clone(),
            cgroup_root: dir.clone(),
        };
        let spec = TargetSpec {
            pids: vec![10],
            ..TargetSpec::default()
        };
        let r = resolve(&procfs, &spec, 999).expect("resolves");
        assert_eq!(
            r.processes,
            BTreeMap::from([(10, TARGET_PID), (11, TARGET_CHILD), (12, TARGET_CHILD)])
        );
        assert!(matches!(
            resolve(&procfs, &spec, 10),
            Err(TargetError::IsSelf(10))
        ));
        let comm = TargetSpec {
            comms: vec!["other".into()],
            ..TargetSpec::default()
        };
        let r = resolve(&procfs, &comm, 999).expect("resolves");
        assert_eq!(r.processes, BTreeMap::from([(20, TARGET_COMM)]));
        let missing = TargetSpec {
            pids: vec![4242],
            ..TargetSpec::default()
        };
        assert!(matches!(
            resolve(&procfs, &missing, 999),
            Err(TargetError::NoSuchPid(4242))
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
