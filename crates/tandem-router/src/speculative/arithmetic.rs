//! The arithmetic of speculative decoding, apart from any transport: the
//! sampling distribution a model's logits give under OpenAI's parameters,
//! the acceptance rule that keeps the target model's distribution, and the
//! draft length that gives the most tokens per second.
//!
//! Greedy decoding accepts a drafted token when it is the target's argmax,
//! so the answer is exactly the target's. With sampling, a drafted token
//! `x` drawn from the draft's distribution `q` is accepted with probability
//! `min(1, p(x)/q(x))`; on rejection the replacement is drawn from
//! `max(0, p - q)`, normalised — the rule of Leviathan et al. and Chen et
//! al., under which every output token is distributed exactly as `p`.

use tandem_api::Sampling;

/// A sparse distribution over token ids, most likely first.
pub type Dist = Vec<(i32, f32)>;

/// Most candidates a draft distribution keeps. It only has to be the
/// distribution the draft token was really drawn from; keeping it small
/// keeps each round's request small.
pub const DRAFT_CANDIDATES: usize = 32;

/// The most likely token.
pub fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as i32
}

/// The distribution sampling draws from, built the way the engine's
/// llama.cpp sampler chain builds it: top-k on the logits, top-p and min-p
/// on their softmax at temperature 1, then the temperature over what is
/// left. `cap` limits the candidates further (draft side only).
pub fn distribution(logits: &[f32], s: &Sampling, cap: Option<usize>) -> Dist {
    if s.is_greedy() || logits.is_empty() {
        return vec![(argmax(logits), 1.0)];
    }
    let temp = s.temperature.unwrap_or(1.0).max(1e-4);
    let k = [
        s.top_k.filter(|&k| k > 0).map(|k| k as usize),
        cap,
        Some(logits.len()),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(logits.len());
    let mut idx: Vec<i32> = (0..logits.len() as i32).collect();
    let by_logit = |a: &i32, b: &i32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_logit);
    let max = logits[idx[0] as usize];
    let at_temp = |idx: &[i32], t: f32| -> Dist {
        idx.iter()
            .map(|&i| (i, ((logits[i as usize] - max) / t).exp()))
            .collect()
    };
    let mut keep = idx.len();
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        let mut d = at_temp(&idx, 1.0);
        normalise(&mut d);
        let mut acc = 0.0;
        keep = 0;
        for &(_, q) in &d {
            keep += 1;
            acc += q;
            if acc >= p {
                break;
            }
        }
    }
    if let Some(m) = s.min_p.filter(|&m| m > 0.0) {
        // p(x) >= m * p(best), i.e. logit(x) >= max + ln(m).
        let floor = max + m.ln();
        let above = idx
            .iter()
            .take_while(|&&i| logits[i as usize] >= floor)
            .count();
        keep = keep.min(above.max(1));
    }
    idx.truncate(keep.max(1));
    let mut dist = at_temp(&idx, temp);
    normalise(&mut dist);
    dist
}

fn normalise(d: &mut Dist) {
    let total: f32 = d.iter().map(|e| e.1).sum();
    if total > 0.0 {
        for e in d.iter_mut() {
            e.1 /= total;
        }
    }
}

fn prob(d: &[(i32, f32)], tok: i32) -> f32 {
    d.iter().find(|e| e.0 == tok).map_or(0.0, |e| e.1)
}

pub fn sample(d: &[(i32, f32)], rng: &mut fastrand::Rng) -> i32 {
    let mut u = rng.f32();
    for &(t, p) in d {
        if u < p {
            return t;
        }
        u -= p;
    }
    d.last().map_or(0, |e| e.0)
}

/// How a round of drafts fared against the target's logits: the accepted
/// prefix length and the target's own next token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: usize,
    pub next: i32,
}

/// `rows[i]` are the target's logits before `draft[i]`; `rows[draft.len()]`
/// those after the whole draft. `q[i]` is the distribution `draft[i]` was
/// drawn from (ignored when greedy).
pub fn verify(
    rows: &[Vec<f32>],
    draft: &[i32],
    q: &[Dist],
    s: &Sampling,
    rng: &mut fastrand::Rng,
) -> Verdict {
    debug_assert_eq!(rows.len(), draft.len() + 1);
    for (i, &d) in draft.iter().enumerate() {
        if s.is_greedy() {
            let best = argmax(&rows[i]);
            if best != d {
                return Verdict {
                    accepted: i,
                    next: best,
                };
            }
            continue;
        }
        let p = distribution(&rows[i], s, None);
        let (px, qx) = (prob(&p, d), q.get(i).map_or(0.0, |q| prob(q, d)));
        // A token the draft could not have drawn is never accepted: qx = 0
        // means the device sent something other than its own draw.
        if qx > 0.0 && rng.f32() * qx < px {
            continue;
        }
        let empty = Vec::new();
        let qi = q.get(i).unwrap_or(&empty);
        let mut residual: Dist = p
            .iter()
            .map(|&(t, pt)| (t, (pt - prob(qi, t)).max(0.0)))
            .filter(|e| e.1 > 0.0)
            .collect();
        normalise(&mut residual);
        let next = if residual.is_empty() {
            sample(&p, rng)
        } else {
            sample(&residual, rng)
        };
        return Verdict { accepted: i, next };
    }
    let last = &rows[draft.len()];
    let next = if s.is_greedy() {
        argmax(last)
    } else {
        sample(&distribution(last, s, None), rng)
    };
    Verdict {
        accepted: draft.len(),
        next,
    }
}

/// Picks the draft length from what the session has measured: the chance
/// a drafted token is accepted, the time to draft one, the network's share
/// of a round, and the target's pass time as a function of the tokens it
/// reads.
///
/// With per-token acceptance `a`, a round with `k` drafts yields
/// `(1 - a^(k+1)) / (1 - a)` tokens (the accepted prefix plus the target's
/// own) and takes `k * draft + network + pass(k + 1)`. Where a pass costs
/// about the same for one token as for ten (a GPU), long drafts pay; where
/// it grows with every token (a CPU), short ones do, and the model learns
/// which from the target's reported pass times (`pass ≈ a + b·n`, fitted
/// by discounted least squares). Of the lengths within 3% of the best
/// rate, the longest is chosen: nearly as fast, fewer cloud passes.
#[derive(Debug, Clone)]
pub struct DraftLength {
    min: usize,
    max: usize,
    /// Discounted counts of accepted and rejected drafted tokens.
    accepted: f64,
    rejected: f64,
    draft_s: Option<f64>,
    net_s: Option<f64>,
    /// Discounted sums for the pass-time fit: weight, n, n², t, n·t.
    fit: [f64; 5],
}

const KEEP: f64 = 0.9;

impl DraftLength {
    pub fn new(min: usize, max: usize) -> Self {
        let max = max.max(1);
        Self {
            min: min.clamp(1, max),
            max,
            // A prior worth a few rounds: acceptance 0.7.
            accepted: 3.5,
            rejected: 1.5,
            draft_s: None,
            net_s: None,
            fit: [0.0; 5],
        }
    }

    /// Per-token acceptance rate as measured so far.
    pub fn acceptance(&self) -> f64 {
        self.accepted / (self.accepted + self.rejected)
    }

    /// Seconds to draft one token, as measured.
    pub fn draft_per_token(&self) -> Option<f64> {
        self.draft_s
    }

    /// Predicted seconds of a target pass over `n` tokens.
    pub fn pass_time(&self, n: usize) -> Option<f64> {
        let [w, sn, snn, st, snt] = self.fit;
        if w <= 0.0 {
            return None;
        }
        let (mn, mt) = (sn / w, st / w);
        let var = snn / w - mn * mn;
        if var < 1e-6 {
            return Some(mt);
        }
        let b = ((snt / w - mn * mt) / var).max(0.0);
        let a = (mt - b * mn).max(0.0);
        Some(a + b * n as f64)
    }

    /// Predicted tokens per second with `k` drafted tokens per round.
    pub fn rate(&self, k: usize) -> Option<f64> {
        let (draft, net, pass) = (self.draft_s?, self.net_s?, self.pass_time(k + 1)?);
        let a = self.acceptance().clamp(0.0, 0.999);
        let tokens = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
        Some(tokens / (k as f64 * draft + net + pass).max(1e-6))
    }

    pub fn next(&self) -> usize {
        let rates: Vec<f64> = match (self.min..=self.max).map(|k| self.rate(k)).collect() {
            Some(r) => r,
            None => return self.max.min(4).max(self.min),
        };
        let best = rates.iter().copied().fold(0.0, f64::max);
        rates
            .iter()
            .rposition(|&r| r >= 0.97 * best)
            .map_or(self.min, |i| i + self.min)
    }

    /// Folds in one round: `drafted` tokens of which `accepted` were kept,
    /// the drafting time (for `drafted` tokens drafted while waiting), the
    /// whole round's time, and the target's pass over `pass_tokens` tokens
    /// (0 s when the target does not say). A round that also carried the
    /// prompt passes `pass_tokens: 0`: long passes run other kernels, and
    /// the fit is for draft-sized ones.
    pub fn observe(
        &mut self,
        drafted: usize,
        accepted: usize,
        draft_s: f64,
        round_s: f64,
        pass_tokens: usize,
        pass_s: f64,
    ) {
        let ewma = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.8 * o + 0.2 * new));
        if drafted > 0 {
            self.accepted = KEEP * self.accepted + accepted as f64;
            self.rejected = KEEP * self.rejected + f64::from(u8::from(accepted < drafted));
            self.draft_s = ewma(self.draft_s, draft_s / drafted as f64);
        }
        self.net_s = ewma(self.net_s, (round_s - pass_s).max(0.0));
        if pass_tokens == 0 {
            return;
        }
        let n = pass_tokens as f64;
        for (sum, x) in self.fit.iter_mut().zip([1.0, n, n * n, pass_s, n * pass_s]) {
            *sum = KEEP * *sum + x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(p: &[f32]) -> Vec<f32> {
        p.iter().map(|x| x.ln()).collect()
    }

    #[test]
    fn greedy_accepts_the_argmax_prefix() {
        let rows = vec![
            logits(&[0.1, 0.8, 0.1]),
            logits(&[0.7, 0.2, 0.1]),
            logits(&[0.1, 0.1, 0.8]),
        ];
        let mut rng = fastrand::Rng::with_seed(1);
        let g = Sampling::greedy();
        assert_eq!(
            verify(&rows, &[1, 0], &[], &g, &mut rng),
            Verdict {
                accepted: 2,
                next: 2
            }
        );
        assert_eq!(
            verify(&rows, &[1, 2], &[], &g, &mut rng),
            Verdict {
                accepted: 1,
                next: 0
            }
        );
        assert_eq!(
            verify(&rows, &[0, 0], &[], &g, &mut rng),
            Verdict {
                accepted: 0,
                next: 1
            }
        );
    }

    #[test]
    fn top_k_and_top_p_cut_the_distribution() {
        let l = logits(&[0.5, 0.3, 0.15, 0.05]);
        let s = Sampling {
            temperature: Some(1.0),
            top_k: Some(3),
            ..Sampling::default()
        };
        let d = distribution(&l, &s, None);
        assert_eq!(d.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!((d.iter().map(|e| e.1).sum::<f32>() - 1.0).abs() < 1e-5);
        let s = Sampling {
            temperature: Some(1.0),
            top_p: Some(0.7),
            ..Sampling::default()
        };
        let d = distribution(&l, &s, None);
        assert_eq!(d.len(), 2);
        assert!((d[0].1 - 0.625).abs() < 1e-4);
    }

    #[test]
    fn min_p_and_top_p_cut_before_the_temperature_as_llama_cpp_does() {
        let l = logits(&[0.5, 0.3, 0.15, 0.05]);
        // min_p 0.25: keeps p >= 0.125, i.e. the first three.
        let s = Sampling {
            temperature: Some(1.0),
            min_p: Some(0.25),
            ..Sampling::default()
        };
        assert_eq!(distribution(&l, &s, None).len(), 3);
        // top_p 0.7 at temperature 2 still keeps two tokens: the cut is
        // taken on the untempered probabilities, then the temperature
        // flattens what is left.
        let s = Sampling {
            temperature: Some(2.0),
            top_p: Some(0.7),
            ..Sampling::default()
        };
        let d = distribution(&l, &s, None);
        assert_eq!(d.len(), 2);
        let (a, b) = (0.5f32.sqrt(), 0.3f32.sqrt());
        assert!((d[0].1 - a / (a + b)).abs() < 1e-4, "{d:?}");
    }

    /// The output of one round is distributed as the target's p, whatever
    /// the draft's q: the property the acceptance rule exists for.
    #[test]
    fn sampled_rounds_keep_the_target_distribution() {
        let p = [0.6f32, 0.3, 0.1];
        let q = [0.2f32, 0.2, 0.6];
        let s = Sampling {
            temperature: Some(1.0),
            ..Sampling::default()
        };
        let rows = vec![logits(&p), logits(&[0.5, 0.5, 1e-9])];
        let qd: Dist = q.iter().enumerate().map(|(i, &x)| (i as i32, x)).collect();
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 200_000;
        let mut counts = [0u32; 3];
        for _ in 0..n {
            let d = sample(&qd, &mut rng);
            let v = verify(&rows, &[d], std::slice::from_ref(&qd), &s, &mut rng);
            let first = if v.accepted == 1 { d } else { v.next };
            counts[first as usize] += 1;
        }
        for (c, want) in counts.iter().zip(p) {
            let got = f64::from(*c) / f64::from(n);
            assert!((got - f64::from(want)).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn draft_length_follows_acceptance_round_trip_and_pass_cost() {
        // A pass that costs the same for 2 or 40 tokens (a GPU).
        let flat = |rtt: f64, accepted: usize| {
            let mut d = DraftLength::new(1, 12);
            d.observe(4, 4, 0.04, rtt + 0.05, 0, 0.05);
            d.observe(8, 8, 0.08, rtt + 0.05, 9, 0.05);
            for _ in 0..30 {
                d.observe(4, accepted, 0.04, rtt + 0.05, 5, 0.05);
            }
            d
        };
        assert!(flat(0.5, 3).next() > flat(0.0, 3).next());
        assert!(flat(0.05, 3).next() >= 4);
        let poor = flat(0.05, 0);
        assert_eq!(poor.next(), 1);
        assert!(poor.acceptance() < 0.1);
        // A pass that grows with every token (a CPU): drafts stay short.
        let mut cpu = DraftLength::new(1, 12);
        cpu.observe(4, 4, 0.18, 2.8, 0, 2.8);
        for i in 0..30 {
            let k = 2 + i % 4;
            let pass = 0.04 + 0.075 * (k + 1) as f64;
            cpu.observe(k, k - 1, 0.045 * k as f64, pass + 0.02, k + 1, pass);
        }
        let pass = cpu.pass_time(13).unwrap();
        assert!((pass - 1.0).abs() < 0.1, "{pass}");
        assert!(cpu.next() <= 3, "{}", cpu.next());
        let mut floor = cpu.clone();
        floor.min = 5;
        assert_eq!(floor.next(), 5);
    }
}
