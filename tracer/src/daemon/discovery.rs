//! Service discovery at run time: what `/proc` shows about the targets' services, fed to the
//! pipeline as inputs and to the probes as new targets, with the two step clocks: the CUDA
//! driver uprobes on members that map `libcuda.so*`, and the Unix-socket IPC between members;
//! and the OpenSSL uprobes on members that map `libssl.so*` or export OpenSSL themselves.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

use tokio::sync::mpsc;
use tracer_ebpf::abi::TARGET_PEER;

use super::DaemonError;
use crate::{
    ids::{Pid, ServiceId},
    occupancy::{
        service::{self, DiscoverOptions, Discovery, ServiceError, ServiceRoot},
        workload::Workload,
    },
    pipeline::{Input, Pipeline},
    power::monotonic_ns,
    probe::Probes,
    procfs::ProcFs,
};

/// The services of the targets, re-discovered periodically (an engine started after the API, a
/// worker respawned). Re-discovery reads all of `/proc` (hundreds of milliseconds on a busy
/// host), so it runs on a blocking thread and its result comes back to the event loop.
pub(super) struct Services {
    finder: Arc<Finder>,
    /// Processes already fed to the pipeline and made kernel targets.
    known: BTreeSet<u32>,
    /// Services already declared to the pipeline, with the workload they were declared with (a
    /// service first found by a re-discovery is declared then, so that it is bound to the
    /// host's CPU and memory like the others; one whose workload changed, e.g. named once the
    /// kubelet answered, is declared again).
    declared: BTreeMap<u32, Option<Workload>>,
    /// (library, process) pairs the CUDA step clock or the TLS uprobes could not be attached
    /// to: not retried.
    cuda_failed: BTreeSet<(PathBuf, u32)>,
    tls_failed: BTreeSet<(PathBuf, u32)>,
    /// A re-discovery is running.
    in_flight: bool,
    /// Discovery warnings already logged.
    warned: BTreeSet<String>,
    tx: mpsc::Sender<Result<Found, ServiceError>>,
}

/// The step clocks discovery sets up.
#[derive(Debug, Clone, Default)]
pub(super) struct Clocks {
    /// Attach the CUDA driver uprobes to members that map `libcuda.so*`.
    pub cuda: bool,
    /// Attach them to this library for every member, mapped or not.
    pub cuda_library: Option<PathBuf>,
    /// Follow the Unix-socket fds between members as IPC.
    pub ipc: bool,
    /// Attach the OpenSSL uprobes (TLS plaintext).
    pub tls: bool,
}

/// A discovery, with what the blocking thread read for the step clocks.
pub(super) struct Found {
    discovery: Discovery,
    /// CUDA driver libraries to probe, per member, as paths this process can open.
    cuda: BTreeMap<u32, BTreeSet<PathBuf>>,
    /// OpenSSL libraries (or executables exporting it) to probe, per member, likewise.
    tls: BTreeMap<u32, BTreeSet<PathBuf>>,
}

/// What a discovery needs, shared with the blocking thread.
struct Finder {
    procfs: ProcFs,
    roots: Vec<ServiceRoot>,
    opts: DiscoverOptions,
    clocks: Clocks,
    /// Whether an executable exports OpenSSL's `SSL_read`, by path (read once).
    exports_ssl: std::sync::Mutex<BTreeMap<PathBuf, bool>>,
}

impl Finder {
    fn new(procfs: ProcFs, roots: Vec<ServiceRoot>, opts: DiscoverOptions, clocks: Clocks) -> Self {
        Self {
            procfs,
            roots,
            opts,
            clocks,
            exports_ssl: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// `path` as process `pid` names it, through its root (containers' mount namespaces).
    fn in_root(&self, pid: u32, path: &std::path::Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        self.procfs.proc_root.join(format!("{pid}/root")).join(rel)
    }

    /// The OpenSSL to probe for `pid`: the `libssl*` it maps, else its executable when that
    /// exports `SSL_read` (OpenSSL linked in, as Node's is).
    fn tls_libraries(&self, pid: u32) -> BTreeSet<PathBuf> {
        let libs: BTreeSet<PathBuf> = self
            .procfs
            .mapped_files(pid, "libssl.so")
            .iter()
            .map(|p| self.in_root(pid, p))
            .collect();
        if !libs.is_empty() {
            return libs;
        }
        let exe = self.procfs.proc_root.join(format!("{pid}/exe"));
        let Ok(target) = std::fs::read_link(&exe) else {
            return libs;
        };
        let mut seen = self
            .exports_ssl
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let exports = *seen
            .entry(target)
            .or_insert_with(|| crate::procfs::exports_symbol(&exe, "SSL_read"));
        if exports { BTreeSet::from([exe]) } else { libs }
    }

    /// A discovery; `fetch`: the kubelet may be asked (a blocking call of up to its timeout),
    /// else names come from its cache only.
    fn discover(&self, fetch: bool) -> Result<Found, ServiceError> {
        let cached_only;
        let opts = if fetch {
            &self.opts
        } else {
            cached_only = DiscoverOptions {
                kubelet_fetch: false,
                ..self.opts.clone()
            };
            &cached_only
        };
        let discovery = service::discover(&self.procfs, &self.roots, opts)?;
        let mut cuda = BTreeMap::new();
        if self.clocks.cuda {
            for pid in discovery.services.iter().flat_map(|s| s.members.keys()) {
                let mut libs: BTreeSet<PathBuf> = self
                    .procfs
                    .mapped_files(*pid, "libcuda.so")
                    .iter()
                    .map(|p| self.in_root(*pid, p))
                    .collect();
                libs.extend(self.clocks.cuda_library.clone());
                if !libs.is_empty() {
                    cuda.insert(*pid, libs);
                }
            }
        }
        let mut tls = BTreeMap::new();
        if self.clocks.tls {
            for pid in discovery.services.iter().flat_map(|s| s.members.keys()) {
                let libs = self.tls_libraries(*pid);
                if !libs.is_empty() {
                    tls.insert(*pid, libs);
                }
            }
        }
        Ok(Found {
            discovery,
            cuda,
            tls,
        })
    }
}

impl Services {
    /// Services of `roots`; re-discoveries are delivered on the returned receiver.
    pub fn new(
        procfs: ProcFs,
        roots: Vec<ServiceRoot>,
        opts: DiscoverOptions,
        clocks: Clocks,
    ) -> (Self, mpsc::Receiver<Result<Found, ServiceError>>) {
        let (tx, rx) = mpsc::channel(1);
        let finder = Arc::new(Finder::new(procfs, roots, opts, clocks));
        (
            Self {
                finder,
                known: BTreeSet::new(),
                declared: BTreeMap::new(),
                cuda_failed: BTreeSet::new(),
                tls_failed: BTreeSet::new(),
                in_flight: false,
                warned: BTreeSet::new(),
                tx,
            },
            rx,
        )
    }

    /// The first discovery, at attach (on this thread: nothing runs yet): services, members, and
    /// the GPUs members already hold.
    pub fn attach(
        &mut self,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
    ) -> Result<(), DaemonError> {
        self.discover_now_as(pipeline, probes, true).map(|_| ())
    }

    /// Discovers from the old roots and `roots` from now on (SIGHUP: the targets re-resolved).
    /// A service's id is its root's position, so the roots it had keep theirs, in order, and
    /// new ones come after them: no service is renumbered, and a re-discovery still running
    /// with the old list numbers the same. A root no longer in the file stays (its service's
    /// requests in flight end where they began; it goes at the next restart).
    pub fn set_roots(&mut self, roots: Vec<ServiceRoot>) {
        let mut merged = self.finder.roots.clone();
        for root in roots {
            match merged.iter_mut().find(|r| r.spec == root.spec) {
                Some(kept) => kept.pids.extend(root.pids),
                None => merged.push(root),
            }
        }
        self.finder = Arc::new(Finder::new(
            self.finder.procfs.clone(),
            merged,
            self.finder.opts.clone(),
            self.finder.clocks.clone(),
        ));
    }

    /// A discovery now, on this thread (SIGHUP, after the roots changed): what it finds is in
    /// the pipeline before the next ring drain, so the first requests of a new target already
    /// belong to its service. Returns whether it found anything new.
    pub fn discover_now(
        &mut self,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
    ) -> Result<bool, DaemonError> {
        self.discover_now_as(pipeline, probes, false)
    }

    /// A discovery on this thread, applied (`seed`: at attach, GPUs already held are seeded).
    fn discover_now_as(
        &mut self,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
        seed: bool,
    ) -> Result<bool, DaemonError> {
        // On the event loop after attach (SIGHUP): never wait for the kubelet there; the next
        // re-discovery, on its own thread, names what the cache does not.
        let d = self.finder.discover(seed)?;
        self.apply(&d, pipeline, probes, monotonic_ns(), seed)
    }

    /// A re-discovery is running.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Starts a re-discovery on a blocking thread, unless one is still running.
    pub fn start_refresh(&mut self) {
        if self.in_flight {
            return;
        }
        self.in_flight = true;
        let finder = Arc::clone(&self.finder);
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.blocking_send(finder.discover(true));
        });
    }

    /// A re-discovery's result: new members only (a failure is logged, not fatal). Returns
    /// whether it found anything new (a member, an IPC fd, a clock attached).
    pub fn refreshed(
        &mut self,
        result: Result<Found, ServiceError>,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
    ) -> Result<bool, DaemonError> {
        self.in_flight = false;
        match result {
            Ok(d) => self.apply(&d, pipeline, probes, monotonic_ns(), false),
            Err(e) => {
                tracing::warn!("service re-discovery: {e}");
                Ok(false)
            }
        }
    }

    /// A process exited: if it comes back under the same pid, it is new.
    pub fn forget(&mut self, pid: u32) {
        self.known.remove(&pid);
        self.cuda_failed.retain(|(_, p)| *p != pid);
        self.tls_failed.retain(|(_, p)| *p != pid);
    }

    /// Sets up the step clocks of a discovery: the CUDA uprobes on every member's driver
    /// library and the OpenSSL uprobes on its TLS library (once per library and process; a
    /// failure is a warning, not retried), and the IPC fds between members. Returns (CUDA
    /// uprobes attached, IPC fds newly followed).
    fn clocks(&mut self, found: &Found, probes: &mut Probes) -> (usize, usize) {
        let attached = attach_each(
            &found.cuda,
            &mut self.cuda_failed,
            "CUDA step clock",
            |lib, pid| probes.attach_cuda(lib, Some(pid)),
        );
        attach_each(
            &found.tls,
            &mut self.tls_failed,
            "TLS plaintext (OpenSSL)",
            |lib, pid| probes.attach_tls(lib, Some(pid)),
        );
        let mut ipc = 0;
        if self.finder.clocks.ipc {
            for &(pid, fd) in found.discovery.services.iter().flat_map(|s| &s.ipc_fds) {
                match probes.track_ipc_fd(pid, fd) {
                    Ok(true) => ipc += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!("IPC fd {fd} of process {pid}: {e}"),
                }
            }
        }
        (attached, ipc)
    }

    /// Feeds a discovery to the pipeline: services, new members (made kernel targets), and at
    /// attach (`seed`) the GPUs members already hold. A member's GPUs are the ones it maps (a
    /// context); a process that maps none but holds GPU fds (stand-in nodes, or a monitor) is
    /// seeded from its fds. Then the step clocks (members are targets by then).
    fn apply(
        &mut self,
        found: &Found,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
        ts_ns: u64,
        seed: bool,
    ) -> Result<bool, DaemonError> {
        let members = self.members(&found.discovery, pipeline, probes, ts_ns, seed)?;
        let (uprobes, ipc) = self.clocks(found, probes);
        if seed {
            tracing::info!(
                "step clocks at attach: {uprobes} CUDA uprobes, {ipc} IPC fds between members"
            );
        } else if ipc > 0 {
            tracing::debug!("{ipc} new IPC fds between members");
        }
        Ok(members + uprobes + ipc > 0)
    }

    fn members(
        &mut self,
        discovery: &Discovery,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
        ts_ns: u64,
        seed: bool,
    ) -> Result<usize, DaemonError> {
        let mut added = 0;
        // Once each: a re-discovery every few seconds would repeat them.
        for w in &discovery.warnings {
            if self.warned.insert(w.clone()) {
                tracing::warn!("service discovery: {w}");
            }
        }
        for s in &discovery.services {
            let changed = self.declared.get(&s.id) != Some(&s.workload);
            if changed || seed {
                if changed && let Some(w) = &s.workload {
                    tracing::info!("service {} runs in {}", s.name, w.text());
                }
                self.declared.insert(s.id, s.workload.clone());
                pipeline.apply(Input::Service {
                    id: ServiceId(s.id),
                    name: s.name.clone(),
                    ts_ns,
                    workload: s.workload.clone(),
                });
            }
            for (&pid, m) in &s.members {
                if !self.known.insert(pid) {
                    continue;
                }
                added += 1;
                let reason = m
                    .reasons
                    .iter()
                    .map(service::Reason::text)
                    .collect::<Vec<_>>()
                    .join("; ");
                if !seed {
                    tracing::info!(
                        "service {} gained process {pid} ({}): {reason}",
                        s.name,
                        m.comm
                    );
                }
                pipeline.apply(Input::Member {
                    pid: Pid(pid),
                    service: ServiceId(s.id),
                    reason,
                });
                // Targets, descendants and cgroup members are traced already; peers join here.
                probes.add_target(pid, TARGET_PEER)?;
                let Some(ev) = s.gpu_evidence.get(&pid).filter(|_| seed) else {
                    continue;
                };
                let mapped = ev.mapped();
                let (minors, how) = if mapped.is_empty() {
                    (ev.minors.clone(), "open device node")
                } else {
                    (mapped, "mapped (context)")
                };
                for minor in minors {
                    pipeline.apply(Input::SeedGpu {
                        pid: Pid(pid),
                        minor,
                        ts_ns,
                        evidence: how.into(),
                    });
                }
            }
        }
        for (minor, pids) in &discovery.others {
            tracing::warn!(
                "GPU minor {minor} is also held by untraced processes {pids:?}: its energy is split by \
                 SM utilisation where NVML reports it, else only among the traced services"
            );
        }
        Ok(added)
    }
}

/// Attaches a uprobe family to each (library, process) of `libs` not failed before; a failure
/// is logged once and remembered. Returns how many uprobes were attached.
fn attach_each(
    libs: &BTreeMap<u32, BTreeSet<PathBuf>>,
    failed: &mut BTreeSet<(PathBuf, u32)>,
    what: &str,
    mut attach: impl FnMut(&std::path::Path, Pid) -> Result<usize, crate::probe::ProbeError>,
) -> usize {
    let mut attached = 0;
    for (&pid, libs) in libs {
        for lib in libs {
            let key = (lib.clone(), pid);
            if failed.contains(&key) {
                continue;
            }
            match attach(lib, Pid(pid)) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!("{what}: {n} uprobes on {} for process {pid}", lib.display());
                    attached += n;
                }
                Err(e) => {
                    tracing::warn!("{what} for process {pid}: {e}");
                    failed.insert(key);
                }
            }
        }
    }
    attached
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::occupancy::service::RootSpec;

    fn root(spec: RootSpec, pid: u32) -> ServiceRoot {
        ServiceRoot {
            spec,
            pids: BTreeSet::from([pid]),
        }
    }

    /// A service's id is its root's position: a reload keeps the old roots where they were,
    /// appends the new ones, and keeps a root the file no longer names.
    #[test]
    fn new_roots_come_after_the_old_ones() {
        let (mut services, _rx) = Services::new(
            ProcFs::default(),
            vec![
                root(RootSpec::Port(8000), 10),
                root(RootSpec::Port(8001), 11),
            ],
            DiscoverOptions::default(),
            Clocks::default(),
        );
        services.set_roots(vec![
            root(RootSpec::Pid(5), 5),
            root(RootSpec::Port(8001), 12),
            root(RootSpec::Port(8002), 13),
        ]);
        let specs: Vec<_> = services
            .finder
            .roots
            .iter()
            .map(|r| r.spec.clone())
            .collect();
        assert_eq!(
            specs,
            [
                RootSpec::Port(8000),
                RootSpec::Port(8001),
                RootSpec::Pid(5),
                RootSpec::Port(8002)
            ]
        );
        assert_eq!(services.finder.roots[1].pids, BTreeSet::from([11, 12]));
    }
}
