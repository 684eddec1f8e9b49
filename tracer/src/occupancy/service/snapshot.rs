//! The procfs snapshot discovery walks: every process's comm, parent, cgroup, network
//! namespace and socket fds, read once.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
};

use crate::{
    probe::targets::TargetError,
    procfs::{self, ProcFs},
};

/// One process, as discovery needs it.
#[derive(Debug)]
pub(super) struct ProcInfo {
    pub(super) comm: String,
    pub(super) kthread: bool,
    pub(super) cgroup: Option<String>,
    pub(super) netns: Option<String>,
    /// Socket inode → the fds holding it.
    pub(super) sockets: BTreeMap<u64, Vec<u32>>,
}

/// Every process with what discovery needs, read once.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    pub(super) procs: BTreeMap<u32, ProcInfo>,
    pub(super) children: BTreeMap<u32, Vec<u32>>,
    /// Socket inode → processes holding it.
    pub(super) holders: HashMap<u64, BTreeSet<u32>>,
}

impl Snapshot {
    pub(super) fn take(procfs: &ProcFs) -> Result<Self, TargetError> {
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

    pub(super) fn comm(&self, pid: u32) -> String {
        self.procs
            .get(&pid)
            .map(|p| p.comm.clone())
            .unwrap_or_default()
    }

    /// Whether `pid` holds `inode` only as stdio (fds 0–2).
    pub(super) fn stdio_only(&self, pid: u32, inode: u64) -> bool {
        self.procs
            .get(&pid)
            .and_then(|p| p.sockets.get(&inode))
            .is_some_and(|fds| fds.iter().all(|&fd| fd <= 2))
    }
}
