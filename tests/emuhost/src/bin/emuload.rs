//! `emuload`: closed-loop load against an OpenAI-compatible server.

use anyhow::Result;
use clap::Parser;
use tracer_emuhost::load::{self, LoadOpts};

fn main() -> Result<()> {
    let opts = LoadOpts::parse();
    let summary = load::run(&opts)?;
    print!("{}", summary.table());
    if summary.errors > 0 && opts.fail_on_error {
        std::process::exit(1);
    }
    Ok(())
}
