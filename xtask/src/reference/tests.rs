//! The analysis on a synthetic run whose answers are known in closed form: a power trace made
//! of the four periods' powers, read the way `energy_log.py` reads a real counter (updates every
//! 100 ms, reads every 20 ms taking 3 ms each).

use std::{collections::BTreeMap, fmt::Write as _};

use super::*;

const S: u64 = 1_000_000_000;
const IDLE_W: f64 = 100.0;
const T0: u64 = 1_000 * S;

/// Extra power over idle (W) for a set, and for how long into its period (s).
fn extra(set: &str) -> (f64, u64) {
    match set {
        "A" => (200.0, 8),
        "B" => (150.0, 7),
        "AB" => (280.0, 9),
        _ => (0.0, 0),
    }
}

struct Run {
    periods: Vec<Period>,
    /// `(start_ns, end_ns, extra W)` pieces of the power trace above idle.
    pieces: Vec<(u64, u64, f64)>,
}

fn run() -> Run {
    let orders = [
        ["0", "A", "B", "AB"],
        ["AB", "B", "A", "0"],
        ["B", "AB", "0", "A"],
    ];
    let mut t = T0;
    let mut periods = Vec::new();
    let mut pieces = Vec::new();
    for (rep, order) in orders.iter().enumerate() {
        for set in order {
            let (w, secs) = extra(set);
            pieces.push((t, t + secs * S, w));
            periods.push(Period {
                label: "main".into(),
                rep: rep as u64,
                set: (*set).into(),
                start_ns: t,
                arrive_end_ns: t + 6 * S,
                end_ns: t + 10 * S,
                spill: 0,
            });
            t += 10 * S;
        }
    }
    // One sequential request: 2 s at +100 W, after a second of idle.
    pieces.push((t + S, t + 3 * S, 100.0));
    Run { periods, pieces }
}

fn energy_mj(run: &Run, t: u64) -> f64 {
    let base = IDLE_W * (t + 5 * S - T0) as f64 / 1e6;
    let dynamic: f64 = run
        .pieces
        .iter()
        .map(|&(a, b, w)| w * (t.clamp(a, b) - a) as f64 / 1e6)
        .sum();
    base + dynamic
}

fn log(run: &Run, end: u64) -> String {
    let mut out = String::from("# source synthetic\n");
    let mut t = T0 - 5 * S;
    let mut value = energy_mj(run, t);
    let mut next_update = t + 100_000_000;
    while t < end {
        let t1 = t + 3_000_000;
        if t1 >= next_update {
            value = energy_mj(run, next_update);
            next_update += 100_000_000;
        }
        writeln!(out, "{t} {t1} {}", value as u64).expect("writing to a String");
        t += 20_000_000;
    }
    out
}

fn request(label: &str, id: &str, class: &str, start: u64, end: u64) -> Request {
    Request {
        label: label.into(),
        id: id.into(),
        class: class.into(),
        start_ns: start,
        end_ns: end,
        ok: true,
    }
}

fn inputs() -> Inputs {
    let run = run();
    let mut requests = Vec::new();
    let mut caused = BTreeMap::new();
    for p in run.periods.iter().filter(|p| p.set == "AB") {
        let s = p.start_ns;
        for (i, (class, a, b, j)) in [("A", 0, 4, 800.0), ("A", 1, 5, 800.0), ("B", 2, 3, 460.0)]
            .into_iter()
            .enumerate()
        {
            let id = format!("main-{class}-{}-{i}", p.rep);
            requests.push(request("main", &id, class, s + a * S, s + b * S));
            caused.insert(
                id,
                Figure {
                    dynamic_j: j,
                    bar_j: 100.0,
                },
            );
        }
    }
    let t = run.periods.last().map_or(0, |p| p.end_ns);
    requests.push(request("seq", "seq-A-1", "A", t + S, t + 3 * S));
    caused.insert(
        "seq-A-1".into(),
        Figure {
            dynamic_j: 190.0,
            bar_j: 30.0,
        },
    );
    let counter = Counter::parse(&log(&run, t + 10 * S)).expect("synthetic log parses");
    Inputs {
        counter,
        periods: run.periods,
        requests,
        tput: vec![
            ("tput-pre".into(), 1000.0),
            ("tput-with".into(), 980.0),
            ("tput-post".into(), 1020.0),
        ],
        caused,
        equal: BTreeMap::new(),
        kind: "gpu".into(),
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs()
}

#[test]
fn the_shapley_split_of_a_synthetic_run_is_the_closed_form() {
    let inp = inputs();
    for rep in 0..3 {
        let r = shapley_rep(&inp, "main", rep).expect("rep");
        // D(A) = 200 W × 8 s, D(B) = 150 × 7, D(AB) = 280 × 9.
        assert!(close(r.d_a_j, 1600.0, 0.01), "{r:?}");
        assert!(close(r.d_b_j, 1050.0, 0.01), "{r:?}");
        assert!(close(r.d_ab_j, 2520.0, 0.01), "{r:?}");
        // φ_A = ½[(2520 − 1050) + 1600], φ_B = ½[(2520 − 1600) + 1050].
        assert!(close(r.phi_a_j, 1535.0, 0.01), "{r:?}");
        assert!(close(r.phi_b_j, 985.0, 0.01), "{r:?}");
        assert!(close(r.caused_a.dynamic_j, 1600.0, 1e-9));
        assert!(close(r.caused_b.bar_j, 100.0, 1e-9));
        assert_eq!(r.missing, 0);
        // Both classes in flight during [2 s, 3 s]: two A requests and one B.
        let share = r.presence_a.expect("both classes were in flight");
        assert!(close(share, 2.0 / 3.0, 1e-9), "{share}");
    }
}

#[test]
fn a_sequential_request_is_its_window_less_idle() {
    let seq = sequential(&inputs()).expect("seq");
    assert_eq!(seq.len(), 1);
    assert!(close(seq[0].reference_j, 200.0, 0.02), "{:?}", seq[0]);
}

#[test]
fn the_report_names_every_table() {
    let t = report(&inputs()).expect("report");
    for needle in [
        "Shapley φ",
        "tracer − φ",
        "One request at a time",
        "ratio 0.970",
    ] {
        assert!(t.contains(needle), "{needle} missing in\n{t}");
    }
    assert!(t.contains("not run"), "svc was not run here:\n{t}");
}

#[test]
fn a_counter_that_goes_backwards_is_refused() {
    assert!(Counter::parse("1 2 100\n3 4 200\n5 6 150\n").is_err());
    assert!(Counter::parse("1 2 100\n").is_err());
    assert!(Counter::parse("1 2\n").is_err());
}

#[test]
fn interpolation_places_each_update_between_its_reads() {
    // Updates of 100 mJ seen by reads at 0–10, 100–110 (new value), 200–210 (new value).
    let c = Counter::parse("0 10 0\n100 110 100\n200 210 200\n").expect("parses");
    // The second update is placed at (0 + 110) / 2 = 55, the third at (100 + 210) / 2 = 155.
    assert!(close(c.energy_j(55, 155).expect("inside"), 0.1, 1e-9));
    assert!(
        c.energy_j(0, 10).is_err(),
        "before the first update's midpoint"
    );
}
