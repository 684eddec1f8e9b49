//! Services: the set of processes that serve one endpoint, and the GPUs they use.
//!
//! Real servers do not hold the GPU in the process that holds the HTTP socket (vLLM's API server
//! talks to `EngineCore` over ZMQ IPC, TGI's router to its shards over gRPC on Unix sockets,
//! Ollama to a child `llama-server` over loopback HTTP; see `shared/notes/inference-servers.md`).
//! So GPU energy is bound to a *service*, and the service's GPUs are the union of the GPUs its
//! processes have a context on ([`crate::occupancy::devices`]: the process maps the GPU's node). GPUs members only
//! hold fds on (NVML calls) are listed apart, in [`Service::fd_only_gpus`].
//!
//! # Who is a member
//! Starting from the operator's targets (each a [`ServiceRoot`]: a pid, a listening port, a
//! comm or a cgroup, with the processes it resolved to), a service grows by these rules:
//!
//! 1. **Target**: the root's processes.
//! 2. **Cgroup**: for a cgroup root, every process in that cgroup or below it. A pid or port
//!    target's own cgroup is *not* pulled in: run from a shell, that is a session scope that also
//!    holds the shell and the load generator.
//! 3. **Descendant**: every descendant of a member.
//! 4. **Unix peer**: the holders of the other end of a connected Unix stream or seqpacket socket
//!    a member holds (found with `NETLINK_SOCK_DIAG`, see [`unix_diag`]). Datagram sockets are
//!    not links (they are mostly logging).
//! 5. **Loopback peer**: the holders of the other end of an established TCP connection a member
//!    holds whose both ends are loopback (127/8, `::1`, `::ffff:127.x`).
//!
//! Peers are followed transitively, at most [`DiscoverOptions::max_depth`] IPC hops from a root
//! (descendants do not add a hop). These links are never followed:
//!
//! - **Client traffic**: a TCP connection with an end on an *endpoint port* — a port given as a
//!   target, or one the root processes listen on — in either direction: whoever connects into
//!   the served HTTP port is a client (the load generator), never a member through that link.
//!   The endpoint ports of all roots apply to every root, so two traced services that call each
//!   other stay two services.
//! - **System sockets**: a Unix link where either end is bound to a well-known system socket
//!   ([`DEFAULT_SYSTEM_SOCKETS`]: journald, `/dev/log`, D-Bus, nscd/sssd, container runtimes);
//!   the name is read from `UNIX_DIAG_NAME`, which an accepted socket shares with its listener.
//! - **Stdio**: a Unix socket that a process holds only as fd 0, 1 or 2 is its log or terminal
//!   plumbing (journald streams, `ssh host cmd` socketpairs to sshd), not IPC.
//! - **Fan-in**: a peer that joined as the *server* side of a link (a member connected into its
//!   listener) is not expanded through its other incoming client links: a shared local server
//!   (a database, a cache) joins, its other clients do not. Its own outgoing links and its
//!   descendants are followed.
//!
//! Never members, whatever links them: pid 1, the tracer itself ([`DiscoverOptions::self_pid`])
//! and kernel threads.
//!
//! # Merging
//! Each root is expanded on its own. Roots whose member sets share a process are one service:
//! their members, reasons and ports are merged (a `--pid` and a `--port` naming the same server,
//! or two targets that are IPC peers of each other).
//!
//! # Limits
//! - `NETLINK_SOCK_DIAG` answers for the tracer's own network namespace: Unix links of processes
//!   in other network namespaces (containers) are not seen; loopback TCP is read per namespace
//!   from `/proc/<pid>/net/tcp{,6}`.
//! - procfs is read without locks: processes that come and go during discovery may be missed.
//! - `/proc/<pid>/fd` of other users' processes needs privileges; unreadable processes have no
//!   sockets and no GPUs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Serialize;
use tracer_ebpf::abi::{TARGET_COMM, TARGET_PID, TARGET_PORT};

use crate::{
    occupancy::devices::{self as gpu, GpuInfo, Majors, ProcessGpus},
    probe::targets::{self as target, TargetError, TargetSpec},
    procfs::{self, ProcFs, TCP_ESTABLISHED, TCP_LISTEN, TcpEntry, is_loopback},
};

pub use unix_diag::UnixSocket;

/// Errors from service discovery.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Resolving a target failed.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Reading procfs failed.
    #[error(transparent)]
    Proc(#[from] procfs::ProcError),
    /// Nothing to start from.
    #[error("no targets given")]
    NoRoots,
}

/// Unix socket names that are never IPC links (`*` matches any run of characters; `@` starts an
/// abstract name).
pub const DEFAULT_SYSTEM_SOCKETS: &[&str] = &[
    "/run/systemd/*",
    "/var/run/systemd/*",
    "/dev/log",
    "/run/dbus/*",
    "/var/run/dbus/*",
    "/run/user/*/bus",
    "@/tmp/dbus-*",
    "/run/nscd/*",
    "/var/run/nscd/*",
    "/var/lib/sss/pipes/*",
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/*",
    "/run/podman/*",
];

/// Default bound on IPC hops from a root.
pub const DEFAULT_MAX_DEPTH: u32 = 4;

/// One operator-given target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum RootSpec {
    Pid(u32),
    /// A TCP port the service listens on (an endpoint port).
    Port(u16),
    Comm(String),
    /// A cgroup v2 directory, absolute or relative to the cgroup root.
    Cgroup(PathBuf),
}

impl RootSpec {
    /// How the target reads in output: `port 8000`, `pid 42`.
    pub fn label(&self) -> String {
        match self {
            Self::Pid(pid) => format!("pid {pid}"),
            Self::Port(port) => format!("port {port}"),
            Self::Comm(comm) => format!("comm {comm}"),
            Self::Cgroup(path) => format!("cgroup {}", path.display()),
        }
    }
}

/// A target with the processes it resolved to. For a cgroup root, [`discover`] adds the
/// processes in the cgroup itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceRoot {
    pub spec: RootSpec,
    pub pids: BTreeSet<u32>,
}

/// Resolves each target of `spec` into its own root (so that unrelated targets can stay
/// separate services). Errors as [`target::resolve`] does: unknown pid, port nothing listens on,
/// not a cgroup directory, the tracer itself.
pub fn roots_from_spec(
    procfs: &ProcFs,
    spec: &TargetSpec,
    self_pid: u32,
) -> Result<Vec<ServiceRoot>, ServiceError> {
    let own = |one: &TargetSpec, bit: u32| -> Result<BTreeSet<u32>, ServiceError> {
        Ok(target::resolve(procfs, one, self_pid)?
            .processes
            .into_iter()
            .filter(|&(_, bits)| bits & bit != 0)
            .map(|(pid, _)| pid)
            .collect())
    };
    let mut roots = Vec::new();
    for &pid in &spec.pids {
        let one = TargetSpec {
            pids: vec![pid],
            ..TargetSpec::default()
        };
        let pids = own(&one, TARGET_PID)?;
        roots.push(ServiceRoot {
            spec: RootSpec::Pid(pid),
            pids,
        });
    }
    for &port in &spec.ports {
        let one = TargetSpec {
            ports: vec![port],
            ..TargetSpec::default()
        };
        let pids = own(&one, TARGET_PORT)?;
        roots.push(ServiceRoot {
            spec: RootSpec::Port(port),
            pids,
        });
    }
    for comm in &spec.comms {
        let one = TargetSpec {
            comms: vec![comm.clone()],
            ..TargetSpec::default()
        };
        let pids = own(&one, TARGET_COMM)?;
        roots.push(ServiceRoot {
            spec: RootSpec::Comm(comm.clone()),
            pids,
        });
    }
    for path in &spec.cgroups {
        procfs.cgroup_id(path)?;
        roots.push(ServiceRoot {
            spec: RootSpec::Cgroup(path.clone()),
            pids: BTreeSet::new(),
        });
    }
    Ok(roots)
}

/// Where Unix socket links come from.
#[derive(Debug, Clone, Default)]
pub enum UnixSource {
    /// Ask the kernel (`NETLINK_SOCK_DIAG`); on failure discovery goes on without Unix links and
    /// says so in [`Discovery::warnings`].
    #[default]
    Kernel,
    /// A given table (tests, fake procfs trees).
    Table(Vec<UnixSocket>),
    /// No Unix links.
    Off,
}

/// Knobs of [`discover`].
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// The tracer's pid: never a member, never a GPU sharer.
    pub self_pid: u32,
    /// Most IPC hops from a root.
    pub max_depth: u32,
    /// Where the NVIDIA device nodes live (`/dev`).
    pub device_root: PathBuf,
    /// Unix socket name patterns that are never links (see [`DEFAULT_SYSTEM_SOCKETS`]).
    pub system_sockets: Vec<String>,
    pub unix: UnixSource,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        Self {
            self_pid: std::process::id(),
            max_depth: DEFAULT_MAX_DEPTH,
            device_root: gpu::default_device_root(),
            system_sockets: DEFAULT_SYSTEM_SOCKETS
                .iter()
                .map(|s| (*s).to_string())
                .collect(),
            unix: UnixSource::Kernel,
        }
    }
}

/// Why a process is a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// One of the root's own processes.
    Target { why: String },
    /// A descendant of member `of` (its parent).
    Descendant { of: u32 },
    /// In the root cgroup `path` (relative to the cgroup root) or below it.
    Cgroup { path: String },
    /// Holds socket `inode`, the other end of a Unix stream a member (`peer`) holds; `name` is the
    /// address either end is bound to.
    UnixPeer {
        peer: u32,
        inode: u64,
        name: Option<String>,
    },
    /// Holds the other end of a loopback TCP connection of member `peer`; `port` is the server
    /// side's port.
    LoopbackPeer { peer: u32, port: u16 },
}

impl Reason {
    /// The member this reason links from, if any.
    fn linked_from(&self) -> Option<u32> {
        match self {
            Self::Descendant { of } => Some(*of),
            Self::UnixPeer { peer, .. } | Self::LoopbackPeer { peer, .. } => Some(*peer),
            Self::Target { .. } | Self::Cgroup { .. } => None,
        }
    }

    /// Whether `other` says the same thing (one reason per kind and peer is enough).
    fn same_as(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && match (self.linked_from(), other.linked_from()) {
                (Some(a), Some(b)) => a == b,
                _ => self == other,
            }
    }

    /// The reason in words, for logs and `tracer services`.
    pub fn text(&self) -> String {
        match self {
            Self::Target { why } => format!("target ({why})"),
            Self::Descendant { of } => format!("child of {of}"),
            Self::Cgroup { path } => format!("in cgroup {path}"),
            Self::UnixPeer { peer, inode, name } => match name {
                Some(name) => format!("unix peer of {peer} ({name}, socket {inode})"),
                None => format!("unix peer of {peer} (socket {inode})"),
            },
            Self::LoopbackPeer { peer, port } => {
                format!("loopback tcp peer of {peer} (port {port})")
            }
        }
    }
}

/// A process of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub comm: String,
    pub reasons: Vec<Reason>,
}

/// The processes serving one endpoint, and their GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// 1-based, in the order of the roots.
    pub id: u32,
    /// The roots' labels, joined with ` + `.
    pub name: String,
    pub roots: Vec<RootSpec>,
    /// Endpoint ports: given ports and the ports the root processes listen on.
    pub ports: Vec<u16>,
    pub members: BTreeMap<u32, Member>,
    /// GPU minors a member has a context on (maps the node; see [`crate::occupancy::devices`]).
    pub gpus: BTreeSet<u32>,
    /// GPU minors members only hold fds on, mapped by no member: NVML-style use (vLLM's API
    /// server calls `nvmlInit`), not occupancy; not counted in `gpus`.
    pub fd_only_gpus: BTreeSet<u32>,
    /// Driver use of each member that uses any, by pid.
    pub gpu_evidence: BTreeMap<u32, ProcessGpus>,
}

/// A process outside every service that holds one of the services' GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub comm: String,
    pub gpus: ProcessGpus,
}

/// The result of [`discover`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Discovery {
    pub services: Vec<Service>,
    /// For each GPU of some service, the processes in no service that hold it too (the GPU is
    /// shared with something untraced).
    pub others: BTreeMap<u32, Vec<u32>>,
    /// What those processes hold, by pid (fd only: likely a monitor; mapped: a context).
    pub other_holders: BTreeMap<u32, Holder>,
    /// The driver's GPUs (empty without the NVIDIA driver).
    pub inventory: Vec<GpuInfo>,
    /// Things that made the answer less complete than it could be.
    pub warnings: Vec<String>,
}

/// Builds the services of `roots` from procfs now. See the module doc for the rules.
pub fn discover(
    procfs: &ProcFs,
    roots: &[ServiceRoot],
    opts: &DiscoverOptions,
) -> Result<Discovery, ServiceError> {
    if roots.is_empty() {
        return Err(ServiceError::NoRoots);
    }
    let mut warnings = Vec::new();
    let snap = Snapshot::take(procfs)?;
    let unix = match &opts.unix {
        UnixSource::Kernel => unix_diag::dump().unwrap_or_else(|e| {
            warnings.push(format!("Unix socket peers not followed: {e}"));
            Vec::new()
        }),
        UnixSource::Table(t) => t.clone(),
        UnixSource::Off => Vec::new(),
    };
    let mut walker = Walker {
        procfs,
        snap: &snap,
        unix: unix.into_iter().map(|s| (s.inode, s)).collect(),
        tables: HashMap::new(),
        opts,
    };

    let root_pids: Vec<BTreeSet<u32>> = roots.iter().map(|r| walker.root_pids(r)).collect();
    let root_ports: Vec<BTreeSet<u16>> = roots
        .iter()
        .zip(&root_pids)
        .map(|(r, pids)| walker.endpoint_ports(r, pids))
        .collect();
    let endpoints: BTreeSet<u16> = root_ports.iter().flatten().copied().collect();
    let expansions: Vec<BTreeMap<u32, Vec<Reason>>> = roots
        .iter()
        .zip(&root_pids)
        .map(|(r, pids)| walker.expand(r, pids, &endpoints))
        .collect();
    for (root, members) in roots.iter().zip(&expansions) {
        if members.is_empty() {
            warnings.push(format!("{} has no processes", root.spec.label()));
        }
    }

    // Roots sharing a process are one service.
    let mut parent: Vec<usize> = (0..roots.len()).collect();
    let mut first_root: HashMap<u32, usize> = HashMap::new();
    for (i, members) in expansions.iter().enumerate() {
        for &pid in members.keys() {
            if let Some(&j) = first_root.get(&pid) {
                union(&mut parent, i, j);
            } else {
                first_root.insert(pid, i);
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..roots.len() {
        groups.entry(find(&mut parent, i)).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
    groups.sort_by_key(|g| g.first().copied());

    let majors = Majors::read(&procfs.proc_root);
    let mut services = Vec::with_capacity(groups.len());
    for (n, group) in groups.iter().enumerate() {
        let mut members: BTreeMap<u32, Member> = BTreeMap::new();
        let mut ports = BTreeSet::new();
        for &i in group {
            ports.extend(&root_ports[i]);
            for (&pid, reasons) in &expansions[i] {
                let member = members.entry(pid).or_insert_with(|| Member {
                    comm: snap.comm(pid),
                    reasons: Vec::new(),
                });
                for r in reasons {
                    if !member.reasons.iter().any(|m| m.same_as(r)) {
                        member.reasons.push(r.clone());
                    }
                }
            }
        }
        let gpu_evidence: BTreeMap<u32, ProcessGpus> = members
            .keys()
            .filter_map(|&pid| {
                let g = gpu::process_gpus(procfs, pid, majors, &opts.device_root);
                (!g.is_empty()).then_some((pid, g))
            })
            .collect();
        let gpus: BTreeSet<u32> = gpu_evidence
            .values()
            .flat_map(ProcessGpus::mapped)
            .collect();
        let fd_only_gpus = gpu_evidence
            .values()
            .flat_map(|g| g.minors.iter().copied())
            .filter(|m| !gpus.contains(m))
            .collect();
        let roots_of: Vec<RootSpec> = group.iter().map(|&i| roots[i].spec.clone()).collect();
        services.push(Service {
            id: u32::try_from(n + 1).unwrap_or(u32::MAX),
            name: roots_of
                .iter()
                .map(RootSpec::label)
                .collect::<Vec<_>>()
                .join(" + "),
            roots: roots_of,
            ports: ports.into_iter().collect(),
            members,
            gpus,
            fd_only_gpus,
            gpu_evidence,
        });
    }

    let mut discovery = Discovery {
        services,
        inventory: gpu::inventory(&procfs.proc_root),
        warnings,
        ..Discovery::default()
    };
    let used: BTreeSet<u32> = discovery
        .services
        .iter()
        .flat_map(|s| s.gpus.iter().copied())
        .collect();
    if !used.is_empty() {
        let in_service: BTreeSet<u32> = discovery
            .services
            .iter()
            .flat_map(|s| s.members.keys().copied())
            .collect();
        for (pid, g) in gpu::all_process_gpus(procfs, majors, &opts.device_root)? {
            if pid == opts.self_pid || in_service.contains(&pid) {
                continue;
            }
            let shared: Vec<u32> = g.minors.intersection(&used).copied().collect();
            if shared.is_empty() {
                continue;
            }
            for minor in shared {
                discovery.others.entry(minor).or_default().push(pid);
            }
            discovery.other_holders.insert(
                pid,
                Holder {
                    comm: snap.comm(pid),
                    gpus: g,
                },
            );
        }
    }
    Ok(discovery)
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

fn union(parent: &mut [usize], a: usize, b: usize) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    if ra != rb {
        let (lo, hi) = (ra.min(rb), ra.max(rb));
        parent[hi] = lo;
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

// ---------------------------------------------------------------------------------------------
// Loopback TCP
// ---------------------------------------------------------------------------------------------

/// The TCP sockets of one network namespace, indexed.
#[derive(Debug, Default)]
struct TcpTable {
    entries: Vec<TcpEntry>,
    by_inode: HashMap<u64, usize>,
    by_ends: HashMap<(SocketAddr, SocketAddr), usize>,
    /// Listening addresses by port.
    listening: HashMap<u16, Vec<IpAddr>>,
}

impl TcpTable {
    fn new(entries: Vec<TcpEntry>) -> Self {
        let mut t = Self {
            entries,
            ..Self::default()
        };
        for (i, e) in t.entries.iter().enumerate() {
            if e.inode != 0 {
                t.by_inode.insert(e.inode, i);
            }
            match e.state {
                TCP_ESTABLISHED => {
                    t.by_ends.insert((e.local, e.remote), i);
                }
                TCP_LISTEN => t
                    .listening
                    .entry(e.local.port())
                    .or_default()
                    .push(e.local.ip()),
                _ => {}
            }
        }
        t
    }

    fn by_inode(&self, inode: u64) -> Option<&TcpEntry> {
        self.entries.get(*self.by_inode.get(&inode)?)
    }

    /// The other end of an established connection (same namespace).
    fn peer_of(&self, e: &TcpEntry) -> Option<&TcpEntry> {
        self.entries.get(*self.by_ends.get(&(e.remote, e.local))?)
    }

    /// Whether some socket listens on `addr` (its address or the wildcard).
    fn listens(&self, addr: SocketAddr) -> bool {
        self.listening
            .get(&addr.port())
            .is_some_and(|ips| ips.iter().any(|ip| *ip == addr.ip() || ip.is_unspecified()))
    }
}

// ---------------------------------------------------------------------------------------------
// The procfs snapshot and the walk
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct ProcInfo {
    comm: String,
    kthread: bool,
    cgroup: Option<String>,
    netns: Option<String>,
    /// Socket inode → the fds holding it.
    sockets: BTreeMap<u64, Vec<u32>>,
}

/// Every process with what discovery needs, read once.
#[derive(Debug, Default)]
struct Snapshot {
    procs: BTreeMap<u32, ProcInfo>,
    children: BTreeMap<u32, Vec<u32>>,
    /// Socket inode → processes holding it.
    holders: HashMap<u64, BTreeSet<u32>>,
}

impl Snapshot {
    fn take(procfs: &ProcFs) -> Result<Self, TargetError> {
        let mut snap = Self::default();
        for pid in procfs.pids()? {
            let dir = procfs.proc_root.join(pid.to_string());
            let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
                continue;
            };
            let Some(st) = procfs::parse_stat(&stat) else {
                continue;
            };
            let kthread = st.is_kthread(pid);
            let (comm, ppid) = (st.comm, st.ppid);
            let mut sockets: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
            for (fd, inode) in procfs.socket_fds(pid) {
                sockets.entry(inode).or_default().push(fd);
                snap.holders.entry(inode).or_default().insert(pid);
            }
            snap.children.entry(ppid).or_default().push(pid);
            snap.procs.insert(
                pid,
                ProcInfo {
                    comm,
                    kthread,
                    cgroup: fs::read_to_string(dir.join("cgroup"))
                        .ok()
                        .and_then(|t| procfs::parse_cgroup(&t)),
                    netns: fs::read_link(dir.join("ns/net"))
                        .ok()
                        .map(|p| p.to_string_lossy().into_owned()),
                    sockets,
                },
            );
        }
        Ok(snap)
    }

    fn comm(&self, pid: u32) -> String {
        self.procs
            .get(&pid)
            .map(|p| p.comm.clone())
            .unwrap_or_default()
    }

    /// Whether `pid` holds `inode` only as stdio (fds 0–2).
    fn stdio_only(&self, pid: u32, inode: u64) -> bool {
        self.procs
            .get(&pid)
            .and_then(|p| p.sockets.get(&inode))
            .is_some_and(|fds| fds.iter().all(|&fd| fd <= 2))
    }
}

/// How a process joined: as the server side of a link (fan-in rule applies), or otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    Server,
    Full,
}

/// The best way a process has been reached so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reach {
    depth: u32,
    full: bool,
}

struct Walk {
    members: BTreeMap<u32, Vec<Reason>>,
    reach: HashMap<u32, Reach>,
    queue: VecDeque<u32>,
}

struct Walker<'a> {
    procfs: &'a ProcFs,
    snap: &'a Snapshot,
    unix: HashMap<u64, UnixSocket>,
    /// TCP tables by network namespace.
    tables: HashMap<String, TcpTable>,
    opts: &'a DiscoverOptions,
}

impl Walker<'_> {
    fn eligible(&self, pid: u32) -> bool {
        pid != 1
            && pid != self.opts.self_pid
            && self.snap.procs.get(&pid).is_some_and(|p| !p.kthread)
    }

    /// The cgroup of a cgroup root, as `/proc/<pid>/cgroup` spells it.
    fn cgroup_rel(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.procfs.cgroup_root).unwrap_or(path);
        format!("/{}", rel.to_string_lossy().trim_matches('/'))
    }

    fn root_pids(&self, root: &ServiceRoot) -> BTreeSet<u32> {
        let mut pids = root.pids.clone();
        if let RootSpec::Cgroup(path) = &root.spec {
            let want = self.cgroup_rel(path);
            pids.extend(
                self.snap
                    .procs
                    .iter()
                    .filter(|(_, p)| p.cgroup.as_deref().is_some_and(|c| cgroup_under(c, &want)))
                    .map(|(&pid, _)| pid),
            );
        }
        pids.retain(|&pid| self.eligible(pid));
        pids
    }

    /// The TCP table of `pid`'s network namespace (falling back to `<proc>/net` when the
    /// process has none, as in fake trees).
    fn table(&mut self, pid: u32) -> &TcpTable {
        let key = self
            .snap
            .procs
            .get(&pid)
            .and_then(|p| p.netns.clone())
            .unwrap_or_else(|| format!("pid {pid}"));
        let procfs = self.procfs;
        self.tables.entry(key).or_insert_with(|| {
            let entries = procfs
                .tcp_entries_in(&format!("{pid}/net"))
                .or_else(|| procfs.tcp_entries_in("net"))
                .unwrap_or_default();
            TcpTable::new(entries)
        })
    }

    /// A root's endpoint ports: its port, and every TCP port its processes listen on.
    fn endpoint_ports(&mut self, root: &ServiceRoot, pids: &BTreeSet<u32>) -> BTreeSet<u16> {
        let mut ports = BTreeSet::new();
        if let RootSpec::Port(port) = root.spec {
            ports.insert(port);
        }
        for &pid in pids {
            let inodes: Vec<u64> = self
                .snap
                .procs
                .get(&pid)
                .map(|p| p.sockets.keys().copied().collect())
                .unwrap_or_default();
            let table = self.table(pid);
            ports.extend(
                inodes
                    .iter()
                    .filter_map(|&i| table.by_inode(i))
                    .filter(|e| e.state == TCP_LISTEN)
                    .map(|e| e.local.port()),
            );
        }
        ports
    }

    /// Adds `pid` as reached with `reason`, `depth` IPC hops from the root. Descendants go to
    /// the front of the queue (same depth), peers to the back (one hop more), so processes are
    /// expanded in order of depth (0-1 BFS) and the first reach is a shortest one.
    fn add(&self, walk: &mut Walk, pid: u32, reason: Reason, depth: u32, entry: Entry) {
        if !self.eligible(pid) {
            return;
        }
        let is_descendant = matches!(reason, Reason::Descendant { .. });
        // A link back to the member that brought `from` in says nothing new.
        let back_edge = reason.linked_from().is_some_and(|from| {
            walk.members
                .get(&from)
                .is_some_and(|rs| rs.iter().any(|r| r.linked_from() == Some(pid)))
        });
        let reasons = walk.members.entry(pid).or_default();
        if !back_edge && !reasons.iter().any(|r| r.same_as(&reason)) {
            reasons.push(reason);
        }
        let full = entry == Entry::Full;
        let merged = match walk.reach.get(&pid) {
            None => Reach { depth, full },
            // A server peer becomes fully expanded only through a path as short as the one it
            // was found by (not through a longer path that came back to it).
            Some(old) if depth < old.depth || (full && !old.full && depth <= old.depth) => Reach {
                depth: old.depth.min(depth),
                full: old.full || full,
            },
            Some(_) => return,
        };
        walk.reach.insert(pid, merged);
        if is_descendant {
            walk.queue.push_front(pid);
        } else {
            walk.queue.push_back(pid);
        }
    }

    fn expand(
        &mut self,
        root: &ServiceRoot,
        pids: &BTreeSet<u32>,
        endpoints: &BTreeSet<u16>,
    ) -> BTreeMap<u32, Vec<Reason>> {
        let mut walk = Walk {
            members: BTreeMap::new(),
            reach: HashMap::new(),
            queue: VecDeque::new(),
        };
        // Given pids are targets; the rest of `pids` came from the root's cgroup.
        let target = Reason::Target {
            why: match &root.spec {
                RootSpec::Port(port) => format!("listens on port {port}"),
                other => other.label(),
            },
        };
        let in_cgroup = match &root.spec {
            RootSpec::Cgroup(path) => Reason::Cgroup {
                path: self.cgroup_rel(path),
            },
            _ => target.clone(),
        };
        for &pid in pids {
            let reason = if root.pids.contains(&pid) {
                target.clone()
            } else {
                in_cgroup.clone()
            };
            self.add(&mut walk, pid, reason, 0, Entry::Full);
        }
        while let Some(pid) = walk.queue.pop_front() {
            let Some(reach) = walk.reach.get(&pid).copied() else {
                continue;
            };
            let entry = if reach.full {
                Entry::Full
            } else {
                Entry::Server
            };
            let children = self.snap.children.get(&pid).cloned().unwrap_or_default();
            for child in children {
                self.add(
                    &mut walk,
                    child,
                    Reason::Descendant { of: pid },
                    reach.depth,
                    Entry::Full,
                );
            }
            if reach.depth >= self.opts.max_depth {
                continue;
            }
            let sockets: Vec<(u64, Vec<u32>)> = self
                .snap
                .procs
                .get(&pid)
                .map(|p| p.sockets.iter().map(|(i, f)| (*i, f.clone())).collect())
                .unwrap_or_default();
            for (inode, fds) in sockets {
                let links = if self.unix.contains_key(&inode) {
                    self.unix_links(pid, inode, &fds, entry)
                } else {
                    self.tcp_links(pid, inode, entry, endpoints)
                };
                for (peer, reason, peer_entry) in links {
                    self.add(&mut walk, peer, reason, reach.depth + 1, peer_entry);
                }
            }
        }
        walk.members
    }

    fn is_system_socket(&self, name: Option<&str>) -> bool {
        name.is_some_and(|n| self.opts.system_sockets.iter().any(|p| glob_match(p, n)))
    }

    /// Processes linked to `pid` through the Unix socket `inode` it holds as `fds`.
    fn unix_links(
        &self,
        pid: u32,
        inode: u64,
        fds: &[u32],
        entry: Entry,
    ) -> Vec<(u32, Reason, Entry)> {
        let Some(me) = self.unix.get(&inode) else {
            return Vec::new();
        };
        let Some(peer_inode) = me.peer else {
            return Vec::new();
        };
        if !me.is_stream() || fds.iter().all(|&fd| fd <= 2) {
            return Vec::new();
        }
        let my_name = me.name.as_deref();
        let peer_name = self.unix.get(&peer_inode).and_then(|p| p.name.as_deref());
        if self.is_system_socket(my_name) || self.is_system_socket(peer_name) {
            return Vec::new();
        }
        // An accepted socket carries its listener's name; the connecting side usually has none.
        let me_server = my_name.is_some() && peer_name.is_none();
        let peer_server = peer_name.is_some() && my_name.is_none();
        if entry == Entry::Server && me_server {
            return Vec::new();
        }
        let name = my_name.or(peer_name).map(str::to_string);
        self.snap
            .holders
            .get(&peer_inode)
            .into_iter()
            .flatten()
            .filter(|&&h| h != pid && !self.snap.stdio_only(h, peer_inode))
            .map(|&h| {
                (
                    h,
                    Reason::UnixPeer {
                        peer: pid,
                        inode: peer_inode,
                        name: name.clone(),
                    },
                    if peer_server {
                        Entry::Server
                    } else {
                        Entry::Full
                    },
                )
            })
            .collect()
    }

    /// Processes linked to `pid` through the TCP socket `inode`, when it is a loopback link.
    fn tcp_links(
        &mut self,
        pid: u32,
        inode: u64,
        entry: Entry,
        endpoints: &BTreeSet<u16>,
    ) -> Vec<(u32, Reason, Entry)> {
        let table = self.table(pid);
        let Some(me) = table.by_inode(inode) else {
            return Vec::new();
        };
        if me.state != TCP_ESTABLISHED
            || !is_loopback(me.local.ip())
            || !is_loopback(me.remote.ip())
            || endpoints.contains(&me.local.port())
            || endpoints.contains(&me.remote.port())
        {
            return Vec::new();
        }
        let me_server = table.listens(me.local);
        let peer_server = !me_server && table.listens(me.remote);
        if entry == Entry::Server && me_server {
            return Vec::new();
        }
        let Some(peer) = table.peer_of(me) else {
            return Vec::new();
        };
        let port = if me_server {
            me.local.port()
        } else {
            me.remote.port()
        };
        let peer_inode = peer.inode;
        if peer_inode == 0 {
            return Vec::new();
        }
        self.snap
            .holders
            .get(&peer_inode)
            .into_iter()
            .flatten()
            .filter(|&&h| h != pid)
            .map(|&h| {
                (
                    h,
                    Reason::LoopbackPeer { peer: pid, port },
                    if peer_server {
                        Entry::Server
                    } else {
                        Entry::Full
                    },
                )
            })
            .collect()
    }
}

/// Whether cgroup `path` is `root` or below it.
fn cgroup_under(path: &str, root: &str) -> bool {
    root == "/"
        || path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

// ---------------------------------------------------------------------------------------------
// Text output
// ---------------------------------------------------------------------------------------------

fn gpu_label(minor: u32, inventory: &[GpuInfo]) -> String {
    match inventory.iter().find(|g| g.minor == minor) {
        Some(g) => format!("GPU {minor} {} {} [{}]", g.uuid, g.model, g.bus),
        None => format!("GPU {minor} (not in the driver's inventory)"),
    }
}

fn gpus_cell(g: &ProcessGpus) -> String {
    let mapped = g.mapped();
    let mut parts: Vec<String> = g
        .minors
        .iter()
        .map(|m| {
            let fds: Vec<String> = g
                .evidence
                .iter()
                .filter_map(|e| match e {
                    gpu::Evidence::Fd {
                        fd,
                        node: gpu::Node::Gpu(n),
                    } if n == m => Some(format!("fd {fd}")),
                    _ => None,
                })
                .collect();
            let mut how = fds;
            if mapped.contains(m) {
                how.push("mapped".into());
            }
            format!("{m} ({})", how.join(", "))
        })
        .collect();
    if g.ctl {
        parts.push("ctl".into());
    }
    if g.uvm {
        parts.push("uvm".into());
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// The table `tracer services` prints: per service its endpoint ports and GPUs (minor, UUID and
/// model when the driver's inventory knows them), then one row per member: pid, comm, GPU use
/// and why it is a member; then who else holds the service's GPUs.
pub fn render_text(d: &Discovery) -> String {
    let mut out = String::new();
    for s in &d.services {
        let _ = writeln!(out, "service {}: {}", s.id, s.name);
        let ports: Vec<String> = s.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(
            out,
            "  ports: {}",
            if ports.is_empty() {
                "-".to_string()
            } else {
                ports.join(", ")
            }
        );
        if s.gpus.is_empty() {
            let _ = writeln!(out, "  gpus:  none with a context");
        }
        for (i, &minor) in s.gpus.iter().enumerate() {
            let head = if i == 0 { "  gpus: " } else { "        " };
            let _ = writeln!(out, "{head} {}", gpu_label(minor, &d.inventory));
        }
        if !s.fd_only_gpus.is_empty() {
            let fd_only: Vec<String> = s.fd_only_gpus.iter().map(u32::to_string).collect();
            let _ = writeln!(
                out,
                "  fd only (no context, not counted): {}",
                fd_only.join(", ")
            );
        }
        let rows: Vec<[String; 4]> = s
            .members
            .iter()
            .map(|(pid, m)| {
                [
                    pid.to_string(),
                    m.comm.clone(),
                    s.gpu_evidence
                        .get(pid)
                        .map_or_else(|| "-".to_string(), gpus_cell),
                    m.reasons
                        .iter()
                        .map(Reason::text)
                        .collect::<Vec<_>>()
                        .join("; "),
                ]
            })
            .collect();
        let header = ["PID", "COMM", "GPUS", "WHY"].map(str::to_string);
        let width = |c: usize| {
            rows.iter()
                .chain(std::iter::once(&header))
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        };
        let (w0, w1, w2) = (width(0), width(1), width(2));
        for r in std::iter::once(&header).chain(&rows) {
            let _ = writeln!(
                out,
                "  {:<w0$}  {:<w1$}  {:<w2$}  {}",
                r[0], r[1], r[2], r[3]
            );
        }
        for &minor in &s.gpus {
            if let Some(pids) = d.others.get(&minor) {
                let who: Vec<String> = pids
                    .iter()
                    .map(|pid| {
                        let h = d.other_holders.get(pid);
                        let comm = h.map_or("", |h| h.comm.as_str());
                        let how = if h.is_some_and(|h| h.gpus.mapped().contains(&minor)) {
                            "mapped"
                        } else {
                            "fd only"
                        };
                        format!("{pid} {comm} ({how})")
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "  GPU {minor} is also held outside every service by: {}",
                    who.join(", ")
                );
            }
            for other in &d.services {
                if other.id != s.id && other.gpus.contains(&minor) {
                    let _ = writeln!(out, "  GPU {minor} is also used by service {}", other.id);
                }
            }
        }
        out.push('\n');
    }
    for w in &d.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// NETLINK_SOCK_DIAG for Unix sockets
// ---------------------------------------------------------------------------------------------

/// Unix socket table from the kernel over `NETLINK_SOCK_DIAG` (what `ss -x` shows): each
/// socket's inode, type, state, bound name and peer inode.
///
/// The request and the replies are built and read byte by byte (native endian, as netlink is);
/// every length is checked against the buffer before use.
pub mod unix_diag {
    use std::{
        io,
        mem::size_of,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    use serde::Serialize;

    /// `NETLINK_SOCK_DIAG` (`linux/netlink.h`).
    pub const NETLINK_SOCK_DIAG: i32 = 4;
    /// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`).
    pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
    /// `NLM_F_REQUEST | NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
    pub const NLM_F_REQUEST_DUMP: u16 = 0x0001 | 0x0100 | 0x0200;
    /// `NLMSG_ERROR`.
    pub const NLMSG_ERROR: u16 = 2;
    /// `NLMSG_DONE`.
    pub const NLMSG_DONE: u16 = 3;
    /// `UDIAG_SHOW_NAME` (`linux/unix_diag.h`).
    pub const UDIAG_SHOW_NAME: u32 = 0x1;
    /// `UDIAG_SHOW_PEER`.
    pub const UDIAG_SHOW_PEER: u32 = 0x4;
    /// Attribute `UNIX_DIAG_NAME`: the bound address (`sun_path` bytes, abstract ones start with
    /// a NUL).
    pub const UNIX_DIAG_NAME: u16 = 0;
    /// Attribute `UNIX_DIAG_PEER`: the peer's inode (u32).
    pub const UNIX_DIAG_PEER: u16 = 2;
    /// `sizeof(struct nlmsghdr)`.
    pub const NLMSG_HDRLEN: usize = 16;
    /// `sizeof(struct unix_diag_req)`.
    pub const UNIX_DIAG_REQ_LEN: usize = 24;
    /// `sizeof(struct unix_diag_msg)`.
    pub const UNIX_DIAG_MSG_LEN: usize = 16;
    /// Socket types.
    pub const SOCK_STREAM: u8 = 1;
    pub const SOCK_DGRAM: u8 = 2;
    pub const SOCK_SEQPACKET: u8 = 5;

    /// Receive buffer: the kernel caps a dump message batch at about 32 KiB.
    const RECV_BUF: usize = 64 * 1024;
    /// Give up on a dump larger than this many sockets.
    const MAX_SOCKETS: usize = 4_000_000;
    /// Sequence number of our one request.
    const SEQ: u32 = 0x7472_6163;

    /// One Unix socket.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
    pub struct UnixSocket {
        pub inode: u64,
        /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
        pub kind: u8,
        /// TCP-like state (1 established, 10 listen).
        pub state: u8,
        /// The other end's inode, for a connected socket.
        pub peer: Option<u64>,
        /// The bound name: a path, or `@…` for an abstract name.
        pub name: Option<String>,
    }

    impl UnixSocket {
        /// Stream or seqpacket (connection-oriented, so the peer is a conversation partner).
        pub fn is_stream(&self) -> bool {
            self.kind == SOCK_STREAM || self.kind == SOCK_SEQPACKET
        }
    }

    /// Errors from the dump.
    #[derive(Debug, thiserror::Error)]
    pub enum DiagError {
        #[error("sock_diag {op}: {source}")]
        Io {
            op: &'static str,
            #[source]
            source: io::Error,
        },
        #[error("sock_diag: kernel answered {0}")]
        Kernel(io::Error),
        #[error("sock_diag: malformed reply: {0}")]
        Malformed(&'static str),
        #[error("sock_diag: a reply of {0} bytes does not fit the receive buffer")]
        Truncated(usize),
        #[error("sock_diag: more than {MAX_SOCKETS} sockets")]
        TooMany,
    }

    fn io_err(op: &'static str) -> DiagError {
        DiagError::Io {
            op,
            source: io::Error::last_os_error(),
        }
    }

    /// The request: `nlmsghdr` + `unix_diag_req` for every state, with names and peers.
    pub fn request() -> Vec<u8> {
        let len = (NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN) as u32;
        let mut b = Vec::with_capacity(len as usize);
        b.extend_from_slice(&len.to_ne_bytes()); // nlmsg_len
        b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
        b.extend_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes()); // nlmsg_flags
        b.extend_from_slice(&SEQ.to_ne_bytes()); // nlmsg_seq
        b.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        b.push(libc::AF_UNIX as u8); // sdiag_family
        b.push(0); // sdiag_protocol
        b.extend_from_slice(&0u16.to_ne_bytes()); // pad
        b.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
        b.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
        b.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER).to_ne_bytes()); // udiag_show
        b.extend_from_slice(&[0u8; 8]); // udiag_cookie
        b
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    const fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    fn decode_name(raw: &[u8]) -> String {
        // Abstract: leading NUL, the rest is the name (may contain NULs; shown as is).
        if let Some((0, rest)) = raw.split_first() {
            return format!("@{}", String::from_utf8_lossy(rest));
        }
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }

    /// Parses one `unix_diag_msg` with its attributes.
    pub fn parse_message(payload: &[u8]) -> Result<UnixSocket, DiagError> {
        if payload.len() < UNIX_DIAG_MSG_LEN {
            return Err(DiagError::Malformed("short unix_diag_msg"));
        }
        let inode = u32_at(payload, 4).ok_or(DiagError::Malformed("inode"))?;
        let mut sock = UnixSocket {
            inode: u64::from(inode),
            kind: payload[1],
            state: payload[2],
            peer: None,
            name: None,
        };
        let mut off = UNIX_DIAG_MSG_LEN;
        while off + 4 <= payload.len() {
            let len = usize::from(u16_at(payload, off).ok_or(DiagError::Malformed("rtattr"))?);
            let kind = u16_at(payload, off + 2).ok_or(DiagError::Malformed("rtattr"))?;
            if len < 4 || off + len > payload.len() {
                return Err(DiagError::Malformed("rtattr length"));
            }
            let data = &payload[off + 4..off + len];
            match kind {
                UNIX_DIAG_NAME if !data.is_empty() => sock.name = Some(decode_name(data)),
                UNIX_DIAG_PEER => {
                    let peer = u32_at(data, 0).ok_or(DiagError::Malformed("peer attribute"))?;
                    if peer != 0 {
                        sock.peer = Some(u64::from(peer));
                    }
                }
                _ => {}
            }
            off += align4(len);
        }
        Ok(sock)
    }

    /// Parses one datagram of the dump into `out`. Returns whether the dump is done.
    pub fn parse_batch(buf: &[u8], out: &mut Vec<UnixSocket>) -> Result<bool, DiagError> {
        let mut off = 0;
        while off + NLMSG_HDRLEN <= buf.len() {
            let len = u32_at(buf, off).ok_or(DiagError::Malformed("nlmsghdr"))? as usize;
            let kind = u16_at(buf, off + 4).ok_or(DiagError::Malformed("nlmsghdr"))?;
            let seq = u32_at(buf, off + 8).ok_or(DiagError::Malformed("nlmsghdr"))?;
            if len < NLMSG_HDRLEN || len > buf.len() - off {
                return Err(DiagError::Malformed("nlmsg_len"));
            }
            let payload = &buf[off + NLMSG_HDRLEN..off + len];
            off += align4(len);
            if seq != SEQ {
                continue;
            }
            match kind {
                NLMSG_DONE => {
                    // A dump's DONE carries an int; negative is an error of the dump.
                    if let Some(code) = u32_at(payload, 0).map(|c| c as i32)
                        && code < 0
                    {
                        return Err(DiagError::Kernel(io::Error::from_raw_os_error(-code)));
                    }
                    return Ok(true);
                }
                NLMSG_ERROR => {
                    let code = u32_at(payload, 0).ok_or(DiagError::Malformed("nlmsgerr"))? as i32;
                    if code != 0 {
                        return Err(DiagError::Kernel(io::Error::from_raw_os_error(
                            code.saturating_neg(),
                        )));
                    }
                }
                SOCK_DIAG_BY_FAMILY => {
                    if out.len() >= MAX_SOCKETS {
                        return Err(DiagError::TooMany);
                    }
                    out.push(parse_message(payload)?);
                }
                _ => {}
            }
        }
        Ok(false)
    }

    /// Dumps every Unix socket of the caller's network namespace. Best effort: a dump the
    /// kernel marks inconsistent (`NLM_F_DUMP_INTR`, sockets changed meanwhile) is taken as is.
    pub fn dump() -> Result<Vec<UnixSocket>, DiagError> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if raw < 0 {
            return Err(io_err("socket"));
        }
        // SAFETY: `raw` is a valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: the option value points to a live timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io_err("setsockopt"));
        }
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (pid 0: the kernel).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let req = request();
        // SAFETY: buffer and address are live for the call, with their true lengths.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io_err("sendto"));
        }
        if sent as usize != req.len() {
            return Err(DiagError::Malformed("short send"));
        }
        let mut buf = vec![0u8; RECV_BUF];
        let mut out = Vec::new();
        loop {
            // SAFETY: `buf` is live and writable for its length. MSG_TRUNC makes the call return
            // the datagram's real length, so a truncation is seen.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DiagError::Io {
                    op: "recv",
                    source: e,
                });
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(DiagError::Truncated(n));
            }
            if n == 0 {
                return Err(DiagError::Malformed("empty reply"));
            }
            if parse_batch(&buf[..n], &mut out)? {
                return Ok(out);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(data);
            while b.len() % 4 != 0 {
                b.push(0);
            }
            b
        }

        fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(&2u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(payload);
            while b.len() % 4 != 0 {
                b.push(0);
            }
            b
        }

        fn diag_msg(kind: u8, state: u8, inode: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
            let mut b = vec![libc::AF_UNIX as u8, kind, state, 0];
            b.extend_from_slice(&inode.to_ne_bytes());
            b.extend_from_slice(&[0u8; 8]);
            for a in attrs {
                b.extend_from_slice(a);
            }
            b
        }

        #[test]
        fn request_layout() {
            let r = request();
            assert_eq!(r.len(), 40);
            assert_eq!(u32_at(&r, 0), Some(40));
            assert_eq!(u16_at(&r, 4), Some(20));
            assert_eq!(r[16], libc::AF_UNIX as u8);
            assert_eq!(u32_at(&r, 20), Some(u32::MAX));
            assert_eq!(u32_at(&r, 28), Some(5));
        }

        #[test]
        fn batch_with_names_peers_done_and_errors() {
            let mut buf = message(
                SOCK_DIAG_BY_FAMILY,
                SEQ,
                &diag_msg(
                    SOCK_STREAM,
                    1,
                    100,
                    &[
                        attr(UNIX_DIAG_NAME, b"/tmp/sock"),
                        attr(UNIX_DIAG_PEER, &101u32.to_ne_bytes()),
                    ],
                ),
            );
            buf.extend(message(
                SOCK_DIAG_BY_FAMILY,
                SEQ,
                &diag_msg(SOCK_DGRAM, 7, 102, &[attr(UNIX_DIAG_NAME, b"\0abstract")]),
            ));
            // Another request's message is skipped.
            buf.extend(message(
                SOCK_DIAG_BY_FAMILY,
                SEQ + 1,
                &diag_msg(SOCK_STREAM, 1, 999, &[]),
            ));
            let mut out = Vec::new();
            assert!(!parse_batch(&buf, &mut out).expect("parses"));
            assert_eq!(
                out,
                vec![
                    UnixSocket {
                        inode: 100,
                        kind: SOCK_STREAM,
                        state: 1,
                        peer: Some(101),
                        name: Some("/tmp/sock".into())
                    },
                    UnixSocket {
                        inode: 102,
                        kind: SOCK_DGRAM,
                        state: 7,
                        peer: None,
                        name: Some("@abstract".into())
                    }
                ]
            );
            assert!(
                parse_batch(&message(NLMSG_DONE, SEQ, &0i32.to_ne_bytes()), &mut out)
                    .expect("done")
            );
            let err = parse_batch(
                &message(NLMSG_ERROR, SEQ, &(-13i32).to_ne_bytes()),
                &mut out,
            );
            assert!(
                matches!(&err, Err(DiagError::Kernel(e)) if e.raw_os_error() == Some(13)),
                "{err:?}"
            );
        }

        #[test]
        fn malformed_lengths_are_errors_not_panics() {
            let good = message(SOCK_DIAG_BY_FAMILY, SEQ, &diag_msg(SOCK_STREAM, 1, 5, &[]));
            let mut out = Vec::new();
            // nlmsg_len past the buffer.
            let mut long = good.clone();
            long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
            assert!(matches!(
                parse_batch(&long, &mut out),
                Err(DiagError::Malformed(_))
            ));
            // nlmsg_len below the header.
            let mut short = good.clone();
            short[0..4].copy_from_slice(&4u32.to_ne_bytes());
            assert!(parse_batch(&short, &mut out).is_err());
            // Payload shorter than unix_diag_msg.
            assert!(parse_batch(&message(SOCK_DIAG_BY_FAMILY, SEQ, &[1, 2, 3]), &mut out).is_err());
            // Attribute longer than the payload.
            let mut bad_attr = diag_msg(SOCK_STREAM, 1, 5, &[attr(UNIX_DIAG_PEER, &[0; 4])]);
            bad_attr[16..18].copy_from_slice(&200u16.to_ne_bytes());
            assert!(parse_message(&bad_attr).is_err());
            // Truncated peer attribute.
            assert!(
                parse_message(&diag_msg(SOCK_STREAM, 1, 5, &[attr(UNIX_DIAG_PEER, &[1])])).is_err()
            );
            // Trailing bytes shorter than a header are ignored.
            let mut tail = good;
            tail.extend_from_slice(&[0; 8]);
            assert!(!parse_batch(&tail, &mut out).expect("parses"));
            assert!(
                proptest_like_fuzz(),
                "random buffers never panic the parser"
            );
        }

        /// Feeds pseudo-random buffers (deterministic xorshift) to the parser.
        fn proptest_like_fuzz() -> bool {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            for _ in 0..2000 {
                let mut buf = vec![0u8; (x % 200) as usize];
                for b in &mut buf {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                if buf.len() >= 16 {
                    buf[8..12].copy_from_slice(&SEQ.to_ne_bytes());
                    buf[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
                }
                let _ = parse_batch(&buf, &mut Vec::new());
            }
            true
        }

        #[test]
        fn kernel_dump_finds_a_socketpair() {
            use std::os::unix::{fs::MetadataExt as _, net::UnixStream};
            let (a, b) = UnixStream::pair().expect("socketpair");
            let ino = |s: &UnixStream| {
                std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
                    .expect("stat fd")
                    .ino()
            };
            let (ia, ib) = (ino(&a), ino(&b));
            let all = dump().expect("sock_diag dump");
            let sa = all.iter().find(|s| s.inode == ia).expect("a listed");
            assert_eq!(sa.peer, Some(ib));
            assert_eq!(sa.kind, SOCK_STREAM);
            assert!(sa.name.is_none());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        os::{
            fd::{AsRawFd as _, RawFd},
            unix::{
                net::{UnixListener, UnixStream},
                process::CommandExt as _,
            },
        },
        process::{Child, Command, Stdio},
    };

    use super::*;

    // ---- /proc/net/tcp parsing ----------------------------------------------------------------

    /// Captured on x86-64 (little endian) with a dual-stack listener on port 44037 and one v4 and
    /// one v6 loopback client.
    const TCP4: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1594 1 00000000817e4110 100 0 0 10 0
   1: 0100007F:D4C6 0100007F:AC05 01 00000000:00000000 00:00000000 00000000     0        0 215105 2 00000000d348718b 20 0 0 10 -1
   2: 0500000A:0016 0100000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 31337 4 0000000000000000 20 4 29 10 -1
   3: 0100007F:1F90 0100007F:9C40 06 00000000:00000000 03:000012B4 00000000     0        0 0 3 0000000000000000
   bogus
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:AC05 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 215104 1 00000000da2d0467 100 0 0 10 0
   1: 00000000000000000000000001000000:AC05 00000000000000000000000001000000:C72C 01 00000000:00000000 00:00000000 00000000     0        0 215108 1 00000000228855e0 20 0 0 10 -1
   2: 00000000000000000000000001000000:C72C 00000000000000000000000001000000:AC05 01 00000000:00000000 00:00000000 00000000     0        0 215106 2 000000008d333849 20 0 0 10 -1
   3: 0000000000000000FFFF00000100007F:AC05 0000000000000000FFFF00000100007F:D4C6 01 00000000:00000000 00:00000000 00000000     0        0 215107 1 0000000057ce248f 20 0 0 10 -1
   4: B80D0120000000000000000001000000:01BB B80D0120000000000000000002000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 20 0 0 10 -1
";

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn tcp_entries_v4_and_v6_with_loopback_detection() {
        let v4 = procfs::parse_tcp(TCP4, false);
        assert_eq!(v4.len(), 4);
        assert_eq!(v4[0].local, sa("0.0.0.0:2024"));
        assert_eq!(v4[0].state, TCP_LISTEN);
        assert_eq!(
            v4[1],
            TcpEntry {
                local: sa("127.0.0.1:54470"),
                remote: sa("127.0.0.1:44037"),
                state: TCP_ESTABLISHED,
                inode: 215_105,
                v6: false,
            }
        );
        assert_eq!(v4[2].local, sa("10.0.0.5:22"));
        assert!(!is_loopback(v4[2].local.ip()) && !is_loopback(v4[2].remote.ip()));
        assert_eq!(v4[3].inode, 0, "time-wait sockets have no inode");

        let v6 = procfs::parse_tcp(TCP6, true);
        assert_eq!(v6.len(), 5);
        assert_eq!(v6[0].local, sa("[::]:44037"));
        assert_eq!(v6[1].local, sa("[::1]:44037"));
        assert_eq!(v6[1].remote, sa("[::1]:50988"));
        // The v4-mapped accepted end reads as v4, so it pairs with the v4 client's entry.
        assert_eq!(v6[3].local, sa("127.0.0.1:44037"));
        assert_eq!(v6[3].remote, v4[1].local);
        assert_eq!(v6[4].local, sa("[2001:db8::1]:443"));
        assert!(!is_loopback(v6[4].local.ip()));
        for e in [&v4[1], &v6[1], &v6[2], &v6[3]] {
            assert!(
                is_loopback(e.local.ip()) && is_loopback(e.remote.ip()),
                "{e:?}"
            );
        }
        assert!(is_loopback("::ffff:127.3.0.1".parse().expect("ip")));

        let table = TcpTable::new(v4.into_iter().chain(v6).collect());
        let client = table.by_inode(215_105).expect("client");
        assert_eq!(table.peer_of(client).map(|e| e.inode), Some(215_107));
        assert!(table.listens(sa("127.0.0.1:44037")), "wildcard v6 listener");
        assert!(!table.listens(client.local));
    }

    #[test]
    fn globs_and_cgroup_paths() {
        assert!(glob_match("/run/systemd/*", "/run/systemd/journal/stdout"));
        assert!(glob_match("/run/user/*/bus", "/run/user/1000/bus"));
        assert!(!glob_match("/run/user/*/bus", "/run/user/1000/bus2"));
        assert!(glob_match("/dev/log", "/dev/log"));
        assert!(!glob_match("/dev/log", "/dev/logx"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(cgroup_under("/system.slice/vllm.service", "/system.slice"));
        assert!(cgroup_under("/system.slice", "/system.slice"));
        assert!(!cgroup_under("/system.slice2/x", "/system.slice"));
        assert!(cgroup_under("/anything", "/"));
    }

    // ---- fake procfs trees ----------------------------------------------------------------------

    struct Tree {
        dir: tempfile::TempDir,
        tcp: Vec<String>,
        unix: Vec<UnixSocket>,
    }

    impl Tree {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            fs::create_dir_all(dir.path().join("proc/net")).expect("mkdir");
            fs::create_dir_all(dir.path().join("dev")).expect("mkdir");
            for n in ["nvidia0", "nvidia1", "nvidiactl"] {
                fs::write(dir.path().join("dev").join(n), "").expect("write");
            }
            Self {
                dir,
                tcp: Vec::new(),
                unix: Vec::new(),
            }
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

        fn pdir(&self, pid: u32) -> PathBuf {
            self.dir.path().join(format!("proc/{pid}"))
        }

        /// A process with `sockets` as (fd, inode).
        fn proc(&self, pid: u32, comm: &str, ppid: u32, sockets: &[(u32, u64)]) -> &Self {
            self.proc_flags(pid, comm, ppid, 0x0040_0100, sockets)
        }

        fn proc_flags(
            &self,
            pid: u32,
            comm: &str,
            ppid: u32,
            flags: u64,
            sockets: &[(u32, u64)],
        ) -> &Self {
            let p = self.pdir(pid);
            fs::create_dir_all(p.join("fd")).expect("mkdir");
            fs::write(
                p.join("stat"),
                format!("{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 0 0 0"),
            )
            .expect("write");
            for (fd, inode) in sockets {
                std::os::unix::fs::symlink(
                    format!("socket:[{inode}]"),
                    p.join("fd").join(fd.to_string()),
                )
                .expect("symlink");
            }
            self
        }

        fn gpu_fd(&self, pid: u32, fd: u32, node: &str) -> &Self {
            std::os::unix::fs::symlink(
                self.dev().join(node),
                self.pdir(pid).join("fd").join(fd.to_string()),
            )
            .expect("symlink");
            self
        }

        /// A mapping of the node (a context), appended to the process's maps.
        fn gpu_map(&self, pid: u32, node: &str) -> &Self {
            let path = self.pdir(pid).join("maps");
            let mut text = fs::read_to_string(&path).unwrap_or_default();
            let _ = writeln!(
                text,
                "7f00a0000000-7f00a0200000 rw-s 00000000 00:05 812 {}",
                self.dev().join(node).display()
            );
            fs::write(path, text).expect("write");
            self
        }

        fn cgroup(&self, pid: u32, path: &str) -> &Self {
            fs::write(self.pdir(pid).join("cgroup"), format!("0::{path}\n")).expect("write");
            self
        }

        fn tcp_line(&mut self, local: &str, remote: &str, state: u8, inode: u64) {
            fn hex(a: SocketAddr) -> String {
                let IpAddr::V4(ip) = a.ip() else {
                    panic!("v4 only in fake tables")
                };
                format!("{:08X}:{:04X}", u32::from_ne_bytes(ip.octets()), a.port())
            }
            self.tcp.push(format!(
                "{:4}: {} {} {state:02X} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 20 4 30 10 -1",
                self.tcp.len(),
                hex(sa(local)),
                hex(sa(remote)),
            ));
            let mut text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n".to_string();
            for l in &self.tcp {
                text.push_str(l);
                text.push('\n');
            }
            fs::write(self.dir.path().join("proc/net/tcp"), text).expect("write");
        }

        /// A loopback connection `client` → `server`; returns nothing, inodes given.
        fn tcp_conn(&mut self, client: &str, server: &str, client_inode: u64, server_inode: u64) {
            self.tcp_line(client, server, TCP_ESTABLISHED, client_inode);
            self.tcp_line(server, client, TCP_ESTABLISHED, server_inode);
        }

        fn tcp_listen(&mut self, addr: &str, inode: u64) {
            self.tcp_line(addr, "0.0.0.0:0", TCP_LISTEN, inode);
        }

        /// A connected Unix stream pair; `name_b` is the (listener's) name on `b`'s side.
        fn unix_pair(&mut self, a: u64, b: u64, name_b: Option<&str>) {
            self.unix.push(UnixSocket {
                inode: a,
                kind: unix_diag::SOCK_STREAM,
                state: 1,
                peer: Some(b),
                name: None,
            });
            self.unix.push(UnixSocket {
                inode: b,
                kind: unix_diag::SOCK_STREAM,
                state: 1,
                peer: Some(a),
                name: name_b.map(str::to_string),
            });
        }

        fn opts(&self) -> DiscoverOptions {
            DiscoverOptions {
                self_pid: 999_999,
                device_root: self.dev(),
                unix: UnixSource::Table(self.unix.clone()),
                ..DiscoverOptions::default()
            }
        }

        fn discover(&self, roots: &[ServiceRoot]) -> Discovery {
            discover(&self.procfs(), roots, &self.opts()).expect("discovers")
        }
    }

    fn root(spec: RootSpec, pids: &[u32]) -> ServiceRoot {
        ServiceRoot {
            spec,
            pids: pids.iter().copied().collect(),
        }
    }

    fn pids(s: &Service) -> Vec<u32> {
        s.members.keys().copied().collect()
    }

    /// vLLM-like: API server 10 on port 8000 (NVML fd on GPU 1) with child engine 11 with a
    /// context on GPU 0; a load generator 50 connected into 8000; untraced processes on GPU 0:
    /// 60 with an fd (a monitor), 61 with a context.
    fn vllm_like() -> Tree {
        let mut t = Tree::new();
        t.proc(10, "python3", 1, &[(5, 100), (6, 101), (7, 300)])
            .proc(11, "VLLM::EngineCor", 10, &[(4, 301)])
            .gpu_fd(11, 20, "nvidia0")
            .gpu_fd(11, 21, "nvidiactl")
            .gpu_map(11, "nvidia0")
            .gpu_fd(10, 9, "nvidiactl")
            .gpu_fd(10, 8, "nvidia1")
            .proc(50, "loadgen", 1, &[(3, 501)])
            .proc(60, "monitor", 1, &[])
            .gpu_fd(60, 3, "nvidia0")
            .proc(61, "untraced", 1, &[])
            .gpu_map(61, "nvidia0");
        t.tcp_listen("127.0.0.1:8000", 100);
        t.tcp_conn("127.0.0.1:40000", "127.0.0.1:8000", 501, 101);
        t.unix_pair(300, 301, Some("/tmp/ipc-1234"));
        t
    }

    #[test]
    fn client_of_the_endpoint_port_is_never_a_member() {
        let t = vllm_like();
        for spec in [RootSpec::Port(8000), RootSpec::Pid(10)] {
            let d = t.discover(&[root(spec, &[10])]);
            assert_eq!(d.services.len(), 1);
            let s = &d.services[0];
            assert_eq!(pids(s), [10, 11], "{}", render_text(&d));
            assert_eq!(s.ports, [8000]);
            assert_eq!(s.gpus, BTreeSet::from([0]));
            assert_eq!(s.fd_only_gpus, BTreeSet::from([1]));
            assert!(s.gpu_evidence[&10].ctl && s.gpu_evidence[&10].mapped().is_empty());
            assert_eq!(d.others, BTreeMap::from([(0, vec![60, 61])]));
            assert_eq!(d.other_holders[&60].comm, "monitor");
            assert!(d.other_holders[&61].gpus.mapped().contains(&0));
        }
        // Rooted at the load generator, nothing declares port 8000 an endpoint: the server is a
        // peer of the client.
        let d = t.discover(&[root(RootSpec::Pid(50), &[50])]);
        assert_eq!(pids(&d.services[0]), [10, 11, 50]);
        // Declared together, they stay two services.
        let d = t.discover(&[
            root(RootSpec::Port(8000), &[10]),
            root(RootSpec::Pid(50), &[50]),
        ]);
        assert_eq!(d.services.len(), 2);
        assert_eq!(pids(&d.services[1]), [50]);
    }

    #[test]
    fn reasons_and_text_output() {
        let t = vllm_like();
        let gpus = t.dir.path().join("proc/driver/nvidia/gpus/0000:18:00.0");
        fs::create_dir_all(&gpus).expect("mkdir");
        fs::write(
            gpus.join("information"),
            "Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t GPU-aaaa\nBus Location: \t 0000:18:00.0\nDevice Minor: \t 0\n",
        )
        .expect("write");
        let d = t.discover(&[root(RootSpec::Port(8000), &[10])]);
        let s = &d.services[0];
        assert_eq!(
            s.members[&10].reasons,
            [Reason::Target {
                why: "listens on port 8000".into()
            }]
        );
        // The engine is both a child and a Unix peer of the API server.
        assert_eq!(
            s.members[&11].reasons,
            [
                Reason::Descendant { of: 10 },
                Reason::UnixPeer {
                    peer: 10,
                    inode: 301,
                    name: Some("/tmp/ipc-1234".into())
                }
            ]
        );
        let text = render_text(&d);
        assert!(text.contains("service 1: port 8000"), "{text}");
        assert!(
            text.contains("GPU 0 GPU-aaaa NVIDIA H100 80GB HBM3 [0000:18:00.0]"),
            "{text}"
        );
        assert!(
            text.contains("VLLM::EngineCor  0 (fd 20, mapped) ctl"),
            "{text}"
        );
        assert!(text.contains("child of 10; unix peer of 10"), "{text}");
        assert!(
            text.contains("fd only (no context, not counted): 1"),
            "{text}"
        );
        assert!(
            text.contains("60 monitor (fd only), 61 untraced (mapped)"),
            "{text}"
        );
        let json = serde_json::to_value(&d).expect("json");
        assert_eq!(
            json["services"][0]["members"]["11"]["reasons"][0]["kind"],
            "descendant"
        );
        assert_eq!(json["others"]["0"][0], 60);
    }

    #[test]
    fn transitive_peers_stop_at_the_depth_bound() {
        let mut t = Tree::new();
        // 10 — 20 — 30 — 40 — 50 — 60, each link a socketpair (no names, no fan-in).
        let chain = [10u32, 20, 30, 40, 50, 60];
        for (i, &pid) in chain.iter().enumerate() {
            let mut socks = Vec::new();
            if i > 0 {
                socks.push((3, u64::from(pid) * 10));
            }
            if i + 1 < chain.len() {
                socks.push((4, u64::from(pid) * 10 + 1));
            }
            t.proc(pid, "p", 1, &socks);
        }
        for w in chain.windows(2) {
            t.unix_pair(u64::from(w[0]) * 10 + 1, u64::from(w[1]) * 10, None);
        }
        let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
        assert_eq!(pids(&d.services[0]), [10, 20, 30, 40, 50]);
        assert_eq!(
            d.services[0].members[&50].reasons,
            [Reason::UnixPeer {
                peer: 40,
                inode: 500,
                name: None
            }]
        );
        let mut opts = t.opts();
        opts.max_depth = 2;
        let d = discover(&t.procfs(), &[root(RootSpec::Pid(10), &[10])], &opts).expect("ok");
        assert_eq!(pids(&d.services[0]), [10, 20, 30]);
        opts.max_depth = 0;
        let d = discover(&t.procfs(), &[root(RootSpec::Pid(10), &[10])], &opts).expect("ok");
        assert_eq!(pids(&d.services[0]), [10]);
    }

    #[test]
    fn roots_that_are_ipc_peers_merge() {
        let mut t = Tree::new();
        // TGI-like: router 10 (port 3000) connects to shard 70's Unix listener; shard 70 is also
        // given by pid; 80 is unrelated.
        t.proc(10, "text-generation", 5, &[(3, 100), (9, 110)])
            .proc(70, "python", 5, &[(3, 170), (4, 171)])
            .gpu_fd(70, 12, "nvidia1")
            .gpu_map(70, "nvidia1")
            .proc(80, "unrelated", 1, &[])
            .proc(5, "launcher", 1, &[]);
        t.tcp_listen("0.0.0.0:3000", 100);
        t.unix_pair(110, 171, Some("/tmp/text-generation-server-0"));
        let d = t.discover(&[
            root(RootSpec::Port(3000), &[10]),
            root(RootSpec::Pid(80), &[80]),
            root(RootSpec::Pid(70), &[70]),
        ]);
        assert_eq!(d.services.len(), 2, "{}", render_text(&d));
        let s = &d.services[0];
        assert_eq!(s.name, "port 3000 + pid 70");
        assert_eq!(s.roots, [RootSpec::Port(3000), RootSpec::Pid(70)]);
        assert_eq!(pids(s), [10, 70]);
        assert_eq!(s.gpus, BTreeSet::from([1]));
        assert_eq!(s.members[&70].reasons.len(), 2, "target and unix peer");
        assert_eq!(d.services[1].id, 2);
        assert_eq!(pids(&d.services[1]), [80]);
        // The launcher (parent) is not pulled in.
        assert!(!s.members.contains_key(&5));
    }

    #[test]
    fn system_sockets_and_stdio_are_not_links() {
        let mut t = Tree::new();
        t.proc(10, "server", 1, &[(4, 100), (5, 101), (6, 102), (7, 103)])
            .proc(90, "systemd-journal", 1, &[(20, 900), (21, 901)])
            .proc(91, "worker", 1, &[(8, 910)])
            .proc(93, "dbus-daemon", 1, &[(9, 930)]);
        // Not stdio, so only the names keep journald (stream and syslog) and D-Bus out; the
        // unnamed socketpair to 91 is a link.
        t.unix_pair(100, 900, Some("/run/systemd/journal/stdout"));
        t.unix_pair(101, 901, Some("/dev/log"));
        t.unix_pair(103, 930, Some("/run/dbus/system_bus_socket"));
        t.unix_pair(102, 910, None);
        let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
        assert_eq!(pids(&d.services[0]), [10, 91]);
        // Unnamed, but held only as stdio on one side or the other: not a link.
        let mut t = Tree::new();
        t.proc(10, "server", 1, &[(2, 100), (5, 200)])
            .proc(91, "sshd", 1, &[(8, 101)])
            .proc(92, "logger", 1, &[(0, 201)]);
        t.unix_pair(100, 101, None);
        t.unix_pair(200, 201, None);
        let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
        assert_eq!(pids(&d.services[0]), [10]);
    }

    #[test]
    fn a_shared_server_joins_but_not_its_other_clients() {
        let mut t = Tree::new();
        // 10 (root) connects to 20's Unix listener and to 25's TCP port 6379; 30 and 35 are other
        // clients of 20 and 25; 20 itself connects out to 40 (followed).
        t.proc(10, "app", 1, &[(3, 100), (4, 150)])
            .proc(20, "db", 1, &[(3, 200), (4, 201), (5, 202)])
            .proc(25, "redis", 1, &[(3, 250), (4, 251), (5, 252)])
            .proc(30, "other-client", 1, &[(3, 300)])
            .proc(35, "other-client", 1, &[(3, 350)])
            .proc(40, "db-helper", 1, &[(3, 400)]);
        t.unix_pair(100, 200, Some("/tmp/db.sock"));
        t.unix_pair(300, 201, Some("/tmp/db.sock"));
        t.unix_pair(202, 400, None);
        t.tcp_listen("127.0.0.1:6379", 250);
        t.tcp_conn("127.0.0.1:41000", "127.0.0.1:6379", 150, 251);
        t.tcp_conn("127.0.0.1:41001", "127.0.0.1:6379", 350, 252);
        let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
        let s = &d.services[0];
        assert_eq!(pids(s), [10, 20, 25, 40], "{}", render_text(&d));
        assert_eq!(
            s.members[&25].reasons,
            [Reason::LoopbackPeer {
                peer: 10,
                port: 6379
            }]
        );
        // Rooted at the server itself, its clients are peers (TGI shard given by pid).
        let d = t.discover(&[root(RootSpec::Pid(20), &[20])]);
        assert_eq!(pids(&d.services[0]), [10, 20, 25, 30, 40]);
    }

    #[test]
    fn pid_1_self_and_kernel_threads_are_never_members() {
        let mut t = Tree::new();
        t.proc(1, "systemd", 0, &[(3, 10)])
            .proc(10, "server", 1, &[(3, 100), (4, 101), (5, 102)])
            .proc(11, "child", 10, &[])
            .proc_flags(12, "kthread-ish", 10, procfs::PF_KTHREAD, &[])
            .proc(2, "kthreadd", 0, &[])
            .proc(77, "kworker/0:1", 2, &[(3, 770)])
            .proc(999_999, "tracer", 10, &[(3, 1000)]);
        t.unix_pair(100, 10, None);
        t.unix_pair(101, 770, None);
        t.unix_pair(102, 1000, None);
        let d = t.discover(&[root(RootSpec::Pid(10), &[10])]);
        assert_eq!(pids(&d.services[0]), [10, 11]);
        let d = t.discover(&[root(RootSpec::Pid(1), &[1])]);
        assert!(d.services[0].members.is_empty());
        assert_eq!(d.warnings, ["pid 1 has no processes"]);
    }

    #[test]
    fn cgroup_roots_take_the_cgroup_and_below() {
        let t = Tree::new();
        t.proc(10, "a", 1, &[])
            .cgroup(10, "/system.slice/vllm.service")
            .proc(11, "b", 1, &[])
            .cgroup(11, "/system.slice/vllm.service/worker")
            .proc(12, "c", 1, &[])
            .cgroup(12, "/system.slice/vllm.service2")
            .proc(13, "d", 11, &[])
            .cgroup(13, "/user.slice");
        let cg = t.dir.path().join("cgroup/system.slice/vllm.service");
        for spec in [
            RootSpec::Cgroup(cg),
            RootSpec::Cgroup("system.slice/vllm.service".into()),
        ] {
            let d = t.discover(&[root(spec, &[])]);
            let s = &d.services[0];
            assert_eq!(pids(s), [10, 11, 13]);
            assert_eq!(
                s.members[&10].reasons,
                [Reason::Cgroup {
                    path: "/system.slice/vllm.service".into()
                }]
            );
            assert_eq!(s.members[&13].reasons, [Reason::Descendant { of: 11 }]);
        }
        assert!(matches!(
            discover(&t.procfs(), &[], &t.opts()),
            Err(ServiceError::NoRoots)
        ));
    }

    // ---- the real kernel ------------------------------------------------------------------------

    /// A `sleep` child holding `fds` as its fds 3, 4, …; killed on drop.
    struct Kid(Child);

    impl Kid {
        fn spawn(fds: &[RawFd]) -> Self {
            let fds = fds.to_vec();
            let mut cmd = Command::new("sleep");
            cmd.arg("60")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2) run, on a
            // vector allocated before the fork; no allocation happens in the closure.
            unsafe {
                cmd.pre_exec(move || {
                    let mut high = [0; 8];
                    for (i, &fd) in fds.iter().enumerate().take(high.len()) {
                        high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                        if high[i] < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    for (i, &h) in high.iter().enumerate().take(fds.len()) {
                        if libc::dup2(h, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            Self(cmd.spawn().expect("spawn sleep"))
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Kid {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn real_opts() -> DiscoverOptions {
        DiscoverOptions {
            // The test process must be allowed to be a member.
            self_pid: 0,
            device_root: PathBuf::from("/nonexistent-dev"),
            ..DiscoverOptions::default()
        }
    }

    fn real(roots: &[ServiceRoot], opts: &DiscoverOptions) -> Discovery {
        let d = discover(&ProcFs::default(), roots, opts).expect("discovers");
        assert!(
            d.warnings.iter().all(|w| !w.contains("Unix")),
            "{:?}",
            d.warnings
        );
        d
    }

    #[test]
    fn kernel_socketpair_peer_is_found() {
        let (mine, theirs) = UnixStream::pair().expect("socketpair");
        let kid = Kid::spawn(&[theirs.as_raw_fd()]);
        drop(theirs);
        let me = std::process::id();
        let d = real(
            &[root(RootSpec::Pid(kid.pid()), &[kid.pid()])],
            &real_opts(),
        );
        let s = &d.services[0];
        assert!(
            s.members.get(&me).is_some_and(|m| m
                .reasons
                .iter()
                .any(|r| matches!(r, Reason::UnixPeer { peer, .. } if *peer == kid.pid()))),
            "{}",
            render_text(&d)
        );
        assert_eq!(s.members[&kid.pid()].comm, "sleep");
        drop(mine);
    }

    #[test]
    fn kernel_unix_listener_peer_and_system_socket_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("engine.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let client = UnixStream::connect(&path).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let kid = Kid::spawn(&[client.as_raw_fd()]);
        drop(client);
        let me = std::process::id();
        let roots = [root(RootSpec::Pid(kid.pid()), &[kid.pid()])];
        let d = real(&roots, &real_opts());
        let reasons = &d.services[0]
            .members
            .get(&me)
            .expect("listener side joins")
            .reasons;
        let name = path.to_string_lossy().into_owned();
        assert!(
            reasons.iter().any(|r| matches!(r,
                Reason::UnixPeer { peer, name: Some(n), .. } if *peer == kid.pid() && *n == name)),
            "{reasons:?}"
        );
        let mut opts = real_opts();
        opts.system_sockets
            .push(format!("{}/*", dir.path().display()));
        let d = real(&roots, &opts);
        assert_eq!(pids(&d.services[0]), [kid.pid()]);
        drop(accepted);
    }

    #[test]
    fn kernel_loopback_tcp_peer_and_endpoint_client_exclusion() {
        // Peer: the child holds a client connection into a listener of the test process.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let port = listener.local_addr().expect("addr").port();
        let kid = Kid::spawn(&[client.as_raw_fd()]);
        drop(client);
        let me = std::process::id();
        let d = real(
            &[root(RootSpec::Pid(kid.pid()), &[kid.pid()])],
            &real_opts(),
        );
        assert!(
            d.services[0]
                .members
                .get(&me)
                .is_some_and(|m| m.reasons.contains(&Reason::LoopbackPeer {
                    peer: kid.pid(),
                    port
                })),
            "{}",
            render_text(&d)
        );
        drop((accepted, listener, kid));

        // Exclusion: server child A holds the listener and the accepted end; client child B
        // connected into A's endpoint port.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let a = Kid::spawn(&[accepted.as_raw_fd(), listener.as_raw_fd()]);
        let b = Kid::spawn(&[client.as_raw_fd()]);
        drop((accepted, listener, client));
        let server = root(RootSpec::Port(port), &[a.pid()]);
        let d = real(std::slice::from_ref(&server), &real_opts());
        assert_eq!(pids(&d.services[0]), [a.pid()], "{}", render_text(&d));
        assert_eq!(d.services[0].ports, [port]);
        let by_pid = root(RootSpec::Pid(a.pid()), &[a.pid()]);
        let d = real(&[by_pid], &real_opts());
        assert_eq!(
            pids(&d.services[0]),
            [a.pid()],
            "listening port is an endpoint"
        );
        // From the client's side with nothing declared, the server is a peer; declared together,
        // they are two services.
        let loadgen = root(RootSpec::Pid(b.pid()), &[b.pid()]);
        let d = real(std::slice::from_ref(&loadgen), &real_opts());
        let mut want = vec![a.pid(), b.pid()];
        want.sort_unstable();
        assert_eq!(pids(&d.services[0]), want);
        let d = real(&[server, loadgen], &real_opts());
        assert_eq!(d.services.len(), 2);
    }

    #[test]
    #[ignore = "needs a live CUDA process: set TRACER_LIVE_GPU_PID"]
    fn live_service_of_a_gpu_process() {
        let Ok(pid) = std::env::var("TRACER_LIVE_GPU_PID") else {
            return;
        };
        let pid: u32 = pid.parse().expect("pid");
        let d = discover(
            &ProcFs::default(),
            &[root(RootSpec::Pid(pid), &[pid])],
            &DiscoverOptions::default(),
        )
        .expect("discovers");
        println!("{}", render_text(&d));
        assert!(!d.services[0].gpus.is_empty());
        assert!(!d.inventory.is_empty());
    }

    #[test]
    fn roots_from_spec_resolves_each_target_separately() {
        let t = vllm_like();
        t.proc(20, "other", 1, &[]);
        let spec = TargetSpec {
            pids: vec![20],
            ports: vec![8000],
            ..TargetSpec::default()
        };
        let roots = roots_from_spec(&t.procfs(), &spec, 999_999).expect("roots");
        assert_eq!(
            roots,
            [
                root(RootSpec::Pid(20), &[20]),
                root(RootSpec::Port(8000), &[10])
            ]
        );
        let bad = TargetSpec {
            ports: vec![9],
            ..TargetSpec::default()
        };
        assert!(matches!(
            roots_from_spec(&t.procfs(), &bad, 999_999),
            Err(ServiceError::Target(TargetError::NoListener(9)))
        ));
    }
}
