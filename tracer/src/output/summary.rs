//! The log: a one-line summary per snapshot (activity since the last one, every kind of loss,
//! cumulative requests and energy) and a line per GPU bind or release.

use std::{fmt::Write as _, sync::Arc};

use tracer_ebpf::abi::{Kind, Stat};

use crate::{
    pipeline::{Fact, Interest, Snapshot, Subscriber, SubscriberError, UserStats},
    probe::KernelStats,
};

/// Logs snapshots and bindings (`tracing` at info level).
#[derive(Debug, Default)]
pub struct LogSummary {
    last: Option<Arc<Snapshot>>,
}

impl LogSummary {
    /// A summary that logs deltas from the first snapshot it sees.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Subscriber for LogSummary {
    fn name(&self) -> &'static str {
        "log"
    }

    fn interest(&self) -> Interest {
        Interest {
            snapshots: true,
            bindings: true,
            ..Interest::default()
        }
    }

    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError> {
        match fact {
            Fact::Binding(b) => {
                let verb = if b.bound { "bound to" } else { "released by" };
                tracing::info!(
                    "{} {verb} service {} (process {})",
                    b.device_name,
                    b.service,
                    b.pid
                );
            }
            Fact::Snapshot(s) => {
                tracing::info!("{}", render(s, self.last.as_deref()));
                self.last = Some(Arc::clone(s));
            }
            _ => {}
        }
        Ok(())
    }
}

/// One summary line: events, bytes and losses since `prev` (everything since the start without
/// it), requests and energy so far, sampler CPU over the interval.
pub fn render(s: &Snapshot, prev: Option<&Snapshot>) -> String {
    let user = prev.map_or(s.counts.user, |p| s.counts.user.since(&p.counts.user));
    let kernel = match (s.kernel, prev.and_then(|p| p.kernel)) {
        (Some(k), Some(pk)) => k.since(&pk),
        (Some(k), None) => k,
        (None, _) => KernelStats::default(),
    };
    let secs = prev.map_or(0.0, |p| s.ts_ns.saturating_sub(p.ts_ns) as f64 / 1e9);
    let mut out = String::from("events");
    events(&mut out, &user);
    let _ = write!(
        out,
        " | bytes in={} out={} | dropped ring={} decode={} stash={} conn_table={} | truncated={} wakeups={}",
        user.bytes_in,
        user.bytes_out,
        kernel.dropped_total(),
        user.decode_errors,
        kernel.get(Stat::StashFull),
        kernel.get(Stat::ConnTableFull),
        kernel.get(Stat::CaptureTruncated),
        kernel.get(Stat::ForcedWakeups),
    );
    let h = &s.counts.http;
    let _ = write!(
        out,
        " | requests done={} in_flight={} conns={} resyncs={} truncated={} unmatched={} errors={}",
        s.counts.requests_done,
        s.in_flight.len(),
        h.connections_open,
        h.resyncs,
        h.truncated,
        h.unmatched_responses,
        h.parse_errors + h.heads_too_large,
    );
    // What is seen but not parsed, or seen only in part: always counted, shown when it happens.
    let unparsed = h.http2_connections
        + h.tls_connections
        + h.tls_decrypted_connections
        + h.upgraded_connections;
    if unparsed + h.body_meta_cut + s.counts.data_pieces_lost > 0 {
        let _ = write!(
            out,
            " | not http/1: h2={} tls={} (decrypted {}) upgraded={} ({} B) | body_meta_cut={} pieces_lost={}",
            h.http2_connections,
            h.tls_connections,
            h.tls_decrypted_connections,
            h.upgraded_connections,
            h.other_protocol_bytes,
            h.body_meta_cut,
            s.counts.data_pieces_lost,
        );
    }
    if s.counts.hop_calls_paired + s.counts.hop_inner_found > 0 {
        let _ = write!(
            out,
            " | hops calls={} (by arrival {}) inner={}",
            s.counts.hop_calls_paired, s.counts.hop_calls_by_arrival, s.counts.hop_inner_found
        );
    }
    let sum = |f: fn(&crate::ledger::DeviceTotals) -> f64| {
        s.devices.iter().map(|d| f(&d.totals)).sum::<f64>()
    };
    let _ = write!(
        out,
        " | energy records={} measured={:.1}J requests={:.1}J idle={:.1}J unattributed={:.1}J",
        s.counts.records_done,
        sum(|t| t.measured_j),
        sum(|t| t.request_dynamic_j + t.request_idle_j),
        sum(|t| t.idle_j),
        sum(|t| t.unattributed_j),
    );
    if let Some(p) = prev
        && secs > 0.0
    {
        let cpu = |snap: &Snapshot| snap.samplers.iter().map(|h| h.cpu_ns).sum::<u64>();
        let used = cpu(s).saturating_sub(cpu(p));
        let _ = write!(
            out,
            " | sampler cpu={:.2}%",
            used as f64 / (secs * 1e9) * 100.0
        );
    }
    if let Some(t) = s.targets {
        let _ = write!(out, " | targets={t}");
    }
    let _ = write!(out, " over {secs:.1}s");
    out
}

fn events(out: &mut String, u: &UserStats) {
    for kind in Kind::ALL {
        let n = u.decoded(kind);
        if n > 0 {
            let _ = write!(out, " {}={n}", kind.name());
        }
    }
}
