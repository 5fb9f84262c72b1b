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
