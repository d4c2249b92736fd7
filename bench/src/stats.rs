//! Percentiles and the median/spread summaries of rounds.

use serde::Serialize;

/// Nearest-rank percentile of a sorted slice (0 when empty).
pub fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median, min, max and the half-spread (max-min)/2/median of a set of per-round values.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// (max - min) / 2 / median: the "±" shown in tables.
    pub spread: f64,
}

pub fn summary(values: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let (min, max) = (v[0], v[n - 1]);
    Some(Summary {
        n,
        median,
        min,
        max,
        spread: if median != 0.0 {
            (max - min) / 2.0 / median.abs()
        } else {
            0.0
        },
    })
}

pub fn median(values: &[f64]) -> Option<f64> {
    summary(values).map(|s| s.median)
}

pub fn pct_f64(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    pct(&v, p)
}
