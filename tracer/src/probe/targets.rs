//! Resolving what the operator asked to trace (`--pid`, `--port`, `--cgroup`, `--comm`) into the
//! processes that exist now, from procfs. The kernel follows them from there (forks, execs).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};
use tracer_ebpf::abi::{TARGET_CHILD, TARGET_COMM, TARGET_PID, TARGET_PORT};

use crate::procfs::{ProcError, ProcFs, TCP_LISTEN};

/// Errors from resolving targets.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// `--pid` names a process that does not exist.
    #[error("no process with pid {0}")]
    NoSuchPid(u32),
    /// `--port` names a port nothing listens on (in this network namespace).
    #[error("no process listens on TCP port {0}")]
    NoListener(u16),
    /// `--pid` or `--port` resolved to the daemon itself.
    #[error("refusing to trace the tracer itself (pid {0})")]
    IsSelf(u32),
    /// Reading procfs or cgroupfs failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
}

/// What to trace, as the operator said it: the `[targets]` table of the configuration and the
/// `--pid`/`--port`/`--cgroup`/`--comm` flags (one definition for both). Each entry is one
/// target, the root of a service; children of every selected process are followed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct TargetSpec {
    /// This process and its descendants (repeatable). [config: targets.pids]
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// The processes listening on this TCP port (repeatable). [config: targets.ports]
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// Every process in this cgroup v2 directory, absolute or relative to /sys/fs/cgroup
    /// (repeatable). [config: targets.cgroups]
    #[arg(long = "cgroup")]
    pub cgroups: Vec<PathBuf>,
    /// Processes with this name, now and at later execs (repeatable). [config: targets.comms]
    #[arg(long = "comm")]
    pub comms: Vec<String>,
}

impl TargetSpec {
    /// Adds `other`'s selectors to these (flags on top of the file).
    pub fn extend(&mut self, other: TargetSpec) {
        self.pids.extend(other.pids);
        self.ports.extend(other.ports);
        self.cgroups.extend(other.cgroups);
        self.comms.extend(other.comms);
    }

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
        let sockets = procfs.tcp_entries(None);
        for &port in &spec.ports {
            let inodes: BTreeSet<u64> = sockets
                .iter()
                .filter(|l| l.state == TCP_LISTEN && l.local.port() == port)
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
            if let Some(st) = procfs.stat(pid)
                && spec.comms.iter().any(|c| comm_matches(c, &st.comm))
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
    use std::{fs, path::Path};

    use super::*;

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
