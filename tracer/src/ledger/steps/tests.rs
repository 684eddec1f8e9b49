use super::*;

const MS: u64 = 1_000_000;
const US: u64 = 1_000;

/// A step's chunks written one request at a time, `spacing` apart, after each step end.
fn write_steps(c: &mut StepClock, ends: &[u64], requests: u64, spacing: u64) {
    let mut last: Vec<Option<u64>> = vec![None; requests as usize];
    for &end in ends {
        for k in 0..requests {
            let t = end + 50 * US + k * spacing;
            c.event(t, last[k as usize], 2 * MS, 50 * MS);
            last[k as usize] = Some(t);
        }
    }
}

#[test]
fn ipc_marks_place_chunks_written_long_after_the_step() {
    let mut c = StepClock::default();
    let ends: Vec<u64> = (0..20).map(|i| 100 * MS + i * 10 * MS).collect();
    for &e in &ends {
        c.mark(e, StepSource::Ipc);
        // A second read of the same message: the same step.
        c.mark(e + 20 * US, StepSource::Ipc);
    }
    // 32 requests written 250 µs apart: 8 ms of writing per 10 ms step.
    write_steps(&mut c, &ends, 32, 250 * US);
    let late = ends[5] + 50 * US + 31 * 250 * US;
    assert_eq!(
        c.step_of(late, StepClockPolicy::Auto),
        Some(Step {
            from_ns: ends[4],
            to_ns: ends[5]
        })
    );
    // The write-burst clock cannot separate these steps: the gaps between bursts are 2 ms.
    let w = c.step_of(late, StepClockPolicy::Writes).expect("bursts");
    assert!(w.to_ns <= late);
}

#[test]
fn bursts_chain_a_steps_writes_and_the_window_adapts() {
    let mut c = StepClock::default();
    let ends: Vec<u64> = (0..40).map(|i| 100 * MS + i * 20 * MS).collect();
    // 16 requests, 200 µs apart: 3.2 ms of writing, longer than the initial 2 ms window
    // would merge from a burst's first write but chained write to write.
    write_steps(&mut c, &ends, 16, 200 * US);
    assert_eq!(c.bursts.marks.ends.len(), ends.len());
    // Half the 25th percentile of per-request gaps (20 ms).
    assert_eq!(c.burst_window_ns(2 * MS), 10 * MS);
    let s = c
        .step_of(ends[7] + 2 * MS, StepClockPolicy::Auto)
        .expect("step");
    assert_eq!(s.to_ns, ends[7] + 50 * US);
    assert_eq!(s.from_ns, ends[6] + 50 * US);
    // Out of order: an early write of a step joins its burst.
    c.event(ends[7] + 10 * US, None, 2 * MS, 50 * MS);
    assert_eq!(c.bursts.marks.ends.len(), ends.len());
    assert_eq!(
        c.step_of(ends[7] + MS, StepClockPolicy::Auto)
            .map(|s| s.to_ns),
        Some(ends[7] + 10 * US)
    );
}

#[test]
fn auto_prefers_ipc_then_cuda_then_bursts_where_they_cover() {
    let mut c = StepClock::default();
    let ends: Vec<u64> = (0..10).map(|i| 10 * MS + i * 10 * MS).collect();
    for &e in &ends {
        c.mark(e + 100 * US, StepSource::Cuda);
        c.mark(e + 300 * US + MARK_MERGE_NS, StepSource::Ipc);
    }
    write_steps(&mut c, &ends, 4, 100 * US);
    let t = ends[5] + 900 * US;
    let step = |p| c.step_of(t, p).map(|s| s.to_ns);
    assert_eq!(step(StepClockPolicy::Auto), Some(ends[5] + 600 * US));
    assert_eq!(step(StepClockPolicy::Ipc), Some(ends[5] + 600 * US));
    assert_eq!(step(StepClockPolicy::Cuda), Some(ends[5] + 100 * US));
    assert_eq!(step(StepClockPolicy::Writes), Some(ends[5] + 50 * US));
    // Far from any engine mark (another part of the run): bursts.
    c.event(10_000 * MS, None, 2 * MS, 50 * MS);
    c.event(10_010 * MS, None, 2 * MS, 50 * MS);
    assert_eq!(
        c.step_of(10_010 * MS + US, StepClockPolicy::Auto),
        Some(Step {
            from_ns: 10_000 * MS,
            to_ns: 10_010 * MS
        })
    );
}

#[test]
fn prefill_step_and_steps_back() {
    let mut c = StepClock::default();
    // 20 ms steps; the one ending at 100 ms carried a prefill and lasted 50 ms.
    for e in [10, 30, 50, 100, 120, 140] {
        c.mark(e * MS, StepSource::Ipc);
    }
    let s = c.prefill_step(100 * MS + MS / 5, StepClockPolicy::Auto);
    assert_eq!(s.from_ns, Some(50 * MS));
    assert_eq!(s.to_ns, 100 * MS);
    assert_eq!(s.extension_ns, 30 * MS);
    // A non-streamed response written after the step ending at 140 ms, two tokens: it was in
    // the steps ending at 120 and 140 ms, from 100 ms.
    assert_eq!(
        c.steps_back(141 * MS, 1, StepClockPolicy::Auto),
        Some(100 * MS)
    );
    assert_eq!(c.steps_back(141 * MS, 5, StepClockPolicy::Auto), None);
    // Only bursts, and none near: a non-streamed request's steps cannot be counted.
    assert_eq!(c.steps_back(141 * MS, 1, StepClockPolicy::Writes), None);
    c.prune(125 * MS);
    assert_eq!(c.ipc.ends.front().copied(), Some(100 * MS));
}

#[test]
fn prefill_rate_is_the_median_of_reported_prefills() {
    let mut c = StepClock::default();
    for (ext, tokens) in [(4 * MS, 100), (40 * MS, 100)] {
        c.prefill_sample(ext, tokens);
    }
    // Too few to size anything yet; nothing learned from an empty prefill.
    c.prefill_sample(0, 100);
    c.prefill_sample(MS, 0);
    assert_eq!(c.prefill_ns_per_token(), None);
    c.prefill_sample(12 * MS, 300);
    // 40 µs per token; the outlier (a step two prefills shared) does not move it.
    assert_eq!(c.prefill_ns_per_token(), Some(40_000.0));
}

#[test]
fn a_closed_prefill_period_teaches_the_rate_not_one_step() {
    let mut c = StepClock::default();
    // Periods of 40 µs per token. The first: one group, its step only. The second: two groups;
    // the second's step alone would say 31 µs (the first's last chunk ran in the step before).
    c.period_group((true, true), 4e6, Some(100));
    c.period_group((true, true), 2e6, Some(20));
    c.period_group((false, false), 4e6, Some(130));
    // A period with a prompt of unknown size, or whose start was not seen, teaches nothing.
    c.period_group((true, true), 9e6, None);
    c.period_group((true, false), 9e6, Some(100));
    c.period_group((true, true), 16e6, Some(400));
    assert_eq!(
        c.prefill_ns_per_token(),
        None,
        "two periods so far, the last still open"
    );
    c.period_group((true, true), 0.0, Some(1));
    assert_eq!(c.prefill_ns_per_token(), Some(40_000.0));
}

#[test]
fn a_chunked_prefill_is_followed_back_through_orphan_stretched_steps() {
    let mut c = StepClock::default();
    // 10 ms steps; the steps ending at 200 and 230 ms carried chunks (30 ms each) of a prefill
    // whose first token came out of the step ending at 260 ms (also 30 ms). The step ending at
    // 160 ms was stretched too, but finished another request's prefill (its first event).
    let mut ends: Vec<u64> = (0..=14).map(|i| i * 10 * MS).collect(); // 0..140
    ends.extend([170, 200, 230, 260].map(|e| e * MS));
    ends.extend((1..=20).map(|i| 260 * MS + i * 10 * MS));
    for &e in &ends {
        c.mark(e, StepSource::Ipc);
    }
    // Another request's first event, written after the step ending at 170 ms (first seen as
    // one written after the step ending at 230 ms: an earlier event came in late).
    c.first_event(230 * MS + 100 * US);
    c.move_first_event(230 * MS + 100 * US, 170 * MS + 100 * US);
    let p = c.prefill_step(260 * MS + 100 * US, StepClockPolicy::Auto);
    assert_eq!(
        (p.from_ns, p.to_ns, p.extension_ns),
        (Some(230 * MS), 260 * MS, 20 * MS)
    );
    // Back through both orphan chunks, nearest first, stopping at the other request's step.
    let chain = c.chain_before(230 * MS, 0, StepClockPolicy::Auto);
    let chunk = |from: u64, to: u64, own: u64| Chunk {
        from_ns: from * MS,
        to_ns: to * MS,
        own_ns: (own * MS) as f64,
    };
    assert_eq!(chain.steps, vec![chunk(200, 230, 20), chunk(170, 200, 20)]);
    // What that request left of its step is not known yet: nothing of it.
    assert_eq!(chain.boundary, Some(chunk(140, 170, 0)));
    // Once allocated, what it left (5 ms of its 20) can be this prefill's first chunk.
    c.set_leftover(170 * MS, 5e6);
    assert_eq!(c.leftover(170 * MS), Some(5e6));
    assert_eq!(c.leftover(160 * MS), None);
    let chain = c.chain_before(230 * MS, 0, StepClockPolicy::Auto);
    assert_eq!(chain.boundary, Some(chunk(140, 170, 5)));
    // A step no longer than usual ends the chain: nothing before the step ending at 100 ms.
    assert_eq!(
        c.chain_before(100 * MS, 0, StepClockPolicy::Auto),
        Chain::default()
    );
    // Nothing ran for a prefill before its request came in (at 215 ms): of the step ending at
    // 230 ms only the 15 ms since, less a usual step's 10.
    let chain = c.chain_before(230 * MS, 215 * MS, StepClockPolicy::Auto);
    assert_eq!(chain.steps, vec![chunk(215, 230, 5)]);
    assert!(chain.boundary.is_none() && !chain.truncated);
    // The non-streamed way in: the end of a request's first step, counted back.
    assert_eq!(
        c.end_back(300 * MS + US, 4, StepClockPolicy::Auto),
        Some(260 * MS)
    );
}

#[test]
fn a_prompt_without_usage_is_sized_from_its_body() {
    let mut c = StepClock::default();
    c.prompt_sample(0, 100);
    for (bytes, tokens) in [(4000, 1000), (400, 100), (800, 190)] {
        assert_eq!(c.prompt_estimate(1000), None, "too few samples yet");
        c.prompt_sample(bytes, tokens);
    }
    // The median density: 0.25 tokens per byte.
    assert_eq!(c.prompt_estimate(2000), Some(500.0));
}
