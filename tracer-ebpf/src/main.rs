//! tracer's eBPF probes.
//!
//! Syscall tracepoints (stable argument offsets, no CO-RE) on the socket, device-open and ioctl
//! paths, plus sched tracepoints to follow targets' children. Design rules:
//! - the not-a-target path is one array read at entry and at exit (the process's `TRACED`
//!   byte) and out: these programs run for every process on the host that makes the syscall;
//! - entry arguments are stashed per thread and the record is emitted at exit, with the syscall's
//!   return value (never the requested length);
//! - payload copies go through a per-CPU scratch buffer with masked lengths, and records are
//!   submitted without waking the consumer unless the ring is filling up.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "tracer-probes is an eBPF object: it is built for bpfel-unknown-none by tracer's build script"
    );
}

#[cfg(target_arch = "bpf")]
mod probes;

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach a real panic; this is never called.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
