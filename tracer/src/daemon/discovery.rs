//! Service discovery at run time: what `/proc` shows about the targets' services, fed to the
//! pipeline as inputs and to the probes as new targets.

use std::{collections::BTreeSet, sync::Arc};

use tokio::sync::mpsc;
use tracer_ebpf::abi::TARGET_PEER;

use super::DaemonError;
use crate::{
    ids::{Pid, ServiceId},
    occupancy::service::{self, DiscoverOptions, Discovery, ServiceError, ServiceRoot},
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
    /// A re-discovery is running.
    in_flight: bool,
    tx: mpsc::Sender<Result<Discovery, ServiceError>>,
}

/// What a discovery needs, shared with the blocking thread.
struct Finder {
    procfs: ProcFs,
    roots: Vec<ServiceRoot>,
    opts: DiscoverOptions,
}

impl Finder {
    fn discover(&self) -> Result<Discovery, ServiceError> {
        service::discover(&self.procfs, &self.roots, &self.opts)
    }
}

impl Services {
    /// Services of `roots`; re-discoveries are delivered on the returned receiver.
    pub fn new(
        procfs: ProcFs,
        roots: Vec<ServiceRoot>,
        opts: DiscoverOptions,
    ) -> (Self, mpsc::Receiver<Result<Discovery, ServiceError>>) {
        let (tx, rx) = mpsc::channel(1);
        let finder = Arc::new(Finder {
            procfs,
            roots,
            opts,
        });
        (
            Self {
                finder,
                known: BTreeSet::new(),
                in_flight: false,
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
        let d = self.finder.discover()?;
        self.apply(&d, pipeline, probes, monotonic_ns(), true)
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
            let _ = tx.blocking_send(finder.discover());
        });
    }

    /// A re-discovery's result: new members only (a failure is logged, not fatal).
    pub fn refreshed(
        &mut self,
        result: Result<Discovery, ServiceError>,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
    ) -> Result<(), DaemonError> {
        self.in_flight = false;
        match result {
            Ok(d) => self.apply(&d, pipeline, probes, monotonic_ns(), false),
            Err(e) => {
                tracing::warn!("service re-discovery: {e}");
                Ok(())
            }
        }
    }

    /// A process exited: if it comes back under the same pid, it is new.
    pub fn forget(&mut self, pid: u32) {
        self.known.remove(&pid);
    }

    /// Feeds a discovery to the pipeline: services, new members (made kernel targets), and at
    /// attach (`seed`) the GPUs members already hold. A member's GPUs are the ones it maps (a
    /// context); a process that maps none but holds GPU fds (stand-in nodes, or a monitor) is
    /// seeded from its fds.
    fn apply(
        &mut self,
        discovery: &Discovery,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
        ts_ns: u64,
        seed: bool,
    ) -> Result<(), DaemonError> {
        for w in &discovery.warnings {
            tracing::warn!("service discovery: {w}");
        }
        for s in &discovery.services {
            if seed {
                pipeline.apply(Input::Service {
                    id: ServiceId(s.id),
                    name: s.name.clone(),
                    ts_ns,
                });
            }
            for (&pid, m) in &s.members {
                if !self.known.insert(pid) {
                    continue;
                }
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
        Ok(())
    }
}
