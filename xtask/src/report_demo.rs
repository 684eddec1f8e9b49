//! `cargo xtask report-demo`: the bill on the emulated host. Two runs of the demo, 30 % and
//! 80 % of requests opening with a shared system prompt, each billed from its store by
//! `tracer report` at one tariff and one per-token price list: the energy bill beside the
//! per-token bill, and how prefix caching moves each.
//!
//! On the emulated host a cached prompt token costs no prefill compute (its engine computes
//! only uncached tokens): the size of the effect is that modelling choice, not evidence about
//! real engines.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::demo::{self, DemoOpts};

const PRICES: &str = "tests/bills/per-token-prices.toml";

fn report(store: &std::path::Path, format: &str, out: &std::path::Path) -> Result<()> {
    let status = Command::new("target/release/tracer")
        .args(["report", "--store"])
        .arg(store)
        .args([
            "--price",
            "0.20",
            "--currency",
            "USD",
            "--pue",
            "1.2",
            "--carbon",
            "350",
            "--per-token-prices",
            PRICES,
            "--format",
            format,
            "--out",
        ])
        .arg(out)
        .status()
        .context("tracer report")?;
    anyhow::ensure!(status.success(), "tracer report --format {format} failed");
    Ok(())
}

pub fn run(seconds: u64) -> Result<()> {
    let root = PathBuf::from("target/report-demo");
    let mut rows = Vec::new();
    for share in [30u32, 80] {
        let dir = std::env::current_dir()?.join(root.join(format!("shared-{share}")));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        eprintln!("report-demo: {share} % of requests share a system prompt");
        demo::demo(&DemoOpts {
            seconds,
            concurrency: 8,
            max_seqs: 16,
            write_cost_us: None,
            cuda_lib: None,
            no_cuda: false,
            kv_tokens: None,
            clocks: false,
            shared_prefix_fraction: Some(f64::from(share) / 100.0),
            dir: Some(dir.clone()),
            tracer_config: None,
        })?;
        let store = dir.join("store");
        report(&store, "table", &dir.join("bill.txt"))?;
        report(&store, "json", &dir.join("bill.json"))?;
        report(&store, "html", &dir.join("bill.html"))?;
        report(&store, "svg", &dir.join("plots"))?;
        let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("bill.json"))?)?;
        let lines = v["bill"]["lines"].as_array().cloned().unwrap_or_default();
        let sum = |k: &str| -> u64 { lines.iter().filter_map(|l| l[k].as_u64()).sum() };
        let dec = |v: &Value| {
            v.as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let g = &v["bill"]["groups"][0];
        let joules: f64 = lines.iter().filter_map(|l| l["joules"].as_f64()).sum();
        let (energy, tokens) = (dec(&g["priced_energy_cost"]), dec(&g["per_token_cost"]));
        rows.push((
            share,
            lines.len(),
            g["priced"].as_u64().unwrap_or(0),
            dec(&g["cost"]),
            sum("cached_tokens") as f64 / sum("prompt_tokens").max(1) as f64,
            joules / sum("completion_tokens").max(1) as f64,
            energy,
            tokens,
            100.0 * (1.0 - energy / tokens.max(f64::MIN_POSITIVE)),
        ));
        println!("{}", std::fs::read_to_string(dir.join("bill.txt"))?);
    }
    println!(
        "\n| shared prompts | requests (with usage) | energy bill, all (USD) | cached share of prompt tokens | J per output token | energy bill, with usage (USD) | per-token bill (USD) | energy bill lower by |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (share, n, priced, all, cached, jpt, energy, tokens, saving) in &rows {
        println!(
            "| {share} % | {n} ({priced}) | {all:.6} | {:.1} % | {jpt:.3} | {energy:.6} | {tokens:.6} | {saving:.1} % |",
            cached * 100.0
        );
    }
    println!(
        "\nThe per-token bill needs the server's token counts: requests streamed without a usage\n\
         chunk are in the energy bill only."
    );
    println!(
        "\nOn the emulated host a cached prompt token costs no prefill compute: the size of the\n\
         caching effect is the emulator's own modelling choice, not evidence about real engines.\n\
         Reports: {}/shared-*/bill.html",
        root.display()
    );
    Ok(())
}
