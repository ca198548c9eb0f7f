//! Log-log slopes (the measured exponent of T) and crossover lengths between two curves.

/// Least-squares slope of `ln y` against `ln x`. `None` with fewer than two points.
pub fn loglog_slope(points: &[(f64, f64)]) -> Option<f64> {
    let pts: Vec<(f64, f64)> =
        points.iter().filter(|(x, y)| *x > 0.0 && *y > 0.0).map(|(x, y)| (x.ln(), y.ln())).collect();
    if pts.len() < 2 {
        return None;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Where the upper half of `n` sorted lengths starts: at the middle length, so an even count
/// keeps one more (1K..8K fits 2K, 4K, 8K; 256..32K fits 2K..32K), and never fewer than two.
pub fn upper_half_start(n: usize) -> usize {
    (n.saturating_sub(1) / 2).min(n.saturating_sub(2))
}

/// The slope over the upper half of the lengths (where asymptotics show), as the report uses.
pub fn upper_half_slope(points: &[(f64, f64)]) -> Option<f64> {
    let mut pts = points.to_vec();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    loglog_slope(&pts[upper_half_start(pts.len())..])
}

/// Lengths where curve `a` and curve `b` cross (interpolated in log-log between measured
/// lengths), with which one is faster after the crossing.
pub fn crossovers(a: &[(f64, f64)], b: &[(f64, f64)]) -> Vec<f64> {
    let mut common: Vec<(f64, f64, f64)> = a
        .iter()
        .filter_map(|&(x, ya)| b.iter().find(|(xb, _)| *xb == x).map(|&(_, yb)| (x, ya, yb)))
        .filter(|(_, ya, yb)| *ya > 0.0 && *yb > 0.0)
        .collect();
    common.sort_by(|p, q| p.0.total_cmp(&q.0));
    let mut out = Vec::new();
    for w in common.windows(2) {
        let (x0, a0, b0) = w[0];
        let (x1, a1, b1) = w[1];
        let d0 = a0.ln() - b0.ln();
        let d1 = a1.ln() - b1.ln();
        if d0 == 0.0 {
            out.push(x0);
        } else if d0 * d1 < 0.0 {
            let f = d0 / (d0 - d1);
            out.push((x0.ln() + f * (x1.ln() - x0.ln())).exp());
        }
    }
    out
}

/// `a`'s value over `b`'s at every length both curves reached, shortest first.
pub fn ratios(a: &[(f64, f64)], b: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = a
        .iter()
        .filter_map(|&(x, ya)| b.iter().find(|(xb, _)| *xb == x).map(|&(_, yb)| (x, ya / yb)))
        .filter(|(_, r)| r.is_finite())
        .collect();
    out.sort_by(|p, q| p.0.total_cmp(&q.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_known_exponents() {
        for k in [1.0, 1.5, 2.0] {
            let pts: Vec<(f64, f64)> = (8..16).map(|i| (2f64.powi(i), 3.0 * 2f64.powi(i).powf(k))).collect();
            assert!((loglog_slope(&pts).unwrap() - k).abs() < 1e-12);
        }
        // T log T looks like slope slightly above 1
        let pts: Vec<(f64, f64)> = (10..15)
            .map(|i| {
                let t = 2f64.powi(i);
                (t, t * t.ln())
            })
            .collect();
        let s = upper_half_slope(&pts).unwrap();
        assert!(s > 1.05 && s < 1.15, "{s}");
        // noise-free linear + quadratic: the upper half is closer to 2
        let pts: Vec<(f64, f64)> = (8..16)
            .map(|i| {
                let t = 2f64.powi(i);
                (t, 1000.0 * t + t * t)
            })
            .collect();
        assert!(upper_half_slope(&pts).unwrap() > loglog_slope(&pts[..4]).unwrap());
        assert!(loglog_slope(&[(1.0, 1.0)]).is_none());
        assert_eq!([4, 5, 8, 2, 1].map(upper_half_start), [1, 2, 3, 0, 0]);
    }

    #[test]
    fn finds_crossover() {
        // a = T^2 / 1000, b = T: cross at T = 1000
        let a: Vec<(f64, f64)> = (6..14)
            .map(|i| {
                let t = 2f64.powi(i);
                (t, t * t / 1000.0)
            })
            .collect();
        let b: Vec<(f64, f64)> = (6..14)
            .map(|i| {
                let t = 2f64.powi(i);
                (t, t)
            })
            .collect();
        let x = crossovers(&a, &b);
        assert_eq!(x.len(), 1);
        assert!((x[0] - 1000.0).abs() < 1.0, "{x:?}");
        assert!(crossovers(&b, &b.iter().map(|(t, y)| (*t, y * 2.0)).collect::<Vec<_>>()).is_empty());
    }

    #[test]
    fn ratios_at_the_common_lengths() {
        let a = [(2048.0, 3.0), (1024.0, 2.0), (4096.0, 4.0)];
        let b = [(1024.0, 1.0), (2048.0, 6.0)];
        assert_eq!(ratios(&a, &b), vec![(1024.0, 2.0), (2048.0, 0.5)]);
        assert!(ratios(&a, &[(512.0, 1.0)]).is_empty());
    }
}
