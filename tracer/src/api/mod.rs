//! The local-socket API: HTTP/1.1 + JSON on a Unix socket (`curl --unix-socket
//! /run/tracer/tracer.sock http://localhost/v1/requests`), served with hyper on the daemon's
//! tokio runtime. It reads what the pipeline publishes on its bus: final records (kept in a
//! bounded in-memory index, newest last) and snapshots (services, devices, counters).
//!
//! Who sees what is decided per connection from the peer's credentials (`SO_PEERCRED`): root
//! and members of the configured group see everything; any other user sees the services whose
//! processes it owns, and their requests only.

mod access;
mod config;
mod health_metrics;
mod index;
mod listen;
mod metrics;
mod query;
mod reply;
mod routes;
mod server;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

pub use config::ApiConfig;
pub use listen::MetricsListener;
pub use query::parse_time;
pub use server::{Api, ApiError};

use crate::{
    ids::ServiceId,
    output::family::Family,
    pipeline::{Fact, FinalRecord, Interest, Subscriber, SubscriberError, snapshot::Snapshot},
};

/// One group's running totals.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    requests: u64,
    joules: f64,
    output_tokens: u64,
    /// Joules per request and per output token, as Prometheus histograms (cumulative counts
    /// at `metrics::J_PER_REQUEST` and `metrics::J_PER_TOKEN`).
    per_request: metrics::Histogram,
    per_token: metrics::Histogram,
    /// Cost at the configured tariff, in its currency (a float for Prometheus, which sums it
    /// across hosts; bills stay decimal), and emissions, grams `CO2e`.
    cost: f64,
    emissions_g: f64,
}

impl Totals {
    /// One final record.
    fn add(&mut self, r: &FinalRecord) {
        self.requests += 1;
        self.joules += r.record.total_j;
        self.output_tokens += r.record.completion_tokens.unwrap_or(0);
        self.per_request
            .observe(&metrics::J_PER_REQUEST, r.record.total_j);
        if let Some(j) = r.record.joules_per_output_token {
            self.per_token.observe(&metrics::J_PER_TOKEN, j);
        }
        if let Some(c) = &r.cost {
            self.cost += rust_decimal::prelude::ToPrimitive::to_f64(&c.amount).unwrap_or(0.0);
            self.emissions_g += c.emissions_g.unwrap_or(0.0);
        }
    }
}

/// What the API serves from: shared between the pipeline (writer) and the server (readers).
#[derive(Debug)]
pub struct Shared {
    index: Mutex<index::Index>,
    /// Running totals per (service, its name, model, workload) since start, for `/metrics`
    /// (never evicted, so they are counters).
    totals: Mutex<BTreeMap<TotalsKey, Totals>>,
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    /// Records as they become final, for `/v1/stream` (a slow reader lags and is told so).
    stream: tokio::sync::broadcast::Sender<Arc<FinalRecord>>,
    /// The store, read where memory ends (older records, ids evicted from memory).
    store: Mutex<Option<crate::store::Store>>,
    /// This run's first request id: records below it are earlier runs', whose service ids
    /// meant other services, so only root and the API group see them.
    run_first_id: std::sync::atomic::AtomicU64,
    /// The store's writer counters, for `/metrics` and `/health`.
    writer: Mutex<Option<Arc<crate::store::WriterStats>>>,
    /// Requests and joules per (service, its name, model, tenant) since start; tenants past
    /// the cap are counted as `other`.
    tenants: Mutex<Tenants>,
    /// What recovering crashed runs did at start (`/health`, `/metrics`).
    recoveries: Mutex<Vec<crate::store::Recovery>>,
    /// The tariff's currency, once a record carried a cost (`tracer_request_cost_total`).
    currency: Mutex<Option<String>>,
    /// More families for `/metrics` (root and the API group): other parts' own counters.
    sources: Mutex<Vec<FamilySource>>,
}

/// Families another part of the daemon keeps (the OTLP exporter's counters), read at each
/// scrape.
pub struct FamilySource(pub Box<dyn Fn() -> Vec<Family> + Send + Sync>);

impl std::fmt::Debug for FamilySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FamilySource")
    }
}

/// (service, its name, model, tenant label).
/// (service, its name, model, tenant label, where the service ran).
type TenantKey = (
    ServiceId,
    String,
    String,
    String,
    Option<Arc<crate::occupancy::workload::Workload>>,
);
/// (service, its name, model, where the service ran).
type TotalsKey = (
    ServiceId,
    String,
    String,
    Option<Arc<crate::occupancy::workload::Workload>>,
);

/// Per-tenant totals under a cardinality cap.
#[derive(Debug)]
struct Tenants {
    cap: usize,
    named: std::collections::BTreeSet<String>,
    totals: BTreeMap<TenantKey, Totals>,
}

impl Tenants {
    /// The label `tenant` is counted under: itself while fewer than `cap` tenants have names.
    fn label(&mut self, tenant: &str) -> String {
        if self.named.contains(tenant) {
            return tenant.to_owned();
        }
        if self.named.len() < self.cap {
            self.named.insert(tenant.to_owned());
            return tenant.to_owned();
        }
        "other".to_owned()
    }
}

/// Tenants named in `/metrics` unless configured (`api.metrics_tenants`).
const DEFAULT_METRICS_TENANTS: usize = 100;

impl Shared {
    /// An empty state keeping at most `records` final records.
    pub fn new(records: usize) -> Arc<Self> {
        Arc::new(Self {
            index: Mutex::new(index::Index::new(records)),
            totals: Mutex::new(BTreeMap::new()),
            snapshot: Mutex::new(None),
            stream: tokio::sync::broadcast::channel(4096).0,
            store: Mutex::new(None),
            run_first_id: std::sync::atomic::AtomicU64::new(0),
            writer: Mutex::new(None),
            tenants: Mutex::new(Tenants {
                cap: DEFAULT_METRICS_TENANTS,
                named: std::collections::BTreeSet::new(),
                totals: BTreeMap::new(),
            }),
            recoveries: Mutex::new(Vec::new()),
            currency: Mutex::new(None),
            sources: Mutex::new(Vec::new()),
        })
    }

    /// Adds `source`'s families to `/metrics` (root and the API group).
    pub fn add_families(&self, source: FamilySource) {
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(source);
    }

    fn sourced_families(&self) -> Vec<Family> {
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .flat_map(|s| (s.0)())
            .collect()
    }

    /// What `/metrics` counts per (service, model), per tenant and per device, as root sees
    /// it: the families the OTLP exporter sends.
    pub fn families(&self) -> Vec<Family> {
        let totals = self.model_totals(&access::Scope::All);
        let mut out = metrics::model_families(&totals, self.currency().as_deref());
        out.extend(metrics::tenant_families(self, &access::Scope::All));
        if let Some(snap) = self.snapshot() {
            out.extend(health_metrics::device_families(&snap));
        }
        out
    }

    /// At most `n` tenants get their own label in `/metrics` (the rest: `other`).
    pub fn limit_tenants(&self, n: usize) {
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .cap = n;
    }

    /// What recovering crashed runs did at start, for `/health` and `/metrics`.
    pub fn report_recoveries(&self, recoveries: Vec<crate::store::Recovery>) {
        *self
            .recoveries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = recoveries;
    }

    fn recoveries(&self) -> Vec<crate::store::Recovery> {
        self.recoveries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Per (service name, model) totals of the services `scope` sees.
    fn model_totals(&self, scope: &access::Scope) -> Vec<metrics::ModelTotals> {
        self.totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|((id, ..), _)| scope.sees(*id))
            .map(|((_, s, m, w), t)| (s.clone(), m.clone(), w.clone(), *t))
            .collect()
    }

    /// Per-tenant totals, keyed by (service, name, model, tenant label).
    fn tenant_totals(&self) -> Vec<(TenantKey, Totals)> {
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .totals
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Nothing: what an answer is rendered against when its query failed.
    fn empty() -> Arc<Self> {
        Self::new(1)
    }

    /// Reports the store writer's counters.
    pub fn watch_writer(&self, stats: Arc<crate::store::WriterStats>) {
        *self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stats);
    }

    fn writer(&self) -> Option<Arc<crate::store::WriterStats>> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves records from earlier runs: the newest `memory` of them from `store` into memory,
    /// older ones from the store on demand; this run's ids start at `run_first_id`.
    pub fn attach_store(
        &self,
        store: crate::store::Store,
        run_first_id: u64,
    ) -> Result<usize, crate::store::StoreError> {
        let newest = store.newest(self.index().capacity())?;
        let n = newest.len();
        {
            let mut index = self.index();
            for r in newest {
                index.push(Arc::new(r));
            }
        }
        self.run_first_id
            .store(run_first_id, std::sync::atomic::Ordering::Relaxed);
        *self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(store);
        Ok(n)
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Option<crate::store::Store>> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The first id a caller limited to its own services may see (earlier runs are hidden).
    fn first_visible(&self, scope: &access::Scope) -> u64 {
        match scope {
            access::Scope::All => 0,
            access::Scope::Services(_) => {
                self.run_first_id.load(std::sync::atomic::Ordering::Relaxed)
            }
        }
    }

    /// Whether a caller with `scope` may see `r`.
    fn sees(&self, scope: &access::Scope, r: &FinalRecord) -> bool {
        scope.sees(r.record.service) && r.record.id.0 >= self.first_visible(scope)
    }

    /// A record became final (and stored, when there is a store): into the totals, the
    /// index and the stream.
    pub fn add_record(&self, r: &Arc<FinalRecord>) {
        if let Some(c) = &r.cost {
            let mut currency = self
                .currency
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if currency.is_none() {
                *currency = Some(c.currency.clone());
            }
        }
        {
            let mut totals = self
                .totals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (
                r.record.service,
                r.service_name.clone(),
                r.record.model.clone().unwrap_or_default(),
                r.workload.clone(),
            );
            totals.entry(key).or_default().add(r);
        }
        if let Some(tenant) = &r.record.tenant {
            let mut tenants = self
                .tenants
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let label = tenants.label(tenant);
            let key = (
                r.record.service,
                r.service_name.clone(),
                r.record.model.clone().unwrap_or_default(),
                label,
                r.workload.clone(),
            );
            tenants.totals.entry(key).or_default().add(r);
        }
        self.index().push(Arc::clone(r));
        // No receiver is not an error: nobody streams.
        let _ = self.stream.send(Arc::clone(r));
    }

    /// The tariff's currency, once a record carried a cost.
    fn currency(&self) -> Option<String> {
        self.currency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn index(&self) -> std::sync::MutexGuard<'_, index::Index> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What the socket would answer root for `GET path_and_query`, in process (benchmarks,
/// tests): the status and the body. `/v1/stream` has no body here.
pub fn get_as_root(shared: &Shared, path_and_query: &str) -> (u16, String) {
    let (path, query) = path_and_query
        .split_once('?')
        .map_or((path_and_query, None), |(p, q)| (p, Some(q)));
    match routes::route("GET", path, query, &access::Scope::All, shared) {
        reply::Reply::Json(status, v) => (status, v.to_string()),
        reply::Reply::Text(status, _, text) => (status, text),
        reply::Reply::Stream => (200, String::new()),
    }
}

/// The bus subscriber that keeps [`Shared`] current: in line (an index push and a broadcast
/// per record, a pointer swap per snapshot), so nothing the API shows is ever skipped.
/// With a store, records come from its writer once committed instead (`records: false`).
pub struct Feed {
    pub shared: Arc<Shared>,
    pub records: bool,
}

impl Subscriber for Feed {
    fn name(&self) -> &'static str {
        "api"
    }

    fn interest(&self) -> Interest {
        Interest {
            records: self.records,
            snapshots: true,
            ..Interest::default()
        }
    }

    fn on_fact(&mut self, fact: &Fact<'_>) -> Result<(), SubscriberError> {
        match fact {
            Fact::Record(r) => self.shared.add_record(r),
            Fact::Snapshot(s) => {
                *self
                    .shared
                    .snapshot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(s));
            }
            _ => {}
        }
        Ok(())
    }
}
