use proptest::prelude::*;

use super::*;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const GPU: DeviceId = DeviceId(0);
const SVC: ServiceId = ServiceId(1);

fn gpu(idle: IdleSource) -> DeviceInfo {
    DeviceInfo {
        name: "gpu0".into(),
        kind: DeviceKind::Gpu,
        idle,
        ..DeviceInfo::default()
    }
}

/// Registers `dev`. The test counters below update exactly when read (like RAPL): a 1 µs
/// update period says so.
fn register(l: &mut Ledger, dev: DeviceId, info: DeviceInfo) {
    l.register_device(dev, info);
    l.set_counter_period(dev, Some(1_000)).expect("device");
}

fn ledger_with(config: LedgerConfig, idle: IdleSource) -> Ledger {
    let mut l = Ledger::new(config).expect("config");
    register(&mut l, GPU, gpu(idle));
    l.occupy(GPU, SVC, 0, None).expect("device");
    l
}

fn ledger(idle: IdleSource, policy: IdlePolicy) -> Ledger {
    ledger_with(
        LedgerConfig {
            idle: policy,
            ..LedgerConfig::default()
        },
        idle,
    )
}

/// A counter on `dev` read every 10 ms for `secs` seconds at constant `watts`, updating every
/// read.
fn constant_power_on(
    l: &mut Ledger,
    dev: DeviceId,
    from: u64,
    secs: u64,
    watts: f64,
    start_uj: u64,
) -> u64 {
    let mut uj = start_uj;
    for i in 0..=secs * 100 {
        let ts = from + i * 10 * MS;
        l.counter(dev, ts, uj, None).expect("device");
        uj += (watts * 10_000.0) as u64;
    }
    uj
}

fn constant_power(l: &mut Ledger, from: u64, secs: u64, watts: f64, start_uj: u64) -> u64 {
    constant_power_on(l, GPU, from, secs, watts, start_uj)
}

fn arrive_on(l: &mut Ledger, id: u64, svc: ServiceId, ts: u64) {
    l.arrive(
        RequestId(id),
        svc,
        Arrival {
            ts_ns: ts,
            ..Arrival::default()
        },
    )
    .expect("new");
}

fn arrive(l: &mut Ledger, id: u64, ts: u64) {
    arrive_on(l, id, SVC, ts);
}

fn by_id(recs: &[RequestRecord]) -> BTreeMap<u64, &RequestRecord> {
    recs.iter().map(|r| (r.id.0, r)).collect()
}

#[test]
fn lone_request_gets_dynamic_and_amortised_idle() {
    let idle = IdleSource::Configured { watts: 100.0 };
    let mut l = ledger(idle, IdlePolicy::Amortize);
    arrive(&mut l, 1, S);
    l.end(RequestId(1), 2 * S, 10, Outcome::Complete);
    constant_power(&mut l, 0, 4, 200.0, 0);
    let recs = l.advance(10 * S);
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    // ±1 %: the 10 ms counter intervals at its edges go to it whole (dynamic energy of a
    // partly active interval belongs to the active part).
    assert!((r.dynamic_j - 100.0).abs() < 1.5, "{r:?}");
    assert!((r.idle_j - 100.0).abs() < 1.5, "{r:?}");
    assert!((r.kwh - r.total_j / 3.6e6).abs() < 1e-12);
    assert_eq!(r.devices.len(), 1);
    assert!(
        r.uncertainty_j > 0.0 && r.uncertainty_j < 0.1 * r.total_j,
        "{r:?}"
    );
    let t = l.totals()[&GPU];
    assert!(t.imbalance_j().abs() < 1e-9);
    // Outside the request (3 s at 200 W): idle 100 W → idle, the rest → unattributed.
    assert!((t.unattributed_j - 300.0).abs() < 3.0, "{t:?}");
    assert!((t.idle_j - 300.0).abs() < 3.0, "{t:?}");
}

#[test]
fn report_policy_keeps_idle_on_the_device() {
    let idle = IdleSource::Configured { watts: 100.0 };
    let mut l = ledger(idle, IdlePolicy::Report);
    arrive(&mut l, 1, S);
    l.end(RequestId(1), 2 * S, 10, Outcome::Complete);
    constant_power(&mut l, 0, 4, 200.0, 0);
    let r = &l.advance(10 * S)[0];
    assert!((r.dynamic_j - 100.0).abs() < 1.5, "{r:?}");
    assert!(r.idle_j.abs() < 1e-12);
    let t = l.totals()[&GPU];
    assert!(t.imbalance_j().abs() < 1e-9);
    assert!((t.idle_j - 400.0).abs() < 3.0, "{t:?}");
}

#[test]
fn concurrent_requests_split_equally_without_tokens() {
    let mut l = ledger(IdleSource::Configured { watts: 0.0 }, IdlePolicy::Amortize);
    arrive(&mut l, 1, S);
    arrive(&mut l, 2, S);
    l.end(RequestId(1), 2 * S, 10, Outcome::Complete);
    l.end(RequestId(2), 2 * S, 10, Outcome::Complete);
    constant_power(&mut l, 0, 3, 300.0, 0);
    let recs = l.advance(10 * S);
    assert_eq!(recs.len(), 2);
    for r in &recs {
        assert!((r.total_j - 150.0).abs() < 2.0, "{r:?}");
        // Token counts unknown: the equal split is a default, and the bar says so.
        assert!(r.uncertainty_j >= 0.2 * r.total_j, "{r:?}");
    }
    assert_eq!(l.stats().split_fallbacks, l.stats().split_fallbacks.max(1));
}

#[test]
fn time_slicing_follows_who_is_in_flight() {
    // Request 1 runs 1–3 s, request 2 runs 2–3 s: 1 gets 1–2 s alone and half of 2–3 s.
    let mut l = ledger_with(
        LedgerConfig {
            split: SplitPolicy::Equal,
            ..LedgerConfig::default()
        },
        IdleSource::Configured { watts: 0.0 },
    );
    arrive(&mut l, 1, S);
    arrive(&mut l, 2, 2 * S);
    l.end(RequestId(1), 3 * S, 10, Outcome::Complete);
    l.end(RequestId(2), 3 * S, 10, Outcome::Complete);
    constant_power(&mut l, 0, 4, 100.0, 0);
    let recs = l.advance(10 * S);
    let e = by_id(&recs);
    assert!((e[&1].total_j - 150.0).abs() < 2.0, "{recs:?}");
    assert!((e[&2].total_j - 50.0).abs() < 2.0, "{recs:?}");
}

/// A counter on GPU read every 10 ms from `from` to `to`, the power given by `watts(t)`.
fn power_profile(l: &mut Ledger, from: u64, to: u64, watts: impl Fn(u64) -> f64) {
    let mut uj = 0.0;
    let mut t = from;
    while t <= to {
        l.counter(GPU, t, uj as u64, None).expect("device");
        uj += watts(t) * 10_000.0;
        t += 10 * MS;
    }
}

#[test]
fn tokens_policy_weights_decode_rate() {
    let mut l = ledger(
        IdleSource::Configured { watts: 100.0 },
        IdlePolicy::Amortize,
    );
    arrive(&mut l, 1, S);
    arrive(&mut l, 2, S);
    // Both decode from the start; request 1 streams 3x as many tokens; each token costs 0.5 J.
    for i in 0..=100 {
        let ts = S + i * 10 * MS;
        l.events(RequestId(1), ts, 3);
        l.events(RequestId(2), ts, 1);
    }
    l.usage(RequestId(1), Some(0), None, None);
    l.usage(RequestId(2), Some(0), None, None);
    l.end(RequestId(1), 2 * S, 10, Outcome::Complete);
    l.end(RequestId(2), 2 * S, 10, Outcome::Complete);
    power_profile(&mut l, 0, 3 * S, |t| {
        if (S..2 * S).contains(&t) {
            100.0 + 0.5 * 400.0
        } else {
            100.0
        }
    });
    let recs = l.advance(10 * S);
    let e = by_id(&recs);
    // Dynamic 150 / 50 J; idle 100 J amortised 3:1.
    assert!((e[&1].dynamic_j - 150.0).abs() < 5.0, "{recs:?}");
    assert!((e[&2].dynamic_j - 50.0).abs() < 5.0, "{recs:?}");
    assert!((e[&1].total_j - 225.0).abs() < 8.0, "{recs:?}");
    assert_eq!(l.stats().split_fallbacks, 0);
    // The split is ambiguous: equal would have said 150 / 150; the bar carries
    // `split_factor` × that difference.
    let f = l.config().uncertainty.split_factor;
    assert!(recs.iter().all(|r| r.uncertainty_j >= f * 70.0), "{recs:?}");
    let prices = l.cost_model(GPU, SVC).expect("learned");
    assert!((prices.decode_j_per_token - 0.5).abs() < 0.05, "{prices:?}");
    assert!((prices.static_w - 100.0).abs() < 5.0, "{prices:?}");
}

#[test]
fn prefill_step_extension_goes_to_the_prefilling_request() {
    // Request 1 decodes in 20 ms steps from 0.5 s; request 2 arrives at 1.0 s and its prefill
    // makes the step ending at 1.1 s last 100 ms; then both decode until 2 s. With equal
    // weights for everything else, 2 gets the 80 ms the prefill added, on top of half the rest.
    let mut l = ledger_with(
        LedgerConfig {
            split: SplitPolicy::Tokens,
            ..LedgerConfig::default()
        },
        IdleSource::Configured { watts: 0.0 },
    );
    arrive(&mut l, 1, S / 2);
    arrive(&mut l, 2, S);
    let mut t = S / 2;
    while t < 2 * S {
        t += if t == S { 100 * MS } else { 20 * MS };
        l.events(RequestId(1), t, 1);
        if t > S {
            l.events(RequestId(2), t + 100_000, 1);
        }
    }
    for id in [1, 2] {
        l.usage(RequestId(id), Some(0), None, None);
        l.end(RequestId(id), 2 * S + MS, 10, Outcome::Complete);
    }
    constant_power(&mut l, 0, 3, 100.0, 0);
    let recs = l.advance(10 * S);
    let e = by_id(&recs);
    let (one, two) = (e[&1].total_j, e[&2].total_j);
    assert!((one + two - 150.0).abs() < 2.0, "{recs:?}");
    // Equal time slicing would give 2 half of 1.0–2.0 s: 50 J. It gets more.
    assert!(two > 52.0, "{recs:?}");
    let step = e[&2].first_event_ns.expect("streamed");
    assert_eq!(step, S + 100 * MS + 100_000);
}

#[test]
fn wrap_is_undone_and_reset_is_a_counted_gap() {
    let mut l = ledger(IdleSource::Configured { watts: 0.0 }, IdlePolicy::Amortize);
    let range = 1_000_000_000;
    l.counter(GPU, 0, range - 500_000, Some(range))
        .expect("device");
    l.counter(GPU, 10 * MS, range - 100, Some(range))
        .expect("device");
    l.counter(GPU, 20 * MS, 400_000, Some(range))
        .expect("device");
    l.advance(10 * S);
    assert_eq!(l.stats().counter_wraps, 1);
    assert!((l.totals()[&GPU].measured_j - 0.4001).abs() < 1e-9);
    l.counter(GPU, 11 * S, 5, None).expect("device");
    l.counter(GPU, 11 * S + 10 * MS, 100_005, None)
        .expect("device");
    l.advance(20 * S);
    assert_eq!(l.stats().counter_resets, 1);
    // From the last update before the reset to the first one after it.
    assert!(l.totals()[&GPU].gap_ns >= 10 * S, "{:?}", l.totals());
}

#[test]
fn implausible_jump_is_a_gap_not_energy() {
    let mut l = ledger(IdleSource::Configured { watts: 0.0 }, IdlePolicy::Amortize);
    let uj = constant_power(&mut l, 0, 1, 100.0, 0);
    // 1 MJ in 10 ms: a glitch (or a reset to a larger value).
    l.counter(GPU, S + 20 * MS, uj + 1_000_000_000_000, None)
        .expect("device");
    constant_power(&mut l, S + 30 * MS, 1, 100.0, uj + 1_000_000_000_000);
    l.advance(10 * S);
    let t = l.totals()[&GPU];
    assert_eq!(l.stats().implausible_readings, 1);
    assert!(t.measured_j < 250.0, "{t:?}");
    assert!(t.gap_ns > 0, "{t:?}");
}

#[test]
fn anomalies_are_counted_not_fatal() {
    let mut l = ledger(IdleSource::Configured { watts: 0.0 }, IdlePolicy::Amortize);
    l.events(RequestId(9), 5, 1);
    l.end(RequestId(9), 5, 0, Outcome::Complete);
    l.first_byte(RequestId(9), 5);
    l.usage(RequestId(9), Some(1), None, None);
    assert_eq!(l.stats().unknown_requests, 4);
    arrive(&mut l, 1, S);
    assert_eq!(
        l.arrive(RequestId(1), SVC, Arrival::default()),
        Err(LedgerError::DuplicateRequest(RequestId(1)))
    );
    assert_eq!(l.stats().duplicate_requests, 1);
    l.end(RequestId(1), 2 * S, 0, Outcome::Complete);
    l.end(RequestId(1), 2 * S, 0, Outcome::Complete);
    assert_eq!(l.stats().duplicate_ends, 1);
    l.advance(100 * S);
    // Beyond the grace: counted, ignored.
    l.counter(GPU, 10 * S, 1, None).expect("device");
    l.power(GPU, 11 * S, 100.0, 0).expect("device");
    assert_eq!(l.stats().late_observations, 2);
    l.power(GPU, 99 * S, f64::NAN, 0).expect("device");
    l.power(GPU, 99 * S, -1.0, 0).expect("device");
    assert_eq!(l.stats().rejected_power_samples, 2);
    assert_eq!(
        l.counter(DeviceId(7), 0, 0, None),
        Err(LedgerError::UnknownDevice(DeviceId(7)))
    );
    assert_eq!(
        l.occupy(DeviceId(7), SVC, 0, None),
        Err(LedgerError::UnknownDevice(DeviceId(7)))
    );
    assert_eq!(
        l.set_counter_period(DeviceId(7), None),
        Err(LedgerError::UnknownDevice(DeviceId(7)))
    );
}

#[test]
fn invalid_config_is_refused() {
    for bad in [
        LedgerConfig {
            slice_ns: 0,
            ..LedgerConfig::default()
        },
        LedgerConfig {
            max_device_watts: f64::NAN,
            ..LedgerConfig::default()
        },
        LedgerConfig {
            model: CostModelConfig {
                prior_prefill_weight: -1.0,
                ..CostModelConfig::default()
            },
            ..LedgerConfig::default()
        },
    ] {
        assert!(matches!(
            Ledger::new(bad),
            Err(LedgerError::InvalidConfig(_))
        ));
    }
}

#[test]
fn config_is_serde_with_defaults_and_no_unknown_fields() {
    let c: LedgerConfig =
        serde_json::from_str(r#"{"grace_ns": 5, "split": "tokens", "idle": "report"}"#)
            .expect("partial config");
    assert_eq!(c.grace_ns, 5);
    assert_eq!(c.split, SplitPolicy::Tokens);
    assert_eq!(c.idle, IdlePolicy::Report);
    assert_eq!(c.slice_ns, LedgerConfig::default().slice_ns);
    assert!(serde_json::from_str::<LedgerConfig>(r#"{"grace": 5}"#).is_err());
    let d: DeviceInfo = serde_json::from_str(
        r#"{"name": "pkg0", "kind": "cpu_package", "idle": {"source": "configured", "watts": 20}}"#,
    )
    .expect("device");
    assert_eq!(d.idle, IdleSource::Configured { watts: 20.0 });
    let back: LedgerConfig =
        serde_json::from_str(&serde_json::to_string(&c).expect("ser")).expect("de");
    assert_eq!(back, c);
}

#[test]
fn vanished_device_finalises_after_stale_period_with_gap() {
    let mut l = ledger(IdleSource::Configured { watts: 0.0 }, IdlePolicy::Amortize);
    constant_power(&mut l, 0, 1, 100.0, 0);
    arrive(&mut l, 1, S / 2);
    l.end(RequestId(1), 3 * S, 0, Outcome::Complete);
    assert!(l.advance(10 * S).is_empty(), "waits for power data");
    let recs = l.advance(40 * S);
    assert_eq!(recs.len(), 1);
    assert!(recs[0].coverage_gap_ns >= 2 * S - 20 * MS);
    assert!(recs[0].devices[0].coverage_j > 0.0);
    assert_eq!(l.stats().stale_finalisations, 1);
}

#[test]
fn power_only_device_integrates_samples() {
    let mut l = ledger(IdleSource::Configured { watts: 50.0 }, IdlePolicy::Amortize);
    for i in 0..=100 {
        l.power(GPU, i * 10 * MS, 150.0, 0).expect("device");
    }
    l.advance(10 * S);
    let t = l.totals()[&GPU];
    assert!((t.measured_j - 150.0).abs() < 1e-6, "{t:?}");
    assert!((t.idle_j - 50.0).abs() < 1e-6, "{t:?}");
}

#[test]
fn long_request_does_not_hold_others_past_max_defer() {
    let mut l = ledger_with(
        LedgerConfig {
            max_defer_ns: 5 * S,
            ..LedgerConfig::default()
        },
        IdleSource::Configured { watts: 50.0 },
    );
    arrive(&mut l, 1, S); // never ends while we look
    arrive(&mut l, 2, 2 * S);
    l.end(RequestId(2), 3 * S, 0, Outcome::Complete);
    constant_power(&mut l, 0, 20, 150.0, 0);
    let recs = l.advance(12 * S);
    assert_eq!(recs.len(), 1, "request 2 is final despite 1 being open");
    let r = &recs[0];
    // 1–3 s... it shared 2–3 s with request 1: half of 150 W.
    assert!((r.total_j - 75.0).abs() < 3.0, "{r:?}");
    assert!(l.stats().forced_attributions > 0);
    assert!(l.totals()[&GPU].imbalance_j().abs() < 1e-9);
}

#[test]
fn open_requests_expire_and_finish_flushes() {
    let mut l = ledger_with(
        LedgerConfig {
            max_open_ns: 10 * S,
            ..LedgerConfig::default()
        },
        IdleSource::Configured { watts: 0.0 },
    );
    arrive(&mut l, 1, S);
    l.events(RequestId(1), 2 * S, 1);
    arrive(&mut l, 2, 3 * S);
    constant_power(&mut l, 0, 20, 100.0, 0);
    let recs = l.advance(15 * S);
    assert_eq!(l.stats().expired_requests, 1);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].outcome, Outcome::Aborted);
    assert_eq!(recs[0].end_ns, 2 * S, "ends at its last activity");
    let rest = l.finish();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id, RequestId(2));
    assert_eq!(l.stats().requests_open, 0);
}

#[test]
fn tensor_parallel_service_gets_a_share_on_every_device() {
    let mut l = Ledger::new(LedgerConfig::default()).expect("config");
    let (g1, cpu) = (DeviceId(1), DeviceId(2));
    register(&mut l, GPU, gpu(IdleSource::Configured { watts: 50.0 }));
    register(&mut l, g1, gpu(IdleSource::Configured { watts: 50.0 }));
    register(
        &mut l,
        cpu,
        DeviceInfo {
            name: "package-0".into(),
            kind: DeviceKind::CpuPackage,
            estimated: true,
            idle: IdleSource::Configured { watts: 10.0 },
        },
    );
    for d in [GPU, g1, cpu] {
        l.occupy(d, SVC, 0, None).expect("device");
    }
    arrive(&mut l, 1, S);
    l.end(RequestId(1), 2 * S, 0, Outcome::Complete);
    constant_power_on(&mut l, GPU, 0, 3, 250.0, 0);
    constant_power_on(&mut l, g1, 0, 3, 150.0, 0);
    constant_power_on(&mut l, cpu, 0, 3, 30.0, 0);
    let recs = l.advance(10 * S);
    let r = &recs[0];
    assert_eq!(r.devices.len(), 3);
    let want = [250.0, 150.0, 30.0];
    for (share, w) in r.devices.iter().zip(want) {
        assert!(
            (share.dynamic_j + share.idle_j - w).abs() < 0.02 * w,
            "{r:?}"
        );
    }
    assert_eq!(r.devices[2].kind, DeviceKind::CpuPackage);
    assert!(r.devices[2].estimated);
    let sum: f64 = r.devices.iter().map(|d| d.dynamic_j + d.idle_j).sum();
    assert!((sum - r.total_j).abs() < 1e-9);
    assert!(
        (r.uncertainty_j - r.devices.iter().map(|d| d.uncertainty_j).sum::<f64>()).abs() < 1e-9
    );
}

#[test]
fn occupancy_weights_split_services_and_idle_occupants_leave_theirs() {
    let mut l = Ledger::new(LedgerConfig::default()).expect("config");
    let other = ServiceId(2);
    register(&mut l, GPU, gpu(IdleSource::Configured { watts: 100.0 }));
    l.occupy(GPU, SVC, 0, Some(0.75)).expect("device");
    l.occupy(GPU, other, 0, Some(0.25)).expect("device");
    arrive(&mut l, 1, S);
    l.end(RequestId(1), 2 * S, 0, Outcome::Complete);
    constant_power(&mut l, 0, 3, 300.0, 0);
    let r = l.advance(10 * S).remove(0);
    // 3/4 of 1 s at 200 W dynamic and 100 W idle.
    assert!((r.dynamic_j - 150.0).abs() < 3.0, "{r:?}");
    assert!((r.idle_j - 75.0).abs() < 2.0, "{r:?}");
    let t = l.totals()[&GPU];
    assert!(
        t.unattributed_j >= 50.0 - 2.0,
        "the other occupant's share: {t:?}"
    );
    assert!(t.imbalance_j().abs() < 1e-9);
}

#[test]
fn learned_idle_comes_from_quiet_time() {
    let mut l = ledger(IdleSource::default(), IdlePolicy::Report);
    // 5 s quiet at 80 W, then 5 s with a request at 300 W.
    let uj = constant_power(&mut l, 0, 5, 80.0, 0);
    arrive(&mut l, 1, 5 * S + 10 * MS);
    l.end(RequestId(1), 10 * S, 0, Outcome::Complete);
    constant_power(&mut l, 5 * S + 10 * MS, 5, 300.0, uj);
    let r = l.advance(20 * S).remove(0);
    let t = l.totals()[&GPU];
    assert!((t.idle_w - 80.0).abs() < 1.0, "{t:?}");
    assert_eq!(t.idle_basis, IdleBasis::Quiet);
    assert!((r.dynamic_j - 5.0 * 220.0).abs() < 15.0, "{r:?}");
}

#[test]
fn never_quiet_device_flags_its_idle_guess_and_widens_bars() {
    let mut l = ledger(IdleSource::default(), IdlePolicy::Amortize);
    // Busy from the start: the only idle figure is a low quantile of loaded power.
    arrive(&mut l, 1, 0);
    arrive(&mut l, 2, 0);
    for i in 1..400 {
        l.events(RequestId(1), i * 10 * MS, 2);
        l.events(RequestId(2), i * 10 * MS, 1);
    }
    for id in [1, 2] {
        l.usage(RequestId(id), Some(10), None, None);
        l.end(RequestId(id), 4 * S - 5 * MS, 0, Outcome::Complete);
    }
    for i in 0..=400 {
        l.power(GPU, i * 10 * MS, 250.0, 10 * MS).expect("device");
    }
    constant_power(&mut l, 0, 4, 250.0, 0);
    let recs = l.advance(10 * S);
    let t = l.totals()[&GPU];
    assert_eq!(t.idle_basis, IdleBasis::AllPower, "{t:?}");
    assert!(recs.iter().all(|r| r.devices[0].split_j > 0.0), "{recs:?}");
    assert!(t.imbalance_j().abs() < 1e-9);
}

/// A device restarted under sustained load: an earlier run's quiet idle is used instead of a
/// low quantile of loaded power, until this run has quiet time of its own.
#[test]
fn a_restored_idle_stands_until_quiet_time_of_its_own() {
    let mut l = ledger(IdleSource::default(), IdlePolicy::Report);
    assert!(l.restore_idle(GPU, 80.0));
    assert!(!l.restore_idle(GPU, f64::NAN), "not a figure");
    assert!(!l.restore_idle(DeviceId(99), 80.0), "no such device");
    // Busy from the start at 250 W: without the restored figure, idle would be ~250 W.
    arrive(&mut l, 1, 0);
    l.end(RequestId(1), 4 * S - 5 * MS, 0, Outcome::Complete);
    let uj = constant_power(&mut l, 0, 4, 250.0, 0);
    let r = l.advance(10 * S).remove(0);
    let t = l.totals()[&GPU];
    assert_eq!(t.idle_basis, IdleBasis::Restored, "{t:?}");
    assert!((t.idle_w - 80.0).abs() < 1e-9, "{t:?}");
    assert!((r.dynamic_j - 4.0 * 170.0).abs() < 15.0, "{r:?}");
    // Then quiet at 60 W: this run's own figure wins.
    constant_power(&mut l, 4 * S, 6, 60.0, uj);
    l.advance(20 * S);
    let t = l.totals()[&GPU];
    assert_eq!(t.idle_basis, IdleBasis::Quiet, "{t:?}");
    assert!((t.idle_w - 60.0).abs() < 1.0, "{t:?}");
}

/// A configured idle is never replaced by a restored one.
#[test]
fn a_configured_idle_wins_over_a_restored_one() {
    let mut l = ledger(IdleSource::Configured { watts: 50.0 }, IdlePolicy::Report);
    assert!(l.restore_idle(GPU, 80.0));
    constant_power(&mut l, 0, 3, 120.0, 0);
    l.advance(10 * S);
    let t = l.totals()[&GPU];
    assert_eq!(t.idle_basis, IdleBasis::Configured, "{t:?}");
    assert!((t.idle_w - 50.0).abs() < 1e-9, "{t:?}");
}

#[test]
fn late_events_are_counted() {
    let mut l = ledger(IdleSource::Configured { watts: 0.0 }, IdlePolicy::Amortize);
    arrive(&mut l, 1, 0);
    for i in 1..200 {
        l.events(RequestId(1), i * 10 * MS, 1);
    }
    arrive(&mut l, 2, 0);
    l.end(RequestId(2), S, 0, Outcome::Complete);
    constant_power(&mut l, 0, 10, 100.0, 0);
    l.advance(5 * S);
    l.advance(9 * S);
    // Request 1 is open: segments wait (up to max_defer), nothing is pruned, nothing is late.
    l.events(RequestId(1), 50 * MS, 1);
    assert_eq!(l.stats().late_observations, 0);
    assert_eq!(l.stats().reordered_observations, 1);
}

/// One random observation, applied in time order.
#[derive(Debug, Clone)]
enum Op {
    Counter {
        dev: u32,
        dt_ms: u64,
        inc_uj: u64,
        reset: bool,
    },
    Power {
        dev: u32,
        watts: f64,
        window_ms: u64,
    },
    Arrive {
        svc: u32,
    },
    Event {
        id: u64,
    },
    Usage {
        id: u64,
    },
    End {
        id: u64,
    },
    Occupy {
        dev: u32,
        svc: u32,
        weight: Option<f64>,
    },
    Release {
        dev: u32,
        svc: u32,
    },
    Advance,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3u32, 1..120u64, 0..50_000_000u64, prop::bool::weighted(0.02))
            .prop_map(|(dev, dt_ms, inc_uj, reset)| Op::Counter { dev, dt_ms, inc_uj, reset }),
        3 => (0..3u32, 0.0..800.0f64, 0..30u64)
            .prop_map(|(dev, watts, window_ms)| Op::Power { dev, watts, window_ms }),
        2 => (1..3u32).prop_map(|svc| Op::Arrive { svc }),
        4 => (0..20u64).prop_map(|id| Op::Event { id }),
        1 => (0..20u64).prop_map(|id| Op::Usage { id }),
        2 => (0..20u64).prop_map(|id| Op::End { id }),
        1 => (0..3u32, 1..3u32, prop::option::of(0.0..1.0f64))
            .prop_map(|(dev, svc, weight)| Op::Occupy { dev, svc, weight }),
        1 => (0..3u32, 1..3u32).prop_map(|(dev, svc)| Op::Release { dev, svc }),
        1 => Just(Op::Advance),
    ]
}

/// A call on the ledger, with the time it happened.
#[derive(Debug, Clone)]
enum Call {
    Counter(u32, u64, u64),
    Power(u32, u64, f64, u64),
    Arrive(u64, u32, u64),
    Event(u64, u64),
    Usage(u64),
    End(u64, u64),
    Occupy(u32, u32, u64, Option<f64>),
    Release(u32, u32, u64),
    Advance(u64),
}

/// Turns ops into timed calls (the daemon mints fresh ids; later ops pick an arrived request).
fn calls(ops: &[Op]) -> Vec<(u64, Call)> {
    let mut now = 0u64;
    let mut energy = [0u64; 3];
    let mut arrived = 0u64;
    let pick = |id: u64, arrived: u64| if arrived == 0 { id } else { id % arrived };
    let mut out = Vec::new();
    for op in ops {
        now += 7 * MS;
        let call = match *op {
            Op::Counter {
                dev,
                dt_ms,
                inc_uj,
                reset,
            } => {
                now += dt_ms * MS;
                let e = &mut energy[dev as usize];
                *e = if reset { 0 } else { *e + inc_uj };
                Call::Counter(dev, now, *e)
            }
            Op::Power {
                dev,
                watts,
                window_ms,
            } => Call::Power(dev, now, watts, window_ms * MS),
            Op::Arrive { svc } => {
                arrived += 1;
                Call::Arrive(arrived - 1, svc, now)
            }
            Op::Event { id } => Call::Event(pick(id, arrived), now),
            Op::Usage { id } => Call::Usage(pick(id, arrived)),
            Op::End { id } => Call::End(pick(id, arrived), now),
            Op::Occupy { dev, svc, weight } => Call::Occupy(dev, svc, now, weight),
            Op::Release { dev, svc } => Call::Release(dev, svc, now),
            Op::Advance => Call::Advance(now),
        };
        out.push((now, call));
    }
    out
}

fn new_ledger(policy: SplitPolicy, idle: IdlePolicy) -> Ledger {
    let mut l = Ledger::new(LedgerConfig {
        split: policy,
        idle,
        grace_ns: 500 * MS,
        stale_ns: 5 * S,
        max_defer_ns: 3 * S,
        ..LedgerConfig::default()
    })
    .expect("config");
    for dev in 0..3 {
        l.register_device(
            DeviceId(dev),
            DeviceInfo {
                name: format!("dev{dev}"),
                kind: DeviceKind::Gpu,
                idle: match dev {
                    0 => IdleSource::default(),
                    1 => IdleSource::Configured { watts: 60.0 },
                    _ => IdleSource::Configured { watts: 0.0 },
                },
                ..DeviceInfo::default()
            },
        );
        if dev == 1 {
            l.set_counter_period(DeviceId(dev), Some(100 * MS))
                .expect("device");
        }
    }
    // Device 2 only ever reports power (integrated), device 0 and 1 mostly counters.
    l
}

fn apply(l: &mut Ledger, call: &Call, out: &mut Vec<(u64, RequestRecord)>) {
    match *call {
        Call::Counter(dev, ts, e) => {
            if dev != 2 {
                let _ = l.counter(DeviceId(dev), ts, e, None);
            }
        }
        Call::Power(dev, ts, w, win) => {
            let _ = l.power(DeviceId(dev), ts, w, win);
        }
        Call::Arrive(id, svc, ts) => {
            let _ = l.arrive(
                RequestId(id),
                ServiceId(svc),
                Arrival {
                    ts_ns: ts,
                    prompt_tokens: Some(id * 10),
                    cached_tokens: Some(id),
                    ..Arrival::default()
                },
            );
        }
        Call::Event(id, ts) => l.events(RequestId(id), ts, 1),
        Call::Usage(id) => l.usage(RequestId(id), None, Some(id + 3), None),
        Call::End(id, ts) => l.end(RequestId(id), ts, id * 100, Outcome::Complete),
        Call::Occupy(dev, svc, ts, w) => {
            let _ = l.occupy(DeviceId(dev), ServiceId(svc), ts, w);
        }
        Call::Release(dev, svc, ts) => {
            let _ = l.release(DeviceId(dev), ServiceId(svc), ts);
        }
        Call::Advance(now) => {
            for r in l.advance(now) {
                out.push((l.watermark_ns(), r));
            }
        }
    }
}

/// Closes everything and drains: end open requests at `now`, then move far past the stale
/// period.
fn drain(l: &mut Ledger, n: u64, now: u64, out: &mut Vec<(u64, RequestRecord)>) {
    for id in 0..n {
        l.end(RequestId(id), now, 0, Outcome::Aborted);
    }
    for r in l.advance(now + 100 * S) {
        out.push((l.watermark_ns(), r));
    }
}

/// Runs a timeline in order; returns records (with the watermark at emission) and the ledger.
fn run(ops: &[Op], policy: SplitPolicy, idle: IdlePolicy) -> (Vec<(u64, RequestRecord)>, Ledger) {
    let mut l = new_ledger(policy, idle);
    let calls = calls(ops);
    let mut out = Vec::new();
    for (_, c) in &calls {
        apply(&mut l, c, &mut out);
    }
    let n = calls
        .iter()
        .filter(|(_, c)| matches!(c, Call::Arrive(..)))
        .count() as u64;
    let now = calls.last().map_or(0, |c| c.0);
    drain(&mut l, n, now, &mut out);
    (out, l)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_joule_lands_in_exactly_one_place(
        ops in prop::collection::vec(op(), 1..200),
        policy in prop_oneof![Just(SplitPolicy::Auto), Just(SplitPolicy::Equal), Just(SplitPolicy::Tokens), Just(SplitPolicy::Bytes)],
        idle in prop_oneof![Just(IdlePolicy::Report), Just(IdlePolicy::Amortize)],
    ) {
        let (records, ledger) = run(&ops, policy, idle);
        let totals = ledger.totals();
        for t in totals.values() {
            let tol = 1e-6 * t.measured_j.max(1.0);
            prop_assert!(t.imbalance_j().abs() <= tol, "imbalance {t:?}");
            for v in [t.request_dynamic_j, t.request_idle_j, t.idle_j, t.unattributed_j] {
                prop_assert!(v >= -tol, "negative bucket {t:?}");
            }
        }
        // Records carry exactly what the devices say requests got, once each, after the
        // watermark passed their end.
        let mut seen = std::collections::BTreeSet::new();
        let mut per_dev: BTreeMap<DeviceId, f64> = BTreeMap::new();
        for (watermark, r) in &records {
            prop_assert!(seen.insert(r.id), "record emitted twice: {:?}", r.id);
            prop_assert!(r.end_ns <= *watermark, "emitted before the watermark covered its end");
            prop_assert!(r.uncertainty_j >= 0.0 && r.uncertainty_j.is_finite());
            prop_assert!(r.total_j.is_finite());
            for d in &r.devices {
                prop_assert!(d.dynamic_j >= -1e-9 && d.idle_j >= -1e-9);
                *per_dev.entry(d.device).or_default() += d.dynamic_j + d.idle_j;
            }
        }
        for (dev, t) in &totals {
            let got = per_dev.get(dev).copied().unwrap_or(0.0);
            let want = t.request_dynamic_j + t.request_idle_j;
            prop_assert!((got - want).abs() <= 1e-6 * want.max(1.0), "records {got} vs totals {want}");
        }
        prop_assert_eq!(ledger.stats().requests_open, 0);
        prop_assert_eq!(ledger.stats().records_emitted, records.len() as u64);
    }

    #[test]
    fn same_input_same_output(ops in prop::collection::vec(op(), 1..150)) {
        let (a, la) = run(&ops, SplitPolicy::Auto, IdlePolicy::Amortize);
        let (b, lb) = run(&ops, SplitPolicy::Auto, IdlePolicy::Amortize);
        prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
        prop_assert_eq!(format!("{:?}", la.totals()), format!("{:?}", lb.totals()));
        prop_assert_eq!(la.stats(), lb.stats());
    }

    /// Input delivered out of order, but within the grace, gives the same result as in order.
    #[test]
    fn reordering_within_grace_changes_nothing(
        ops in prop::collection::vec(op(), 1..150),
        delays in prop::collection::vec(0..400u64, 150),
    ) {
        let timed = calls(&ops);
        let n = timed.iter().filter(|(_, c)| matches!(c, Call::Arrive(..))).count() as u64;
        let now = timed.last().map_or(0, |c| c.0);
        let (sorted, ls) = {
            let mut l = new_ledger(SplitPolicy::Auto, IdlePolicy::Amortize);
            let mut out = Vec::new();
            for (_, c) in &timed {
                apply(&mut l, c, &mut out);
            }
            drain(&mut l, n, now, &mut out);
            (out, l)
        };
        // Delay observations (not lifecycle order within a request, not `advance`, which is the
        // daemon's own clock) by up to 400 ms of the 500 ms grace.
        let mut shuffled: Vec<(u64, usize, Call)> = timed
            .iter()
            .enumerate()
            .map(|(i, (t, c))| {
                let d = match c {
                    Call::Counter(..) | Call::Power(..) => delays[i % delays.len()] * MS,
                    _ => 0,
                };
                (t + d, i, c.clone())
            })
            .collect();
        shuffled.sort_by_key(|x| (x.0, x.1));
        let mut l = new_ledger(SplitPolicy::Auto, IdlePolicy::Amortize);
        let mut out = Vec::new();
        for (_, _, c) in &shuffled {
            // `advance` stays at its own time: observations due before it arrive after it.
            apply(&mut l, c, &mut out);
        }
        drain(&mut l, n, now, &mut out);
        prop_assert_eq!(l.stats().late_observations, ls.stats().late_observations);
        let a: BTreeMap<u64, &RequestRecord> = sorted.iter().map(|(_, r)| (r.id.0, r)).collect();
        let b: BTreeMap<u64, &RequestRecord> = out.iter().map(|(_, r)| (r.id.0, r)).collect();
        prop_assert_eq!(a.len(), b.len());
        for (id, ra) in &a {
            let rb = b[id];
            prop_assert!(close(ra.total_j, rb.total_j), "{ra:?} vs {rb:?}");
            prop_assert!(close(ra.uncertainty_j, rb.uncertainty_j), "{ra:?} vs {rb:?}");
        }
        for (dev, ta) in ls.totals() {
            let tb = l.totals()[&dev];
            prop_assert!(close(ta.measured_j, tb.measured_j), "{ta:?} vs {tb:?}");
            prop_assert!(close(ta.unattributed_j, tb.unattributed_j), "{ta:?} vs {tb:?}");
        }
    }
}

#[test]
fn queued_requests_share_no_steps_until_their_prefill() {
    // The engine steps every 20 ms from 1 s to 3 s and tells the API process so over IPC.
    // Request 1 runs from 1 s. Request 2 arrives at 1.1 s but waits in the queue until its
    // prefill step at 2.0 s. Request 3 (not streamed, 25 tokens) arrives at 1.1 s and is in
    // the last 25 steps. Time slicing over who is in the engine: 1 alone for 1–2 s, 1 and 2
    // for 2–2.5 s, all three for 2.5–3 s.
    let mut l = ledger_with(
        LedgerConfig {
            split: SplitPolicy::Equal,
            ..LedgerConfig::default()
        },
        IdleSource::Configured { watts: 0.0 },
    );
    arrive(&mut l, 1, S);
    arrive(&mut l, 2, S + 100 * MS);
    arrive(&mut l, 3, S + 100 * MS);
    for k in 0..=100 {
        let end = S + k * 20 * MS;
        l.step_mark(SVC, end, StepSource::Ipc);
        if k == 0 {
            continue;
        }
        l.events(RequestId(1), end + 50_000, 1);
        if end > 2 * S {
            l.events(RequestId(2), end + 100_000, 1);
        }
    }
    for id in [1, 2, 3] {
        l.usage(
            RequestId(id),
            Some(16),
            Some(if id == 3 { 25 } else { 0 }),
            None,
        );
        l.end(RequestId(id), 3 * S + 200_000, 10, Outcome::Complete);
    }
    constant_power(&mut l, 0, 4, 100.0, 0);
    let recs = l.advance(10 * S);
    let e = by_id(&recs);
    let near = |id: u64, want: f64| {
        assert!(
            (e[&id].total_j - want).abs() < 1.5,
            "{id}: want {want} J: {recs:?}"
        );
    };
    near(1, 100.0 + 25.0 + 50.0 / 3.0);
    near(2, 25.0 + 50.0 / 3.0);
    near(3, 50.0 / 3.0);
    assert_eq!(l.stats().step_marks_ipc, 101);

    // Without the engine's clock, request 1's write bursts count request 3's steps.
    let mut l = ledger_with(
        LedgerConfig {
            split: SplitPolicy::Equal,
            step_clock: StepClockPolicy::Writes,
            ..LedgerConfig::default()
        },
        IdleSource::Configured { watts: 0.0 },
    );
    arrive(&mut l, 1, S);
    arrive(&mut l, 3, S + 100 * MS);
    for k in 1..=100 {
        l.events(RequestId(1), S + k * 20 * MS + 50_000, 1);
    }
    l.usage(RequestId(3), Some(16), Some(25), None);
    for id in [1, 3] {
        l.end(RequestId(id), 3 * S + 200_000, 10, Outcome::Complete);
    }
    constant_power(&mut l, 0, 4, 100.0, 0);
    let recs = l.advance(10 * S);
    let e = by_id(&recs);
    assert!((e[&3].total_j - 25.0).abs() < 1.5, "{recs:?}");
}

/// CPU-time weights on a host domain are rates while serving: a service with nothing in
/// flight does not dilute the one that serves, while other processes' weight always counts.
#[test]
fn host_domain_weights_count_only_services_serving_and_other_processes() {
    let mut l = Ledger::new(LedgerConfig::default()).expect("config");
    let (cpu, b) = (DeviceId(3), ServiceId(2));
    register(
        &mut l,
        cpu,
        DeviceInfo {
            name: "cpu0".into(),
            kind: DeviceKind::CpuPackage,
            estimated: false,
            idle: IdleSource::Configured { watts: 10.0 },
        },
    );
    l.occupy(cpu, SVC, 0, Some(60.0)).expect("device");
    l.occupy(cpu, b, 0, Some(60.0)).expect("device");
    l.occupy(cpu, ServiceId::OTHER_PROCESSES, 0, Some(40.0))
        .expect("device");
    arrive_on(&mut l, 1, SVC, S);
    l.end(RequestId(1), 2 * S, 0, Outcome::Complete);
    arrive_on(&mut l, 2, b, 2 * S);
    arrive_on(&mut l, 3, b, 2 * S + S / 2);
    assert!((l.in_flight_fraction(SVC, 0, 4 * S) - 0.25).abs() < 1e-12);
    assert!(
        (l.in_flight_fraction(b, 0, 4 * S) - 0.5).abs() < 1e-12,
        "open: to the end"
    );
    assert!((l.in_flight_fraction(b, 3 * S, 5 * S) - 1.0).abs() < 1e-12);
    assert!(l.in_flight_fraction(ServiceId(9), 0, 4 * S).abs() < 1e-12);
    l.end(RequestId(2), 3 * S, 0, Outcome::Complete);
    l.end(RequestId(3), 3 * S, 0, Outcome::Complete);
    assert!(
        (l.in_flight_fraction(b, 0, 4 * S) - 0.25).abs() < 1e-12,
        "overlap once"
    );
    constant_power_on(&mut l, cpu, 0, 4, 50.0, 0);
    let recs = l.advance(20 * S);
    let got = by_id(&recs);
    // 40 W dynamic for 1 s each; 60 against other processes' 40 while serving.
    assert!((got[&1].dynamic_j - 24.0).abs() < 0.5, "{:?}", got[&1]);
    let b_j = got[&2].dynamic_j + got[&3].dynamic_j;
    assert!((b_j - 24.0).abs() < 0.5, "{b_j}");
}
