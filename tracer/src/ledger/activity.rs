//! How much of a stretch of time a service had requests in flight: CPU-time shares are
//! averages over a sampling interval, and a service spends its CPU time while it serves, so
//! its share while serving is its average over this fraction (`occupancy/binding/cputime.rs`).

use crate::ids::ServiceId;

use super::Ledger;

impl Ledger {
    /// The fraction of `[from_ns, to_ns)` in which `service` had at least one request in
    /// flight (arrived, not yet ended), over the requests the ledger still holds: 0 when
    /// none, or for an empty stretch. Requests already final are not held any more, so the
    /// interval should be recent (within the attribution delay).
    pub fn in_flight_fraction(&self, service: ServiceId, from_ns: u64, to_ns: u64) -> f64 {
        if to_ns <= from_ns {
            return 0.0;
        }
        let Some(p) = self.pending.service(service) else {
            return 0.0;
        };
        // Only those that arrived before the stretch's end can overlap it.
        let mut spans: Vec<(u64, u64)> = p
            .arrivals
            .range(..(to_ns, crate::ids::RequestId(0)))
            .filter_map(|(_, id)| self.requests.get(id))
            .map(|r| {
                let a = r.arrival.ts_ns.max(from_ns);
                (a, r.end_ns.unwrap_or(to_ns).min(to_ns))
            })
            .filter(|(a, b)| a < b)
            .collect();
        spans.sort_unstable();
        let (mut covered, mut reach) = (0u64, from_ns);
        for (a, b) in spans {
            let a = a.max(reach);
            if b > a {
                covered += b - a;
                reach = b;
            }
        }
        covered as f64 / (to_ns - from_ns) as f64
    }
}
