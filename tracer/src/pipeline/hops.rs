//! The second hop: a request that a target forwards to another target over loopback HTTP
//! (Ollama's API process calling its runner, any proxy in front of a local engine) is one
//! request, not three.
//!
//! The wire shows it three times: the **outer** exchange (a client → the front, the front's
//! server side), the front's **call** (its client side) and the **inner** exchange (the same
//! bytes seen from the engine's server side). Only the outer one is a ledger request, so its
//! energy is not divided; the call's token counts and model join it where it reports none.
//!
//! - A call belongs to the outer request the front was serving when it made it: the one on the
//!   server connection the writing thread last read a request from (thread-per-connection
//!   servers), else the earliest unpaired request in flight in that process (a proxy forwards
//!   in arrival order).
//! - The inner exchange is the call's other end: a request on a connection accepted from a
//!   loopback address, from another process, with the call's length and first 4 KiB, within
//!   [`HOP_WINDOW_NS`]. When the engine's side is seen first, it is taken back from the ledger
//!   as soon as the call is (`Ledger::withdraw`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::ids::Pid;

/// How far apart the two ends of one exchange may be seen.
pub(super) const HOP_WINDOW_NS: u64 = 1_000_000_000;

/// A request message as both ends see it: its length and the hash of its first 4 KiB.
pub(super) type Message = (u64, u64);

/// A call a traced process made as a client, until it ends.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Call {
    tgid: Pid,
    ts_ns: u64,
    message: Message,
    /// To this host (a hop), not to a remote API.
    local: bool,
    /// The outer request it was made for, and the inner exchange at its other end.
    pub(super) outer: Option<u64>,
    inner: Option<u64>,
    pub(super) model: Option<String>,
    pub(super) usage: Option<(Option<u64>, Option<u64>, Option<u64>)>,
}

/// A server-side request in flight (a ledger request).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Outer {
    id: u64,
    conn_id: u64,
    paired: bool,
}

/// A server-side request from a loopback peer that was given to the ledger before any call
/// matched it.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Loopback {
    id: u64,
    tgid: Pid,
    ts_ns: u64,
    message: Message,
}

/// The pairing state (see the module docs).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Hops {
    calls: BTreeMap<u64, Call>,
    /// Inner exchanges in flight (not ledger requests).
    inner: BTreeSet<u64>,
    /// Per process, by request id (arrival order).
    outers: BTreeMap<Pid, BTreeMap<u64, Outer>>,
    loopback: VecDeque<Loopback>,
    /// The server connection each thread last read from, and the server connection each
    /// client connection was last written from.
    last_read: BTreeMap<u32, (Pid, u64)>,
    via: BTreeMap<(Pid, u64), u64>,
    /// Calls paired with an outer request, and inner exchanges found.
    pub(super) calls_paired: u64,
    pub(super) inner_found: u64,
    /// Calls paired by arrival order (the writing thread named no unpaired request): the
    /// weaker rule, counted so a wrong pairing can be told from a right one.
    #[serde(default)]
    pub(super) calls_by_arrival: u64,
}

/// What to do with a server-side arrival.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Arrival {
    /// A request of its own: to the ledger.
    Outer,
    /// Another process's call seen from the other end: not a request; the outer request the
    /// call was made for, if known.
    Inner { outer: Option<u64> },
}

/// A call's two ends found: the inner exchange (id, process) and the call's outer request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Found {
    pub(super) inner: u64,
    pub(super) inner_tgid: Pid,
    pub(super) outer: Option<u64>,
}

impl Hops {
    /// Bytes moved by thread `tid` on a connection of `tgid`: a read on a server connection
    /// names what the thread is serving, a write on a client connection is on its behalf.
    pub(super) fn data(&mut self, tid: u32, tgid: Pid, conn_id: u64, inbound: bool, server: bool) {
        if inbound && server {
            self.last_read.insert(tid, (tgid, conn_id));
        } else if !inbound
            && !server
            && let Some(&(p, served)) = self.last_read.get(&tid)
            && p == tgid
        {
            self.via.insert((tgid, conn_id), served);
        }
    }

    /// A call (`id`, on client connection `conn_id` of `tgid`) was sent; `local`: to this host
    /// (only such a call is a hop: one to a remote API is the process's own business, and is
    /// not paired). Returns its inner exchange when that was already given to the ledger (to
    /// be taken back).
    pub(super) fn call(
        &mut self,
        id: u64,
        (tgid, conn_id): (Pid, u64),
        (ts_ns, message, model): (u64, Message, Option<String>),
        local: bool,
    ) -> Option<Found> {
        let served = self.via.get(&(tgid, conn_id)).copied();
        let outers = if local {
            self.outers.get_mut(&tgid)
        } else {
            None
        };
        let outer = outers.and_then(|list| {
            let pick = served.and_then(|s| {
                list.values_mut()
                    .rev()
                    .find(|o| o.conn_id == s && !o.paired)
            });
            let o = if let Some(o) = pick {
                o
            } else {
                let o = list.values_mut().find(|o| !o.paired)?;
                self.calls_by_arrival += 1;
                o
            };
            o.paired = true;
            Some(o.id)
        });
        self.calls_paired += u64::from(outer.is_some());
        self.prune(ts_ns);
        let early = self.loopback.iter().position(|l| {
            local
                && l.tgid != tgid
                && l.message == message
                && l.ts_ns.abs_diff(ts_ns) <= HOP_WINDOW_NS
        });
        let early = early.and_then(|i| self.loopback.remove(i)).map(|l| {
            self.inner_found += 1;
            self.inner.insert(l.id);
            if let Some(list) = self.outers.get_mut(&l.tgid) {
                list.remove(&l.id);
            }
            (l.id, l.tgid)
        });
        let inner = early.map(|e| e.0);
        self.calls.insert(
            id,
            Call {
                tgid,
                ts_ns,
                message,
                local,
                outer,
                inner,
                model,
                usage: None,
            },
        );
        early.map(|(inner, inner_tgid)| Found {
            inner,
            inner_tgid,
            outer,
        })
    }

    /// A request arrived on server connection `conn_id` of `tgid` (`local_peer`: from a
    /// loopback address).
    pub(super) fn arrive(
        &mut self,
        id: u64,
        (tgid, conn_id): (Pid, u64),
        ts_ns: u64,
        message: Message,
        local_peer: bool,
    ) -> Arrival {
        if local_peer
            && let Some(call) = self.calls.values_mut().find(|c| {
                c.local
                    && c.inner.is_none()
                    && c.tgid != tgid
                    && c.message == message
                    && c.ts_ns.abs_diff(ts_ns) <= HOP_WINDOW_NS
            })
        {
            call.inner = Some(id);
            let outer = call.outer;
            self.inner.insert(id);
            self.inner_found += 1;
            return Arrival::Inner { outer };
        }
        self.outers.entry(tgid).or_default().insert(
            id,
            Outer {
                id,
                conn_id,
                paired: false,
            },
        );
        if local_peer {
            self.prune(ts_ns);
            self.loopback.push_back(Loopback {
                id,
                tgid,
                ts_ns,
                message,
            });
        }
        Arrival::Outer
    }

    /// Whether `id` is a call or an inner exchange (its lifecycle is not the ledger's).
    pub(super) fn not_a_request(&self, id: u64) -> bool {
        self.calls.contains_key(&id) || self.inner.contains(&id)
    }

    /// The call `id`, to record what its response said.
    pub(super) fn call_mut(&mut self, id: u64) -> Option<&mut Call> {
        self.calls.get_mut(&id)
    }

    /// Request `id` ended (any kind); a call's record is returned for its outer request.
    pub(super) fn end(&mut self, id: u64, tgid: Pid) -> Option<Call> {
        self.inner.remove(&id);
        if let Some(list) = self.outers.get_mut(&tgid) {
            list.remove(&id);
            if list.is_empty() {
                self.outers.remove(&tgid);
            }
        }
        self.calls.remove(&id)
    }

    /// A thread ended: it serves nothing any more.
    pub(super) fn thread_exited(&mut self, tid: u32) {
        self.last_read.remove(&tid);
    }

    /// A process exited: forget its threads and connections.
    pub(super) fn process_exited(&mut self, pid: Pid) {
        self.last_read.retain(|_, v| v.0 != pid);
        self.via.retain(|k, _| k.0 != pid);
    }

    /// Connection `conn_id` of `tgid` closed.
    pub(super) fn closed(&mut self, tgid: Pid, conn_id: u64) {
        self.via.remove(&(tgid, conn_id));
    }

    fn prune(&mut self, now_ns: u64) {
        while self
            .loopback
            .front()
            .is_some_and(|l| now_ns.saturating_sub(l.ts_ns) > HOP_WINDOW_NS)
        {
            self.loopback.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRONT: Pid = Pid(100);
    const MSG: Message = (300, 7);

    /// Two requests in flight at a front; each thread's call goes to the request it read, and
    /// a call from a thread that read none falls back to arrival order, counted as such.
    #[test]
    fn calls_pair_by_the_thread_that_read_else_by_arrival_and_say_which() {
        let mut h = Hops::default();
        for (id, conn, tid) in [(1, 10, 1), (2, 11, 2)] {
            assert_eq!(h.arrive(id, (FRONT, conn), id, MSG, false), Arrival::Outer);
            h.data(tid, FRONT, conn, true, true);
        }
        // Thread 2 (serving request 2) calls first, on client connection 20.
        h.data(2, FRONT, 20, false, false);
        h.call(50, (FRONT, 20), (10, MSG, None), true);
        assert_eq!(h.calls[&50].outer, Some(2));
        assert_eq!((h.calls_paired, h.calls_by_arrival), (1, 0));
        // A thread that read no request (a task moved to another thread) calls on 21.
        h.data(9, FRONT, 21, false, false);
        h.call(51, (FRONT, 21), (11, MSG, None), true);
        assert_eq!(h.calls[&51].outer, Some(1));
        assert_eq!((h.calls_paired, h.calls_by_arrival), (2, 1));
        // Nothing left unpaired: a third call pairs with nothing.
        h.call(52, (FRONT, 22), (12, MSG, None), true);
        assert_eq!(h.calls[&52].outer, None);
        assert_eq!((h.calls_paired, h.calls_by_arrival), (2, 1));
    }
}
