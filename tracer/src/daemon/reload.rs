//! SIGHUP: the configuration re-read, the targets re-resolved, the output files reopened (after
//! logrotate moved them). Nothing in flight is touched: the pipeline, its requests and the
//! store carry on, so no record is lost or split.
//!
//! What a reload applies: new targets (processes, ports, cgroups and names, traced from now on
//! and their services discovered), and the output files. Everything else the file says (probe
//! sizes, power sources, attribution, the API, the store) is read at start only: a change there
//! is named in the log as waiting for a restart. A target removed from the file stays traced
//! until the restart, since its requests in flight must end where they began.

use super::{DaemonError, attach, discovery::Services};
use crate::{
    config::Config,
    occupancy::service,
    pipeline::Pipeline,
    probe::{Probes, targets},
    procfs::ProcFs,
};

/// Reads the configuration again (the file, with the command line's flags over it).
pub type Reader = Box<dyn Fn() -> Result<Config, String>>;

/// What was loaded at start and cannot change without reloading the probes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Loaded {
    /// The probes filter by cgroup (targets named cgroups at start).
    pub cgroups: bool,
    /// The probes filter by process name (targets named names at start).
    pub comms: bool,
}

/// The sections of `new` that differ from `old` and take effect only at a restart.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check("probe", old.probe == new.probe);
    check("http", old.http == new.http);
    check("power", old.power == new.power);
    check("ledger", old.ledger == new.ledger);
    check("api", old.api == new.api);
    check("store", old.store == new.store);
    check("bill", old.bill == new.bill);
    check("daemon", old.daemon == new.daemon);
    check("output", old.output == new.output);
    check("otlp", old.otlp == new.otlp);
    out
}

/// Everything a reload touches.
pub(super) struct Daemon<'a> {
    pub config: &'a mut Config,
    pub loaded: Loaded,
    pub procfs: &'a ProcFs,
    pub self_pid: u32,
    pub probes: &'a mut Probes,
    pub services: &'a mut Services,
    pub pipeline: &'a mut Pipeline,
}

/// Handles one SIGHUP. A configuration that cannot be read or resolved changes nothing (the
/// error is logged); the output files are reopened either way. Never stops the daemon: an
/// error while applying new targets is logged (what was applied stays), and the daemon goes on
/// with what it traced.
pub(super) fn on_hangup(read: &Reader, d: &mut Daemon<'_>) {
    if let Err(e) = apply(read, d) {
        tracing::error!("reload: {e}; tracing goes on with what was applied");
    }
}

fn apply(read: &Reader, d: &mut Daemon<'_>) -> Result<(), DaemonError> {
    let (reopened, failed) = d.pipeline.reopen_outputs();
    for (name, e) in &failed {
        tracing::warn!("reload: reopening output {name} failed ({e}); still writing the old file");
    }
    tracing::info!("reload: {reopened} output files reopened");
    let new = match read() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload: the configuration was not read, nothing changed: {e}");
            return Ok(());
        }
    };
    let later = needs_restart(d.config, &new);
    if !later.is_empty() {
        tracing::warn!(
            "reload: changes to [{}] take effect at the next restart",
            later.join("], [")
        );
    }
    if new.targets == d.config.targets {
        tracing::info!("reload: targets unchanged");
        return Ok(());
    }
    if new.targets.is_empty() {
        tracing::error!("reload: the configuration names no target, nothing changed");
        return Ok(());
    }
    if (!new.targets.cgroups.is_empty() && !d.loaded.cgroups)
        || (!new.targets.comms.is_empty() && !d.loaded.comms)
    {
        tracing::error!(
            "reload: the probes were loaded without a cgroup or name filter; new cgroup or \
             name targets need a restart (nothing changed)"
        );
        return Ok(());
    }
    let resolved = match targets::resolve(d.procfs, &new.targets, d.self_pid) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("reload: targets not resolved, nothing changed: {e}");
            return Ok(());
        }
    };
    let roots = match service::roots_from_spec(d.procfs, &new.targets, d.self_pid) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("reload: services not resolved, nothing changed: {e}");
            return Ok(());
        }
    };
    let known: std::collections::BTreeSet<u32> = d
        .probes
        .targets()?
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    let fresh = targets::Resolved {
        processes: resolved
            .processes
            .into_iter()
            .filter(|(pid, _)| !known.contains(pid))
            .collect(),
        cgroup_ids: resolved.cgroup_ids,
    };
    attach::add_targets(d.probes, &fresh, &new.targets.comms)?;
    d.services.set_roots(roots);
    let found = d.services.discover_now(d.pipeline, d.probes)?;
    let seeded = attach::seed_connections(d.procfs, &fresh, d.probes, d.pipeline)?;
    tracing::info!(
        "reload: targets re-resolved: {} new processes {:?}, {seeded} open connections; \
         services re-discovered ({})",
        fresh.processes.len(),
        fresh.processes.keys().collect::<Vec<_>>(),
        if found {
            "something new"
        } else {
            "nothing new"
        }
    );
    d.config.targets = new.targets;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_sections_a_reload_cannot_apply() {
        let old = Config::default();
        let mut new = old.clone();
        new.targets.ports.push(8000);
        new.output.records_out = Some("/tmp/r.jsonl".into());
        assert_eq!(needs_restart(&old, &new), ["output"]);
        new.output.records_out = None;
        assert!(
            needs_restart(&old, &new).is_empty(),
            "targets apply at once"
        );
        new.power.interval_ms += 1;
        new.ledger.grace_ns += 1;
        assert_eq!(needs_restart(&old, &new), ["power", "ledger"]);
    }
}
