//! tracer: per-request energy attribution for LLM inference servers.
//!
//! The modules follow the data path:
//!
//! ```text
//! probe (load, attach, ring, decode, targets)
//!   → wire (HTTP framing, streams, server dialects, request summaries)
//!   → occupancy (GPU devices, services, which process holds which GPU)
//!   → pipeline (deterministic: inputs in, facts out)  ← power (samplers)
//!        └ ledger (where every joule goes)
//!   → output (subscribers: JSON lines, log summary), record (recordings, replay),
//!     store (the database, its writer, crash recovery), api (the local socket) and bill
//!     (tariffs, per-token prices, bills)
//! ```
//!
//! [`daemon`] wires them together at run time; [`cli`] is the binary's front end.

pub mod api;
pub mod bill;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod ids;
pub mod ledger;
mod memo;
pub mod occupancy;
pub mod output;
pub mod pipeline;
pub mod power;
pub mod probe;
pub mod procfs;
pub mod record;
pub mod report;
pub mod store;
pub mod wallclock;
pub mod wire;
