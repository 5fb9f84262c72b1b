//! What the cascade taught the router: for prompts like this one, did the
//! device's answer stand or was it escalated?
//!
//! Each cascaded request leaves an [`Outcome`] — the prompt's vector as the
//! router reads it (8 bits a dimension), its partition (as the semantic
//! cache partitions: key and privacy mode) and whether the device's answer
//! was escalated. No prompt text is kept. A new prompt's escalation rate
//! among its close neighbours ([`Outcomes::estimate`]) is blended into the
//! router's difficulty ([`blend`]): prompts like those the device failed go
//! to the cloud at once instead of costing the device a first attempt, and
//! prompts like those it answered well stay, whatever the router thought.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::learned::quantise;

/// The `[router.memory]` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Learn from the cascade's outcomes (needs a learned router, whose
    /// vectors it reads, and the cascade).
    #[serde(default)]
    pub enabled: bool,
    /// Outcomes kept; the oldest go first.
    #[serde(default = "d_max")]
    pub max_entries: usize,
    /// Cosine similarity from which a past prompt counts as a neighbour.
    #[serde(default = "d_similarity")]
    pub similarity: f32,
    /// Neighbours consulted at most.
    #[serde(default = "d_k")]
    pub k: usize,
    /// How many neighbours' worth of weight the router's own score has: with
    /// this many close neighbours, the two count equally.
    #[serde(default = "d_prior")]
    pub prior: f32,
    /// Default: `$TANDEM_HOME/router/outcomes.jsonl`.
    #[serde(default)]
    pub path: Option<std::path::PathBuf>,
}

fn d_max() -> usize {
    20_000
}
fn d_similarity() -> f32 {
    0.95
}
fn d_k() -> usize {
    16
}
fn d_prior() -> f32 {
    4.0
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_entries: d_max(),
            similarity: d_similarity(),
            k: d_k(),
            prior: d_prior(),
            path: None,
        }
    }
}

/// One cascaded request's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// A digest of the partition (key and privacy mode), not the key.
    pub partition: String,
    /// The prompt's unit vector, 8 bits a dimension.
    #[serde(with = "crate::learned::b64")]
    pub vector: Vec<i8>,
    /// The device's answer was escalated.
    pub escalated: bool,
}

impl Outcome {
    /// An outcome of a prompt with the router's (unit) vector `v`.
    pub fn new(partition: &str, v: &[f32], escalated: bool) -> Outcome {
        Outcome {
            partition: partition.to_owned(),
            vector: quantise(v).collect(),
            escalated,
        }
    }
}

/// What the neighbours say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Their similarity-weighted escalation rate.
    pub escalated: f32,
    /// Their total weight (similarities summed).
    pub weight: f32,
    /// How many there were.
    pub neighbours: usize,
}

/// The outcomes remembered, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Outcomes {
    entries: VecDeque<Outcome>,
    max: usize,
}

impl Outcomes {
    /// Empty, holding at most `max` outcomes.
    pub fn new(max: usize) -> Outcomes {
        Outcomes {
            entries: VecDeque::new(),
            max: max.max(1),
        }
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// None kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Remembers one, forgetting the oldest beyond the limit.
    pub fn push(&mut self, o: Outcome) {
        while self.entries.len() >= self.max {
            self.entries.pop_front();
        }
        self.entries.push_back(o);
    }

    /// The escalation rate among the `k` most similar outcomes of the same
    /// partition at or above `similarity`; `None` when there are none.
    pub fn estimate(&self, partition: &str, v: &[f32], cfg: &MemoryConfig) -> Option<Estimate> {
        let q: Vec<i16> = quantise(v).map(i16::from).collect();
        let mut best: Vec<(f32, bool)> = Vec::with_capacity(cfg.k + 1);
        for o in &self.entries {
            if o.partition != partition || o.vector.len() != q.len() {
                continue;
            }
            let dot: i32 = o
                .vector
                .iter()
                .zip(&q)
                .map(|(&a, &b)| i32::from(i16::from(a) * b))
                .sum();
            let sim = dot as f32 / (127.0 * 127.0);
            if sim < cfg.similarity {
                continue;
            }
            let at = best.partition_point(|&(s, _)| s >= sim);
            best.insert(at, (sim, o.escalated));
            best.truncate(cfg.k.max(1));
        }
        if best.is_empty() {
            return None;
        }
        let weight: f32 = best.iter().map(|b| b.0).sum();
        let escalated: f32 = best.iter().filter(|b| b.1).map(|b| b.0).sum();
        Some(Estimate {
            escalated: escalated / weight,
            weight,
            neighbours: best.len(),
        })
    }

    /// Every outcome, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Outcome> {
        self.entries.iter()
    }
}

/// The router's difficulty (a percentile in [0, 1]) moved towards the
/// neighbours' escalation rate, in proportion to their weight against the
/// router's `prior`. With no neighbours it is the router's own.
pub fn blend(difficulty: f32, estimate: Option<Estimate>, prior: f32) -> f32 {
    match estimate {
        Some(e) if e.weight > 0.0 => {
            let prior = prior.max(0.0);
            (prior * difficulty + e.weight * e.escalated) / (prior + e.weight)
        }
        _ => difficulty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn neighbours_of_the_same_partition_decide() {
        let cfg = MemoryConfig::default();
        let mut m = Outcomes::new(100);
        let a = unit(&[1.0, 0.0, 0.0]);
        let near_a = unit(&[1.0, 0.1, 0.0]);
        let b = unit(&[0.0, 1.0, 0.0]);
        for _ in 0..4 {
            m.push(Outcome::new("p", &a, true));
            m.push(Outcome::new("p", &b, false));
            m.push(Outcome::new("other", &a, false));
        }
        let e = m.estimate("p", &near_a, &cfg).unwrap();
        assert_eq!(e.neighbours, 4);
        assert!((e.escalated - 1.0).abs() < 1e-6);
        assert!((blend(0.2, Some(e), 4.0) - 0.6).abs() < 0.02);
        assert_eq!(m.estimate("p", &unit(&[0.0, 0.0, 1.0]), &cfg), None);
        assert_eq!(m.estimate("nobody", &a, &cfg), None);
        assert_eq!(blend(0.3, None, 4.0), 0.3);
        // The router alone when its prior outweighs everything.
        assert!((blend(0.3, Some(e), 1e9) - 0.3).abs() < 1e-6);
    }

    #[test]
    fn the_oldest_are_forgotten_first() {
        let mut m = Outcomes::new(2);
        let a = unit(&[1.0, 0.0]);
        m.push(Outcome::new("p", &a, true));
        m.push(Outcome::new("p", &a, false));
        m.push(Outcome::new("p", &a, false));
        assert_eq!(m.len(), 2);
        let e = m.estimate("p", &a, &MemoryConfig::default()).unwrap();
        assert_eq!(e.escalated, 0.0);
    }

    #[test]
    fn outcomes_round_trip_without_text() {
        let o = Outcome::new("p", &unit(&[0.6, 0.8]), true);
        let line = serde_json::to_string(&o).unwrap();
        assert_eq!(serde_json::from_str::<Outcome>(&line).unwrap(), o);
    }
}
