//! Attaching: targets resolved from `/proc`, the probes loaded and told whom to trace, and the
//! connections targets already had handed to both.

use super::DaemonError;
use crate::{
    config::Config,
    ids::Pid,
    pipeline::{Input, Pipeline},
    power::monotonic_ns,
    probe::{
        ProbeSettings, Probes,
        targets::{self, Resolved},
    },
    procfs::ProcFs,
};

/// Resolves the targets and loads the probes for them.
pub(super) fn load(
    config: &Config,
    procfs: &ProcFs,
    self_pid: u32,
) -> Result<(Probes, Resolved), DaemonError> {
    let spec = &config.targets;
    if spec.is_empty() {
        return Err(DaemonError::NoTargets);
    }
    let resolved = targets::resolve(procfs, spec, self_pid)?;
    let settings = ProbeSettings {
        ring_bytes: config.probe.ring_bytes,
        capture_bytes: config.probe.capture_bytes,
        request_capture_bytes: config.probe.request_capture_bytes,
        device_root: config.probe.device_root.clone(),
        filter_cgroup: !resolved.cgroup_ids.is_empty(),
        filter_comm: !spec.comms.is_empty(),
        ioctl_events: config.probe.ioctl_events,
        standin_devices: config.probe.standin_devices,
        ipc: config.probe.ipc_clock,
    };
    let mut probes = Probes::load(&settings)?;
    add_targets(&mut probes, &resolved, &spec.comms)?;
    Ok((probes, resolved))
}

/// Tells the probes whom to trace: the resolved processes and cgroups, and the names (at load,
/// and on SIGHUP for targets new in the configuration).
pub(super) fn add_targets(
    probes: &mut Probes,
    resolved: &Resolved,
    comms: &[String],
) -> Result<(), DaemonError> {
    for (&pid, &why) in &resolved.processes {
        probes.add_target(pid, why)?;
    }
    for &id in &resolved.cgroup_ids {
        probes.add_cgroup(id)?;
    }
    for comm in comms {
        probes.add_comm(comm)?;
    }
    Ok(())
}

/// Connections the targets already had: captured from now on, parsing resyncs at the next
/// request or response. Returns how many.
pub(super) fn seed_connections(
    procfs: &ProcFs,
    resolved: &Resolved,
    probes: &mut Probes,
    pipeline: &mut Pipeline,
) -> Result<u64, DaemonError> {
    let now = monotonic_ns();
    let mut seeded = 0u64;
    for &pid in resolved.processes.keys() {
        for c in procfs.established_connections(pid) {
            let conn_id = now + seeded;
            seeded += 1;
            let state = tracer_ebpf::abi::ConnState {
                conn_id,
                family: if c.v6 { 10 } else { 2 },
                role: tracer_ebpf::abi::ROLE_SEEDED,
                pad: [0; 5],
            };
            probes.seed_connection(pid, c.fd, state)?;
            pipeline.apply(Input::SeedConn {
                tgid: Pid(pid),
                fd: c.fd as i32,
                conn_id,
                ts_ns: now,
                server: c.server,
            });
        }
    }
    Ok(seeded)
}
