//! Requests the wire showed twice: a forwarded request's inner exchange (a proxy calling a
//! local engine, `pipeline/hops.rs`) is taken back, and what it showed joins the outer one.

use crate::ids::RequestId;

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
        let service = r.service;
        self.requests.remove(&id);
        if let Some(ids) = self.pending.get_mut(&service)
            && let Some(pos) = ids.iter().position(|x| *x == id)
        {
            ids.remove(pos);
        }
        self.stats.requests_open = self.stats.requests_open.saturating_sub(1);
        self.stats.withdrawn += 1;
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
