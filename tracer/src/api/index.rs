//! Final records in memory, in id order (ids grow with finality), bounded: the newest
//! `capacity` are kept. Queries walk from the newest back.

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

    /// The oldest id held (older ones are in the store, if anywhere).
    pub fn oldest_id(&self) -> Option<u64> {
        self.records.front().map(|r| r.record.id.0)
    }

    pub fn push(&mut self, r: Arc<FinalRecord>) {
        if self.records.len() == self.capacity {
            self.records.pop_front();
            self.evicted += 1;
        }
        self.records.push_back(r);
    }

    /// One record by id.
    pub fn get(&self, id: u64) -> Option<Arc<FinalRecord>> {
        // Ids are pushed in increasing order: binary search.
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
