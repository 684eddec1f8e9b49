//! The independent energy log as a function of time.
//!
//! The counter moves in updates (about every 100 ms on NVIDIA GPUs); a read only says that the
//! update it shows happened before it ended and after the previous read (which showed the old
//! value) began. Each update is placed at the middle of that interval, and the energy at any
//! time is interpolated linearly between updates, so a window's energy is not off by a whole
//! update's worth at each end.

use anyhow::{Context as _, Result, bail};

/// Cumulative energy by time: `(t_ns, mj)` at each update, in time order.
#[derive(Debug, Clone)]
pub struct Counter {
    points: Vec<(f64, f64)>,
}

impl Counter {
    /// Reads `t0_ns t1_ns mj` lines (`#` lines are comments).
    pub fn parse(text: &str) -> Result<Self> {
        let mut points = Vec::new();
        let mut prev: Option<(u64, u64)> = None; // (t0 of the previous read, its value)
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let v: Vec<u64> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("energy log line {}: {line:?}", n + 1))?;
            let [t0, t1, mj] = v[..] else {
                bail!("energy log line {}: expected `t0_ns t1_ns mj`", n + 1);
            };
            match prev {
                None => points.push((mid(t0, t1), mj as f64)),
                Some((p0, pv)) if mj != pv => {
                    if mj < pv {
                        bail!("energy log line {}: the counter went backwards", n + 1);
                    }
                    points.push((mid(p0, t1), mj as f64));
                }
                Some(_) => {}
            }
            prev = Some((t0, mj));
        }
        if points.len() < 2 {
            bail!("energy log: fewer than two counter updates");
        }
        Ok(Self { points })
    }

    /// Counter updates seen.
    pub fn updates(&self) -> usize {
        self.points.len() - 1
    }

    /// Median time between updates (ns).
    pub fn median_update_ns(&self) -> f64 {
        let mut d: Vec<f64> = self.points.windows(2).map(|w| w[1].0 - w[0].0).collect();
        crate::stats::median_in_place(&mut d)
    }

    /// Cumulative energy at `t_ns` (mJ).
    fn at(&self, t_ns: u64) -> Result<f64> {
        let t = t_ns as f64;
        let (first, last) = (self.points[0], self.points[self.points.len() - 1]);
        if t < first.0 || t > last.0 {
            bail!("time {t_ns} ns is outside the energy log");
        }
        let i = self.points.partition_point(|p| p.0 <= t).max(1);
        let (a, b) = (
            self.points[i - 1],
            self.points[i.min(self.points.len() - 1)],
        );
        if b.0 <= a.0 {
            return Ok(a.1);
        }
        Ok(a.1 + (b.1 - a.1) * (t - a.0) / (b.0 - a.0))
    }

    /// Energy between two times (J).
    pub fn energy_j(&self, from_ns: u64, to_ns: u64) -> Result<f64> {
        Ok((self.at(to_ns)? - self.at(from_ns)?) / 1000.0)
    }
}

fn mid(a: u64, b: u64) -> f64 {
    f64::midpoint(a as f64, b as f64)
}
