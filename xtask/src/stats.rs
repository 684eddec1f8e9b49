//! Means with Student-t confidence intervals over repetitions, and medians (the bench's
//! rounds, the reference's repetitions).

use std::fmt;

/// A mean and the half-width of its 95 % confidence interval.
#[derive(Debug, Clone, Copy)]
pub struct Mean {
    pub mean: f64,
    pub ci: f64,
}

impl fmt::Display for Mean {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ci.is_finite() {
            write!(f, "{:.0} ± {:.0}", self.mean, self.ci)
        } else {
            write!(f, "{:.0}", self.mean)
        }
    }
}

/// Two-sided 97.5 % quantiles of Student's t for 1–10 degrees of freedom.
const T975: [f64; 10] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
];

/// Mean and 95 % interval (Student t) of independent repetitions; no interval from one.
pub fn mean_ci(x: &[f64]) -> Mean {
    let n = x.len();
    if n == 0 {
        return Mean {
            mean: f64::NAN,
            ci: f64::NAN,
        };
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Mean {
            mean,
            ci: f64::INFINITY,
        };
    }
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = T975.get(n - 2).copied().unwrap_or(1.96);
    Mean {
        mean,
        ci: t * (var / n as f64).sqrt(),
    }
}

/// Median (NaN for none).
pub fn median(x: &[f64]) -> f64 {
    median_in_place(&mut x.to_vec())
}

/// Median, sorting `x`.
pub fn median_in_place(x: &mut [f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.sort_by(f64::total_cmp);
    let n = x.len();
    if n % 2 == 1 {
        x[n / 2]
    } else {
        f64::midpoint(x[n / 2 - 1], x[n / 2])
    }
}
