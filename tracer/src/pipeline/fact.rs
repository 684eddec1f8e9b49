//! The facts the pipeline emits, borrowed for lossless subscribers ([`Fact`]) and owned for
//! lossy queues ([`OwnedFact`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Input, snapshot::Snapshot};
use crate::{
    ids::{DeviceId, Pid, ServiceId},
    ledger::RequestRecord,
    occupancy::workload::Workload,
    probe::decode::Event,
    wire::summary::RequestSummary,
};

/// A request's final energy account with its service's name and wall-clock end time (the API
/// edge). This is what `--records-out` writes, one JSON line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalRecord {
    #[serde(flatten)]
    pub record: RequestRecord,
    pub service_name: String,
    /// Where the service runs (pod, container, unit), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<Workload>>,
    pub end_unix_ms: i64,
    /// Its cost at the configured tariff (none configured: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::bill::RecordCost>,
}

/// A service bound or released a device (what the log shows; the ledger has already been
/// told).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BindingFact {
    pub ts_ns: u64,
    pub device: DeviceId,
    pub device_name: String,
    pub service: ServiceId,
    /// The process whose evidence changed.
    pub pid: Pid,
    /// `true`: bound; `false`: released.
    pub bound: bool,
}

/// One result of the pipeline, lent to lossless subscribers in pipeline order.
#[derive(Debug, Clone, Copy)]
pub enum Fact<'a> {
    /// An input, before the pipeline acts on it.
    Input(&'a Input),
    /// A raw probe record, before it is decoded (the hot path's input, not copied).
    Probe(&'a [u8]),
    /// A decoded probe event, with the record it came from.
    Event { raw: &'a [u8], event: &'a Event<'a> },
    /// A finished HTTP request.
    Request(&'a Arc<RequestSummary>),
    /// A final energy record.
    Record(&'a Arc<FinalRecord>),
    /// A service bound or released a GPU.
    Binding(&'a BindingFact),
    /// A periodic snapshot of the whole state.
    Snapshot(&'a Arc<Snapshot>),
    /// The pipeline's whole state, between two inputs ([`super::Pipeline::checkpoint`]).
    Checkpoint(&'a [u8]),
}

/// A fact a lossy subscriber owns (cheap to clone: shared parts are reference-counted).
#[derive(Debug, Clone)]
pub enum OwnedFact {
    /// An input (raw probe records as [`Input::Probe`]).
    Input(Arc<Input>),
    /// A probe record; decode it with [`crate::probe::decode::decode`].
    Event(Arc<[u8]>),
    Request(Arc<RequestSummary>),
    Record(Arc<FinalRecord>),
    Binding(BindingFact),
    Snapshot(Arc<Snapshot>),
    Checkpoint(Arc<[u8]>),
}

impl Fact<'_> {
    /// The owned form, for a queue.
    pub fn to_owned_fact(&self) -> OwnedFact {
        match *self {
            Fact::Input(i) => OwnedFact::Input(Arc::new(i.clone())),
            Fact::Probe(b) => OwnedFact::Input(Arc::new(Input::Probe { bytes: b.to_vec() })),
            Fact::Event { raw, .. } => OwnedFact::Event(Arc::from(raw)),
            Fact::Request(r) => OwnedFact::Request(Arc::clone(r)),
            Fact::Record(r) => OwnedFact::Record(Arc::clone(r)),
            Fact::Binding(b) => OwnedFact::Binding(b.clone()),
            Fact::Snapshot(s) => OwnedFact::Snapshot(Arc::clone(s)),
            Fact::Checkpoint(b) => OwnedFact::Checkpoint(Arc::from(b)),
        }
    }
}
