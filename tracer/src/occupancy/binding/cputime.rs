//! CPU package and DRAM energy split by CPU time: a CPU-only engine (llama.cpp on CPU) shares
//! the host with everything else on it, and only its own CPU time is its share.
//!
//! Every sample gives the host's busy clock ticks and each service process's (all threads).
//! Over the interval since the previous sample, a service's weight on the host domains is its
//! processes' ticks as a percentage of the host's busy ticks; the rest is the weight of
//! [`OTHER_PROCESSES`], a pseudo-service with no requests, whose share the ledger leaves
//! unattributed. Without samples (or with `cpu_time_interval_ms = 0`) the weights stay unset
//! and the services with requests in flight share the host domains equally, as before.

use crate::ids::{Pid, ServiceId};

use super::{Binding, Change, WEIGHT_STEP, is_host_domain};

/// The pseudo-service holding what the traced services' CPU time does not explain: other
/// processes on the host. It never has requests.
pub const OTHER_PROCESSES: ServiceId = ServiceId(u32::MAX - 1);

impl Binding {
    /// A CPU-time sample at `ts_ns` (cumulative ticks; see the module docs).
    pub fn cpu_time(
        &mut self,
        ts_ns: u64,
        busy_ticks: u64,
        processes: &[(Pid, u64)],
        out: &mut Vec<Change>,
    ) {
        let previous = self.busy_last.replace(busy_ticks);
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
        let shares: Vec<(ServiceId, f64)> = used
            .iter()
            .filter(|(s, _)| **s != OTHER_PROCESSES && self.host_since.contains_key(s))
            .map(|(&s, &ticks)| (s, ticks as f64 * scale))
            .chain([(OTHER_PROCESSES, other.max(0.0))])
            .collect();
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
        b.cpu_time(1, 1_000, &[(Pid(10), 100), (Pid(20), 50)], &mut out);
        assert!(
            out.is_empty(),
            "the first sample has nothing to compare with"
        );
        // Over the next interval: 200 busy ticks on the host, 100 a's, 20 b's, 80 others'.
        b.cpu_time(2, 1_200, &[(Pid(10), 200), (Pid(20), 70)], &mut out);
        assert_eq!(
            weights(&out),
            [(1, 1, 50), (1, 2, 10), (1, OTHER_PROCESSES.0, 40)],
            "only the CPU package, by CPU time"
        );
        // Almost the same again: nothing new to say.
        out.clear();
        b.cpu_time(3, 1_400, &[(Pid(10), 301), (Pid(20), 90)], &mut out);
        assert!(out.is_empty(), "{out:?}");
        // Processes that counted more than the host (sampled at other moments) are capped.
        b.cpu_time(4, 1_500, &[(Pid(10), 451), (Pid(20), 90)], &mut out);
        assert_eq!(
            weights(&out),
            [(1, 1, 100), (1, 2, 0), (1, OTHER_PROCESSES.0, 0)]
        );
    }
}
