//! Loopback TCP: the TCP sockets of one network namespace, indexed by inode and by ends, to
//! find the other end of a connection and who listens on an address.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use crate::procfs::{TCP_ESTABLISHED, TCP_LISTEN, TcpEntry};

/// The TCP sockets of one network namespace, indexed.
#[derive(Debug, Default)]
pub(super) struct TcpTable {
    entries: Vec<TcpEntry>,
    by_inode: HashMap<u64, usize>,
    by_ends: HashMap<(SocketAddr, SocketAddr), usize>,
    /// Listening addresses by port.
    listening: HashMap<u16, Vec<IpAddr>>,
}

impl TcpTable {
    pub(super) fn new(entries: Vec<TcpEntry>) -> Self {
        let mut t = Self {
            entries,
            ..Self::default()
        };
        for (i, e) in t.entries.iter().enumerate() {
            if e.inode != 0 {
                t.by_inode.insert(e.inode, i);
            }
            match e.state {
                TCP_ESTABLISHED => {
                    t.by_ends.insert((e.local, e.remote), i);
                }
                TCP_LISTEN => t
                    .listening
                    .entry(e.local.port())
                    .or_default()
                    .push(e.local.ip()),
                _ => {}
            }
        }
        t
    }

    pub(super) fn by_inode(&self, inode: u64) -> Option<&TcpEntry> {
        self.entries.get(*self.by_inode.get(&inode)?)
    }

    /// The other end of an established connection (same namespace).
    pub(super) fn peer_of(&self, e: &TcpEntry) -> Option<&TcpEntry> {
        self.entries.get(*self.by_ends.get(&(e.remote, e.local))?)
    }

    /// Whether some socket listens on `addr` (its address or the wildcard).
    pub(super) fn listens(&self, addr: SocketAddr) -> bool {
        self.listening
            .get(&addr.port())
            .is_some_and(|ips| ips.iter().any(|ip| *ip == addr.ip() || ip.is_unspecified()))
    }
}
