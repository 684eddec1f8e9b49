//! Reading procfs and cgroupfs: the one place that parses `/proc/<pid>/stat`, `/proc/net/tcp`,
//! fd links and cgroup paths. Target resolution, service discovery and GPU discovery all read
//! the host through it; its roots are configurable so tests use fake trees.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Errors reading procfs or cgroupfs.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A procfs file or directory could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A path given as a cgroup is not a cgroup v2 directory.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where procfs and cgroupfs live.
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

/// TCP state number of a listening socket.
pub const TCP_LISTEN: u8 = 0x0A;
/// TCP state number of an established connection.
pub const TCP_ESTABLISHED: u8 = 0x01;
/// `PF_KTHREAD` in the flags field of `/proc/<pid>/stat`.
pub const PF_KTHREAD: u64 = 0x0020_0000;

/// What `/proc/<pid>/stat` says that tracer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// The name; may contain spaces and parentheses.
    pub comm: String,
    pub ppid: u32,
    /// The `flags` field (`PF_*`), when present.
    pub flags: Option<u64>,
}

impl ProcStat {
    /// A kernel thread (kthreadd, its children, or `PF_KTHREAD`).
    pub fn is_kthread(&self, pid: u32) -> bool {
        pid == 2 || self.ppid == 2 || self.flags.is_some_and(|f| f & PF_KTHREAD != 0)
    }
}

/// Parses `/proc/<pid>/stat`. The comm may contain spaces and parentheses: it ends at the last
/// `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // After the comm: state ppid pgrp session tty_nr tpgid flags.
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    let flags = rest.nth(4).and_then(|f| f.parse().ok());
    Some(ProcStat { comm, ppid, flags })
}

/// CPU time of a process in clock ticks (`utime + stime` from `/proc/<pid>/stat`: all its
/// threads).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let close = stat.rfind(')')?;
    // After the comm: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
    // utime stime.
    let mut rest = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Host-wide busy CPU ticks since boot from `/proc/stat`'s first line: user, nice, system,
/// irq, softirq and steal (not idle or iowait; guest time is inside user already).
pub fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// The cgroup v2 path of a process from `/proc/<pid>/cgroup` (`0::/path`).
pub fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// A TCP socket from `/proc/net/tcp{,6}` (v4-mapped v6 addresses are given as v4, so that the
/// two ends of a v4 connection to a dual-stack listener match).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel TCP state ([`TCP_LISTEN`], [`TCP_ESTABLISHED`], ...).
    pub state: u8,
    pub inode: u64,
    /// Whether it came from `tcp6`.
    pub v6: bool,
}

/// Parses `/proc/net/tcp` (`v6` false) or `tcp6` text. Malformed lines are skipped.
///
/// The kernel prints each 32-bit word of an address with `%08X` in host byte order, so the words
/// are read back with native byte order.
pub fn parse_tcp(text: &str, v6: bool) -> Vec<TcpEntry> {
    let mut out = Vec::new();
    parse_tcp_lines(text.as_bytes(), v6, &mut out);
    out
}

/// [`parse_tcp`] from a reader, one line in memory at a time; a read error ends the table.
fn parse_tcp_lines(mut r: impl std::io::BufRead, v6: bool, out: &mut Vec<TcpEntry>) {
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if std::mem::take(&mut first) {
            continue;
        }
        out.extend(parse_tcp_line(&line, v6));
    }
}

/// One line of `/proc/net/tcp{,6}` (after the header); `None` when malformed.
fn parse_tcp_line(line: &str, v6: bool) -> Option<TcpEntry> {
    let mut cols = line.split_whitespace();
    let local = parse_tcp_addr(cols.nth(1)?, v6)?;
    let remote = parse_tcp_addr(cols.next()?, v6)?;
    let state = u8::from_str_radix(cols.next()?, 16).ok()?;
    let inode = cols.nth(5)?.parse().ok()?;
    Some(TcpEntry {
        local,
        remote,
        state,
        inode,
        v6,
    })
}

fn parse_tcp_addr(text: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&word(i)?);
        }
        IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical()
    } else {
        if addr.len() != 8 {
            return None;
        }
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether an address is loopback (127/8, `::1`, `::ffff:127.x.x.x`).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// A connection a target already had when the daemon attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedConnection {
    pub fd: u32,
    /// The process accepted it (its local port is one the process listens on).
    pub server: bool,
    pub v6: bool,
}

impl ProcFs {
    fn read(&self, rel: impl AsRef<Path>) -> Result<String, ProcError> {
        let path = self.proc_root.join(rel);
        fs::read_to_string(&path).map_err(|source| ProcError::Read { path, source })
    }

    /// Every process id in procfs.
    pub fn pids(&self) -> Result<Vec<u32>, ProcError> {
        let dir = fs::read_dir(&self.proc_root).map_err(|source| ProcError::Read {
            path: self.proc_root.clone(),
            source,
        })?;
        Ok(dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect())
    }

    /// A process's stat, or `None` if it is gone.
    pub fn stat(&self, pid: u32) -> Option<ProcStat> {
        parse_stat(&self.read(format!("{pid}/stat")).ok()?)
    }

    /// A process's CPU time in clock ticks, all its threads; `None` for a thread that is not
    /// its process's leader (its time is in the leader's), or a process that is gone.
    pub fn process_cpu_ticks(&self, pid: u32) -> Option<u64> {
        let status =
            fs::read_to_string(self.proc_root.join(pid.to_string()).join("status")).ok()?;
        let tgid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))?
            .trim()
            .parse()
            .ok()?;
        if tgid != pid {
            return None;
        }
        let stat = fs::read_to_string(self.proc_root.join(pid.to_string()).join("stat")).ok()?;
        parse_cpu_ticks(&stat)
    }

    /// Host-wide busy CPU ticks since boot (see [`parse_busy_ticks`]).
    pub fn busy_ticks(&self) -> Option<u64> {
        parse_busy_ticks(&fs::read_to_string(self.proc_root.join("stat")).ok()?)
    }

    /// A process's cgroup v2 path, if it has one.
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        parse_cgroup(&self.read(format!("{pid}/cgroup")).ok()?)
    }

    /// A process's network namespace (the `ns/net` link text).
    pub fn netns_of(&self, pid: u32) -> Option<String> {
        fs::read_link(self.proc_root.join(format!("{pid}/ns/net")))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// The TCP sockets of a network namespace: the daemon's own (`None`), or a process's.
    pub fn tcp_entries(&self, pid: Option<u32>) -> Vec<TcpEntry> {
        let dir = pid.map_or_else(|| "net".to_string(), |p| format!("{p}/net"));
        self.tcp_entries_in(&dir).unwrap_or_default()
    }

    /// The TCP sockets listed under `<proc>/<dir>/tcp{,6}`; `None` when neither file exists.
    ///
    /// Read line by line: with tens of thousands of connections the files are megabytes, and
    /// holding one whole would grow the heap by that much at every discovery pass.
    pub fn tcp_entries_in(&self, dir: &str) -> Option<Vec<TcpEntry>> {
        let open = |name: &str| fs::File::open(self.proc_root.join(dir).join(name)).ok();
        let (v4, v6) = (open("tcp"), open("tcp6"));
        if v4.is_none() && v6.is_none() {
            return None;
        }
        let mut out = Vec::new();
        for (file, is_v6) in [(v4, false), (v6, true)] {
            if let Some(f) = file {
                parse_tcp_lines(std::io::BufReader::new(f), is_v6, &mut out);
            }
        }
        Some(out)
    }

    /// Established TCP connections a process holds now, with the role it plays in each (server
    /// when the local port is one of the process's listening ports), for seeding the probes.
    pub fn established_connections(&self, pid: u32) -> Vec<SeedConnection> {
        let fds = self.socket_fds(pid);
        if fds.is_empty() {
            return Vec::new();
        }
        let sockets = self.tcp_entries(Some(pid));
        let by_inode: BTreeMap<u64, &TcpEntry> = sockets.iter().map(|s| (s.inode, s)).collect();
        let listening: BTreeSet<u16> = fds
            .iter()
            .filter_map(|(_, inode)| by_inode.get(inode))
            .filter(|s| s.state == TCP_LISTEN)
            .map(|s| s.local.port())
            .collect();
        fds.iter()
            .filter_map(|&(fd, inode)| {
                let s = by_inode.get(&inode)?;
                (s.state == TCP_ESTABLISHED).then(|| SeedConnection {
                    fd,
                    server: listening.contains(&s.local.port()),
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
    pub fn holders_of(&self, inodes: &BTreeSet<u64>) -> Result<BTreeSet<u32>, ProcError> {
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
    pub fn descendants(&self, roots: &BTreeSet<u32>) -> Result<BTreeSet<u32>, ProcError> {
        let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for pid in self.pids()? {
            if let Some(st) = self.stat(pid) {
                children.entry(st.ppid).or_default().push(pid);
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

    /// Files a process maps whose file name starts with `name_prefix` (`libcuda.so` finds
    /// `libcuda.so.1`, `libcuda.so.580.65.06`), as `/proc/<pid>/maps` names them (in the
    /// process's mount namespace). A gone process maps nothing.
    pub fn mapped_files(&self, pid: u32, name_prefix: &str) -> BTreeSet<PathBuf> {
        let text =
            fs::read_to_string(self.proc_root.join(format!("{pid}/maps"))).unwrap_or_default();
        parse_mapped_files(&text, name_prefix)
    }

    /// The cgroup v2 id of a cgroup directory (its inode), path absolute or under the root.
    pub fn cgroup_id(&self, path: &Path) -> Result<u64, ProcError> {
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.cgroup_root.join(path)
        };
        let meta = fs::metadata(&full).map_err(|source| ProcError::Cgroup {
            path: full.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(ProcError::Cgroup {
                path: full,
                source: std::io::Error::other("not a directory"),
            });
        }
        Ok(meta.ino())
    }
}

/// The file-backed mappings of a `/proc/<pid>/maps` text whose file name starts with
/// `name_prefix`; deleted files (` (deleted)`) are left out.
pub fn parse_mapped_files(maps: &str, name_prefix: &str) -> BTreeSet<PathBuf> {
    maps.lines()
        .filter_map(|line| {
            // address perms offset dev inode pathname; the pathname may contain spaces.
            let mut rest = line.trim_start();
            for _ in 0..5 {
                let end = rest.find(char::is_whitespace)?;
                rest = rest.get(end..)?.trim_start();
            }
            let path = Path::new(rest);
            let named = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(name_prefix));
            (path.is_absolute() && named && !rest.ends_with(" (deleted)"))
                .then(|| path.to_path_buf())
        })
        .collect()
}

#[cfg(test)]
mod tests;

/// Whether the ELF file at `path` exports `symbol` (dynamic or static symbol table); false for
/// anything unreadable or not ELF. Reads only the parts it needs.
pub fn exports_symbol(path: &Path, symbol: &str) -> bool {
    use object::{Object as _, ObjectSymbol as _};
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let cache = object::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else {
        return false;
    };
    elf.dynamic_symbols()
        .chain(elf.symbols())
        .any(|s| s.is_definition() && s.name_bytes() == Ok(symbol.as_bytes()))
}
