use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use super::*;
use crate::{
    ids::{RequestId, ServiceId},
    ledger::{IdleBasis, Outcome, RequestRecord},
    pipeline::snapshot::Snapshot,
};

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tracer-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn record(id: u64, end_unix_ms: i64, model: &str, total_j: f64) -> Arc<FinalRecord> {
    Arc::new(FinalRecord {
        workload: None,
        record: RequestRecord {
            id: RequestId(id),
            external_id: None,
            service: ServiceId(1),
            model: Some(model.into()),
            tenant: id.is_multiple_of(2).then(|| "t-even".to_string()),
            arrive_ns: 0,
            first_byte_ns: None,
            first_event_ns: None,
            end_ns: 1,
            outcome: Outcome::Complete,
            prompt_tokens: Some(10),
            cached_tokens: None,
            completion_tokens: Some(4),
            events: 4,
            response_bytes: 100,
            devices: Vec::new(),
            dynamic_j: total_j * 0.75,
            idle_j: total_j * 0.25,
            total_j,
            kwh: total_j / 3.6e6,
            occupancy: None,
            joules_per_output_token: Some(total_j / 4.0),
            uncertainty_j: 0.1,
            coverage_gap_ns: 0,
        },
        service_name: "api".into(),
        end_unix_ms,
        cost: None,
    })
}

#[test]
fn ids_keep_growing_across_runs_and_nothing_is_stored_twice() {
    let dir = temp("ids");
    let mut s = Store::open(&dir).expect("open");
    // Root's alone: other users ask the API.
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    };
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(DB_FILE)), 0o600);
    let run = s.begin_run(1_000).expect("run");
    assert_eq!(run.first_request_id, 1);
    let batch: Vec<_> = (1..=5)
        .map(|i| record(i, 1_000 + i as i64, "m", 1.0))
        .collect();
    assert_eq!(s.insert(run.run, &batch, false).expect("insert"), 5);
    // The same records again (a recovery replaying them): nothing new.
    assert_eq!(s.insert(run.run, &batch, true).expect("insert"), 0);
    // A run that gave ids up to 9 but stored only up to 5.
    s.close_run(run.run, 2_000, 10).expect("close");
    let next = s.begin_run(3_000).expect("run");
    assert_eq!(next.first_request_id, 10);
    assert_eq!(s.unclosed_runs().expect("runs").len(), 1);
    // Another daemon cannot open the same store.
    assert!(matches!(Store::open(&dir), Err(StoreError::Locked(_))));
    drop(s);
    let s = Store::open(&dir).expect("reopen after the first let go");
    assert_eq!(s.count().expect("count"), 5);
    assert_eq!(s.last_request_id().expect("last"), 9);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot of one device named `name` with this idle figure.
fn device_snapshot(unix_ms: i64, name: &str, idle_w: f64, basis: IdleBasis) -> Snapshot {
    use crate::pipeline::snapshot::{Counts, DeviceSnapshot};
    Snapshot {
        ts_ns: 0,
        unix_ms,
        devices: vec![DeviceSnapshot {
            id: crate::ids::DeviceId(0),
            name: name.into(),
            kind: crate::ledger::DeviceKind::Gpu,
            estimated: false,
            power_w: None,
            power_age_ms: None,
            totals: crate::ledger::DeviceTotals {
                idle_w,
                idle_basis: basis,
                ..Default::default()
            },
        }],
        services: Vec::new(),
        in_flight: Vec::new(),
        counts: Counts::default(),
        kernel: None,
        samplers: Vec::new(),
        outputs: Vec::new(),
        targets: None,
        learned: Vec::new(),
    }
}

/// The idle the next run starts from is each device's newest figure learned from quiet time,
/// across runs; all-power guesses never are.
#[test]
fn the_newest_quiet_idle_of_each_device_is_kept_for_the_next_run() {
    let dir = temp("idle");
    let mut s = Store::open(&dir).expect("open");
    let run = s.begin_run(1_000).expect("run").run;
    for (ms, name, w, basis) in [
        (1_000, "gpu0", 70.0, IdleBasis::Quiet),
        (2_000, "gpu0", 72.0, IdleBasis::Quiet),
        (3_000, "gpu0", 240.0, IdleBasis::AllPower),
        (1_000, "gpu1", 200.0, IdleBasis::AllPower),
    ] {
        s.snapshot(run, &device_snapshot(ms, name, w, basis))
            .expect("snapshot");
    }
    let later = s.begin_run(4_000).expect("run").run;
    s.snapshot(
        later,
        &device_snapshot(5_000, "gpu2", 55.0, IdleBasis::Quiet),
    )
    .expect("snapshot");
    assert_eq!(
        s.learned_idle().expect("idle"),
        vec![("gpu0".to_string(), 72.0), ("gpu2".to_string(), 55.0)]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device's energy over a window is its totals at the last snapshot at or before the end
/// less those at or before the start, per run (a run's totals start from zero).
#[test]
fn device_energy_over_a_window_is_the_difference_at_its_edges() {
    let dir = temp("window");
    let mut s = Store::open(&dir).expect("open");
    let snap = |ms: i64, measured_j: f64| {
        let mut snap = device_snapshot(ms, "gpu0", 50.0, IdleBasis::Quiet);
        let t = &mut snap.devices[0].totals;
        t.measured_j = measured_j;
        t.request_dynamic_j = measured_j / 2.0;
        t.idle_j = measured_j / 4.0;
        t.unattributed_j = measured_j / 4.0;
        snap
    };
    let run = s.begin_run(500).expect("run").run;
    for (ms, j) in [(1_000, 10.0), (2_000, 30.0), (3_000, 60.0)] {
        s.snapshot(run, &snap(ms, j)).expect("snapshot");
    }
    let measured = |s: &Store, a: i64, b: i64| {
        s.device_window(a, b)
            .expect("window")
            .into_iter()
            .map(|(n, v)| (n, v[0], v[1]))
            .collect::<Vec<_>>()
    };
    assert_eq!(measured(&s, 1_500, 2_500), [("gpu0".into(), 20.0, 10.0)]);
    assert_eq!(
        measured(&s, i64::MIN, i64::MAX),
        [("gpu0".into(), 60.0, 30.0)]
    );
    s.close_run(run, 3_500, 10).expect("close");
    let later = s.begin_run(4_000).expect("run").run;
    s.snapshot(later, &snap(5_000, 7.0)).expect("snapshot");
    assert_eq!(
        measured(&s, i64::MIN, i64::MAX),
        [("gpu0".into(), 67.0, 33.5)]
    );
    assert_eq!(measured(&s, 3_600, i64::MAX), [("gpu0".into(), 7.0, 3.5)]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn queries_filter_page_and_sum_like_the_api() {
    let dir = temp("query");
    let mut s = Store::open(&dir).expect("open");
    let run = s.begin_run(0).expect("run");
    let batch: Vec<_> = (1..=100)
        .map(|i| {
            record(
                i,
                i as i64 * 10,
                if i % 3 == 0 { "b" } else { "a" },
                i as f64,
            )
        })
        .collect();
    s.insert(run.run, &batch, false).expect("insert");
    let reader = Store::open_reader(&dir).expect("reader");
    let got = reader.get(42).expect("get").expect("stored");
    assert_eq!(
        &got,
        batch[41].as_ref(),
        "a record comes back as it went in"
    );
    let page = reader
        .page(
            &StoredFilter {
                model: Some("b".into()),
                ..StoredFilter::default()
            },
            50,
            5,
        )
        .expect("page");
    let ids: Vec<u64> = page.iter().map(|r| r.record.id.0).collect();
    assert_eq!(ids, [48, 45, 42, 39, 36], "newest first, below the cursor");
    let window = reader
        .page(
            &StoredFilter {
                since_ms: Some(200),
                until_ms: Some(300),
                tenant: Some("t-even".into()),
                ..StoredFilter::default()
            },
            u64::MAX,
            100,
        )
        .expect("page");
    assert_eq!(window.len(), 5, "ids 20..30 even: {window:?}");
    let sums = reader
        .sums(&StoredFilter::default(), u64::MAX, GroupBy::Model)
        .expect("sums");
    let b = sums.iter().find(|g| g.key == "b").expect("b");
    assert_eq!(b.requests, 33);
    let want: f64 = (1..=100).filter(|i| i % 3 == 0).map(f64::from).sum();
    assert!((b.total_j - want).abs() < 1e-9);
    assert_eq!(b.output_tokens, 33 * 4);
    // Callers limited to their own services see only this run's, of their services.
    let scoped = StoredFilter {
        services: Some(vec![2]),
        ..StoredFilter::default()
    };
    assert!(reader.page(&scoped, u64::MAX, 10).expect("page").is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn retention_deletes_by_age_then_by_size() {
    let dir = temp("retention");
    let mut s = Store::open(&dir).expect("open");
    let run = s.begin_run(0).expect("run");
    let day = 86_400_000i64;
    let now = 100 * day;
    let old: Vec<_> = (1..=10)
        .map(|i| record(i, now - 40 * day, "m", 1.0))
        .collect();
    let new: Vec<_> = (11..=5000)
        .map(|i| record(i, now - day, "m", 1.0))
        .collect();
    s.insert(run.run, &old, false).expect("insert");
    s.insert(run.run, &new, false).expect("insert");
    let by_age = StoreConfig {
        retention_days: 30,
        max_bytes: 0,
        ..StoreConfig::default()
    };
    assert_eq!(s.enforce_retention(now, &by_age).expect("age"), 10);
    assert!(s.get(10).expect("get").is_none());
    let used = s.used_bytes().expect("bytes");
    let by_size = StoreConfig {
        retention_days: 0,
        max_bytes: used / 2,
        ..StoreConfig::default()
    };
    let gone = s.enforce_retention(now, &by_size).expect("size");
    assert!(
        gone > 0 && s.used_bytes().expect("bytes") <= used / 2,
        "{gone}"
    );
    // The oldest went first: the newest record is still there.
    assert!(s.get(5000).expect("get").is_some());
    assert!(s.get(11).expect("get").is_none());
    // What retention deleted, a recovery will not bring back.
    assert!(s.deleted_through().expect("floor") >= 11);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A crash, with a real recording (the H200 check's) as the dead run's journal, cut in the
/// middle: what was stored stays once, the rest is recovered, open requests are incomplete.
#[test]
fn a_crashed_run_is_recovered_from_its_journal_without_duplicates() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/h200/live.rec");
    let whole = std::fs::read(&fixture).expect("fixture");
    let dir = temp("recover");
    let mut s = Store::open(&dir).expect("open");
    let run = s.begin_run(0).expect("run");
    // The kill: the journal's last write cut mid-frame, 60 % in.
    std::fs::write(s.journal_path(run.run), &whole[..whole.len() * 6 / 10]).expect("journal");
    // What the live run had stored before it died: the replay's first few records.
    let (replayed, _) = crate::record::replay::replay_records(
        &crate::record::replay::ReplayOptions::of(&s.journal_path(run.run)),
    )
    .expect("replay");
    assert!(replayed.len() > 5, "{}", replayed.len());
    let stored_before: Vec<_> = replayed
        .iter()
        .map(|r| r.record.clone())
        .filter(|r| r.record.outcome != Outcome::Incomplete)
        .take(5)
        .collect();
    s.insert(run.run, &stored_before, false).expect("insert");

    let out = recover(&mut s, 1).expect("recover");
    assert_eq!(out.len(), 1);
    let r = &out[0];
    assert!(r.cut_short, "{r}");
    assert_eq!(r.already_stored, 5, "{r}");
    assert_eq!(r.recovered, replayed.len() - 5, "{r}");
    assert!(r.incomplete >= 1, "a request was in flight at the cut: {r}");
    assert_eq!(s.count().expect("count") as usize, replayed.len());
    // Each recovered record as the replay gave it, once.
    for want in &replayed {
        let got = s
            .get(want.record.record.id.0)
            .expect("get")
            .expect("stored");
        assert_eq!(&got, want.record.as_ref());
    }
    // Closed: the next run's ids follow the dead run's last one.
    assert!(s.unclosed_runs().expect("runs").is_empty());
    let max_id = replayed
        .iter()
        .map(|r| r.record.record.id.0)
        .max()
        .expect("some");
    assert!(s.begin_run(2).expect("run").first_request_id > max_id);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Summaries from the per-minute rollups (and the records at a window's unaligned edges) are
/// the sums over the records themselves, for any window.
#[test]
fn rollup_summaries_equal_sums_over_the_records() {
    let dir = temp("rollup");
    let mut s = Store::open(&dir).expect("open");
    let run = s.begin_run(0).expect("run");
    let t0 = 1_800_000_000_000i64;
    let batch: Vec<_> = (1..=600u64)
        .map(|i| {
            let model = ["a", "b", "c"][(i % 3) as usize];
            record(i, t0 + (i as i64) * 997, model, 0.5 + (i % 7) as f64)
        })
        .collect();
    s.insert(run.run, &batch, false).expect("insert");
    let windows = [
        (None, None),
        (Some(t0 + 12_345), None),
        (None, Some(t0 + 400_001)),
        (Some(t0 + 60_000), Some(t0 + 240_000)),
        (Some(t0 + 61_234), Some(t0 + 599_999)),
        (Some(t0 + 100_000), Some(t0 + 110_000)),
    ];
    for (since_ms, until_ms) in windows {
        for by in [GroupBy::Model, GroupBy::Tenant] {
            let f = StoredFilter {
                since_ms,
                until_ms,
                ..StoredFilter::default()
            };
            let mut fast = s.summary(&f, by).expect("summary");
            let mut slow = s.sums(&f, u64::MAX, by).expect("sums");
            fast.sort_by(|a, b| a.key.cmp(&b.key));
            slow.sort_by(|a, b| a.key.cmp(&b.key));
            assert_eq!(fast.len(), slow.len(), "{since_ms:?}..{until_ms:?}");
            for (x, y) in fast.iter().zip(&slow) {
                assert_eq!(
                    (&x.key, x.requests, x.output_tokens),
                    (&y.key, y.requests, y.output_tokens)
                );
                assert!((x.total_j - y.total_j).abs() < 1e-6, "{x:?} {y:?}");
                // The same values in the same buckets: rollups' histograms add up exactly.
                assert_eq!(x.quantiles, y.quantiles, "{since_ms:?}..{until_ms:?}");
                assert_eq!(x.quantiles.requests(), x.requests);
            }
        }
    }
    // A filter on a rolled-up column.
    let f = StoredFilter {
        model: Some("b".into()),
        since_ms: Some(t0 + 30_500),
        ..StoredFilter::default()
    };
    let fast = s.summary(&f, GroupBy::Model).expect("summary");
    let slow = s.sums(&f, u64::MAX, GroupBy::Model).expect("sums");
    assert_eq!(fast[0].requests, slow[0].requests);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A record like [`record`]'s with `tokens` output tokens (`None`: not reported).
fn with_tokens(r: &FinalRecord, tokens: Option<u64>) -> Arc<FinalRecord> {
    let mut r = r.clone();
    r.record.completion_tokens = tokens;
    r.record.joules_per_output_token = tokens
        .filter(|&t| t > 0)
        .map(|t| r.record.total_j / t as f64);
    Arc::new(r)
}

/// Records over ten minutes from `t0`, three models, joules over four orders of magnitude,
/// some without output tokens (or with 0), in id order but with their minutes mixed.
fn varied(t0: i64) -> Vec<Arc<FinalRecord>> {
    varied_over(t0, 600_000)
}

/// As `varied`, the ends spread over `span_ms`.
fn varied_over(t0: i64, span_ms: u64) -> Vec<Arc<FinalRecord>> {
    (1..=900u64)
        .map(|i| {
            let model = ["a", "b", "c"][(i % 3) as usize];
            let total_j = 0.05 * 1.07f64.powi((i * 37 % 130) as i32);
            let end = t0 + ((i * 7919) % span_ms) as i64;
            let tokens = match i % 5 {
                0 => None,
                1 => Some(0),
                _ => Some(1 + i * 13 % 500),
            };
            with_tokens(&record(i, end, model, total_j), tokens)
        })
        .collect()
}

/// The nearest-rank p50, p90, p99 and max of `values` (sorted, the value at rank
/// `ceil(q * n)`), computed without histograms.
fn nearest_rank(mut values: Vec<f64>) -> Option<[f64; 4]> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let at = |q: f64| values[((q * n as f64).ceil() as usize).max(1) - 1];
    (n > 0).then(|| [at(0.5), at(0.9), at(0.99), values[n - 1]])
}

/// `got` (the API's JSON of a histogram's quantiles) is `want` within hdrhistogram's
/// precision: at most 1 % above (a bucket's highest value), never below but for the rounding
/// to whole microjoules.
fn assert_quantiles(what: &str, got: &serde_json::Value, want: Option<[f64; 4]>) {
    let Some(want) = want else {
        assert!(got.is_null(), "{what}: {got}, not null");
        return;
    };
    for (k, w) in ["p50", "p90", "p99", "max"].into_iter().zip(want) {
        let g = got[k].as_f64().unwrap_or(f64::NAN);
        assert!(
            g >= w - 1e-6 && g <= w * 1.01 + 1e-6,
            "{what} {k}: {g}, not {w} within 1 % ({got})"
        );
    }
}

/// Quantiles from the rollups (whole minutes, merged across the batches that wrote each
/// minute) and from the records at unaligned edges are the nearest-rank quantiles over the
/// records themselves.
#[test]
fn rollup_quantiles_equal_nearest_rank_over_the_records() {
    // Ten minutes (minute rows only), then three and a half hours (whole hours from the
    // hourly histograms, the minutes around them from the minute rows).
    const H: i64 = 3_600_000;
    for (span, windows) in [
        (
            600_000,
            vec![
                (None, None),
                (Some(12_345), Some(500_001)),
                (Some(61_234), Some(599_999)),
                (None, Some(400_001)),
                (Some(100_000), Some(110_000)),
            ],
        ),
        (
            7 * H as u64 / 2,
            vec![
                (None, None),
                (Some(12_345), Some(3 * H + 1_234)),
                (Some(H), Some(3 * H)),
                (None, Some(2 * H + 61_000)),
                (Some(H - 60_000), Some(H + 60_000)),
                (Some(H + 59_999), None),
            ],
        ),
    ] {
        quantiles_over_windows(span, &windows);
    }
}

/// [`rollup_quantiles_equal_nearest_rank_over_the_records`] for records over `span_ms` and
/// windows relative to the first minute.
fn quantiles_over_windows(span_ms: u64, windows: &[(Option<i64>, Option<i64>)]) {
    let dir = temp(&format!("quantiles-{span_ms}"));
    let mut s = Store::open(&dir).expect("open");
    let run = s.begin_run(0).expect("run");
    let t0 = 1_800_000_000_000i64;
    let all = varied_over(t0, span_ms);
    // Several batches: every minute is written by more than one.
    for batch in all.chunks(97) {
        s.insert(run.run, batch, false).expect("insert");
    }
    let windows = windows
        .iter()
        .map(|(a, b)| (a.map(|a| t0 + a), b.map(|b| t0 + b)));
    for (since_ms, until_ms) in windows {
        let f = StoredFilter {
            since_ms,
            until_ms,
            ..StoredFilter::default()
        };
        let groups = s.summary(&f, GroupBy::Model).expect("summary");
        assert_eq!(groups.len(), 3, "{since_ms:?}..{until_ms:?}");
        for g in &groups {
            let kept: Vec<&FinalRecord> = all
                .iter()
                .map(Arc::as_ref)
                .filter(|r| {
                    r.record.model.as_deref() == Some(g.key.as_str())
                        && since_ms.is_none_or(|t| r.end_unix_ms >= t)
                        && until_ms.is_none_or(|t| r.end_unix_ms < t)
                })
                .collect();
            let what = format!("{}, {since_ms:?}..{until_ms:?}", g.key);
            assert_eq!(g.requests, kept.len() as u64, "{what}");
            assert_eq!(g.quantiles.requests(), g.requests, "{what}");
            let per_request = nearest_rank(kept.iter().map(|r| r.record.total_j).collect());
            let per_token = nearest_rank(
                kept.iter()
                    .filter_map(|r| r.record.joules_per_output_token)
                    .collect(),
            );
            assert_quantiles(&what, &g.quantiles.per_request_json(), per_request);
            assert_quantiles(&what, &g.quantiles.per_token_json(), per_token);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The rollup rows' histograms decoded, by (minute, model).
fn rollup_rows(s: &Store) -> Vec<((i64, String), u64, JouleQuantiles)> {
    let mut st = s
        .conn
        .prepare("SELECT minute, model, requests, j_hist, token_hist FROM rollup ORDER BY 1, 2")
        .expect("prepare");
    let mut rows = st.query([]).expect("query");
    let mut out = Vec::new();
    while let Some(r) = rows.next().expect("row") {
        let (j, token): quantiles::HistBytes =
            (r.get(3).expect("j_hist"), r.get(4).expect("token_hist"));
        let mut q = JouleQuantiles::default();
        q.add_bytes(j.as_deref(), token.as_deref())
            .expect("readable histograms");
        out.push((
            (r.get(0).expect("minute"), r.get(1).expect("model")),
            r.get::<_, i64>(2).expect("requests") as u64,
            q,
        ));
    }
    out
}

/// A minute written by three batches holds the histograms one batch would have written.
#[test]
fn rollup_histograms_merge_across_batches() {
    let t0 = 1_800_000_000_000i64;
    let all = varied(t0);
    let (one, three) = (temp("merge-one"), temp("merge-three"));
    let mut a = Store::open(&one).expect("open");
    let mut b = Store::open(&three).expect("open");
    let (ra, rb) = (a.begin_run(0).expect("run"), b.begin_run(0).expect("run"));
    a.insert(ra.run, &all, false).expect("insert");
    for batch in all.chunks(all.len() / 3) {
        b.insert(rb.run, batch, false).expect("insert");
    }
    let (rows_a, rows_b) = (rollup_rows(&a), rollup_rows(&b));
    assert!(rows_a.len() >= 30, "10 minutes, 3 models: {}", rows_a.len());
    assert_eq!(rows_a, rows_b);
    for (key, requests, q) in &rows_a {
        assert_eq!(q.requests(), *requests, "{key:?}");
    }
    let _ = std::fs::remove_dir_all(&one);
    let _ = std::fs::remove_dir_all(&three);
}

/// A version 2 store (its rollup table without histograms) opens as version 3: the table gains
/// the columns, the old rows keep their sums, and the quantiles say they cover only the
/// requests stored since.
/// The store in `dir` opened by this build (migrated to its version), a new run storing `after`.
fn upgraded(dir: &Path, after: &[Arc<FinalRecord>]) -> Store {
    let mut s = Store::open(dir).expect("open an older store");
    let version: i64 = s
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(version, schema::VERSION);
    let run = s.begin_run(1).expect("run");
    s.insert(run.run, after, false).expect("insert");
    s
}

#[test]
fn a_version_2_store_gains_the_histograms_and_says_what_they_cover() {
    let dir = temp("migrate");
    let t0 = 1_800_000_000_000i64;
    let all = varied(t0);
    let (before, after) = all.split_at(500);
    {
        let mut s = Store::open(&dir).expect("open");
        let run = s.begin_run(0).expect("run");
        s.insert(run.run, before, false).expect("insert");
    }
    {
        // Version 2's rollup table, with these rows (and no hourly histograms).
        let conn = Connection::open(dir.join(DB_FILE)).expect("db");
        conn.execute_batch(
            "ALTER TABLE rollup RENAME TO rollup_v3;
             CREATE TABLE rollup (
                 minute INTEGER NOT NULL,
                 service_name TEXT NOT NULL,
                 model TEXT NOT NULL,
                 tenant TEXT NOT NULL,
                 outcome TEXT NOT NULL,
                 requests INTEGER NOT NULL,
                 total_j REAL NOT NULL,
                 dynamic_j REAL NOT NULL,
                 idle_j REAL NOT NULL,
                 output_tokens INTEGER NOT NULL,
                 token_j REAL NOT NULL,
                 cost_nano INTEGER NOT NULL,
                 currency TEXT NOT NULL,
                 PRIMARY KEY (minute, service_name, model, tenant, outcome)
             ) WITHOUT ROWID;
             INSERT INTO rollup SELECT minute, service_name, model, tenant, outcome, requests, total_j, \
                 dynamic_j, idle_j, output_tokens, token_j, cost_nano, currency FROM rollup_v3;
             DROP TABLE rollup_v3;
             DROP TABLE rollup_hour;
             PRAGMA user_version = 2;",
        )
        .expect("version 2");
    }
    // The same minutes again: old rows (NULL histograms) gain this batch's.
    let s = upgraded(&dir, after);
    let groups = s
        .summary(&StoredFilter::default(), GroupBy::Model)
        .expect("summary");
    assert_eq!(groups.len(), 3);
    for g in &groups {
        let since: Vec<&FinalRecord> = after
            .iter()
            .map(Arc::as_ref)
            .filter(|r| r.record.model.as_deref() == Some(g.key.as_str()))
            .collect();
        let all_of_group = all
            .iter()
            .filter(|r| r.record.model.as_deref() == Some(g.key.as_str()))
            .count();
        assert_eq!(g.requests, all_of_group as u64, "{}", g.key);
        assert_eq!(g.quantiles.requests(), since.len() as u64, "{}", g.key);
        assert!(g.quantiles.requests() < g.requests, "{}", g.key);
        assert_quantiles(
            &g.key,
            &g.quantiles.per_request_json(),
            nearest_rank(since.iter().map(|r| r.record.total_j).collect()),
        );
    }
    // Reopening a store of this version changes nothing.
    drop(s);
    let s = Store::open(&dir).expect("reopen");
    assert_eq!(
        s.summary(&StoredFilter::default(), GroupBy::Model)
            .expect("summary"),
        groups
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A version 3 store kept each record as JSON: after the upgrade its rows read back beside
/// the binary rows written since, through every reader, as the same records and JSON.
#[test]
fn a_version_3_store_reads_its_json_rows_beside_the_binary_ones() {
    let dir = temp("rows");
    let all = varied(1_800_000_000_000);
    let (before, after) = all.split_at(400);
    {
        let mut s = Store::open(&dir).expect("open");
        let run = s.begin_run(0).expect("run");
        s.insert(run.run, before, false).expect("insert");
        for r in before {
            s.conn
                .execute(
                    "UPDATE records SET json = ?1 WHERE id = ?2",
                    params![
                        serde_json::to_string(&**r).expect("json"),
                        r.record.id.0 as i64
                    ],
                )
                .expect("json row");
        }
        s.conn
            .execute_batch("ALTER TABLE records DROP COLUMN rec; PRAGMA user_version = 3;")
            .expect("version 3");
    }
    let s = upgraded(&dir, after);
    let (json_rows, binary_rows): (i64, i64) = s
        .conn
        .query_row(
            "SELECT SUM(rec IS NULL AND json != ''), SUM(rec IS NOT NULL AND json = '') FROM records",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("count");
    assert_eq!((json_rows, binary_rows), (400, 500));

    let owned: Vec<FinalRecord> = all.iter().map(|r| (**r).clone()).collect();
    assert_eq!(s.newest(all.len()).expect("newest"), owned);
    let between: Vec<FinalRecord> = s
        .records_between(i64::MIN, i64::MAX)
        .expect("between")
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(between, owned);
    for r in [&all[0], &all[399], &all[400], &all[899]] {
        assert_eq!(s.get(r.record.id.0).expect("get").as_ref(), Some(&**r));
    }
    let raw = s
        .page_raw(&StoredFilter::default(), u64::MAX, all.len())
        .expect("raw page");
    assert_eq!(raw.len(), all.len());
    for ((id, json), r) in raw.iter().zip(all.iter().rev()) {
        assert_eq!(*id, r.record.id.0);
        assert_eq!(json.get(), serde_json::to_string(&**r).expect("json"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A binary row that does not decode is an error naming the record, for the one record.
#[test]
fn a_damaged_binary_row_is_an_error_naming_its_record() {
    let dir = temp("damaged-row");
    let mut s = Store::open(&dir).expect("open");
    let run = s.begin_run(0).expect("run");
    s.insert(run.run, &varied(0)[..3], false).expect("insert");
    s.conn
        .execute("UPDATE records SET rec = x'01ff' WHERE id = 2", [])
        .expect("damage");
    assert!(matches!(s.get(2), Err(StoreError::Row { id: 2, .. })));
    assert!(s.get(1).expect("get").is_some());
    // The API's memory skips it and starts.
    assert_eq!(s.newest(10).expect("newest").len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Histograms read from the database are input: bytes that are not one are an error, not a
/// panic, and leave the quantiles as they were.
#[test]
fn unreadable_histogram_bytes_are_an_error() {
    let mut q = JouleQuantiles::default();
    q.record(2.0, Some(4));
    let (j, token) = q.to_bytes();
    let before = q.clone();
    // Nothing; another format; cut inside a number; a count of zero; a value above 10 MJ;
    // a number over 64 bits.
    let above = [&[1u8][..], &[0xff; 7], &[0x7f, 1]].concat();
    for bad in [
        &b""[..],
        b"not a histogram at all",
        b"\x01\x80",
        b"\x01\x05\x00",
        &above[..],
        b"\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    ] {
        assert!(matches!(
            q.add_bytes(j.as_deref(), Some(bad)),
            Err(StoreError::Histogram(_))
        ));
        assert_eq!(q, before);
    }
    q.add_bytes(j.as_deref(), token.as_deref())
        .expect("read back");
    assert_eq!(q.requests(), 2);
    // The top of the range: 10 MJ and far above it are kept as 10 MJ, stored and read back.
    let mut big = JouleQuantiles::default();
    big.record(1e7, Some(1));
    big.record(1e9, None);
    let (j, token) = big.to_bytes();
    let mut back = JouleQuantiles::default();
    back.add_bytes(j.as_deref(), token.as_deref())
        .expect("the top bucket reads back");
    assert_eq!(back, big);
    assert_quantiles("10 MJ", &back.per_request_json(), Some([1e7; 4]));
    assert_quantiles("2 J", &q.per_request_json(), Some([2.0; 4]));
    assert_quantiles("0.5 J/token", &q.per_token_json(), Some([0.5; 4]));
}

/// Journals are pruned by whole runs (every segment of a run), and by bytes from the oldest
/// segment on, never the current run's newest two.
#[test]
fn journals_are_pruned_by_run_and_by_bytes() {
    let dir = temp("prune");
    let mut s = Store::open(&dir).expect("open");
    let mut runs = Vec::new();
    for t in 0..3 {
        let r = s.begin_run(t).expect("run");
        s.close_run(r.run, t + 1, r.first_request_id)
            .expect("close");
        runs.push(r.run);
    }
    let current = s.begin_run(9).expect("run").run;
    for run in runs.iter().chain([&current]) {
        for k in 0..3 {
            let p = crate::record::format::segment_path(&s.journal_path(*run), k);
            std::fs::write(&p, vec![0u8; 1000]).expect("segment");
        }
    }
    assert_eq!(s.journal_segments(current).len(), 3);
    // Keep the newest run before this one: the two older runs go, all their segments.
    assert_eq!(s.prune_journals(current, 1).expect("prune"), 6);
    assert!(s.journal_segments(runs[0]).is_empty());
    assert_eq!(s.journal_segments(runs[2]).len(), 3);
    // 6 segments of 1000 bytes left; under 2500 bytes: the oldest go first, but never the
    // current run's newest two.
    assert_eq!(prune_journal_bytes(&dir, current, 2500), 4);
    let left: Vec<u32> = s
        .journal_segments(current)
        .iter()
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(left, vec![1, 2]);
    assert!(s.journal_segments(runs[2]).is_empty());
    assert_eq!(prune_journal_bytes(&dir, current, 0), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
