//! Requests the wire showed twice: a forwarded request's inner exchange (a proxy calling a
//! local engine, `pipeline/hops.rs`) is taken back, and what it showed joins the outer one.

use crate::ids::{RequestId, ServiceId};

use super::Ledger;

impl Ledger {
    /// Takes back a request that turned out to be another's inner exchange. Only while nothing
    /// has been attributed to it: afterwards it stays (counted in
    /// [`LedgerStats::withdraw_too_late`](super::LedgerStats)) so every joule keeps its place.
    /// Returns whether it was taken back.
    pub fn withdraw(&mut self, id: RequestId) -> bool {
        let Some(r) = self.requests.get(&id) else {
            return false;
        };
        if !r.accounts.is_empty() || r.held_units > 0 {
            self.stats.withdraw_too_late += 1;
            return false;
        }
        let (service, keys) = (r.service, r.keys());
        self.requests.remove(&id);
        self.pending.remove(service, id, keys);
        self.stats.requests_open = self.stats.requests_open.saturating_sub(1);
        self.stats.withdrawn += 1;
        true
    }

    /// Moves a request to `service` (a proxy's request whose engine runs in another service),
    /// while nothing has been attributed to it; afterwards it stays where it is (counted in
    /// `rehome_too_late`). Returns whether it is in `service` now.
    pub fn rehome(&mut self, id: RequestId, service: ServiceId) -> bool {
        let Some(r) = self.requests.get_mut(&id) else {
            return false;
        };
        if r.service == service {
            return true;
        }
        if !r.accounts.is_empty() || r.held_units > 0 {
            self.stats.rehome_too_late += 1;
            return false;
        }
        let old = std::mem::replace(&mut r.service, service);
        let (keys, long) = (r.keys(), r.times.len() > super::finalise::LONG_TIMES);
        self.pending.remove(old, id, keys);
        self.pending.insert(service, id, keys);
        if long {
            self.pending.long(service, id);
        }
        self.stats.rehomed += 1;
        true
    }

    /// The model a request was for, learned from its inner exchange, where its own body did
    /// not say.
    pub fn model_if_unknown(&mut self, id: RequestId, model: &str) {
        if let Some(r) = self.requests.get_mut(&id)
            && r.arrival.model.is_none()
        {
            r.arrival.model = Some(model.to_string());
        }
    }
}
