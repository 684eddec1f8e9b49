//! Who may see what, from the peer's credentials: root and the configured group see every
//! service; any other user the services one of whose processes it owns (the real uid in
//! `/proc/<pid>/status`).

use std::path::Path;

use crate::{ids::ServiceId, pipeline::snapshot::Snapshot};

/// A connection's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    All,
    /// These services only.
    Services(Vec<ServiceId>),
}

impl Scope {
    pub fn sees(&self, service: ServiceId) -> bool {
        match self {
            Scope::All => true,
            Scope::Services(s) => s.contains(&service),
        }
    }

    /// The services a query may return (`None`: no restriction).
    pub fn services(&self) -> Option<Vec<ServiceId>> {
        match self {
            Scope::All => None,
            Scope::Services(s) => Some(s.clone()),
        }
    }
}

/// The value of a `/proc/<pid>/status` line (`Uid:`, `Groups:`), first field or all.
fn status_fields(proc_root: &Path, pid: u32, key: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(proc_root.join(format!("{pid}/status"))).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The group id a configured group names (a number, or a name in `/etc/group`).
pub fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == group).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// The scope of a peer (`uid`, `gid`, `pid` from `SO_PEERCRED`), given the current services.
pub fn scope(
    proc_root: &Path,
    (uid, gid, pid): (u32, u32, Option<u32>),
    group: Option<u32>,
    snapshot: Option<&Snapshot>,
) -> Scope {
    if uid == 0 {
        return Scope::All;
    }
    if let Some(g) = group {
        let supplementary = pid.map(|p| status_fields(proc_root, p, "Groups:"));
        if gid == g || supplementary.is_some_and(|s| s.contains(&g)) {
            return Scope::All;
        }
    }
    let owned = snapshot.map_or_else(Vec::new, |s| {
        s.services
            .iter()
            .filter(|svc| {
                svc.members
                    .keys()
                    .any(|p| status_fields(proc_root, p.0, "Uid:").first() == Some(&uid))
            })
            .map(|svc| svc.id)
            .collect()
    });
    Scope::Services(owned)
}
