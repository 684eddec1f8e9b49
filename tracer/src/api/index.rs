//! Final records in memory, kept in id order, bounded: the `capacity` highest ids are kept.
//! Records become final in order of their end, not of their id (a long stream ends after
//! shorter requests that came later), so a record is inserted where its id belongs (almost
//! always near the back) and the lowest id goes first. Every final record with an id above
//! the lowest held is therefore in memory; lower ones are in the store. Queries walk from the
//! highest id back.

use std::{collections::VecDeque, sync::Arc};

use crate::{ids::ServiceId, pipeline::FinalRecord};

/// What a query keeps.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub services: Option<Vec<ServiceId>>,
    pub service_name: Option<String>,
    pub model: Option<String>,
    pub outcome: Option<String>,
    pub tenant: Option<String>,
    /// Records with smaller ids are hidden (earlier runs, for callers limited to their own).
    pub first_id: u64,
    /// Unix milliseconds, on the record's end.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

impl Filter {
    pub fn keeps(&self, r: &FinalRecord) -> bool {
        self.services
            .as_ref()
            .is_none_or(|s| s.contains(&r.record.service))
            && self
                .service_name
                .as_ref()
                .is_none_or(|n| *n == r.service_name)
            && self
                .model
                .as_ref()
                .is_none_or(|m| r.record.model.as_deref() == Some(m.as_str()))
            && self
                .outcome
                .as_ref()
                .is_none_or(|o| r.record.outcome.name() == o.as_str())
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| r.record.tenant.as_deref() == Some(t.as_str()))
            && r.record.id.0 >= self.first_id
            && self.since_ms.is_none_or(|t| r.end_unix_ms >= t)
            && self.until_ms.is_none_or(|t| r.end_unix_ms < t)
    }
}

/// The records.
#[derive(Debug)]
pub struct Index {
    records: VecDeque<Arc<FinalRecord>>,
    capacity: usize,
    /// Records pushed out by newer ones.
    pub evicted: u64,
}

impl Index {
    pub fn new(capacity: usize) -> Self {
        Self {
            records: VecDeque::new(),
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The lowest id held (lower ones are in the store, if anywhere).
    pub fn oldest_id(&self) -> Option<u64> {
        self.records.front().map(|r| r.record.id.0)
    }

    pub fn push(&mut self, r: Arc<FinalRecord>) {
        let id = r.record.id.0;
        // Records are mostly final in id order: the newest goes at the back without a search
        // (a search reads a record behind a pointer at each step: cache misses at 100k).
        if self.records.back().is_none_or(|x| x.record.id.0 < id) {
            self.records.push_back(r);
            if self.records.len() > self.capacity {
                self.records.pop_front();
                self.evicted += 1;
            }
            return;
        }
        let at = self.records.partition_point(|x| x.record.id.0 < id);
        if self.records.get(at).is_some_and(|x| x.record.id.0 == id) {
            return; // already held (a record is final once)
        }
        self.records.insert(at, r);
        if self.records.len() > self.capacity {
            self.records.pop_front();
            self.evicted += 1;
        }
    }

    /// One record by id.
    pub fn get(&self, id: u64) -> Option<Arc<FinalRecord>> {
        // Kept in id order: binary search.
        let at = self
            .records
            .binary_search_by_key(&id, |r| r.record.id.0)
            .ok()?;
        self.records.get(at).cloned()
    }

    /// Up to `limit` records older than id `before` (newest first) that `filter` keeps.
    pub fn page(
        &self,
        filter: &Filter,
        before: Option<u64>,
        limit: usize,
    ) -> Vec<Arc<FinalRecord>> {
        let end = before.map_or(self.records.len(), |b| {
            self.records.partition_point(|r| r.record.id.0 < b)
        });
        self.records
            .range(..end)
            .rev()
            .filter(|r| filter.keeps(r))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Every record `filter` keeps, oldest first.
    pub fn all<'a>(&'a self, filter: &'a Filter) -> impl Iterator<Item = &'a Arc<FinalRecord>> {
        self.records.iter().filter(move |r| filter.keeps(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64) -> Arc<FinalRecord> {
        Arc::new(FinalRecord {
            workload: None,
            record: serde_json::from_value(serde_json::json!({
                "id": id, "external_id": null, "service": 1, "model": "m", "arrive_ns": 0,
                "first_byte_ns": null, "first_event_ns": null, "end_ns": 1, "outcome": "complete",
                "prompt_tokens": null, "cached_tokens": null, "completion_tokens": null,
                "events": 0, "response_bytes": 0, "devices": [], "dynamic_j": 0.0, "idle_j": 0.0,
                "total_j": 0.0, "kwh": 0.0, "joules_per_output_token": null,
                "uncertainty_j": 0.0, "coverage_gap_ns": 0
            }))
            .expect("record"),
            service_name: "s".into(),
            end_unix_ms: 0,
            cost: None,
        })
    }

    /// A long request (id 10) ends after shorter ones that came later: it is found, paged in
    /// order, and eviction drops the lowest ids.
    #[test]
    fn records_final_out_of_id_order_stay_in_id_order() {
        let mut i = Index::new(5);
        for id in [11, 12, 13, 10, 14, 15] {
            i.push(rec(id));
        }
        assert_eq!(i.oldest_id(), Some(11), "10 was the lowest: evicted");
        assert!(i.get(13).is_some() && i.get(10).is_none());
        let ids: Vec<u64> = i
            .page(&Filter::default(), None, 10)
            .iter()
            .map(|r| r.record.id.0)
            .collect();
        assert_eq!(ids, [15, 14, 13, 12, 11]);
        i.push(rec(14));
        assert_eq!(i.len(), 5, "a record is held once");
    }
}
