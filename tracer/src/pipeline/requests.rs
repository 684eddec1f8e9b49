//! Requests through the pipeline: the tracker's lifecycles feed the ledger and the request
//! summaries; the ledger's final accounts become published records.

use std::sync::Arc;

use super::{Fact, FinalRecord, Pipeline, hops};
use crate::{
    ids::{Pid, RequestId},
    ledger::{self, Arrival, RequestRecord},
    wire::{self, Lifecycle},
};

impl Pipeline {
    /// Moves the tracker's request lifecycles into the collector and the ledger.
    pub(super) fn flush_requests(&mut self) {
        self.tracker.drain_into(&mut self.lifecycle);
        let lifecycle = std::mem::take(&mut self.lifecycle);
        let publish = self.bus.interest().requests;
        for lc in &lifecycle {
            self.feed_ledger(lc);
            if let Some(done) = self.collector.apply(lc) {
                self.requests_done += 1;
                if publish {
                    self.bus.publish(&Fact::Request(&Arc::new(done)));
                }
            }
        }
        self.lifecycle = lifecycle;
        self.lifecycle.clear();
    }

    /// The second hop (`hops.rs`): a call a target makes and the inner exchange at its other
    /// end are not ledger requests; a call's token counts and model join its outer request.
    /// Returns whether `lc` was taken care of here.
    fn route_hop(&mut self, lc: &Lifecycle) -> bool {
        let req = lc.request();
        let (id, tgid, conn) = (req.id, Pid(req.conn.tgid), req.conn.conn_id);
        match lc {
            Lifecycle::Arrive {
                ts_ns,
                body_bytes,
                client: true,
                model,
                message_hash,
                ..
            } => {
                let message = (*body_bytes, *message_hash);
                let local = self.conns.local_peer(tgid, conn);
                let call = (*ts_ns, message, model.clone());
                if let Some(found) = self.hops.call(id, (tgid, conn), call, local) {
                    self.ledger.withdraw(RequestId(found.inner));
                    if let Some(outer) = found.outer {
                        self.where_it_ran(outer, found.inner_tgid);
                    }
                }
                true
            }
            Lifecycle::Arrive {
                ts_ns,
                body_bytes,
                client: false,
                message_hash,
                ..
            } => {
                let local = self.conns.local_peer(tgid, conn);
                let message = (*body_bytes, *message_hash);
                match self.hops.arrive(id, (tgid, conn), *ts_ns, message, local) {
                    hops::Arrival::Outer => false,
                    hops::Arrival::Inner { outer } => {
                        if let Some(outer) = outer {
                            self.where_it_ran(outer, tgid);
                        }
                        true
                    }
                }
            }
            _ if !self.hops.not_a_request(id) => {
                if matches!(lc, Lifecycle::End { .. }) {
                    self.hops.end(id, tgid);
                }
                false
            }
            Lifecycle::Usage {
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                if let Some(c) = self.hops.call_mut(id) {
                    c.usage = Some((*prompt_tokens, *completion_tokens, *cached_tokens));
                }
                true
            }
            Lifecycle::End { .. } => {
                if let Some(call) = self.hops.end(id, tgid)
                    && let Some(outer) = call.outer
                {
                    let outer = RequestId(outer);
                    if let Some((p, c, k)) = call.usage {
                        self.ledger.usage(outer, p, c, k);
                    }
                    if let Some(m) = &call.model {
                        self.ledger.model_if_unknown(outer, m);
                    }
                }
                true
            }
            _ => true,
        }
    }

    /// A forwarded request's engine runs in `engine`'s service: when that is not the front's,
    /// the request is the engine's service's (its energy is where its work ran).
    fn where_it_ran(&mut self, outer: u64, engine: Pid) {
        let service = self.binding.service_of(engine);
        self.ledger.rehome(RequestId(outer), service);
    }

    /// Request lifecycle → ledger input.
    fn feed_ledger(&mut self, lc: &Lifecycle) {
        if self.route_hop(lc) {
            return;
        }
        let l = &mut self.ledger;
        match lc {
            Lifecycle::Arrive {
                req,
                ts_ns,
                model,
                request_id,
                tenant,
                body_bytes,
                prompt_blocks,
                ..
            } => {
                let service = self.binding.service_of(Pid(req.conn.tgid));
                self.serving.insert(Pid(req.conn.tgid));
                let _ = l.arrive(
                    RequestId(req.id),
                    service,
                    Arrival {
                        ts_ns: *ts_ns,
                        model: model.clone(),
                        external_id: request_id.clone(),
                        tenant: tenant.clone(),
                        prompt_tokens: None,
                        cached_tokens: None,
                        body_bytes: Some(*body_bytes).filter(|&b| b > 0),
                        prefix_blocks: prompt_blocks.clone(),
                    },
                );
            }
            // Streaming servers send their headers before the first token: the prefill/decode
            // boundary is the first event, which `events` records; the first byte is reported
            // (time to first byte) and splits nothing.
            Lifecycle::FirstByte { req, ts_ns, .. } => l.first_byte(RequestId(req.id), *ts_ns),
            Lifecycle::RequestDone { .. } => {}
            Lifecycle::Event { req, ts_ns } => l.events(RequestId(req.id), *ts_ns, 1),
            Lifecycle::Usage {
                req,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => l.usage(
                RequestId(req.id),
                *prompt_tokens,
                *completion_tokens,
                *cached_tokens,
            ),
            Lifecycle::End {
                req,
                ts_ns,
                response_bytes,
                outcome,
                ..
            } => {
                let outcome = match outcome {
                    wire::Outcome::Complete => ledger::Outcome::Complete,
                    wire::Outcome::ClosedEarly => ledger::Outcome::ClosedEarly,
                    wire::Outcome::Truncated => ledger::Outcome::Truncated,
                    wire::Outcome::Aborted => ledger::Outcome::Aborted,
                };
                l.end(RequestId(req.id), *ts_ns, *response_bytes, outcome);
            }
        }
    }

    /// Publishes final records with their service's name and wall-clock end.
    pub(super) fn emit_records(&mut self, recs: Vec<RequestRecord>) {
        let publish = self.bus.interest().records;
        for rec in recs {
            self.records_done += 1;
            if !publish {
                continue;
            }
            let end_unix_ms = self.unix_ms(rec.end_ns);
            let cost = self.tariff.as_ref().map(|t| {
                t.record_cost(
                    rec.total_j,
                    rec.uncertainty_j,
                    self.unix_ms(rec.arrive_ns),
                    end_unix_ms,
                )
            });
            let rec = Arc::new(FinalRecord {
                end_unix_ms,
                service_name: self.binding.service_name(rec.service).to_string(),
                workload: self.binding.service_workload(rec.service).cloned(),
                record: rec,
                cost,
            });
            self.bus.publish(&Fact::Record(&rec));
        }
    }

    /// Requests that arrived and have not ended, oldest first.
    pub(super) fn in_flight(&self) -> Vec<super::snapshot::InFlight> {
        let mut v: Vec<_> = self
            .collector
            .open()
            .map(|s| super::snapshot::InFlight {
                id: RequestId(s.id),
                service: self.binding.service_of(Pid(s.tgid)),
                pid: Pid(s.tgid),
                method: s.method.clone(),
                path: s.path.clone(),
                model: s.model.clone(),
                arrive_ns: s.arrive_ns,
            })
            .collect();
        v.sort_by_key(|r| (r.arrive_ns, r.id));
        v
    }
}
