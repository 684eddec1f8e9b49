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
//! - `NETLINK_SOCK_DIAG` answers for the network namespace its socket was made in: the Unix
//!   sockets of every other namespace (containers') are dumped from inside each
//!   ([`unix_diag::dump_in`]), which needs `CAP_SYS_ADMIN` ([`DiscoverOptions::other_netns`]);
//!   without it those links are not seen, and discovery says so. Loopback TCP is read per
//!   namespace from `/proc/<pid>/net/tcp{,6}`.
//! - procfs is read without locks: processes that come and go during discovery may be missed.
//! - `/proc/<pid>/fd` of other users' processes needs privileges; unreadable processes have no
//!   sockets and no GPUs.

mod glob;
mod render;
mod snapshot;
mod tcp;
pub mod unix_diag;
mod walk;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tracer_ebpf::abi::{TARGET_COMM, TARGET_PID, TARGET_PORT};

pub use self::{glob::glob_match, render::render_text, unix_diag::UnixSocket};
use self::{snapshot::Snapshot, walk::Walker};
use crate::{
    occupancy::{
        devices::{self as gpu, GpuInfo, Majors, ProcessGpus},
        workload::{self, Workload, kubelet::Kubelet},
    },
    probe::targets::{self as target, TargetError, TargetSpec},
    procfs::{self, ProcFs},
};

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
    /// Names pods and containers found in cgroup paths (none: UIDs and ids only).
    pub kubelet: Option<Arc<Mutex<Kubelet>>>,
    /// The kubelet may be asked for a pod it has not named yet (a blocking call of up to its
    /// timeout); false: its cache only.
    pub kubelet_fetch: bool,
    /// Follow Unix links of processes in other network namespaces (containers): their
    /// sockets are dumped from inside each namespace, which needs `CAP_SYS_ADMIN`.
    pub other_netns: bool,
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
            kubelet: None,
            kubelet_fetch: true,
            other_netns: true,
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
    /// (pid, fd) of members' Unix stream sockets whose other end a member holds: the IPC
    /// inside the service (vLLM's ZMQ, TGI's gRPC), both ends.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub ipc_fds: BTreeSet<(u32, u32)>,
    /// The pod, container or unit its first root process runs in, as its cgroup path says
    /// (names are the kubelet's, filled in by the daemon).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
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

/// Most network namespaces whose Unix sockets one discovery reads.
const MAX_NAMESPACES: usize = 4096;

/// The Unix sockets of every network namespace but the daemon's, each dumped from inside it
/// (through one of its processes). All of them, not only the members': the socket an
/// accepted connection gets is made in the *connecting* process's namespace, so a server's
/// end of a link may sit in a namespace none of its known processes is in.
fn other_namespaces(
    procfs: &ProcFs,
    snap: &Snapshot,
    warnings: &mut Vec<String>,
) -> Vec<UnixSocket> {
    let own = std::fs::read_link(procfs.proc_root.join("self/ns/net"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let mut namespaces: BTreeMap<&str, u32> = BTreeMap::new();
    for (&pid, p) in &snap.procs {
        if let Some(ns) = p
            .netns
            .as_deref()
            .filter(|ns| Some(*ns) != own.as_deref() && !p.kthread)
        {
            namespaces.entry(ns).or_insert(pid);
        }
    }
    if namespaces.len() > MAX_NAMESPACES {
        warnings.push(format!(
            "{} network namespaces: the Unix sockets of the first {MAX_NAMESPACES} are read",
            namespaces.len()
        ));
    }
    let mut out = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut refused = false;
    for (ns, pid) in namespaces.into_iter().take(MAX_NAMESPACES) {
        match unix_diag::dump_in(&procfs.proc_root.join(format!("{pid}/ns/net"))) {
            Ok(sockets) => out.extend(sockets),
            Err(e) => {
                let errno = match &e {
                    unix_diag::DiagError::Setns { source, .. } => source.raw_os_error(),
                    _ => None,
                };
                // A process that exited since the snapshot: nothing lost.
                if errno == Some(libc::ENOENT) {
                    continue;
                }
                refused |= errno == Some(libc::EPERM);
                failed.push(format!("{ns}: {e}"));
            }
        }
    }
    if let Some(first) = failed.first() {
        let hint = if refused {
            " (joining a namespace needs CAP_SYS_ADMIN: probe.other_netns_peers)"
        } else {
            ""
        };
        warnings.push(format!(
            "Unix socket peers in {} other network namespaces not followed{hint}: {first}",
            failed.len()
        ));
    }
    out
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
        UnixSource::Kernel => {
            let mut all = unix_diag::dump().unwrap_or_else(|e| {
                warnings.push(format!("Unix socket peers not followed: {e}"));
                Vec::new()
            });
            if opts.other_netns {
                all.extend(other_namespaces(procfs, &snap, &mut warnings));
            }
            all
        }
        UnixSource::Table(t) => t.clone(),
        UnixSource::Off => Vec::new(),
    };
    let mut walker = Walker::new(procfs, &snap, unix, opts);

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
    let groups = walk::merged_roots(&expansions);

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
        let member_pids: BTreeSet<u32> = members.keys().copied().collect();
        let ipc_fds = walker.ipc_fds(&member_pids);
        let roots_of: Vec<RootSpec> = group.iter().map(|&i| roots[i].spec.clone()).collect();
        // The first root's lowest pid (a cgroup root has none of its own: its lowest member).
        let workload = group
            .iter()
            .find_map(|&i| root_pids[i].first().copied())
            .or_else(|| member_pids.first().copied())
            .and_then(|pid| {
                let text =
                    std::fs::read_to_string(procfs.proc_root.join(pid.to_string()).join("cgroup"))
                        .ok()?;
                let mut w = workload::cgroup::parse(&text)?;
                if let Some(k) = &opts.kubelet {
                    k.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .enrich(&mut w, opts.kubelet_fetch);
                }
                Some(w)
            });
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
            ipc_fds,
            workload,
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
