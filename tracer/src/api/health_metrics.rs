//! `/metrics`, the host's half (root and the API group only): what each device draws and where
//! its energy went, the samplers' cost and health, and every counted loss on the data path
//! (probe records dropped on a full ring per kind, the probes' table-full counters, the
//! pipeline's decode and tracking counters, outputs' drops, recoveries that lost requests).

use std::fmt::Write as _;

use serde_json::Value;

use crate::output::family::{Family, Kind};
pub(super) use crate::output::family::{head, label};

use super::Shared;
use crate::pipeline::snapshot::{DeviceSnapshot, SamplerHealth, Snapshot};

/// A series: its name, help, and how its value is read.
type Series<T, V> = (&'static str, &'static str, fn(&T) -> V);

/// A series for OTLP too: its names (Prometheus, OpenTelemetry) and unit, help, and how its
/// value is read.
type Named<T, V> = (
    (&'static str, &'static str, &'static str),
    &'static str,
    fn(&T) -> V,
);

/// A sensor whose newest reading is older than this is reported stale: samplers poll at tens
/// of hertz and counters update at least every few hundred milliseconds, so seconds of silence
/// mean the sensor or its sampler stopped.
pub(super) const STALE_AFTER_MS: u64 = 2_000;

pub(super) fn write(out: &mut String, shared: &Shared) {
    if let Some(snap) = shared.snapshot() {
        for f in device_families(&snap) {
            f.write(out);
        }
        samplers(out, &snap);
        losses(out, &snap);
    }
    recoveries(out, shared);
}

/// Each device's energy by part (measured, requests, idle, unattributed), what it draws now,
/// its idle figure and whether its sensor went stale.
pub(super) fn device_families(snap: &Snapshot) -> Vec<Family> {
    let mut energy = Family::new(
        (
            "tracer_device_energy_joules_total",
            "tracer.device.energy",
            "J",
        ),
        "Energy measured on each device, and where it went.",
        Kind::Counter,
    );
    for d in &snap.devices {
        for (part, j) in [
            ("measured", d.totals.measured_j),
            (
                "requests",
                d.totals.request_dynamic_j + d.totals.request_idle_j,
            ),
            ("idle", d.totals.idle_j),
            ("unattributed", d.totals.unattributed_j),
        ] {
            energy.point(vec![("device", d.name.clone()), ("part", part.into())], j);
        }
    }
    let gauges: [Named<DeviceSnapshot, Option<f64>>; 3] = [
        (
            ("tracer_device_power_watts", "tracer.device.power", "W"),
            "What each device draws now: its newest power sample or counter update.",
            |d| d.power_w,
        ),
        (
            ("tracer_device_idle_watts", "tracer.device.idle_power", "W"),
            "Each device's idle figure (the basis is in /v1/gpus).",
            |d| Some(d.totals.idle_w),
        ),
        (
            (
                "tracer_device_sensor_stale",
                "tracer.device.sensor_stale",
                "1",
            ),
            "1 when a device's newest reading is over 2 s old (its sensor or sampler stopped).",
            |d| {
                Some(f64::from(u8::from(
                    d.power_age_ms.is_none_or(|a| a > STALE_AFTER_MS),
                )))
            },
        ),
    ];
    let mut out = vec![energy];
    for (names, help, get) in gauges {
        let mut f = Family::new(names, help, Kind::Gauge);
        for d in &snap.devices {
            if let Some(v) = get(d) {
                f.point(vec![("device", d.name.clone())], v);
            }
        }
        out.push(f);
    }
    out
}

fn samplers(out: &mut String, snap: &Snapshot) {
    let series: [Series<SamplerHealth, f64>; 3] = [
        (
            "tracer_sampler_cpu_seconds_total",
            "CPU time each power sampler's thread has used.",
            |s| s.cpu_ns as f64 / 1e9,
        ),
        (
            "tracer_sampler_polls_total",
            "Polls each power sampler made.",
            |s| s.polls as f64,
        ),
        (
            "tracer_sampler_late_polls_total",
            "Polls that started late (the sampler could not keep up).",
            |s| s.late as f64,
        ),
    ];
    for (name, help, get) in series {
        head(out, name, "counter", help);
        for s in &snap.samplers {
            let _ = writeln!(out, "{name}{{source=\"{}\"}} {}", label(&s.source), get(s));
        }
    }
}

fn losses(out: &mut String, snap: &Snapshot) {
    if let Some(k) = &snap.kernel {
        let name = "tracer_probe_records_total";
        head(
            out,
            name,
            "counter",
            "Probe records written to the ring buffer, and dropped because it was full, per kind.",
        );
        for kind in tracer_ebpf::abi::Kind::ALL {
            for (result, n) in [("emitted", k.emitted(kind)), ("dropped", k.dropped(kind))] {
                let _ = writeln!(
                    out,
                    "{name}{{kind=\"{}\",result=\"{result}\"}} {n}",
                    kind.name()
                );
            }
        }
        let name = "tracer_probe_events_total";
        head(
            out,
            name,
            "counter",
            "The probes' own counters: tables full, user reads failed, truncations, wakeups.",
        );
        for st in tracer_ebpf::abi::Stat::ALL {
            let _ = writeln!(out, "{name}{{counter=\"{}\"}} {}", st.name(), k.get(st));
        }
    }
    // The pipeline's counters by name; those that are levels (`*_open`) as gauges.
    let mut flat = Vec::new();
    if let Ok(v) = serde_json::to_value(snap.counts) {
        flatten(&v, String::new(), &mut flat);
    }
    let (open, counters): (Vec<_>, Vec<_>) =
        flat.into_iter().partition(|(n, _)| n.ends_with("_open"));
    let name = "tracer_pipeline_events_total";
    head(
        out,
        name,
        "counter",
        "The pipeline's counters (decoding per record kind, HTTP tracking, the ledger), by name.",
    );
    for (counter, n) in counters {
        let _ = writeln!(out, "{name}{{counter=\"{}\"}} {n}", label(&counter));
    }
    let name = "tracer_pipeline_open";
    head(
        out,
        name,
        "gauge",
        "What the pipeline holds open now (requests, connections), by name.",
    );
    for (what, n) in open {
        let _ = writeln!(out, "{name}{{what=\"{}\"}} {n}", label(&what));
    }
    let name = "tracer_output_facts_total";
    head(
        out,
        name,
        "counter",
        "Facts each output took, and those a lossy output dropped on a full queue.",
    );
    for o in &snap.outputs {
        for (result, n) in [("delivered", o.delivered), ("dropped", o.dropped)] {
            let _ = writeln!(
                out,
                "{name}{{output=\"{}\",result=\"{result}\"}} {n}",
                label(&o.name)
            );
        }
    }
    let name = "tracer_output_failed";
    head(
        out,
        name,
        "gauge",
        "1 when an output gave up after an error (in the log).",
    );
    for o in &snap.outputs {
        let _ = writeln!(
            out,
            "{name}{{output=\"{}\"}} {}",
            label(&o.name),
            u8::from(o.failed)
        );
    }
}

/// Numbers in a JSON tree as `(path_with_underscores, value)`; arrays by index.
fn flatten(v: &Value, path: String, out: &mut Vec<(String, f64)>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}_{k}")
        }
    };
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.push((path, f));
            }
        }
        Value::Object(m) => {
            for (k, v) in m {
                flatten(v, join(k), out);
            }
        }
        Value::Array(a) => {
            // Arrays are per record kind (`decoded`): named by the kind (unused slots left out).
            for (i, v) in a.iter().enumerate() {
                if let Some(kind) = u16::try_from(i)
                    .ok()
                    .and_then(tracer_ebpf::abi::Kind::from_u16)
                {
                    flatten(v, join(kind.name()), out);
                }
            }
        }
        _ => {}
    }
}

fn recoveries(out: &mut String, shared: &Shared) {
    let recoveries = shared.recoveries();
    let name = "tracer_store_recovered_records_total";
    head(
        out,
        name,
        "counter",
        "Records recovered at start from crashed runs' journals (incomplete: in flight at the crash).",
    );
    let (mut recovered, mut incomplete, mut lost_runs) = (0, 0, 0);
    for r in &recoveries {
        recovered += r.recovered.saturating_sub(r.incomplete);
        incomplete += r.incomplete;
        lost_runs += u64::from(r.journal.is_none() || r.unreadable.is_some());
    }
    let _ = writeln!(out, "{name}{{state=\"complete\"}} {recovered}");
    let _ = writeln!(out, "{name}{{state=\"incomplete\"}} {incomplete}");
    let name = "tracer_store_runs_lost_total";
    head(
        out,
        name,
        "counter",
        "Crashed runs whose journal was missing or unreadable: their requests not final at the crash are lost (count unknown).",
    );
    let _ = writeln!(out, "{name} {lost_runs}");
}
