use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use super::*;
use crate::{
    ids::{RequestId, ServiceId},
    ledger::{Outcome, RequestRecord},
};

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tracer-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn record(id: u64, end_unix_ms: i64, model: &str, total_j: f64) -> Arc<FinalRecord> {
    Arc::new(FinalRecord {
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
