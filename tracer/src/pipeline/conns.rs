//! Connections as the probes report them, handed to the HTTP tracker.
//!
//! A connection can have several fds (`dup`, `fcntl(F_DUPFD)`): the tracker knows it by its
//! first fd and generation (`conn_id`), and it ends when its last fd closes or its process
//! exits.

use std::{collections::BTreeMap, net::SocketAddr};

use tracer_ebpf::abi::{self, DataHead, Syscall};

use crate::{
    ids::Pid,
    wire::{ConnKey, Direction, Role, Tracker},
};

/// A traced connection: its tracker key (first fd) and every fd that refers to it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OpenConn {
    key: ConnKey,
    fds: Vec<i32>,
    role: Role,
    /// The other end has a loopback address: accepted from, or connected to, this host.
    local_peer: bool,
}

/// The open connections of every traced process.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Conns {
    open: BTreeMap<(Pid, u64), OpenConn>,
    /// Syscalls captured in several records, being put back together.
    pieces: BTreeMap<(Pid, u64), Pieces>,
    pieces_lost: u64,
    /// When inputs are recorded: each syscall as the tracker read it (redacted), as data
    /// records in the probes' format, in the order the tracker read them.
    pub read: Option<Vec<Vec<u8>>>,
}

/// One data record's fields, as the tracker needs them.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "the record's flags, each its own meaning"
)]
pub(super) struct Moved<'a> {
    pub fd: i32,
    pub conn_id: u64,
    pub ts_ns: u64,
    pub inbound: bool,
    pub total_len: u64,
    pub eof: bool,
    pub more: bool,
    pub cont: bool,
    pub offset: u32,
    /// A TLS connection's plaintext (`SSL_read`/`SSL_write`), not its socket bytes.
    pub plaintext: bool,
    /// Not in a checkpoint: a syscall being put together keeps its bytes in [`Pieces`].
    #[serde(skip)]
    pub payload: &'a [u8],
    /// The record's fixed part as the probes wrote it (what a recording starts from).
    #[serde(skip)]
    pub head: &'a [u8],
}

/// A syscall's first record and the bytes put together so far.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Pieces {
    first: Moved<'static>,
    head: Vec<u8>,
    buf: Vec<u8>,
}

/// `payload` of the syscall whose first record began with `head`, as data records: one, or
/// several continuation records when it is longer than a record holds (a replay puts them
/// back together as the live run did).
fn records_of(head: &[u8], payload: &[u8], out: &mut Vec<Vec<u8>>) {
    const FLAGS: usize = std::mem::offset_of!(DataHead, hdr.flags);
    const CAP: usize = std::mem::offset_of!(DataHead, cap_len);
    const OFFSET: usize = std::mem::offset_of!(DataHead, offset);
    let len = size_of::<DataHead>();
    let Some(head) = head.get(..len) else {
        return;
    };
    let flags = u16::from_ne_bytes([head[FLAGS], head[FLAGS + 1]])
        & !(abi::DATA_FLAG_MORE | abi::DATA_FLAG_CONT);
    let pieces: Vec<&[u8]> = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(abi::CAPTURE_MAX).collect()
    };
    let last = pieces.len() - 1;
    for (i, piece) in pieces.into_iter().enumerate() {
        let mut f = flags;
        if i < last {
            f |= abi::DATA_FLAG_MORE;
        }
        if i > 0 {
            f |= abi::DATA_FLAG_CONT;
        }
        let mut r = Vec::with_capacity(len + piece.len());
        r.extend_from_slice(head);
        r[FLAGS..FLAGS + 2].copy_from_slice(&f.to_ne_bytes());
        r[CAP..CAP + 4].copy_from_slice(&(piece.len() as u32).to_ne_bytes());
        r[OFFSET..OFFSET + 4].copy_from_slice(&((i * abi::CAPTURE_MAX) as u32).to_ne_bytes());
        r.extend_from_slice(piece);
        out.push(r);
    }
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
        self.open.insert(
            (tgid, conn_id),
            OpenConn {
                key,
                fds: vec![fd],
                role,
                local_peer: false,
            },
        );
    }

    /// The process's side of a connection, when it was seen opening.
    fn role(&self, tgid: Pid, conn_id: u64) -> Option<Role> {
        self.open.get(&(tgid, conn_id)).map(|c| c.role)
    }

    /// The connection's other end has a loopback address.
    pub fn local_peer(&self, tgid: Pid, conn_id: u64) -> bool {
        self.open
            .get(&(tgid, conn_id))
            .is_some_and(|c| c.local_peer)
    }

    /// A connection record: a new connection, or a second fd for one (`dup`); `peer` is the
    /// address an accepted connection came from, and whether it is a Unix socket.
    #[expect(clippy::too_many_arguments, reason = "one connection record's fields")]
    pub fn conn(
        &mut self,
        t: &mut Tracker,
        tgid: Pid,
        fd: i32,
        conn_id: u64,
        syscall: Syscall,
        ts_ns: u64,
        (peer, unix): (Option<SocketAddr>, bool),
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
        if (unix || peer.is_some_and(|p| p.ip().is_loopback()))
            && let Some(c) = self.open.get_mut(&(tgid, conn_id))
        {
            c.local_peer = true;
        }
    }

    /// Bytes moved (or a read returned 0: `eof`). A syscall captured in several records (see
    /// `DATA_FLAG_MORE`) is put back together first: the tracker sees one read. Returns the
    /// process's side of the connection, when known (none for a continuation).
    pub fn data(&mut self, t: &mut Tracker, tgid: Pid, d: &Moved<'_>) -> Option<Role> {
        let at = (tgid, d.conn_id);
        if d.cont {
            match self.pieces.get_mut(&at) {
                Some(p) if p.buf.len() as u64 == u64::from(d.offset) => {
                    p.buf.extend_from_slice(d.payload);
                    if !d.more {
                        self.flush_pieces(t, at);
                    }
                }
                // The record before it was lost (a full ring): what was put together goes on,
                // the rest counts as uncaptured.
                _ => {
                    self.pieces_lost += 1;
                    self.flush_pieces(t, at);
                }
            }
            return None;
        }
        self.flush_pieces(t, at);
        if d.more {
            self.pieces.insert(
                at,
                Pieces {
                    first: Moved {
                        payload: &[],
                        head: &[],
                        ..*d
                    },
                    head: d.head.to_vec(),
                    buf: d.payload.to_vec(),
                },
            );
            return self.role(tgid, d.conn_id);
        }
        self.deliver(t, tgid, d)
    }

    /// Hands a syscall being put together to the tracker as it is.
    fn flush_pieces(&mut self, t: &mut Tracker, at: (Pid, u64)) {
        if self.pieces.is_empty() {
            return;
        }
        if let Some(p) = self.pieces.remove(&at) {
            let d = Moved {
                payload: &p.buf,
                head: &p.head,
                ..p.first
            };
            self.deliver(t, at.0, &d);
        }
    }

    /// Feeds the tracker; returns the connection's side, when it was seen opening.
    fn deliver(&mut self, t: &mut Tracker, tgid: Pid, d: &Moved<'_>) -> Option<Role> {
        let open = self.open.get(&(tgid, d.conn_id));
        let first_fd = open.map_or(d.fd, |c| c.key.fd);
        let key = ConnKey {
            tgid: tgid.0,
            fd: first_fd,
            conn_id: d.conn_id,
        };
        let dir = if d.inbound {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let role = open.map(|c| c.role);
        if d.eof {
            t.on_eof(key, d.ts_ns, dir);
        } else if d.plaintext {
            t.on_plaintext(key, d.ts_ns, dir, d.total_len, d.payload);
        } else {
            t.on_data(key, d.ts_ns, dir, d.total_len, d.payload);
        }
        if let Some(out) = &mut self.read {
            records_of(d.head, if d.eof { &[] } else { t.view() }, out);
        }
        role
    }

    /// Continuation records that did not follow the record before them (counted, not used).
    pub fn pieces_lost(&self) -> u64 {
        self.pieces_lost
    }

    /// An fd of a connection closed; the connection ends with its last fd.
    pub fn close(&mut self, t: &mut Tracker, tgid: Pid, fd: i32, conn_id: u64, ts_ns: u64) {
        self.flush_pieces(t, (tgid, conn_id));
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
            self.flush_pieces(t, k);
            if let Some(c) = self.open.remove(&k) {
                t.on_close(c.key, ts_ns);
            }
        }
    }
}
