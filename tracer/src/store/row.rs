//! A final record as the store keeps it: a compact binary row (`postcard`) in the `rec` column.
//!
//! Why not the record's JSON: the store's writer pays for every byte of a row several times
//! (the row's B-tree page, its WAL frame, the checkpoint's copy back into the database), and
//! the JSON repeated each field's name and spelled each float in ~20 characters: ~900 bytes
//! for a record with one device, ~190 here. The columns beside it (model, tenant, outcome,
//! energies, times) stay for SQL and for operators reading the file; the API and
//! `--records-out` still speak JSON (decoded from here).
//!
//! Rows outlive the build that wrote them, so the layout is versioned by the row's first
//! byte: a change to [`Row`] (a field added, moved or retyped) is a new format with its own
//! reader, never an edit of this one (`format_1_is_frozen` holds the bytes). Enums are stored
//! as the fixed codes below, not as their position in the type, and every record field is
//! named in the conversions (no `..`), so a field added to a record does not compile until
//! the row carries it.

use std::{borrow::Cow, sync::Arc};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::{
    bill::RecordCost,
    ids::{DeviceId, RequestId, ServiceId},
    ledger::{DeviceKind, DeviceShare, Outcome, RequestRecord},
    occupancy::workload::Workload,
    pipeline::FinalRecord,
};

/// The first byte of a row written by this build.
const FORMAT_1: u8 = 1;

/// Why a stored row could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    /// The row is empty or starts with a format this build does not know (a newer tracer).
    #[error("unknown row format {0:?}")]
    Format(Option<u8>),
    /// The bytes do not decode as the format says (a damaged row).
    #[error("damaged row: {0}")]
    Damaged(#[from] postcard::Error),
    /// Bytes left over after the row: not a row of this format.
    #[error("damaged row: {0} bytes past its end")]
    Trailing(usize),
    /// An enum's stored code is not one this build knows.
    #[error("damaged row: unknown {what} code {code}")]
    Code { what: &'static str, code: u8 },
}

/// Format 1. Field order is the layout; see the module docs before touching it.
#[derive(Debug, Serialize, Deserialize)]
struct Row<'a> {
    id: u64,
    external_id: Option<Cow<'a, str>>,
    service: u32,
    model: Option<Cow<'a, str>>,
    tenant: Option<Cow<'a, str>>,
    arrive_ns: u64,
    first_byte_ns: Option<u64>,
    first_event_ns: Option<u64>,
    end_ns: u64,
    outcome: u8,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    events: u64,
    response_bytes: u64,
    devices: Vec<Share<'a>>,
    dynamic_j: f64,
    idle_j: f64,
    total_j: f64,
    kwh: f64,
    joules_per_output_token: Option<f64>,
    occupancy: Option<f64>,
    uncertainty_j: f64,
    coverage_gap_ns: u64,
    service_name: Cow<'a, str>,
    workload: Option<Place<'a>>,
    end_unix_ms: i64,
    cost: Option<Cost<'a>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Share<'a> {
    device: u32,
    name: Cow<'a, str>,
    kind: u8,
    estimated: bool,
    dynamic_j: f64,
    idle_j: f64,
    uncertainty_j: f64,
    sensor_j: f64,
    coverage_j: f64,
    split_j: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Place<'a> {
    namespace: Option<Cow<'a, str>>,
    pod: Option<Cow<'a, str>>,
    container: Option<Cow<'a, str>>,
    pod_uid: Option<Cow<'a, str>>,
    container_id: Option<Cow<'a, str>>,
    runtime: Option<Cow<'a, str>>,
    unit: Option<Cow<'a, str>>,
}

/// Decimals as their exact 16-byte form (scale and mantissa), not text.
#[derive(Debug, Serialize, Deserialize)]
struct Cost<'a> {
    amount: [u8; 16],
    bar: [u8; 16],
    currency: Cow<'a, str>,
    price_per_kwh: [u8; 16],
    pue: [u8; 16],
    emissions_g: Option<f64>,
}

fn outcome_code(o: Outcome) -> u8 {
    match o {
        Outcome::Complete => 0,
        Outcome::ClosedEarly => 1,
        Outcome::Truncated => 2,
        Outcome::Aborted => 3,
        Outcome::Incomplete => 4,
    }
}

fn outcome_of(code: u8) -> Result<Outcome, RowError> {
    Ok(match code {
        0 => Outcome::Complete,
        1 => Outcome::ClosedEarly,
        2 => Outcome::Truncated,
        3 => Outcome::Aborted,
        4 => Outcome::Incomplete,
        _ => {
            return Err(RowError::Code {
                what: "outcome",
                code,
            });
        }
    })
}

fn kind_code(k: DeviceKind) -> u8 {
    match k {
        DeviceKind::Gpu => 0,
        DeviceKind::CpuPackage => 1,
        DeviceKind::Dram => 2,
        DeviceKind::Other => 3,
    }
}

fn kind_of(code: u8) -> Result<DeviceKind, RowError> {
    Ok(match code {
        0 => DeviceKind::Gpu,
        1 => DeviceKind::CpuPackage,
        2 => DeviceKind::Dram,
        3 => DeviceKind::Other,
        _ => {
            return Err(RowError::Code {
                what: "device kind",
                code,
            });
        }
    })
}

fn lend(s: Option<&String>) -> Option<Cow<'_, str>> {
    s.map(|s| Cow::Borrowed(s.as_str()))
}

fn own(s: Option<Cow<'_, str>>) -> Option<String> {
    s.map(Cow::into_owned)
}

impl<'a> Share<'a> {
    fn of(d: &'a DeviceShare) -> Self {
        let DeviceShare {
            device,
            name,
            kind,
            estimated,
            dynamic_j,
            idle_j,
            uncertainty_j,
            sensor_j,
            coverage_j,
            split_j,
        } = d;
        Self {
            device: device.0,
            name: Cow::Borrowed(name),
            kind: kind_code(*kind),
            estimated: *estimated,
            dynamic_j: *dynamic_j,
            idle_j: *idle_j,
            uncertainty_j: *uncertainty_j,
            sensor_j: *sensor_j,
            coverage_j: *coverage_j,
            split_j: *split_j,
        }
    }

    fn share(self) -> Result<DeviceShare, RowError> {
        Ok(DeviceShare {
            device: DeviceId(self.device),
            name: self.name.into_owned(),
            kind: kind_of(self.kind)?,
            estimated: self.estimated,
            dynamic_j: self.dynamic_j,
            idle_j: self.idle_j,
            uncertainty_j: self.uncertainty_j,
            sensor_j: self.sensor_j,
            coverage_j: self.coverage_j,
            split_j: self.split_j,
        })
    }
}

impl<'a> Place<'a> {
    fn of(w: &'a Workload) -> Self {
        let Workload {
            namespace,
            pod,
            container,
            pod_uid,
            container_id,
            runtime,
            unit,
        } = w;
        Self {
            namespace: lend(namespace.as_ref()),
            pod: lend(pod.as_ref()),
            container: lend(container.as_ref()),
            pod_uid: lend(pod_uid.as_ref()),
            container_id: lend(container_id.as_ref()),
            runtime: lend(runtime.as_ref()),
            unit: lend(unit.as_ref()),
        }
    }

    fn workload(self) -> Workload {
        Workload {
            namespace: own(self.namespace),
            pod: own(self.pod),
            container: own(self.container),
            pod_uid: own(self.pod_uid),
            container_id: own(self.container_id),
            runtime: own(self.runtime),
            unit: own(self.unit),
        }
    }
}

impl<'a> Cost<'a> {
    fn of(c: &'a RecordCost) -> Self {
        let RecordCost {
            amount,
            bar,
            currency,
            price_per_kwh,
            pue,
            emissions_g,
        } = c;
        Self {
            amount: amount.serialize(),
            bar: bar.serialize(),
            currency: Cow::Borrowed(currency),
            price_per_kwh: price_per_kwh.serialize(),
            pue: pue.serialize(),
            emissions_g: *emissions_g,
        }
    }

    fn cost(self) -> RecordCost {
        RecordCost {
            amount: Decimal::deserialize(self.amount),
            bar: Decimal::deserialize(self.bar),
            currency: self.currency.into_owned(),
            price_per_kwh: Decimal::deserialize(self.price_per_kwh),
            pue: Decimal::deserialize(self.pue),
            emissions_g: self.emissions_g,
        }
    }
}

impl<'a> Row<'a> {
    fn of(f: &'a FinalRecord) -> Self {
        let FinalRecord {
            record,
            service_name,
            workload,
            end_unix_ms,
            cost,
        } = f;
        let RequestRecord {
            id,
            external_id,
            service,
            model,
            tenant,
            arrive_ns,
            first_byte_ns,
            first_event_ns,
            end_ns,
            outcome,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            events,
            response_bytes,
            devices,
            dynamic_j,
            idle_j,
            total_j,
            kwh,
            joules_per_output_token,
            occupancy,
            uncertainty_j,
            coverage_gap_ns,
        } = record;
        Self {
            id: id.0,
            external_id: lend(external_id.as_ref()),
            service: service.0,
            model: lend(model.as_ref()),
            tenant: lend(tenant.as_ref()),
            arrive_ns: *arrive_ns,
            first_byte_ns: *first_byte_ns,
            first_event_ns: *first_event_ns,
            end_ns: *end_ns,
            outcome: outcome_code(*outcome),
            prompt_tokens: *prompt_tokens,
            cached_tokens: *cached_tokens,
            completion_tokens: *completion_tokens,
            events: *events,
            response_bytes: *response_bytes,
            devices: devices.iter().map(Share::of).collect(),
            dynamic_j: *dynamic_j,
            idle_j: *idle_j,
            total_j: *total_j,
            kwh: *kwh,
            joules_per_output_token: *joules_per_output_token,
            occupancy: *occupancy,
            uncertainty_j: *uncertainty_j,
            coverage_gap_ns: *coverage_gap_ns,
            service_name: Cow::Borrowed(service_name),
            workload: workload.as_deref().map(Place::of),
            end_unix_ms: *end_unix_ms,
            cost: cost.as_ref().map(Cost::of),
        }
    }

    fn record(self) -> Result<FinalRecord, RowError> {
        Ok(FinalRecord {
            record: RequestRecord {
                id: RequestId(self.id),
                external_id: own(self.external_id),
                service: ServiceId(self.service),
                model: own(self.model),
                tenant: own(self.tenant),
                arrive_ns: self.arrive_ns,
                first_byte_ns: self.first_byte_ns,
                first_event_ns: self.first_event_ns,
                end_ns: self.end_ns,
                outcome: outcome_of(self.outcome)?,
                prompt_tokens: self.prompt_tokens,
                cached_tokens: self.cached_tokens,
                completion_tokens: self.completion_tokens,
                events: self.events,
                response_bytes: self.response_bytes,
                devices: self
                    .devices
                    .into_iter()
                    .map(Share::share)
                    .collect::<Result<_, _>>()?,
                dynamic_j: self.dynamic_j,
                idle_j: self.idle_j,
                total_j: self.total_j,
                kwh: self.kwh,
                joules_per_output_token: self.joules_per_output_token,
                occupancy: self.occupancy,
                uncertainty_j: self.uncertainty_j,
                coverage_gap_ns: self.coverage_gap_ns,
            },
            service_name: self.service_name.into_owned(),
            workload: self.workload.map(|w| Arc::new(w.workload())),
            end_unix_ms: self.end_unix_ms,
            cost: self.cost.map(Cost::cost),
        })
    }
}

/// Writes `record`'s row into `out` (cleared first).
pub fn encode(record: &FinalRecord, out: &mut Vec<u8>) -> Result<(), RowError> {
    out.clear();
    out.push(FORMAT_1);
    let buf = postcard::to_extend(&Row::of(record), std::mem::take(out))?;
    *out = buf;
    Ok(())
}

/// Reads a row back into the record it was written from.
pub fn decode(bytes: &[u8]) -> Result<FinalRecord, RowError> {
    match bytes.split_first() {
        Some((&FORMAT_1, rest)) => {
            let (row, left) = postcard::take_from_bytes::<Row<'_>>(rest)?;
            if !left.is_empty() {
                return Err(RowError::Trailing(left.len()));
            }
            row.record()
        }
        other => Err(RowError::Format(other.map(|(f, _)| *f))),
    }
}

#[cfg(test)]
mod tests;
