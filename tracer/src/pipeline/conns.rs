//! Connections as the probes report them, handed to the HTTP tracker.
//!
//! A connection can have several fds (`dup`, `fcntl(F_DUPFD)`): the tracker knows it by its
//! first fd and generation (`conn_id`), and it ends when its last fd closes or its process
//! exits.

use std::collections::BTreeMap;

use tracer_ebpf::abi::Syscall;

use crate::{
    ids::Pid,
    wire::{ConnKey, Direction, Role, Tracker},
};

/// A traced connection: its tracker key (first fd) and every fd that refers to it.
#[derive(Debug)]
struct OpenConn {
    key: ConnKey,
    fds: Vec<i32>,
}

/// The open connections of every traced process.
#[derive(Debug, Default)]
pub(super) struct Conns {
    open: BTreeMap<(Pid, u64), OpenConn>,
}

impl Conns {
    /// A connection opened (accepted, connected, or found at attach).
    pub fn open(
        &mut self,
        t: &mut Tracker,
        tgid: Pid,
        fd: i32,
        conn_id: u64,
        ts_ns: u64,
        role: Role,
    ) {
        let key = ConnKey {
            tgid: tgid.0,
            fd,
            conn_id,
        };
        t.on_open(key, ts_ns, role);
        self.open
            .insert((tgid, conn_id), OpenConn { key, fds: vec![fd] });
    }

    /// A connection record: a new connection, or a second fd for one (`dup`).
    pub fn conn(
        &mut self,
        t: &mut Tracker,
        tgid: Pid,
        fd: i32,
        conn_id: u64,
        syscall: Syscall,
        ts_ns: u64,
    ) {
        if syscall == Syscall::Dup {
            if let Some(c) = self.open.get_mut(&(tgid, conn_id)) {
                c.fds.push(fd);
            } else {
                // Duplicated from a connection we never saw opened: follow it anyway.
                self.open(t, tgid, fd, conn_id, ts_ns, Role::Unknown);
            }
            return;
        }
        let role = if syscall == Syscall::Connect {
            Role::Client
        } else {
            Role::Server
        };
        self.open(t, tgid, fd, conn_id, ts_ns, role);
    }

    /// Bytes moved (or a read returned 0: `eof`).
    #[expect(clippy::too_many_arguments, reason = "one data record's fields")]
    pub fn data(
        &self,
        t: &mut Tracker,
        tgid: Pid,
        fd: i32,
        conn_id: u64,
        ts_ns: u64,
        inbound: bool,
        total_len: u64,
        eof: bool,
        payload: &[u8],
    ) {
        let first_fd = self.open.get(&(tgid, conn_id)).map_or(fd, |c| c.key.fd);
        let key = ConnKey {
            tgid: tgid.0,
            fd: first_fd,
            conn_id,
        };
        let dir = if inbound {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        if eof {
            t.on_eof(key, ts_ns, dir);
        } else {
            t.on_data(key, ts_ns, dir, total_len, payload);
        }
    }

    /// An fd of a connection closed; the connection ends with its last fd.
    pub fn close(&mut self, t: &mut Tracker, tgid: Pid, fd: i32, conn_id: u64, ts_ns: u64) {
        let Some(c) = self.open.get_mut(&(tgid, conn_id)) else {
            t.on_close(
                ConnKey {
                    tgid: tgid.0,
                    fd,
                    conn_id,
                },
                ts_ns,
            );
            return;
        };
        c.fds.retain(|&f| f != fd);
        if c.fds.is_empty() {
            let key = c.key;
            self.open.remove(&(tgid, conn_id));
            t.on_close(key, ts_ns);
        }
    }

    /// A process ended: its connections end with it.
    pub fn process_exited(&mut self, t: &mut Tracker, pid: Pid, ts_ns: u64) {
        let gone: Vec<(Pid, u64)> = self
            .open
            .range((pid, 0)..=(pid, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            if let Some(c) = self.open.remove(&k) {
                t.on_close(c.key, ts_ns);
            }
        }
    }
}
