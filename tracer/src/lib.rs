//! tracer: per-request energy attribution for LLM inference servers.
//!
//! Data path: kernel probes ([`probe`]) → ring buffer → [`event`] decode → per-connection and
//! per-process state → ledger ← power samplers → request records. [`daemon`] runs the loop;
//! [`cli`] is the binary's front end.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod event;
pub mod gpu;
pub mod http;
pub mod ledger;
pub mod pipeline;
pub mod power;
pub mod probe;
pub mod record;
pub mod replay;
pub mod requests;
pub mod sensors;
pub mod service;
pub mod target;
