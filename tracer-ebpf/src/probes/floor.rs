//! The empty program: the benchmark attaches it to every tracepoint the daemon uses, so the
//! cost of running any program there at all (the floor the probes' tax is held to) is measured
//! in the same run as the probes themselves.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

#[tracepoint]
pub fn floor(_ctx: TracePointContext) -> u32 {
    0
}
