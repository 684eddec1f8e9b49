//! CPU package and DRAM energy split by CPU time: a CPU-only engine (llama.cpp on CPU) shares
//! the host with everything else on it, and only its own CPU time is its share.
//!
//! Every sample gives the host's busy clock ticks and each service process's (all threads).
//! Over the interval since the previous sample, a service's weight on the host domains is its
//! processes' ticks as a percentage of the host's busy ticks; the rest is the weight of
//! [`OTHER_PROCESSES`], a pseudo-service with no requests, whose share the ledger leaves
//! unattributed. A service's CPU time is taken as spent while it has requests in flight: its
//! weight is its average share over the fraction of the interval it was serving (so while it
//! serves, its requests get what it used, not a share diluted by the gaps between them), and
//! the ledger leaves a service's weight out wherever it has nothing in flight. A service that
//! served nothing in the interval adds its share to [`OTHER_PROCESSES`]. Without samples (or with `cpu_time_interval_ms = 0`) the weights stay unset
//! and the services with requests in flight share the host domains equally, as before.

use crate::ids::{Pid, ServiceId};

use super::{Binding, Change, WEIGHT_STEP, is_host_domain};

/// The pseudo-service holding what the traced services' CPU time does not explain: other
/// processes on the host. It never has requests.
pub const OTHER_PROCESSES: ServiceId = ServiceId::OTHER_PROCESSES;

impl Binding {
    /// A CPU-time sample at `ts_ns` (cumulative ticks; see the module docs).
    pub fn cpu_time(
        &mut self,
        ts_ns: u64,
        busy_ticks: u64,
        processes: &[(Pid, u64)],
        in_flight: impl Fn(ServiceId, u64, u64) -> f64,
        out: &mut Vec<Change>,
    ) {
        let previous = self.busy_last.replace(busy_ticks);
        let since_ns = self.cpu_last_ns.replace(ts_ns);
        let mut used: std::collections::BTreeMap<ServiceId, u64> =
            self.host_since.keys().map(|&s| (s, 0)).collect();
        let mut last = std::collections::BTreeMap::new();
        for &(pid, ticks) in processes {
            if let Some(&before) = self.cpu_last.get(&pid) {
                let service = self.service_of(pid);
                *used.entry(service).or_default() += ticks.saturating_sub(before);
            }
            last.insert(pid, ticks);
        }
        self.cpu_last = last;
        let Some(busy) = previous
            .map(|p| busy_ticks.saturating_sub(p))
            .filter(|&b| b > 0)
        else {
            return;
        };
        let total: u64 = used.values().sum();
        // Ticks are counted per process and per host at different moments: never more than
        // the host's busy time in all.
        let scale = 100.0 / (busy.max(total)) as f64;
        let other = 100.0 - total as f64 * scale;
        let hosts: Vec<_> = self
            .devices
            .iter()
            .filter(|(_, d)| is_host_domain(d.kind))
            .map(|(&id, _)| id)
            .collect();
        // A service's rate while it serves: its average over the part of the interval it had
        // requests in flight. One that served nothing is like any other process here.
        let mut other = other.max(0.0);
        let mut shares: Vec<(ServiceId, f64)> = Vec::with_capacity(used.len() + 1);
        for (&s, &ticks) in &used {
            if s == OTHER_PROCESSES || !self.host_since.contains_key(&s) {
                continue;
            }
            let average = ticks as f64 * scale;
            let serving = since_ns.map_or(1.0, |from| in_flight(s, from, ts_ns));
            if serving > 0.0 {
                shares.push((s, average / serving.min(1.0)));
            } else {
                other += average;
                shares.push((s, 0.0));
            }
        }
        shares.push((OTHER_PROCESSES, other));
        for device in hosts {
            for &(service, weight) in &shares {
                // Passed on when it moved noticeably (each change is an occupancy entry).
                let last = self.weights.get(&(device, service)).copied().flatten();
                if last.is_some_and(|w| (w - weight).abs() <= WEIGHT_STEP) {
                    continue;
                }
                self.weights.insert((device, service), Some(weight));
                out.push(Change::Reweighed {
                    device,
                    service,
                    ts_ns,
                    weight: Some(weight),
                });
            }
        }
    }

    /// Every process of every service.
    pub fn service_processes(&self) -> Vec<u32> {
        self.proc_service.keys().map(|p| p.0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ids::DeviceId, ledger::DeviceKind};

    fn always(_: ServiceId, _: u64, _: u64) -> f64 {
        1.0
    }

    fn weights(out: &[Change]) -> Vec<(u32, u32, i64)> {
        out.iter()
            .filter_map(|c| match c {
                Change::Reweighed {
                    device,
                    service,
                    weight: Some(w),
                    ..
                } => Some((device.0, service.0, w.round() as i64)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn host_domains_are_weighed_by_cpu_time_and_the_rest_is_other() {
        let mut b = Binding::default();
        let mut out = Vec::new();
        b.add_device(
            DeviceId(0),
            "gpu0",
            DeviceKind::Gpu,
            Some(0),
            None,
            &mut out,
        );
        b.add_device(
            DeviceId(1),
            "cpu0",
            DeviceKind::CpuPackage,
            None,
            None,
            &mut out,
        );
        b.add_service(ServiceId(1), "a".into(), 0, &mut out);
        b.add_service(ServiceId(2), "b".into(), 0, &mut out);
        b.add_member(Pid(10), ServiceId(1), "target".into());
        b.add_member(Pid(20), ServiceId(2), "target".into());
        out.clear();
        b.cpu_time(1, 1_000, &[(Pid(10), 100), (Pid(20), 50)], always, &mut out);
        assert!(
            out.is_empty(),
            "the first sample has nothing to compare with"
        );
        // Over the next interval: 200 busy ticks on the host, 100 a's, 20 b's, 80 others'.
        b.cpu_time(2, 1_200, &[(Pid(10), 200), (Pid(20), 70)], always, &mut out);
        assert_eq!(
            weights(&out),
            [(1, 1, 50), (1, 2, 10), (1, OTHER_PROCESSES.0, 40)],
            "only the CPU package, by CPU time"
        );
        // Almost the same again: nothing new to say.
        out.clear();
        b.cpu_time(3, 1_400, &[(Pid(10), 301), (Pid(20), 90)], always, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // Processes that counted more than the host (sampled at other moments) are capped.
        b.cpu_time(4, 1_500, &[(Pid(10), 451), (Pid(20), 90)], always, &mut out);
        assert_eq!(
            weights(&out),
            [(1, 1, 100), (1, 2, 0), (1, OTHER_PROCESSES.0, 0)]
        );
        // a served a quarter of the interval (from 4 to 8): its 25 % of the busy time is
        // 100 % while it served. b served nothing: its 25 % is someone else's as far as
        // requests go.
        out.clear();
        let served = |s: ServiceId, from: u64, to: u64| {
            assert_eq!((from, to), (4, 8), "the interval since the previous sample");
            if s == ServiceId(1) { 0.25 } else { 0.0 }
        };
        b.cpu_time(
            8,
            1_900,
            &[(Pid(10), 551), (Pid(20), 190)],
            served,
            &mut out,
        );
        assert_eq!(
            weights(&out),
            [(1, OTHER_PROCESSES.0, 75)],
            "a's 100 and b's 0 are unchanged: {out:?}"
        );
        // Serving half the interval with 30 % of the busy time: 60 % while serving.
        out.clear();
        let half = |s: ServiceId, _: u64, _: u64| if s == ServiceId(1) { 0.5 } else { 0.0 };
        b.cpu_time(9, 2_000, &[(Pid(10), 581), (Pid(20), 190)], half, &mut out);
        assert_eq!(weights(&out), [(1, 1, 60), (1, OTHER_PROCESSES.0, 70)]);
    }
}
