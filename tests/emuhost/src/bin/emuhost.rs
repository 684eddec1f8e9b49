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
    /// A bare CUDA-like process: prints `ready <pid>`, waits for a line on stdin, opens the
    /// GPUs' device nodes and RM objects like a CUDA context does, prints `holding`, waits for
    /// another line, frees them (`freed`), waits for a last line and exits.
    Hold {
        /// Directory of the (stand-in) device nodes.
        #[arg(long)]
        device_root: std::path::PathBuf,
        /// How many emulated GPUs (`GpuSpec::h100(i)`) to open.
        #[arg(long, default_value_t = 2)]
        gpus: u32,
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
        Cmd::Hold { device_root, gpus } => {
            use std::io::BufRead as _;
            let mut lines = std::io::stdin().lock().lines();
            println!("ready {}", std::process::id());
            let _ = lines.next();
            let session = tracer_emuhost::gpu::GpuSession::open(
                &device_root,
                &tracer_emugpu::GpuSpec::h100s(gpus),
            )?;
            println!("holding");
            let _ = lines.next();
            session.close();
            println!("freed");
            let _ = lines.next();
            Ok(())
        }
    }
}
