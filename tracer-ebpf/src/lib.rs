//! The ABI shared by tracer's eBPF probes and its userspace daemon.
//!
//! Everything in [`abi`] is `#[repr(C)]` plain data: the probes write it into the ring buffer and
//! the maps, the daemon reads it back. Keep this crate `no_std`, dependency-free (except for the
//! optional `aya::Pod` impls that userspace needs) and boring: a change here is a wire change.
#![no_std]

pub mod abi;
