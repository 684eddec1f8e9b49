//! The walk from a root's processes to its members (descendants, Unix and loopback TCP peers,
//! breadth first by IPC hops, under the rules of the [module doc](super)), and the merge of
//! roots whose members meet.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    path::Path,
};

use super::{
    DiscoverOptions, Reason, RootSpec, ServiceRoot, glob::glob_match, snapshot::Snapshot,
    tcp::TcpTable, unix_diag::UnixSocket,
};
use crate::procfs::{ProcFs, TCP_ESTABLISHED, TCP_LISTEN, is_loopback};

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

/// Expands roots over one procfs snapshot and one Unix socket table.
pub(super) struct Walker<'a> {
    procfs: &'a ProcFs,
    snap: &'a Snapshot,
    unix: HashMap<u64, UnixSocket>,
    /// TCP tables by network namespace.
    tables: HashMap<String, TcpTable>,
    opts: &'a DiscoverOptions,
}

impl<'a> Walker<'a> {
    pub(super) fn new(
        procfs: &'a ProcFs,
        snap: &'a Snapshot,
        unix: Vec<UnixSocket>,
        opts: &'a DiscoverOptions,
    ) -> Self {
        Self {
            procfs,
            snap,
            unix: unix.into_iter().map(|s| (s.inode, s)).collect(),
            tables: HashMap::new(),
            opts,
        }
    }

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

    pub(super) fn root_pids(&self, root: &ServiceRoot) -> BTreeSet<u32> {
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
    pub(super) fn endpoint_ports(
        &mut self,
        root: &ServiceRoot,
        pids: &BTreeSet<u32>,
    ) -> BTreeSet<u16> {
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

    pub(super) fn expand(
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

    /// The fds members hold on connected Unix stream sockets whose other end a member holds
    /// too (IPC inside the service, socketpairs included), as (pid, fd); stdio fds and system
    /// sockets are left out.
    pub(super) fn ipc_fds(&self, members: &BTreeSet<u32>) -> BTreeSet<(u32, u32)> {
        let mut out = BTreeSet::new();
        for &pid in members {
            let Some(p) = self.snap.procs.get(&pid) else {
                continue;
            };
            for (inode, fds) in &p.sockets {
                let Some(me) = self.unix.get(inode) else {
                    continue;
                };
                let Some(peer) = me.peer.filter(|_| me.is_stream()) else {
                    continue;
                };
                let peer_name = self.unix.get(&peer).and_then(|s| s.name.as_deref());
                if self.is_system_socket(me.name.as_deref()) || self.is_system_socket(peer_name) {
                    continue;
                }
                let linked = self
                    .snap
                    .holders
                    .get(&peer)
                    .is_some_and(|h| h.iter().any(|holder| members.contains(holder)));
                if linked {
                    out.extend(fds.iter().filter(|&&fd| fd > 2).map(|&fd| (pid, fd)));
                }
            }
        }
        out
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
pub(super) fn cgroup_under(path: &str, root: &str) -> bool {
    root == "/"
        || path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Groups of indexes into `expansions` (one per root) whose member sets share a process,
/// transitively: each group is one service. Groups are in the order of their first root.
pub(super) fn merged_roots(expansions: &[BTreeMap<u32, Vec<Reason>>]) -> Vec<Vec<usize>> {
    let mut parent: Vec<usize> = (0..expansions.len()).collect();
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
    for i in 0..expansions.len() {
        groups.entry(find(&mut parent, i)).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
    groups.sort_by_key(|g| g.first().copied());
    groups
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
