//! `emuhost serve` (the API process) and `emuhost engine` (its child, started by `serve`).

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use tracer_emuhost::api::{self, ServeOpts};
use tracer_emuhost::engine::{self, EngineOpts};

/// An emulated, vLLM-shaped inference server for tracer's proving ground.
#[derive(Debug, Parser)]
#[command(name = "emuhost", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The OpenAI-compatible API process; spawns the engine and prints `listening <port>`.
    Serve(ServeOpts),
    /// The engine process (started by `serve`, connected through an inherited socket).
    Engine {
        /// Inherited Unix stream socket connected to the API process.
        #[arg(long)]
        fd: i32,
        #[command(flatten)]
        opts: EngineOpts,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(opts) => api::serve(&opts),
        Cmd::Engine { fd, opts } => {
            // SAFETY: fcntl only inspects the fd.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if fd < 3 || flags < 0 {
                bail!("--fd {fd} is not an inherited socket");
            }
            // SAFETY: the fd is open (checked above) and handed to this process to own.
            let sock = unsafe { UnixStream::from_raw_fd(fd) };
            // Keep it away from anything the engine might spawn.
            // SAFETY: fcntl on an fd we own.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            engine::run(&opts, sock)
        }
    }
}
