//! Turning OpenAI's sampling parameters into a llama.cpp sampler chain, and
//! log-probabilities read from the raw logits.

use std::hash::{BuildHasher, Hasher};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use serde_json::{Map, Value};
use tandem_api::{ApiError, Sampling};

/// How many recent tokens `repeat_penalty` looks at (llama.cpp's default).
pub const REPEAT_LAST_N: i32 = 64;

/// Builds the chain llama.cpp applies to one sequence's logits, in
/// llama.cpp's order: penalties, then top-k, top-p, min-p, temperature, and
/// a seeded draw (or argmax when greedy). Penalties look at generated tokens
/// only, as OpenAI's do: presence and frequency over the whole answer,
/// `repeat_penalty` over its last [`REPEAT_LAST_N`] tokens.
pub fn sampler_chain(s: &Sampling, n_vocab: i32, max_new_tokens: u32) -> LlamaSampler {
    let mut chain = Vec::new();
    let repeat = s.repeat_penalty.filter(|&r| r != 1.0 && r > 0.0);
    if let Some(r) = repeat {
        chain.push(LlamaSampler::penalties(n_vocab, REPEAT_LAST_N, r, 0.0, 0.0));
    }
    if s.presence_penalty != 0.0 || s.frequency_penalty != 0.0 {
        let window = i32::try_from(max_new_tokens).unwrap_or(i32::MAX);
        chain.push(LlamaSampler::penalties(
            n_vocab,
            window,
            1.0,
            s.frequency_penalty,
            s.presence_penalty,
        ));
    }
    if s.is_greedy() {
        chain.push(LlamaSampler::greedy());
        return LlamaSampler::chain_simple(chain);
    }
    if let Some(k) = s.top_k.filter(|&k| k > 0) {
        chain.push(LlamaSampler::top_k(i32::try_from(k).unwrap_or(i32::MAX)));
    }
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        chain.push(LlamaSampler::top_p(p, 1));
    }
    if let Some(p) = s.min_p.filter(|&p| p > 0.0) {
        chain.push(LlamaSampler::min_p(p, 1));
    }
    chain.push(LlamaSampler::temp(s.temperature.unwrap_or(1.0)));
    chain.push(LlamaSampler::dist(s.seed.unwrap_or_else(random_seed)));
    LlamaSampler::chain_simple(chain)
}

/// Greedy decoding with llama.cpp's penalties, picking exactly the token
/// that [`sampler_chain`]'s greedy chain picks. llama.cpp copies every
/// logit into a candidate array and looks each one up in the penalties'
/// counts: about 0.35 ms a token for a 150k-token vocabulary, 2–6% of a
/// small model's decoding step. Here only the penalised tokens are touched
/// and the maximum is found in two vectorisable passes.
#[derive(Debug)]
pub struct Greedy {
    penalties: Vec<Penalty>,
    /// The logits with penalties applied, reused across tokens.
    scratch: Vec<f32>,
}

/// One of llama.cpp's `penalties` samplers: a window of recent tokens.
#[derive(Debug)]
struct Penalty {
    last_n: usize,
    repeat: f32,
    freq: f32,
    present: f32,
    window: std::collections::VecDeque<i32>,
    counts: std::collections::HashMap<i32, u32>,
}

impl Penalty {
    fn new(last_n: i32, repeat: f32, freq: f32, present: f32) -> Self {
        Self {
            last_n: usize::try_from(last_n).unwrap_or(0),
            repeat,
            freq,
            present,
            window: std::collections::VecDeque::new(),
            counts: std::collections::HashMap::new(),
        }
    }

    fn accept(&mut self, token: i32) {
        if self.last_n == 0 {
            return;
        }
        *self.counts.entry(token).or_insert(0) += 1;
        if self.window.len() >= self.last_n
            && let Some(old) = self.window.pop_front()
            && let Some(c) = self.counts.get_mut(&old)
        {
            *c -= 1;
            if *c == 0 {
                self.counts.remove(&old);
            }
        }
        self.window.push_back(token);
    }

    /// llama.cpp's formula, applied to one logit of a counted token.
    fn apply(&self, logit: f32, count: u32) -> f32 {
        let l = if logit <= 0.0 {
            logit * self.repeat
        } else {
            logit / self.repeat
        };
        l - count as f32 * self.freq - f32::from(u8::from(count > 0)) * self.present
    }
}

impl Greedy {
    /// The greedy chain for `s`, or `None` when it samples (not greedy).
    pub fn for_sampling(s: &Sampling, max_new_tokens: u32) -> Option<Self> {
        if !s.is_greedy() {
            return None;
        }
        let mut penalties = Vec::new();
        if let Some(r) = s.repeat_penalty.filter(|&r| r != 1.0 && r > 0.0) {
            penalties.push(Penalty::new(REPEAT_LAST_N, r, 0.0, 0.0));
        }
        if s.presence_penalty != 0.0 || s.frequency_penalty != 0.0 {
            let window = i32::try_from(max_new_tokens).unwrap_or(i32::MAX);
            penalties.push(Penalty::new(
                window,
                1.0,
                s.frequency_penalty,
                s.presence_penalty,
            ));
        }
        Some(Self {
            penalties,
            scratch: Vec::new(),
        })
    }

    /// The token to emit after `logits` (one per vocabulary entry).
    pub fn pick(&mut self, logits: &[f32]) -> usize {
        if self.penalties.iter().all(|p| p.counts.is_empty()) {
            return argmax(logits);
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        self.penalise();
        argmax(&self.scratch)
    }

    /// The token to emit among those `allowed` lets through: as llama.cpp
    /// picks after a grammar set the others' logits to minus infinity.
    pub fn pick_where(&mut self, logits: &[f32], allowed: impl Fn(usize) -> bool) -> usize {
        self.scratch.clear();
        self.scratch.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| if allowed(i) { l } else { f32::NEG_INFINITY }),
        );
        self.penalise();
        argmax(&self.scratch)
    }

    /// Applies the penalties to `scratch`, where the logits are.
    fn penalise(&mut self) {
        for p in &self.penalties {
            for (&token, &count) in &p.counts {
                if let Some(l) = usize::try_from(token)
                    .ok()
                    .and_then(|t| self.scratch.get_mut(t))
                {
                    *l = p.apply(*l, count);
                }
            }
        }
    }

    /// Records the token emitted, for the penalties' windows.
    pub fn accept(&mut self, token: i32) {
        for p in &mut self.penalties {
            p.accept(token);
        }
    }
}

/// The first index of the largest value, as llama.cpp's greedy sampler
/// chooses (NaNs are never chosen unless nothing else is there).
pub fn argmax(v: &[f32]) -> usize {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &x in lanes.iter().chain(tail) {
        if x > max {
            max = x;
        }
    }
    v.iter().position(|&x| x == max).unwrap_or(0)
}

/// OpenAI's `logit_bias` (token id → bias in -100..=100) as a sampler, or
/// a 400 naming the entry that is not one.
pub fn logit_bias(
    extra: &Map<String, Value>,
    n_vocab: i32,
) -> Result<Option<LlamaSampler>, ApiError> {
    let Some(map) = extra.get("logit_bias").and_then(Value::as_object) else {
        return Ok(None);
    };
    if map.is_empty() {
        return Ok(None);
    }
    let mut biases = Vec::with_capacity(map.len());
    for (key, value) in map {
        let token = key
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|t| (0..n_vocab).contains(t))
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!(
                        "`{key}` is not a token id of this model (0 to {})",
                        n_vocab - 1
                    ),
                )
            })?;
        let bias = value
            .as_f64()
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!("the bias of token {key} must be a number from -100 to 100"),
                )
            })?;
        // OpenAI's -100 and 100 mean "never" and "always".
        let bias = match bias {
            b if b <= -100.0 => f32::NEG_INFINITY,
            b => b as f32,
        };
        biases.push(LlamaLogitBias::new(LlamaToken(token), bias));
    }
    Ok(Some(LlamaSampler::logit_bias(n_vocab, &biases)))
}

fn random_seed() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// Log-softmax of `logits` at `chosen`, and the `top` most likely tokens
/// with their log-probabilities, most likely first.
pub fn logprobs(logits: &[f32], chosen: usize, top: usize) -> (f32, Vec<(usize, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = max + sum.ln() as f32;
    let chosen_lp = logits.get(chosen).map_or(f32::NEG_INFINITY, |&l| l - log_z);
    if top == 0 {
        return (chosen_lp, Vec::new());
    }
    // A bounded insertion list: top is at most 20, the vocabulary 10^5.
    let mut best: Vec<(usize, f32)> = Vec::with_capacity(top + 1);
    for (i, &l) in logits.iter().enumerate() {
        if best.len() == top && l <= best[top - 1].1 {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= l);
        best.insert(at, (i, l));
        best.truncate(top);
    }
    for entry in &mut best {
        entry.1 -= log_z;
    }
    (chosen_lp, best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_cpp_2::token::data::LlamaTokenData;
    use llama_cpp_2::token::data_array::LlamaTokenDataArray;

    /// llama.cpp's own choice: its sampler chain over a candidate array.
    fn llama_pick(chain: &mut LlamaSampler, logits: &[f32]) -> i32 {
        let mut arr = LlamaTokenDataArray::from_iter(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
            false,
        );
        arr.apply_sampler(chain);
        let tok = arr.selected_token().expect("greedy selects a token").0;
        chain.accept(LlamaToken(tok));
        tok
    }

    #[test]
    fn greedy_picks_what_llama_cpp_picks_also_under_a_mask() {
        let n_vocab = 1000;
        let cases = [
            Sampling {
                temperature: Some(0.0),
                ..Sampling::default()
            },
            Sampling {
                temperature: Some(0.0),
                repeat_penalty: Some(1.3),
                ..Sampling::default()
            },
            Sampling {
                temperature: Some(0.0),
                repeat_penalty: Some(0.8),
                presence_penalty: 0.7,
                frequency_penalty: -0.4,
                ..Sampling::default()
            },
            Sampling {
                top_k: Some(1),
                frequency_penalty: 1.5,
                ..Sampling::default()
            },
        ];
        let mut rng = fastrand::Rng::with_seed(5);
        for s in &cases {
            let mut chain = sampler_chain(s, n_vocab, 40);
            let mut fast = Greedy::for_sampling(s, 40).expect("greedy");
            for step in 0..300 {
                // Few distinct values, so ties and penalised leaders are common;
                // the tokens just picked get the largest logits, so penalties
                // decide.
                let mut logits: Vec<f32> = (0..n_vocab)
                    .map(|_| f32::from(rng.i8(-8..8)) * 0.5)
                    .collect();
                for p in fast.penalties.iter().flat_map(|p| p.window.iter()) {
                    logits[*p as usize] = 4.0 + f32::from(rng.u8(0..3));
                }
                // Every third step a grammar allows some tokens only (or,
                // now and then, none): llama.cpp sees the others at minus
                // infinity.
                let allowed: Vec<bool> = match step % 3 {
                    0 if step % 27 == 0 => vec![false; n_vocab as usize],
                    0 => (0..n_vocab).map(|_| rng.u8(0..4) == 0).collect(),
                    _ => vec![true; n_vocab as usize],
                };
                let masked: Vec<f32> = logits
                    .iter()
                    .zip(&allowed)
                    .map(|(&l, &a)| if a { l } else { f32::NEG_INFINITY })
                    .collect();
                let want = llama_pick(&mut chain, &masked);
                let got = if step % 3 == 0 {
                    fast.pick_where(&logits, |i| allowed[i])
                } else {
                    fast.pick(&logits)
                } as i32;
                assert_eq!(got, want, "{s:?}, step {step}");
                fast.accept(got);
            }
        }
        assert!(Greedy::for_sampling(&Sampling::default(), 8).is_none());
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[1.0]), 0);
        let mut v = vec![0.0f32; 100];
        v[37] = 2.0;
        v[90] = 2.0;
        assert_eq!(argmax(&v), 37);
        v[3] = f32::NAN;
        assert_eq!(argmax(&v), 37);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1.0, -1.0]), 1);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let (lp, top) = logprobs(&logits, 1, 3);
        let total: f32 = logits.iter().map(|&l| (l - 3.0).exp()).sum();
        assert!((lp - (-(total.ln()))).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        let p: f32 = (0..4).map(|i| logprobs(&logits, i, 0).0.exp()).sum();
        assert!((p - 1.0).abs() < 1e-5);
    }
}
