//! `tracer query` and `tracer summary`: the daemon's API, over its Unix socket, as a table or
//! JSON.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use super::args::{QueryArgs, SummaryArgs};

/// `GET path` on the daemon's socket: the JSON body of a 200, else the API's error.
pub(super) fn get(socket: &Path, path: &str) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => {
                "no such socket: is the daemon running, with this api.socket?"
            }
            std::io::ErrorKind::ConnectionRefused => {
                "nobody answers (a daemon that stopped left it)"
            }
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (the socket's mode, or its directory's)"
            }
            _ => "cannot connect",
        };
        anyhow::anyhow!("{}: {why}: {e}", socket.display())
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: tracer\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer from {}", socket.display()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the daemon's answer has no HTTP head")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the daemon's answer has no status")?;
    // The API answers JSON with a Content-Length (a whole body), never chunked.
    let v: Value = serde_json::from_str(body).context("the daemon's answer is not JSON")?;
    if status != 200 {
        bail!(
            "the daemon answered {status}: {}",
            v["error"].as_str().unwrap_or(body)
        );
    }
    Ok(v)
}

/// `key=value` pairs, percent-encoded.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            v.as_ref()
                .map(|v| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_string(), |x| format!("{x:.digits$}"))
}

/// `tracer query`.
pub fn requests(a: &QueryArgs) -> anyhow::Result<()> {
    let path = format!(
        "/v1/requests{}",
        query(&[
            ("service", a.service.clone()),
            ("model", a.model.clone()),
            ("tenant", a.tenant.clone()),
            ("outcome", a.outcome.clone()),
            ("since", a.since.clone()),
            ("until", a.until.clone()),
            ("limit", Some(a.limit.to_string())),
        ])
    );
    let v = get(&a.socket, &path)?;
    let list = v["requests"].as_array().cloned().unwrap_or_default();
    if a.json {
        for r in &list {
            println!("{r}");
        }
        return Ok(());
    }
    println!(
        "{:>8}  {:<16} {:<20} {:<12} {:>6} {:>11} {:>9} {:>9}  cost",
        "id", "service", "model", "outcome", "tokens", "energy J", "± J", "J/token"
    );
    for r in &list {
        let cost = r["cost"]["amount"].as_str().map_or_else(String::new, |a| {
            format!(
                "{a} ± {} {}",
                r["cost"]["bar"].as_str().unwrap_or("?"),
                r["cost"]["currency"].as_str().unwrap_or("")
            )
        });
        println!(
            "{:>8}  {:<16} {:<20} {:<12} {:>6} {:>11} {:>9} {:>9}  {cost}",
            r["id"],
            r["service_name"].as_str().unwrap_or("-"),
            r["model"].as_str().unwrap_or("-"),
            r["outcome"].as_str().unwrap_or("-"),
            r["completion_tokens"]
                .as_u64()
                .map_or_else(|| "-".into(), |t| t.to_string()),
            num(&r["total_j"], 3),
            num(&r["uncertainty_j"], 3),
            num(&r["joules_per_output_token"], 4),
        );
    }
    if let Some(c) = v["next_cursor"].as_str() {
        eprintln!("(more: the API's cursor {c})");
    }
    Ok(())
}

/// `tracer summary`.
pub fn summary(a: &SummaryArgs) -> anyhow::Result<()> {
    let path = format!(
        "/v1/summary{}",
        query(&[
            ("by", Some(a.by.clone())),
            ("since", a.since.clone()),
            ("until", a.until.clone()),
        ])
    );
    let v = get(&a.socket, &path)?;
    if a.json {
        println!("{v}");
        return Ok(());
    }
    let by = a.by.as_str();
    println!(
        "{:<24} {:>9} {:>13} {:>12} {:>10} {:>10} {:>10} {:>11} {:>10}  cost",
        by, "requests", "energy J", "kWh", "J/token", "J/req p50", "p99", "J/token p50", "p99"
    );
    let mut partial = Vec::new();
    for g in v["groups"].as_array().cloned().unwrap_or_default() {
        let cost = match (g["cost"]["amount"].as_str(), g["cost"]["currency"].as_str()) {
            (Some(a), Some(c)) => format!("{a} {c}"),
            _ => g["cost"]["error"].as_str().unwrap_or("").to_string(),
        };
        let name = g[by].as_str().unwrap_or("-");
        println!(
            "{name:<24} {:>9} {:>13} {:>12} {:>10} {:>10} {:>10} {:>11} {:>10}  {cost}",
            g["requests"],
            num(&g["joules"], 2),
            num(&g["kwh"], 6),
            num(&g["joules_per_output_token"], 4),
            num(&g["j_per_request"]["p50"], 3),
            num(&g["j_per_request"]["p99"], 3),
            num(&g["j_per_output_token"]["p50"], 4),
            num(&g["j_per_output_token"]["p99"], 4),
        );
        // By service: where it runs (pod, container or unit), under its row.
        if let Ok(w) =
            serde_json::from_value::<crate::occupancy::workload::Workload>(g["workload"].clone())
            && !w.is_empty()
        {
            println!("  in {}", w.text());
        }
        if let (Some(over), Some(all)) = (g["quantiles_over"].as_u64(), g["requests"].as_u64())
            && over < all
        {
            partial.push(format!("{name}: {over} of {all}"));
        }
    }
    // Stored minutes from before the quantiles existed have none: say what they cover.
    if !partial.is_empty() {
        eprintln!("(quantiles over fewer requests: {})", partial.join(", "));
    }
    Ok(())
}
