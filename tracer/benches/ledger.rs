//! Ledger throughput: input events per second on one core.
//!
//! A realistic mix for one GPU: 64 concurrent streaming requests at 50 tokens/s each (one event
//! per token, the batch's events written 10 µs apart), requests of 2–8 s arriving and ending
//! continuously with usage at the end, an energy counter that updates every 100 ms and a power
//! sensor that averages 25 ms of every 100 ms, both polled at 50 Hz (so most reads repeat the
//! last value, as with NVML), and `advance` every 100 ms. Token events dominate, as on a real
//! server. `cargo bench -p tracer --bench ledger`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer::ledger::{
    Arrival, DeviceId, DeviceInfo, DeviceKind, IdleSource, Ledger, LedgerConfig, Outcome,
    RequestId, ServiceId,
};

const MS: u64 = 1_000_000;

#[derive(Clone, Copy)]
enum Op {
    Counter(u64, u64),
    Power(u64, f64),
    Arrive(u64, u64),
    First(u64, u64),
    Token(u64, u64),
    End(u64, u64),
    Advance(u64),
}

fn workload(seconds: u64) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut next_id = 0u64;
    // (id, start, length) for 64 slots, staggered, re-filled as requests end.
    let mut slots: Vec<(u64, u64, u64)> = (0..64)
        .map(|i| {
            next_id += 1;
            (next_id, i * 37 * MS, 2_000 * MS + (i * 97 % 6_000) * MS)
        })
        .collect();
    for &(id, start, _) in &slots {
        ops.push(Op::Arrive(id, start));
    }
    let mut energy_mj = 0u64;
    for tick in 0..seconds * 1000 / 20 {
        let t = tick * 20 * MS;
        // The counter and the power window update every 100 ms; reads in between repeat them.
        if tick % 5 == 0 {
            energy_mj += 30_000; // 300 W for 100 ms
        }
        let window_end = t / (100 * MS) * (100 * MS);
        ops.push(Op::Counter(t, energy_mj));
        ops.push(Op::Power(window_end, 300.0));
        for slot in &mut slots {
            let (id, start, len) = *slot;
            if t < start {
                continue;
            }
            if t == start || (t > start && t - 20 * MS < start) {
                ops.push(Op::First(id, t));
            }
            ops.push(Op::Token(id, t + (id % 64) * 10_000));
            if t >= start + len {
                ops.push(Op::End(id, t));
                next_id += 1;
                *slot = (
                    next_id,
                    t + 10 * MS,
                    2_000 * MS + (next_id * 97 % 6_000) * MS,
                );
                ops.push(Op::Arrive(next_id, t + 10 * MS));
            }
        }
        if tick % 5 == 0 {
            ops.push(Op::Advance(t));
        }
    }
    ops
}

fn feed(ops: &[Op]) -> usize {
    let mut l = Ledger::new(LedgerConfig::default()).expect("config");
    let gpu = DeviceId(0);
    let svc = ServiceId(1);
    l.register_device(
        gpu,
        DeviceInfo {
            name: "gpu0".into(),
            kind: DeviceKind::Gpu,
            estimated: false,
            idle: IdleSource::default(),
        },
    );
    // NVML's energy counter updates every 100 ms on A100/H100.
    l.set_counter_period(gpu, Some(100 * MS)).expect("device");
    l.occupy(gpu, svc, 0, None).expect("device");
    let mut records = 0;
    for op in ops {
        match *op {
            Op::Counter(t, mj) => l.counter(gpu, t, mj * 1000, None).expect("device"),
            Op::Power(t, w) => l.power(gpu, t, w, 25 * MS).expect("device"),
            Op::Arrive(id, t) => l
                .arrive(
                    RequestId(id),
                    svc,
                    Arrival {
                        ts_ns: t,
                        prompt_tokens: Some(500),
                        cached_tokens: Some(100),
                        ..Arrival::default()
                    },
                )
                .expect("fresh id"),
            Op::First(id, t) => l.first_byte(RequestId(id), t),
            Op::Token(id, t) => l.events(RequestId(id), t, 1),
            Op::End(id, t) => {
                l.usage(RequestId(id), None, Some(100), None);
                l.end(RequestId(id), t, 4096, Outcome::Complete);
            }
            Op::Advance(t) => records += l.advance(t).len(),
        }
    }
    // Shutdown: attribute the rest, so every segment's cost is in the figure.
    records + l.finish().len()
}

fn bench(c: &mut Criterion) {
    let ops = workload(20);
    // Sanity: every request that arrived gets its record.
    let arrived = ops.iter().filter(|o| matches!(o, Op::Arrive(..))).count();
    assert_eq!(feed(&ops), arrived);
    let start = std::time::Instant::now();
    let runs = 20;
    for _ in 0..runs {
        std::hint::black_box(feed(&ops));
    }
    let per_s = (ops.len() * runs) as f64 / start.elapsed().as_secs_f64();
    eprintln!(
        "workload: {} input events ({arrived} requests, 20 s of traffic); quick estimate {:.2} M \
         events/s (criterion's figure below is the one to quote)",
        ops.len(),
        per_s / 1e6
    );
    let mut group = c.benchmark_group("ledger");
    group.throughput(Throughput::Elements(ops.len() as u64));
    group.sample_size(10);
    group.bench_function("mixed_input_events", |b| b.iter(|| feed(&ops)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
