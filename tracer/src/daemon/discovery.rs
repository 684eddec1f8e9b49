//! Service discovery at run time: what `/proc` shows about the targets' services, fed to the
//! pipeline as inputs and to the probes as new targets.

use std::collections::BTreeSet;

use tracer_ebpf::abi::TARGET_PEER;

use super::DaemonError;
use crate::{
    ids::{Pid, ServiceId},
    occupancy::service::{self, DiscoverOptions, Discovery, ServiceRoot},
    pipeline::{Input, Pipeline},
    power::monotonic_ns,
    probe::Probes,
    procfs::ProcFs,
};

/// The services of the targets, re-discovered periodically (an engine started after the API, a
/// worker respawned).
pub(super) struct Services {
    procfs: ProcFs,
    roots: Vec<ServiceRoot>,
    opts: DiscoverOptions,
    /// Processes already fed to the pipeline and made kernel targets.
    known: BTreeSet<u32>,
}

impl Services {
    pub fn new(procfs: ProcFs, roots: Vec<ServiceRoot>, opts: DiscoverOptions) -> Self {
        Self {
            procfs,
            roots,
            opts,
            known: BTreeSet::new(),
        }
    }

    /// The first discovery, at attach: services, members, and the GPUs members already hold.
    pub fn attach(
        &mut self,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
    ) -> Result<(), DaemonError> {
        let d = service::discover(&self.procfs, &self.roots, &self.opts)?;
        self.apply(&d, pipeline, probes, monotonic_ns(), true)
    }

    /// A later discovery: new members only (a failure is logged, not fatal).
    pub fn refresh(
        &mut self,
        pipeline: &mut Pipeline,
        probes: &mut Probes,
    ) -> Result<(), DaemonError> {
        match service::discover(&self.procfs, &self.roots, &self.opts) {
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
