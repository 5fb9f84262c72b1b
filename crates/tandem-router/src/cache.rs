//! The semantic cache: answers kept and served again for prompts that mean
//! the same, without a backend — so also when the device is offline.
//!
//! An entry is found only within its partition (the API key and the privacy
//! mode), only for the same conversation before the last user message
//! (every field of every message: tool calls, names), the same model name,
//! length limits, sampling and other request fields (all but those that
//! say who asks or how to bill, such as `user`), only when the last user
//! message's *literals* are the same ([`literals`]: its numbers, negations
//! and capitalised names, in order — what a sentence vector blurs, and
//! what changes the answer), and only when its embedding is at least
//! `similarity` close (cosine). Prompts in
//! which the privacy detector found anything are neither stored nor served.
//! The cache keeps at most `max_entries`, evicting the least recently used,
//! and appends every new entry to a JSON Lines file that is compacted when
//! it grows to twice the bound.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tandem_api::{FinishReason, GenerateRequest, Input, Usage};

fn d_true() -> bool {
    true
}
fn d_similarity() -> f32 {
    0.92
}
fn d_max() -> usize {
    10_000
}

/// The `[cache]` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Keep and serve answers.
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Cosine similarity of the last user message's embeddings needed for a hit.
    #[serde(default = "d_similarity")]
    pub similarity: f32,
    /// Answers kept at most.
    #[serde(default = "d_max")]
    pub max_entries: usize,
    /// Keep local answers too (cloud answers are always kept).
    #[serde(default)]
    pub local_answers: bool,
    /// Default: `$TANDEM_HOME/cache/answers.jsonl`.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("defaults parse"))
    }
}

/// What a lookup is keyed by, computed once per request.
#[derive(Debug, Clone)]
pub struct CacheKey {
    partition: String,
    context: String,
    text: String,
}

impl CacheKey {
    /// `None` when the request is not one to cache: logprobs, tools,
    /// structured output or token biases asked for, a continuation, or
    /// content parts other than text. (Several choices skip the cache
    /// where they are made, one request each.)
    pub fn new(req: &GenerateRequest, key: Option<&str>, privacy: &str) -> Option<CacheKey> {
        if req.logprobs.is_some()
            || ["tools", "functions", "response_format", "logit_bias"]
                .iter()
                .chain(tandem_api::GUIDED_FIELDS)
                .any(|f| req.extra.get(*f).is_some_and(|v| !v.is_null()))
        {
            return None;
        }
        let mut h = Sha256::new();
        let mut field = |s: &str| {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        field(&req.model);
        field(&format!("{:?}", req.max_tokens));
        // A different temperature, seed or penalty asks for a different
        // answer: one made greedily must not stand in for it. (Debug's form
        // may change between versions; that costs only misses.)
        field(&format!("{:?}", req.sampling));
        for s in &req.stop {
            field(s);
        }
        // Every field Tandem passes on uninterpreted (`reasoning_effort`,
        // `modalities`, `prediction`...) may change the answer; only those
        // that say who asks or how to bill do not. An unknown field costs a
        // miss, never another request's answer.
        field("fields");
        for (k, v) in &req.extra {
            if !ANSWER_NEUTRAL.contains(&k.as_str()) {
                field(k);
                field(&canonical(v));
            }
        }
        let text = match &req.input {
            Input::Chat {
                messages,
                continue_from,
            } => {
                if continue_from.is_some() {
                    return None;
                }
                let (last, before) = messages.split_last()?;
                // Images, audio and files are not in the key: two requests
                // with the same words may show different pictures.
                if last.role != "user" || messages.iter().any(|m| m.parts.is_some()) {
                    return None;
                }
                field("chat");
                // The whole message, not its text alone: an assistant's
                // tool call (`book({"city": "Paris"})`) or a participant's
                // `name` changes what the next question asks.
                for m in before {
                    field(&m.role);
                    field(&m.content);
                    message_fields(m, &mut field);
                }
                field("last");
                message_fields(last, &mut field);
                last.content.clone()
            }
            Input::Text {
                prompt,
                continue_from,
            } => {
                if continue_from.is_some() {
                    return None;
                }
                field("text");
                prompt.clone()
            }
        };
        // Two prompts that differ only in a number, a "not" or a name
        // embed alike (cosine 0.97 for "Which of these is (not) a mammal")
        // but want different answers: they must match exactly.
        field("literals");
        for l in literals(&text) {
            field(&l);
        }
        Some(CacheKey {
            partition: format!("{}|{privacy}", key.unwrap_or("-")),
            context: hex::encode(h.finalize()),
            text,
        })
    }

    /// The text whose embedding is compared.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Request fields that change no answer: who asks (`user`,
/// `safety_identifier`), what to store or bill (`metadata`, `store`,
/// `service_tier`, `prompt_cache_key`, `prompt_cache_retention`).
const ANSWER_NEUTRAL: &[&str] = &[
    "user",
    "safety_identifier",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// A message's fields besides its role and text, into the key.
fn message_fields(m: &tandem_api::Message, field: &mut impl FnMut(&str)) {
    field(m.name.as_deref().map_or("-", |n| n));
    field(&canonical(&Value::Object(m.extra.clone())));
}

/// A JSON value written with its objects' keys in order, so that the same
/// value sent with its keys in another order keys the same entry.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let mut pairs: Vec<(&String, &Value)> = o.iter().collect();
            pairs.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = pairs
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(a) => {
            let inner: Vec<String> = a.iter().map(canonical).collect();
            format!("[{}]", inner.join(","))
        }
        other => other.to_string(),
    }
}

/// Words that turn a question into its opposite.
const NEGATIONS: &[&str] = &[
    "not",
    "no",
    "never",
    "none",
    "nor",
    "neither",
    "nothing",
    "nobody",
    "nowhere",
    "without",
    "except",
    "cannot",
    "excluding",
    "unless",
    "least",
    "fewest",
    "false",
    "incorrect",
];

/// What in a prompt must be the same for a cached answer to stand, in
/// order: every word with a digit in it (numbers, "3rd", "x2"), every
/// negation ("not", "without", "except", "isn't" as "not"), and every word
/// with a capital letter that does not open a sentence (names, "II",
/// "Python"), folded to lower case. Words are runs of letters and digits
/// (apostrophes inside kept), in any script.
pub fn literals(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut sentence_start = true;
    let mut word = String::new();
    let flush = |word: &mut String, opens: bool, out: &mut Vec<String>| {
        if word.is_empty() {
            return;
        }
        let w = word.trim_end_matches(['\'', '\u{2019}']);
        let lower = w.to_lowercase();
        if w.chars().any(char::is_numeric) {
            out.push(lower);
        } else if NEGATIONS.contains(&lower.as_str())
            || lower.ends_with("n't")
            || lower.ends_with("n\u{2019}t")
        {
            out.push("not".into());
        } else if !opens && w.chars().any(char::is_uppercase) {
            out.push(lower);
        }
        word.clear();
    };
    let mut opens = true;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let inner_apostrophe = matches!(c, '\'' | '\u{2019}')
            && !word.is_empty()
            && chars.peek().is_some_and(|n| n.is_alphanumeric());
        if c.is_alphanumeric() || inner_apostrophe {
            if word.is_empty() {
                opens = sentence_start;
                sentence_start = false;
            }
            word.push(c);
            continue;
        }
        flush(&mut word, opens, &mut out);
        // A full stop between digits is a decimal point, not an end.
        if matches!(c, '.' | '!' | '?' | ':' | ';' | '\n' | '\u{3002}') {
            sentence_start = true;
        }
    }
    flush(&mut word, opens, &mut out);
    out
}

/// A cached answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cached {
    /// The answer.
    pub text: String,
    /// How it ended.
    pub finish: FinishReason,
    /// What it cost to make.
    pub usage: Usage,
    /// Where the answer was first produced (`cloud:name` or `local`).
    pub backend: String,
    /// The model that made it.
    pub model: String,
    /// Fields of its message beside the text (`reasoning_content`,
    /// `annotations`...), as the client saw them whole.
    #[serde(default)]
    pub extra: Map<String, Value>,
    /// Fields of the answer beside its choices (`system_fingerprint`...).
    #[serde(default)]
    pub response: Map<String, Value>,
    /// How close the prompt was (1 when stored).
    pub similarity: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    partition: String,
    context: String,
    #[serde(with = "f32_b64")]
    embedding: Vec<f32>,
    text: String,
    finish: FinishReason,
    usage: Usage,
    backend: String,
    model: String,
    // Older entries have neither: they replay as text alone.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    extra: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    response: Map<String, Value>,
    created: u64,
    #[serde(skip)]
    used: u64,
}

mod f32_b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom("embedding length"));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

struct Inner {
    entries: Vec<Entry>,
    /// Lines in the file, for deciding when to compact it.
    lines: usize,
    clock: u64,
}

/// Answers by meaning, in memory and on disk.
pub struct SemanticCache {
    config: CacheConfig,
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for SemanticCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SemanticCache")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl SemanticCache {
    /// Opens the cache, reading what an earlier run kept at `path`.
    pub fn open(config: CacheConfig, path: Option<PathBuf>) -> std::io::Result<SemanticCache> {
        let mut entries = Vec::new();
        let mut lines = 0;
        if let Some(p) = &path {
            match std::fs::File::open(p) {
                Ok(f) => {
                    for line in std::io::BufReader::new(f).lines() {
                        let line = line?;
                        lines += 1;
                        // A line cut short by a crash is skipped, not fatal.
                        if let Ok(e) = serde_json::from_str::<Entry>(&line) {
                            entries.push(e);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // Later lines are newer: keep the newest within the bound, and let
        // a newer entry for the same prompt replace an older one.
        let mut seen = std::collections::HashSet::new();
        let mut kept: Vec<Entry> = Vec::new();
        for e in entries.into_iter().rev() {
            if kept.len() >= config.max_entries {
                break;
            }
            if seen.insert((e.partition.clone(), e.context.clone(), e.text.clone())) {
                kept.push(e);
            }
        }
        kept.reverse();
        for (i, e) in kept.iter_mut().enumerate() {
            e.used = i as u64;
        }
        let clock = kept.len() as u64;
        Ok(SemanticCache {
            config,
            path,
            inner: Mutex::new(Inner {
                entries: kept,
                lines,
                clock,
            }),
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Its file, if persistent.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Answers kept.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether it keeps none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The closest answer at or above the similarity bound.
    pub fn lookup(&self, key: &CacheKey, embedding: &[f32]) -> Option<Cached> {
        let mut inner = self.lock();
        let mut best: Option<(usize, f32)> = None;
        for (i, e) in inner.entries.iter().enumerate() {
            if e.partition != key.partition || e.context != key.context {
                continue;
            }
            let sim = tandem_embed::cosine(&e.embedding, embedding);
            if sim >= self.config.similarity && best.is_none_or(|(_, b)| sim > b) {
                best = Some((i, sim));
            }
        }
        let (i, similarity) = best?;
        inner.clock += 1;
        let clock = inner.clock;
        let e = &mut inner.entries[i];
        e.used = clock;
        Some(Cached {
            text: e.text.clone(),
            finish: e.finish,
            usage: e.usage,
            backend: e.backend.clone(),
            model: e.model.clone(),
            extra: e.extra.clone(),
            response: e.response.clone(),
            similarity,
        })
    }

    /// Keeps an answer, evicting the least recently used past the bound.
    /// Returns the entry as written to the file (what replicas share).
    pub fn insert(&self, key: &CacheKey, embedding: Vec<f32>, answer: Cached) -> Option<String> {
        let entry = Entry {
            partition: key.partition.clone(),
            context: key.context.clone(),
            embedding,
            text: answer.text,
            finish: answer.finish,
            usage: answer.usage,
            backend: answer.backend,
            model: answer.model,
            extra: answer.extra,
            response: answer.response,
            created: now(),
            used: 0,
        };
        self.keep(entry)
    }

    /// Keeps an entry another replica wrote (a line of its file); `false`
    /// when the line is not one.
    pub fn absorb(&self, line: &str) -> bool {
        match serde_json::from_str::<Entry>(line) {
            Ok(e) if !e.embedding.is_empty() => {
                self.keep(e);
                true
            }
            _ => false,
        }
    }

    fn keep(&self, mut entry: Entry) -> Option<String> {
        let mut inner = self.lock();
        inner.clock += 1;
        entry.used = inner.clock;
        inner.entries.retain(|e| {
            !(e.partition == entry.partition && e.context == entry.context && e.text == entry.text)
        });
        let line = serde_json::to_string(&entry).ok();
        inner.entries.push(entry);
        while inner.entries.len() > self.config.max_entries.max(1) {
            if let Some(oldest) = inner
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            {
                inner.entries.swap_remove(oldest);
            }
        }
        let Some(path) = &self.path else { return line };
        let result = if inner.lines + 1 > 2 * self.config.max_entries.max(1) {
            Self::rewrite(path, &inner.entries).map(|n| inner.lines = n)
        } else if let Some(line) = &line {
            crate::jsonl::append_line(path, line.as_bytes()).map(|()| inner.lines += 1)
        } else {
            Ok(())
        };
        if let Err(e) = result {
            tracing::warn!("writing the cache to {}: {e}", path.display());
        }
        line
    }

    /// Writes the entries oldest-used first, so a reload keeps the most
    /// recently used.
    fn rewrite(path: &Path, entries: &[Entry]) -> std::io::Result<usize> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut sorted: Vec<&Entry> = entries.iter().collect();
        sorted.sort_by_key(|e| e.used);
        let tmp = path.with_extension("partial");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for e in &sorted {
            serde_json::to_writer(&mut f, e)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        Ok(sorted.len())
    }

    /// Forgets everything, on disk too. Returns how many entries there were.
    pub fn clear(&self) -> std::io::Result<usize> {
        let mut inner = self.lock();
        let n = inner.entries.len();
        inner.entries.clear();
        inner.lines = 0;
        if let Some(p) = &self.path {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_api::{Message, Sampling};

    fn req(msgs: &[(&str, &str)]) -> GenerateRequest {
        GenerateRequest {
            choices: 1,
            model: "tandem/auto".into(),
            input: Input::Chat {
                messages: msgs.iter().map(|(r, c)| Message::new(r, *c)).collect(),
                continue_from: None,
            },
            sampling: Sampling::default(),
            max_tokens: Some(32),
            stop: Vec::new(),
            logprobs: None,
            stream: false,
            include_usage: false,
            extra: Default::default(),
        }
    }

    fn answer(text: &str) -> Cached {
        Cached {
            text: text.into(),
            finish: FinishReason::Stop,
            usage: Usage::new(5, 2),
            backend: "cloud:test".into(),
            model: "m".into(),
            extra: Map::new(),
            response: Map::new(),
            similarity: 1.0,
        }
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn evicts_least_recently_used_and_persists() {
        let dir = std::env::temp_dir().join(format!("tandem-cache-{}", fastrand::u64(..)));
        let path = dir.join("answers.jsonl");
        let cfg = CacheConfig {
            max_entries: 2,
            ..CacheConfig::default()
        };
        let c = SemanticCache::open(cfg.clone(), Some(path.clone())).unwrap();
        let keys: Vec<CacheKey> = ["a", "b", "c"]
            .iter()
            .map(|t| CacheKey::new(&req(&[("user", t)]), None, "redact").unwrap())
            .collect();
        let vecs = [
            unit(&[1.0, 0.0, 0.0]),
            unit(&[0.0, 1.0, 0.0]),
            unit(&[0.0, 0.0, 1.0]),
        ];
        c.insert(&keys[0], vecs[0].clone(), answer("A"));
        c.insert(&keys[1], vecs[1].clone(), answer("B"));
        // Using "a" makes "b" the least recently used.
        assert_eq!(c.lookup(&keys[0], &vecs[0]).unwrap().text, "A");
        c.insert(&keys[2], vecs[2].clone(), answer("C"));
        assert!(c.lookup(&keys[1], &vecs[1]).is_none());
        assert_eq!(c.len(), 2);
        // Enough writes to compact the file; a reload keeps the bound.
        for _ in 0..3 {
            c.insert(&keys[2], vecs[2].clone(), answer("C"));
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 4, "{lines} lines");
        let again = SemanticCache::open(cfg, Some(path.clone())).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again.lookup(&keys[2], &vecs[2]).unwrap().text, "C");
        assert_eq!(again.clear().unwrap(), 2);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn literals_are_numbers_negations_and_names_in_order() {
        let l = |t: &str| literals(t);
        assert_eq!(
            l("A train travels at 51 km per hour for 8 hours. How far?"),
            ["51", "8"]
        );
        assert_eq!(l("Which of these is not a mammal?"), ["not"]);
        assert_eq!(l("It isn\u{2019}t safe without water."), ["not", "not"]);
        assert_eq!(
            l("What year did World War II end? Tell Anna."),
            ["world", "war", "ii", "anna"]
        );
        assert_eq!(l("What's the capital city of France?"), ["france"]);
        assert_eq!(l("Which city is the capital of France?"), ["france"]);
        assert_eq!(
            l("Wie viel kostet 2,50 \u{20ac} in Z\u{fc}rich?"),
            ["2", "50", "z\u{fc}rich"]
        );
        assert!(l("\u{4e09}\u{52a0}\u{56db}\u{7b49}\u{4e8e}\u{51e0}").is_empty());
        assert!(l("").is_empty());
        assert!(l("'' \u{2019}x'").is_empty());
    }

    proptest::proptest! {
        /// Any Unicode: no panic; literals are non-empty and folded; a
        /// number added to a prompt is always one more literal.
        #[test]
        fn literals_of_any_text(text in "\\PC{0,80}", n in 0u32..100_000) {
            let l = literals(&text);
            for w in &l {
                proptest::prop_assert!(!w.is_empty());
                proptest::prop_assert_eq!(w, &w.to_lowercase());
            }
            let more = literals(&format!("{text} {n}"));
            proptest::prop_assert_eq!(more.len(), l.len() + 1);
            proptest::prop_assert_eq!(more.last(), Some(&n.to_string()));
        }
    }

    #[test]
    fn prompts_differing_in_a_literal_never_share_an_entry() {
        let key = |t: &str| CacheKey::new(&req(&[("user", t)]), None, "redact").unwrap();
        let cache = SemanticCache::open(CacheConfig::default(), None).unwrap();
        let v = unit(&[1.0, 1.0]);
        cache.insert(&key("What is 57 + 50?"), v.clone(), answer("107"));
        // The same vector (the embedding cannot tell them apart) and still
        // a miss when a number, a negation or a name differs.
        for other in [
            "What is 57 + 33?",
            "What is not 57 + 50?",
            "What is 57 + 50 in Python?",
        ] {
            assert!(cache.lookup(&key(other), &v).is_none(), "{other}");
        }
        // Case, punctuation and other words are the embedding's to judge.
        let same = key("what's 57 + 50");
        assert_eq!(cache.lookup(&same, &v).unwrap().text, "107");
    }

    #[test]
    fn every_field_that_shapes_an_answer_is_in_the_key() {
        let key = |r: &GenerateRequest| CacheKey::new(r, Some("k"), "redact").unwrap().context;
        let booked = |city: &str, key_order: bool| {
            let mut r = req(&[
                ("user", "Book me a hotel."),
                ("assistant", ""),
                ("tool", "done"),
            ]);
            let call = if key_order {
                serde_json::json!([{"id": "c1", "type": "function",
                    "function": {"name": "book", "arguments": format!("{{\"city\":\"{city}\"}}")}}])
            } else {
                serde_json::json!([{"function": {"arguments": format!("{{\"city\":\"{city}\"}}"),
                    "name": "book"}, "type": "function", "id": "c1"}])
            };
            if let Input::Chat { messages, .. } = &mut r.input {
                messages[1].extra.insert("tool_calls".into(), call);
                messages.push(Message::new("user", "What did I book?"));
            }
            r
        };
        // Another tool call before the same words: another entry.
        assert_ne!(key(&booked("Paris", true)), key(&booked("Berlin", true)));
        // The same call with its keys in another order: the same entry.
        assert_eq!(key(&booked("Paris", true)), key(&booked("Paris", false)));
        // Another participant's name, before or on the question itself.
        let named = |who: Option<&str>| {
            let mut r = req(&[("user", "What is my name?")]);
            if let Input::Chat { messages, .. } = &mut r.input {
                messages[0].name = who.map(str::to_owned);
            }
            key(&r)
        };
        assert_ne!(named(Some("alice")), named(Some("bob")));
        assert_ne!(named(Some("alice")), named(None));
        // Fields passed on to the upstream change the answer; who asks
        // does not.
        let with = |field: &str, v: serde_json::Value| {
            let mut r = req(&[("user", "hi")]);
            r.extra.insert(field.into(), v);
            key(&r)
        };
        let plain = key(&req(&[("user", "hi")]));
        for (field, v) in [
            ("reasoning_effort", serde_json::json!("low")),
            ("modalities", serde_json::json!(["text", "audio"])),
            ("verbosity", serde_json::json!("high")),
        ] {
            assert_ne!(with(field, v), plain, "{field}");
        }
        for (field, v) in [
            ("user", serde_json::json!("u-17")),
            ("metadata", serde_json::json!({"run": "a"})),
            ("store", serde_json::json!(true)),
            ("service_tier", serde_json::json!("flex")),
        ] {
            assert_eq!(with(field, v), plain, "{field}");
        }
    }

    #[test]
    fn keys_separate_partitions_and_contexts() {
        let a = CacheKey::new(&req(&[("user", "hi")]), Some("k1"), "redact").unwrap();
        let b = CacheKey::new(&req(&[("user", "hi")]), Some("k2"), "redact").unwrap();
        let c = CacheKey::new(&req(&[("user", "hi")]), Some("k1"), "strict").unwrap();
        let d = CacheKey::new(
            &req(&[("system", "be brief"), ("user", "hi")]),
            Some("k1"),
            "redact",
        )
        .unwrap();
        assert_ne!(a.partition, b.partition);
        assert_ne!(a.partition, c.partition);
        assert_eq!(a.partition, d.partition);
        assert_ne!(a.context, d.context);
        let cache = SemanticCache::open(CacheConfig::default(), None).unwrap();
        let v = unit(&[1.0, 1.0]);
        cache.insert(&a, v.clone(), answer("A"));
        assert!(cache.lookup(&a, &v).is_some());
        for other in [&b, &c, &d] {
            assert!(cache.lookup(other, &v).is_none());
        }
        // Below the similarity bound is a miss.
        assert!(cache.lookup(&a, &unit(&[1.0, -0.2])).is_none());
        let mut hot = req(&[("user", "hi")]);
        hot.sampling.temperature = Some(1.9);
        hot.sampling.seed = Some(7);
        let hot = CacheKey::new(&hot, Some("k1"), "redact").unwrap();
        assert_ne!(
            a.context, hot.context,
            "sampling parameters are part of the key"
        );
        assert!(cache.lookup(&hot, &v).is_none());
        let mut with_logprobs = req(&[("user", "hi")]);
        with_logprobs.logprobs = Some(tandem_api::LogprobRequest { top: 0 });
        assert!(CacheKey::new(&with_logprobs, None, "off").is_none());
        for (field, value) in [
            (
                "tools",
                serde_json::json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            (
                "response_format",
                serde_json::json!({"type": "json_object"}),
            ),
            ("logit_bias", serde_json::json!({"15": -100})),
            ("guided_regex", serde_json::json!("[a-z]+")),
        ] {
            let mut r = req(&[("user", "hi")]);
            r.extra.insert(field.into(), value);
            assert!(CacheKey::new(&r, None, "off").is_none(), "{field}");
        }
    }
}
