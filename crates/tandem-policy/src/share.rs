//! A cloud share held online: of the requests the learned router and the
//! cascade decide, at most a set share go to the cloud.
//!
//! Each such request has one number saying how much it wants out — its
//! *escalation*, `weight × difficulty − confidence`: the router's score
//! (`weight` = `cascade_prior` under the cascade, 1 without it) less the
//! device answer's mean token log-probability (the lower of its first
//! tokens' and the whole answer's). A request goes out when its escalation
//! is above a *cut*. A fixed cut, calibrated once, lets the share drift
//! with the traffic; [`ShareHold`] instead keeps the last requests'
//! escalations and puts the cut where the set share of them lie above it,
//! so the share follows the budget as the traffic changes. No labels are
//! needed: which requests go out is still the router's and the
//! confidence's call, only how many is fixed.
//!
//! Two corrections keep the share from creeping over: a request the router
//! sent out before the device answered counts with the device's typical
//! confidence (the median of the window's answers), not none — its
//! escalation counted as the score alone would sit just above the cut and
//! fall under it as soon as the cut moves up; and the share aimed at is
//! lowered by as much as the window's actual share is over it (and raised
//! as much as it is under).
//!
//! [`bars`] turns a cut into the thresholds the dispatcher applies: the
//! router's score alone above `cut / weight` goes out at once (confidences
//! are at most 0, so no answer could keep it), and below it the device's
//! answer must reach `weight × difficulty − cut`.

use std::collections::VecDeque;

/// Escalations needed before the window's cut is trusted; until then the
/// configured thresholds decide.
pub const WARMUP: usize = 20;

/// One decided request, as the hold remembers it.
#[derive(Debug, Clone, Copy)]
struct Decided {
    escalation: f32,
    out: bool,
}

/// The last requests' escalations and the cut they give.
#[derive(Debug, Clone)]
pub struct ShareHold {
    share: f64,
    window: usize,
    recent: VecDeque<Decided>,
    /// The window's device answers' confidences (as `-confidence`, ≥ 0).
    doubts: VecDeque<f32>,
}

impl ShareHold {
    /// Holds `share` (clamped to 0..1) over the last `window` requests (at
    /// least 1).
    pub fn new(share: f32, window: usize) -> Self {
        let window = window.max(1);
        Self {
            share: f64::from(share.clamp(0.0, 1.0)),
            window,
            recent: VecDeque::with_capacity(window),
            doubts: VecDeque::with_capacity(window),
        }
    }

    /// The share held.
    pub fn share(&self) -> f64 {
        self.share
    }

    /// The share of the window that went out.
    pub fn actual(&self) -> Option<f64> {
        (!self.recent.is_empty())
            .then(|| self.recent.iter().filter(|d| d.out).count() as f64 / self.recent.len() as f64)
    }

    /// The cut for the next request, once [`WARMUP`] escalations (or a
    /// whole window, if smaller) are in.
    pub fn cut(&self) -> Option<f32> {
        if self.recent.len() < WARMUP.min(self.window) {
            return None;
        }
        let aim = 2.0 * self.share - self.actual().unwrap_or(self.share);
        Some(cut(self.recent.iter().map(|d| d.escalation).collect(), aim))
    }

    /// Remembers a decided request: `weighted` is `weight × difficulty` (0
    /// without a router), `confidence` the device answer's as judged (the
    /// lower of its two looks), none if the router sent it out before the
    /// device answered, and `out` whether it went to the cloud. The oldest
    /// leaves a full window; NaN says nothing and is dropped.
    pub fn record(&mut self, weighted: f32, confidence: Option<f32>, out: bool) {
        let doubt = match confidence {
            Some(c) if c.is_nan() => return,
            Some(c) => {
                let d = -c.min(0.0);
                if self.doubts.len() == self.window {
                    self.doubts.pop_front();
                }
                self.doubts.push_back(d);
                d
            }
            None => self.typical_doubt(),
        };
        let escalation = weighted + doubt;
        if escalation.is_nan() {
            return;
        }
        if self.recent.len() == self.window {
            self.recent.pop_front();
        }
        self.recent.push_back(Decided { escalation, out });
    }

    /// The median of the window's doubts (0 with none: the router alone).
    fn typical_doubt(&self) -> f32 {
        let mut v: Vec<f32> = self.doubts.iter().copied().collect();
        v.sort_by(f32::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }

    /// Requests remembered.
    pub fn len(&self) -> usize {
        self.recent.len()
    }

    /// Nothing remembered yet.
    pub fn is_empty(&self) -> bool {
        self.recent.is_empty()
    }
}

/// The cut above which at most `share` of `values` lie: halfway between
/// two neighbouring values, so that rounding in how a request's escalation
/// is computed later cannot move it across. Ties at the cut stay below it
/// (none of them goes), so the share is never exceeded; infinite with no
/// room for any, negative infinite for no values.
pub fn cut(mut values: Vec<f32>, share: f64) -> f32 {
    values.retain(|v| !v.is_nan());
    values.sort_by(|a, b| b.total_cmp(a));
    let out = (share.clamp(0.0, 1.0) * values.len() as f64).floor() as usize;
    let Some(&at) = values.get(out) else {
        return f32::NEG_INFINITY;
    };
    // The smallest value above `at` among those let out.
    let above = values.iter().take(out).rev().find(|&&x| x > at).copied();
    match above {
        None => f32::INFINITY,
        Some(a) if a.is_finite() && at.is_finite() => (a + at) / 2.0,
        Some(_) if at.is_finite() => at + 1.0,
        Some(a) if a.is_finite() => a - 1.0,
        Some(_) => 0.0,
    }
}

/// The thresholds that apply a cut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bars {
    /// The learned router's threshold: a score above it goes out at once.
    /// `None` when the router's score does not count (`weight` 0).
    pub router: Option<f32>,
    /// The cascade's threshold (`cascade_threshold`), to which
    /// `weight × (difficulty − router)` is added as usual.
    pub cascade: f32,
}

/// The thresholds that send out exactly the requests whose escalation is
/// above `cut`: with a weight, the router's threshold `cut / weight` and
/// cascade threshold 0, so the bar `weight × (difficulty − cut / weight)`
/// is `weight × difficulty − cut`; without one, the cascade alone at
/// `−cut`.
pub fn bars(cut: f32, weight: f32) -> Bars {
    if weight > 0.0 {
        Bars {
            router: Some(cut / weight),
            cascade: 0.0,
        }
    } else {
        Bars {
            router: None,
            cascade: -cut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cut_lets_out_at_most_the_share() {
        let v: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let c = cut(v.clone(), 0.3);
        assert_eq!(c, 6.5);
        assert_eq!(v.iter().filter(|&&x| x > c).count(), 3);
        // Ties at the boundary all stay.
        let tied = vec![1.0, 2.0, 2.0, 2.0, 3.0];
        let c = cut(tied.clone(), 0.5);
        assert_eq!(tied.iter().filter(|&&x| x > c).count(), 1);
        assert_eq!(cut(vec![2.0; 4], 0.5), f32::INFINITY);
        assert_eq!(cut(v.clone(), 0.0), f32::INFINITY);
        assert!(v.iter().all(|&x| x > cut(v.clone(), 1.0)));
        assert_eq!(cut(Vec::new(), 0.5), f32::NEG_INFINITY);
        assert_eq!(cut(vec![f32::NAN, 1.0, 0.0], 0.5), 0.5);
        // Infinities (requests that went out whatever) keep it finite.
        assert_eq!(cut(vec![f32::INFINITY, 0.0, 1.0, 2.0], 0.5), 1.5);
    }

    /// Decides `values` in order under `hold` (out when above its cut, or
    /// when `warm` says so while it warms up) and returns what went out.
    fn decide(hold: &mut ShareHold, values: &[f32], warm: impl Fn(f32) -> bool) -> Vec<bool> {
        values
            .iter()
            .map(|&x| {
                let out = hold.cut().map_or(warm(x), |c| x > c);
                hold.record(x, Some(0.0), out);
                out
            })
            .collect()
    }

    /// A fixed pseudo-random stream in 0..1.
    fn stream(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }

    #[test]
    fn the_hold_follows_the_traffic() {
        let mut h = ShareHold::new(0.25, 100);
        for i in 0..WARMUP - 1 {
            h.record(i as f32, Some(0.0), false);
        }
        assert_eq!(h.cut(), None, "not before the warm-up");
        h.record(f32::NAN, Some(0.0), true);
        h.record(0.0, Some(f32::NAN), true);
        assert_eq!(h.len(), WARMUP - 1);
        let mut h = ShareHold::new(0.25, 100);
        // Warming up, a threshold that sends out half.
        let first = decide(&mut h, &stream(400, 1), |x| x > 0.5);
        let share = |v: &[bool]| v.iter().filter(|&&o| o).count() as f64 / v.len() as f64;
        assert!((share(&first[..WARMUP]) - 0.5).abs() < 0.2);
        let settled = share(&first[200..]);
        assert!((0.22..=0.28).contains(&settled), "{settled}");
        // The traffic gets harder by 10: a cut fixed on the first part would
        // send all out; the hold is back at its share once the window has
        // turned over.
        let fixed = h.cut().unwrap_or(f32::NAN);
        let harder: Vec<f32> = stream(400, 2).iter().map(|x| x + 10.0).collect();
        assert!(harder.iter().all(|&x| x > fixed));
        let then = decide(&mut h, &harder, |_| false);
        let settled = share(&then[200..]);
        assert!((0.22..=0.28).contains(&settled), "{settled}");
        assert!(h.actual().is_some_and(|a| (0.2..=0.3).contains(&a)));
        // A window smaller than the warm-up is trusted once full.
        let mut small = ShareHold::new(0.5, 4);
        for x in [0.0, 1.0, 2.0] {
            small.record(x, Some(0.0), x > 1.5);
        }
        assert_eq!(small.cut(), None);
        small.record(3.0, Some(0.0), true);
        assert_eq!(small.cut(), Some(1.5));
    }

    #[test]
    fn what_the_router_sent_counts_with_a_typical_doubt() {
        let mut h = ShareHold::new(0.5, 10);
        // No answer seen yet: the score alone (the router without cascade).
        h.record(0.7, None, true);
        // Answers 0.2, 0.4 and 0.9 unsure (above all, the lower look).
        for c in [-0.2, -0.4, -0.9] {
            h.record(1.0, Some(c), false);
        }
        h.record(2.0, None, true);
        let got: Vec<f32> = h.recent.iter().map(|d| d.escalation).collect();
        assert_eq!(got, vec![0.7, 1.2, 1.4, 1.9, 2.4]);
        // Confidences above 0 (rounding) doubt nothing.
        h.record(1.0, Some(0.01), false);
        assert_eq!(h.recent.back().map(|d| d.escalation), Some(1.0));
    }

    #[test]
    fn a_window_over_its_share_aims_lower() {
        let values: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let mut on = ShareHold::new(0.5, 20);
        let mut over = ShareHold::new(0.5, 20);
        for &x in &values {
            on.record(x, Some(0.0), x >= 10.0);
            over.record(x, Some(0.0), x >= 5.0);
        }
        assert_eq!(on.cut(), Some(9.5));
        // 75% went out: it aims at 25% until that evens out.
        assert_eq!(over.actual(), Some(0.75));
        assert_eq!(over.cut(), Some(14.5));
    }

    #[test]
    fn bars_send_out_what_is_above_the_cut() {
        // weight × d − c > cut  ⇔  c < weight × (d − router) + cascade.
        let (w, k) = (8.0, 0.9);
        let b = bars(k, w);
        for (d, c) in [
            (0.05, -0.6),
            (0.05, -0.3),
            (0.2, -0.01),
            (0.1, -0.2),
            (0.3, 0.0),
        ] {
            let out = w * d - c > k;
            let bar = b.cascade + w * (d - b.router.unwrap_or(f32::NAN));
            assert_eq!(out, c < bar, "d {d} c {c}");
            // Above the router's threshold, no answer could stay.
            if d > b.router.unwrap_or(f32::NAN) {
                assert!(out && bar > 0.0);
            }
        }
        let alone = bars(0.4, 0.0);
        assert_eq!(alone.router, None);
        assert_eq!(alone.cascade, -0.4);
    }
}
