//! Subscribers to the pipeline's facts: where results go.
//!
//! Each output is a [`Subscriber`](crate::pipeline::Subscriber) on the pipeline's bus:
//! [`jsonl`] writes events, requests or records as JSON lines, [`summary`] renders snapshots and
//! bindings into the log, and [`otlp`] sends records and counters to an OpenTelemetry collector
//! (through a lossy queue); [`family`] is the counters as data, for `/metrics` and OTLP alike. The recorder ([`crate::record::format::Recorder`]) is one too. A new
//! output (a store, an API stream, metrics) implements the trait, or takes a lossy queue with
//! [`Bus::subscribe_lossy`](crate::pipeline::Bus::subscribe_lossy) when it must never slow
//! attribution down.

pub mod family;
pub mod jsonl;
pub mod otlp;
pub mod summary;
