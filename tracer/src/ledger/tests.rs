use proptest::prelude::*;

use super::*;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const GPU: DeviceId = DeviceId(0);
const SVC: ServiceId = ServiceId(1);

fn ledger(idle: IdleSource, policy: IdlePolicy) -> Ledger {
    let mut l = Ledger::new(LedgerConfig {
        idle: policy,
        ..LedgerConfig::default()
    })
    .expect("config");
    l.register_device(
        GPU,
        DeviceInfo {
            name: "gpu0".into(),
            kind: DeviceKind::Gpu,
            estimated: false,
            idle,
        },
    );
    l.occupy(GPU, SVC, 0, None).expect("device");
    l
}

/// A counter read every 10 ms for `secs` seconds at constant `watts`, updating every read.
fn constant_power(l: &mut Ledger, from: u64, secs: u64, watts: f64, start_uj: u64) -> u64 {
    let mut uj = start_uj;
    for i in 0..=secs * 100 {
        let ts = from + i * 10 * MS;
        l.counter(GPU, ts, uj, None).expect("device");
        uj += (watts * 10_000.0) as u64;
    }
    uj
}

fn arrive(l: &mut Ledger, id: u64, ts: u64) {
    l.arrive(
        RequestId(id),
        SVC,
        Arrival {
            ts_ns: ts,
            ..Arrival::default()
        },
    )
    .expect("new");
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
    assert!((r.dynamic_j - 100.0).abs() < 1.0, "{r:?}");
    assert!((r.idle_j - 100.0).abs() < 1.0, "{r:?}");
    assert!((r.kwh - r.total_j / 3.6e6).abs() < 1e-12);
    let t = l.totals()[&GPU];
    assert!(t.imbalance_j().abs() < 1e-9);
    // Outside the request (3 s at 200 W): idle 100 W → idle, the rest → unattributed.
    assert!((t.unattributed_j - 300.0).abs() < 2.0, "{t:?}");
    assert!((t.idle_j - 300.0).abs() < 2.0, "{t:?}");
}

#[test]
fn report_policy_keeps_idle_on_the_device() {
    let idle = IdleSource::Configured { watts: 100.0 };
    let mut l = ledger(idle, IdlePolicy::Report);
    arrive(&mut l, 1, S);
    l.end(RequestId(1), 2 * S, 10, Outcome::Complete);
    constant_power(&mut l, 0, 4, 200.0, 0);
    let r = &l.advance(10 * S)[0];
    assert!((r.dynamic_j - 100.0).abs() < 1.0);
    assert!(r.idle_j.abs() < 1e-12);
    assert!(l.totals()[&GPU].imbalance_j().abs() < 1e-9);
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
    }
}

#[test]
fn tokens_policy_weights_decode_rate() {
    let mut l = ledger(IdleSource::Configured { watts: 0.0 }, IdlePolicy::Amortize);
    arrive(&mut l, 1, S);
    arrive(&mut l, 2, S);
    // Both decode from the start; request 1 streams 3x as many tokens.
    l.first_byte(RequestId(1), S);
    l.first_byte(RequestId(2), S);
    for i in 0..100 {
        let ts = S + i * 10 * MS;
        l.events(RequestId(1), ts, 3);
        l.events(RequestId(2), ts, 1);
    }
    l.end(RequestId(1), 2 * S, 10, Outcome::Complete);
    l.end(RequestId(2), 2 * S, 10, Outcome::Complete);
    constant_power(&mut l, 0, 3, 400.0, 0);
    let recs = l.advance(10 * S);
    let e: BTreeMap<u64, f64> = recs.iter().map(|r| (r.id.0, r.total_j)).collect();
    assert!((e[&1] - 300.0).abs() < 10.0, "{e:?}");
    assert!((e[&2] - 100.0).abs() < 10.0, "{e:?}");
    // The split is ambiguous: equal would have said 200 / 200.
    assert!(recs.iter().all(|r| r.uncertainty_j >= 90.0), "{recs:?}");
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
    assert_eq!(l.stats().counter_resets, 1);
    assert!(l.totals()[&GPU].gap_ns > 0);
}

#[test]
fn anomalies_are_counted_not_fatal() {
    let mut l = ledger(IdleSource::Configured { watts: 0.0 }, IdlePolicy::Amortize);
    l.events(RequestId(9), 5, 1);
    l.end(RequestId(9), 5, 0, Outcome::Complete);
    assert_eq!(l.stats().unknown_requests, 2);
    arrive(&mut l, 1, S);
    assert_eq!(
        l.arrive(RequestId(1), SVC, Arrival::default()),
        Err(LedgerError::DuplicateRequest(RequestId(1)))
    );
    l.end(RequestId(1), 2 * S, 0, Outcome::Complete);
    l.end(RequestId(1), 2 * S, 0, Outcome::Complete);
    assert_eq!(l.stats().duplicate_ends, 1);
    l.advance(100 * S);
    l.counter(GPU, 10 * S, 1, None).expect("device");
    l.counter(GPU, 11 * S, 2, None).expect("device");
    assert_eq!(l.stats().late_observations, 2);
    assert_eq!(
        l.counter(DeviceId(7), 0, 0, None),
        Err(LedgerError::UnknownDevice(DeviceId(7)))
    );
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
    assert!(recs[0].uncertainty_j > 0.0);
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
    },
    Arrive {
        id: u64,
        svc: u32,
    },
    Event {
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
        6 => (0..2u32, 1..120u64, 0..50_000_000u64, prop::bool::weighted(0.02))
            .prop_map(|(dev, dt_ms, inc_uj, reset)| Op::Counter { dev, dt_ms, inc_uj, reset }),
        3 => (0..2u32, 0.0..800.0f64).prop_map(|(dev, watts)| Op::Power { dev, watts }),
        2 => (0..20u64, 1..3u32).prop_map(|(id, svc)| Op::Arrive { id, svc }),
        3 => (0..20u64).prop_map(|id| Op::Event { id }),
        2 => (0..20u64).prop_map(|id| Op::End { id }),
        1 => (0..2u32, 1..3u32, prop::option::of(0.0..1.0f64))
            .prop_map(|(dev, svc, weight)| Op::Occupy { dev, svc, weight }),
        1 => (0..2u32, 1..3u32).prop_map(|(dev, svc)| Op::Release { dev, svc }),
        1 => Just(Op::Advance),
    ]
}

/// Runs a timeline; returns records (with the watermark at emission) and the final ledger.
fn run(ops: &[Op], policy: SplitPolicy, idle: IdlePolicy) -> (Vec<(u64, RequestRecord)>, Ledger) {
    let mut l = Ledger::new(LedgerConfig {
        split: policy,
        idle,
        grace_ns: 100 * MS,
        stale_ns: 5 * S,
        ..LedgerConfig::default()
    })
    .expect("config");
    for dev in 0..2 {
        l.register_device(
            DeviceId(dev),
            DeviceInfo {
                name: format!("gpu{dev}"),
                kind: DeviceKind::Gpu,
                estimated: false,
                idle: if dev == 0 {
                    IdleSource::default()
                } else {
                    IdleSource::Configured { watts: 60.0 }
                },
            },
        );
    }
    let mut now = 0u64;
    let mut energy = [0u64; 2];
    // The daemon mints unique ids: Arrive gets a fresh one, later ops pick an arrived request.
    let mut arrived = 0u64;
    let pick = |id: u64, arrived: u64| RequestId(if arrived == 0 { id } else { id % arrived });
    let mut out = Vec::new();
    for op in ops {
        now += 7 * MS;
        match *op {
            Op::Counter {
                dev,
                dt_ms,
                inc_uj,
                reset,
            } => {
                now += dt_ms * MS;
                energy[dev as usize] = if reset {
                    0
                } else {
                    energy[dev as usize] + inc_uj
                };
                let _ = l.counter(DeviceId(dev), now, energy[dev as usize], None);
            }
            Op::Power { dev, watts } => {
                let _ = l.power(DeviceId(dev), now, watts, 25 * MS);
            }
            Op::Arrive { id, svc } => {
                let fresh = arrived;
                arrived += 1;
                let _ = l.arrive(
                    RequestId(fresh),
                    ServiceId(svc),
                    Arrival {
                        ts_ns: now,
                        prompt_tokens: Some(id * 10),
                        cached_tokens: Some(id),
                        ..Arrival::default()
                    },
                );
            }
            Op::Event { id } => l.events(pick(id, arrived), now, 1),
            Op::End { id } => l.end(pick(id, arrived), now, id * 100, Outcome::Complete),
            Op::Occupy { dev, svc, weight } => {
                let _ = l.occupy(DeviceId(dev), ServiceId(svc), now, weight);
            }
            Op::Release { dev, svc } => {
                let _ = l.release(DeviceId(dev), ServiceId(svc), now);
            }
            Op::Advance => {
                for r in l.advance(now) {
                    out.push((l.watermark_ns(), r));
                }
            }
        }
    }
    // Close everything and drain: end open requests, then move far past the stale period.
    for id in 0..arrived {
        l.end(RequestId(id), now, 0, Outcome::Aborted);
    }
    for r in l.advance(now + 100 * S) {
        out.push((l.watermark_ns(), r));
    }
    (out, l)
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
        // Records carry exactly what the devices say requests got.
        let mut seen = BTreeSet::new();
        let mut per_dev: BTreeMap<DeviceId, f64> = BTreeMap::new();
        for (watermark, r) in &records {
            prop_assert!(seen.insert(r.id), "record emitted twice: {:?}", r.id);
            prop_assert!(r.end_ns <= *watermark, "emitted before the watermark covered its end");
            prop_assert!(r.uncertainty_j >= 0.0);
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
    }

    #[test]
    fn same_input_same_output(ops in prop::collection::vec(op(), 1..150)) {
        let (a, la) = run(&ops, SplitPolicy::Auto, IdlePolicy::Amortize);
        let (b, lb) = run(&ops, SplitPolicy::Auto, IdlePolicy::Amortize);
        prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
        prop_assert_eq!(format!("{:?}", la.totals()), format!("{:?}", lb.totals()));
    }
}
