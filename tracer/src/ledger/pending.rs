//! The requests the ledger holds until they are final, indexed so that a tick's work follows
//! what changed, not how many requests wait: at a few thousand requests a second thousands
//! wait for the power data past their end, and every tick, every segment, used to walk them
//! all (issue 17 measured 71 % of the daemon's CPU there).
//!
//! Each index answers one question of [`super::Ledger::advance`]: the oldest open request
//! (what blocks attribution, what expires), the requests whose prefill is not placed yet, the
//! requests that arrived before a segment's end (its candidates), the ended requests up to
//! the watermark (what may be final), the requests with many event times (what to prune).
//! Every set is kept in step with the request's own fields at the few places that change them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{BuildHasherDefault, Hasher},
};

use crate::ids::{RequestId, ServiceId};

/// Request ids are small and sequential: a multiplicative hash spreads them over a table at a
/// fraction of `SipHash`'s cost (nothing here is keyed by what a client chose).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by request id.
pub(crate) type IdMap<V> = HashMap<RequestId, V, BuildHasherDefault<IdHasher>>;

/// One service's requests held.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct ServicePending {
    /// Every request held, in id order (the order the split sees its candidates in).
    pub(crate) ids: BTreeSet<RequestId>,
    /// (arrival, id) of every request held.
    pub(crate) arrivals: BTreeSet<(u64, RequestId)>,
    /// (arrival, id) of those not ended yet.
    pub(crate) open: BTreeSet<(u64, RequestId)>,
    /// (arrival, id) of those whose prefill is not placed yet (`prefill_placed` false).
    pub(crate) unplaced: BTreeSet<(u64, RequestId)>,
    /// Of those, the ones with a streamed event: without a step clock only these can have
    /// their prefill resolved (`presence::resolve_prefill`).
    pub(crate) evented: BTreeSet<RequestId>,
    /// Those holding more event times than are kept once attributed past them.
    pub(crate) long: BTreeSet<RequestId>,
}

/// Every request held, by service, and the ended ones by end.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Pending {
    services: BTreeMap<ServiceId, ServicePending>,
    /// (end, id) of every ended request held.
    ended: BTreeSet<(u64, RequestId)>,
}

/// What the indices need of a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keys {
    pub(crate) arrival_ns: u64,
    pub(crate) end_ns: Option<u64>,
    pub(crate) placed: bool,
    /// It has a streamed event.
    pub(crate) evented: bool,
}

impl Pending {
    /// A request held by `service` from now on.
    pub(crate) fn insert(&mut self, service: ServiceId, id: RequestId, k: Keys) {
        let s = self.services.entry(service).or_default();
        s.ids.insert(id);
        s.arrivals.insert((k.arrival_ns, id));
        match k.end_ns {
            None => {
                s.open.insert((k.arrival_ns, id));
            }
            Some(end) => {
                self.ended.insert((end, id));
            }
        }
        if !k.placed {
            s.unplaced.insert((k.arrival_ns, id));
            if k.evented {
                s.evented.insert(id);
            }
        }
    }

    /// A request no longer held (final, withdrawn, or moving to another service).
    pub(crate) fn remove(&mut self, service: ServiceId, id: RequestId, k: Keys) {
        if let Some(s) = self.services.get_mut(&service) {
            s.ids.remove(&id);
            s.arrivals.remove(&(k.arrival_ns, id));
            s.open.remove(&(k.arrival_ns, id));
            s.unplaced.remove(&(k.arrival_ns, id));
            s.evented.remove(&id);
            s.long.remove(&id);
            if s.ids.is_empty() {
                self.services.remove(&service);
            }
        }
        if let Some(end) = k.end_ns {
            self.ended.remove(&(end, id));
        }
    }

    /// An open request ended at `end_ns`.
    pub(crate) fn end(&mut self, service: ServiceId, id: RequestId, arrival_ns: u64, end_ns: u64) {
        if let Some(s) = self.services.get_mut(&service) {
            s.open.remove(&(arrival_ns, id));
        }
        self.ended.insert((end_ns, id));
    }

    /// Its prefill is placed.
    pub(crate) fn placed(&mut self, service: ServiceId, id: RequestId, arrival_ns: u64) {
        if let Some(s) = self.services.get_mut(&service) {
            s.unplaced.remove(&(arrival_ns, id));
            s.evented.remove(&id);
        }
    }

    /// Its first streamed event came (and its prefill is not placed yet).
    pub(crate) fn evented(&mut self, service: ServiceId, id: RequestId) {
        if let Some(s) = self.services.get_mut(&service) {
            s.evented.insert(id);
        }
    }

    /// It holds many event times (pruned once attribution is past them).
    pub(crate) fn long(&mut self, service: ServiceId, id: RequestId) {
        if let Some(s) = self.services.get_mut(&service) {
            s.long.insert(id);
        }
    }

    /// It holds few event times again.
    pub(crate) fn short(&mut self, service: ServiceId, id: RequestId) {
        if let Some(s) = self.services.get_mut(&service) {
            s.long.remove(&id);
        }
    }

    pub(crate) fn service(&self, service: ServiceId) -> Option<&ServicePending> {
        self.services.get(&service)
    }

    pub(crate) fn services(&self) -> impl Iterator<Item = (ServiceId, &ServicePending)> {
        self.services.iter().map(|(k, v)| (*k, v))
    }

    /// The ended requests with an end at or before `until_ns`, by end then id.
    pub(crate) fn ended_until(&self, until_ns: u64) -> impl Iterator<Item = (u64, RequestId)> {
        self.ended
            .range(..=(until_ns, RequestId(u64::MAX)))
            .copied()
    }

    /// The earliest arrival of any request held.
    pub(crate) fn oldest_arrival(&self) -> Option<u64> {
        self.services
            .values()
            .filter_map(|s| s.arrivals.first().map(|a| a.0))
            .min()
    }

    /// Every open request, by service.
    pub(crate) fn open(&self) -> Vec<(ServiceId, RequestId)> {
        self.services
            .iter()
            .flat_map(|(svc, s)| s.open.iter().map(move |(_, id)| (*svc, *id)))
            .collect()
    }

    /// Requests held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.services.values().map(|s| s.ids.len()).sum()
    }
}

impl ServicePending {
    /// Requests that arrived before `ts_ns`, in id order.
    pub(crate) fn arrived_before(&self, ts_ns: u64, out: &mut Vec<RequestId>) {
        out.clear();
        out.extend(self.arrivals.range(..(ts_ns, RequestId(0))).map(|a| a.1));
        out.sort_unstable();
    }

    /// Requests not placed yet, in id order: all of them, or (`evented_only`: a service
    /// without a step clock) those with a streamed event.
    pub(crate) fn unplaced(&self, evented_only: bool, out: &mut Vec<RequestId>) {
        out.clear();
        if evented_only {
            out.extend(self.evented.iter().copied());
        } else {
            out.extend(self.unplaced.iter().map(|a| a.1));
            out.sort_unstable();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(arrival_ns: u64, end_ns: Option<u64>) -> Keys {
        Keys {
            arrival_ns,
            end_ns,
            placed: false,
            evented: false,
        }
    }

    #[test]
    fn indices_follow_a_request_through_its_life() {
        let mut p = Pending::default();
        let s = ServiceId(1);
        p.insert(s, RequestId(2), keys(20, None));
        p.insert(s, RequestId(1), keys(30, None));
        p.insert(s, RequestId(3), keys(10, Some(40)));
        let sp = p.service(s).expect("service");
        assert_eq!(sp.open.first(), Some(&(20, RequestId(2))));
        let mut before = Vec::new();
        sp.arrived_before(25, &mut before);
        assert_eq!(before, vec![RequestId(2), RequestId(3)]);
        p.end(s, RequestId(2), 20, 35);
        assert_eq!(
            p.ended_until(39).collect::<Vec<_>>(),
            vec![(35, RequestId(2))]
        );
        p.evented(s, RequestId(3));
        p.placed(s, RequestId(1), 30);
        let mut unplaced = Vec::new();
        let sp = p.service(s).expect("service");
        sp.unplaced(false, &mut unplaced);
        assert_eq!(unplaced, vec![RequestId(2), RequestId(3)]);
        sp.unplaced(true, &mut unplaced);
        assert_eq!(unplaced, vec![RequestId(3)]);
        assert_eq!(p.oldest_arrival(), Some(10));
        assert_eq!(p.open(), vec![(s, RequestId(1))]);
        p.remove(s, RequestId(3), keys(10, Some(40)));
        p.remove(s, RequestId(2), keys(20, Some(35)));
        assert_eq!(p.len(), 1);
        assert_eq!(p.ended_until(u64::MAX).count(), 0);
        p.remove(s, RequestId(1), keys(30, None));
        assert!(p.service(s).is_none());
    }

    #[test]
    fn sequential_ids_spread() {
        use std::hash::BuildHasher as _;
        let b = BuildHasherDefault::<IdHasher>::default();
        let buckets: BTreeSet<u64> = (0..1024u64)
            .map(|i| b.hash_one(RequestId(i)) & 1023)
            .collect();
        assert_eq!(buckets.len(), 1024);
    }
}
