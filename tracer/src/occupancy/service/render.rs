//! The text view of a discovery: the table `tracer services` prints.

use std::fmt::Write as _;

use super::{Discovery, Reason};
use crate::occupancy::devices::{self as gpu, GpuInfo, ProcessGpus};

fn gpu_label(minor: u32, inventory: &[GpuInfo]) -> String {
    match inventory.iter().find(|g| g.minor == minor) {
        Some(g) => format!("GPU {minor} {} {} [{}]", g.uuid, g.model, g.bus),
        None => format!("GPU {minor} (not in the driver's inventory)"),
    }
}

fn gpus_cell(g: &ProcessGpus) -> String {
    let mapped = g.mapped();
    let mut parts: Vec<String> = g
        .minors
        .iter()
        .map(|m| {
            let fds: Vec<String> = g
                .evidence
                .iter()
                .filter_map(|e| match e {
                    gpu::Evidence::Fd {
                        fd,
                        node: gpu::Node::Gpu(n),
                    } if n == m => Some(format!("fd {fd}")),
                    _ => None,
                })
                .collect();
            let mut how = fds;
            if mapped.contains(m) {
                how.push("mapped".into());
            }
            format!("{m} ({})", how.join(", "))
        })
        .collect();
    if g.ctl {
        parts.push("ctl".into());
    }
    if g.uvm {
        parts.push("uvm".into());
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// The table `tracer services` prints: per service its endpoint ports and GPUs (minor, UUID and
/// model when the driver's inventory knows them), then one row per member: pid, comm, GPU use
/// and why it is a member; then who else holds the service's GPUs.
pub fn render_text(d: &Discovery) -> String {
    let mut out = String::new();
    for s in &d.services {
        let _ = writeln!(out, "service {}: {}", s.id, s.name);
        if let Some(w) = &s.workload {
            let _ = writeln!(out, "  workload: {}", w.text());
        }
        let ports: Vec<String> = s.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(
            out,
            "  ports: {}",
            if ports.is_empty() {
                "-".to_string()
            } else {
                ports.join(", ")
            }
        );
        if s.gpus.is_empty() {
            let _ = writeln!(out, "  gpus:  none with a context");
        }
        for (i, &minor) in s.gpus.iter().enumerate() {
            let head = if i == 0 { "  gpus: " } else { "        " };
            let _ = writeln!(out, "{head} {}", gpu_label(minor, &d.inventory));
        }
        if !s.fd_only_gpus.is_empty() {
            let fd_only: Vec<String> = s.fd_only_gpus.iter().map(u32::to_string).collect();
            let _ = writeln!(
                out,
                "  fd only (no context, not counted): {}",
                fd_only.join(", ")
            );
        }
        let rows: Vec<[String; 4]> = s
            .members
            .iter()
            .map(|(pid, m)| {
                [
                    pid.to_string(),
                    m.comm.clone(),
                    s.gpu_evidence
                        .get(pid)
                        .map_or_else(|| "-".to_string(), gpus_cell),
                    m.reasons
                        .iter()
                        .map(Reason::text)
                        .collect::<Vec<_>>()
                        .join("; "),
                ]
            })
            .collect();
        let header = ["PID", "COMM", "GPUS", "WHY"].map(str::to_string);
        let width = |c: usize| {
            rows.iter()
                .chain(std::iter::once(&header))
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        };
        let (w0, w1, w2) = (width(0), width(1), width(2));
        for r in std::iter::once(&header).chain(&rows) {
            let _ = writeln!(
                out,
                "  {:<w0$}  {:<w1$}  {:<w2$}  {}",
                r[0], r[1], r[2], r[3]
            );
        }
        for &minor in &s.gpus {
            if let Some(pids) = d.others.get(&minor) {
                let who: Vec<String> = pids
                    .iter()
                    .map(|pid| {
                        let h = d.other_holders.get(pid);
                        let comm = h.map_or("", |h| h.comm.as_str());
                        let how = if h.is_some_and(|h| h.gpus.mapped().contains(&minor)) {
                            "mapped"
                        } else {
                            "fd only"
                        };
                        format!("{pid} {comm} ({how})")
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "  GPU {minor} is also held outside every service by: {}",
                    who.join(", ")
                );
            }
            for other in &d.services {
                if other.id != s.id && other.gpus.contains(&minor) {
                    let _ = writeln!(out, "  GPU {minor} is also used by service {}", other.id);
                }
            }
        }
        out.push('\n');
    }
    for w in &d.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}
