//! The engine thread: owns the llama.cpp context and runs continuous
//! batching. Every step gathers one token from each decoding sequence plus a
//! chunk of any prompt being read, decodes them in one batch, and samples
//! each sequence from its row of logits — the shape of llama.cpp's server
//! slots. New requests join between steps; requests whose client went away
//! are dropped between steps.
//!
//! A sequence keeps its KV cells after its request ends, and the engine
//! remembers which tokens they hold. A new request goes to the free
//! sequence holding the longest common prefix with its prompt and reads only
//! the rest — every chat request shares its template's system prompt, and a
//! conversation's next turn shares its whole history (llama.cpp's server
//! calls this `cache_prompt`).

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llguidance::Matcher;
use tandem_api::text::TextAssembler;
use tandem_api::{
    ApiError, Delta, Event, Finish, FinishReason, Sampling, TokenLogprob, TopLogprob, Usage,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::load::LoadMonitor;
use crate::runtime;
use crate::sampling::{Greedy, logprobs, sampler_chain};
use crate::{Stats, Threads};

/// A request ready for the engine: tokenized and checked against the context.
pub(crate) struct Job {
    pub tokens: Vec<LlamaToken>,
    pub sampling: Sampling,
    /// Already limited to what fits in the sequence's context.
    pub max_new: u32,
    pub stop: Vec<String>,
    pub top_logprobs: Option<u8>,
    /// Samplers that run before the request's own (a logit bias).
    pub constraints: Vec<LlamaSampler>,
    /// The grammar's matchers, which every token must pass (after the
    /// logit bias, before the request's own samplers).
    pub grammar: Vec<Matcher>,
    pub tx: UnboundedSender<Result<Event, ApiError>>,
}

/// What the engine thread is asked to do.
pub(crate) enum Command {
    Run(Job),
    /// End every running and waiting request with this error.
    AbortAll(String),
}

pub(crate) struct SchedulerConfig {
    pub ctx_per_seq: u32,
    pub parallel: u32,
    pub batch: u32,
    pub threads: Threads,
}

struct Slot {
    seq: i32,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens found in the sequence's cache, not read again.
    cached: usize,
    /// Generated tokens fed back into the KV cache, in order.
    fed: Vec<LlamaToken>,
    /// Prompt tokens already in the KV cache.
    prefilled: usize,
    /// Next token to feed (the last sampled one) once the prompt is in.
    pending: Option<LlamaToken>,
    /// Tokens of this sequence in the KV cache.
    n_past: u32,
    generated: u32,
    max_new: u32,
    ignore_eos: bool,
    top_logprobs: Option<u8>,
    sampler: Picker,
    text: TextAssembler,
    tx: UnboundedSender<Result<Event, ApiError>>,
    /// Row of this step's batch whose logits belong to this sequence.
    logits_row: Option<i32>,
    /// Tokens this step's batch holds for the sequence.
    in_batch: usize,
}

impl Slot {
    fn usage(&self) -> Usage {
        Usage::new(self.prompt.len() as u32, self.generated).with_cached(self.cached as u32)
    }

    /// The tokens its KV cells hold, in position order.
    fn kv_tokens(mut self) -> Vec<LlamaToken> {
        let n = self.n_past as usize;
        self.prompt.truncate(self.prefilled);
        self.prompt.append(&mut self.fed);
        self.prompt.truncate(n);
        self.prompt
    }
}

/// What each sequence's KV cells hold while no request uses it.
struct PromptCache {
    tokens: Vec<Vec<LlamaToken>>,
    /// When each was last used (a step count), to evict the oldest first.
    used: Vec<u64>,
    clock: u64,
}

impl PromptCache {
    fn new(n: usize) -> Self {
        Self {
            tokens: vec![Vec::new(); n],
            used: vec![0; n],
            clock: 0,
        }
    }

    /// Forgets everything (after a failed decode the cells are unknown).
    fn clear(&mut self) {
        self.tokens.iter_mut().for_each(Vec::clear);
    }

    /// The free sequence for `prompt`, and the prefix length it shares.
    /// Each candidate scores the tokens it saves minus the cached tokens it
    /// would lose: a conversation's next turn goes where its history is, and
    /// a request that shares only the system prompt goes where the least is
    /// thrown away rather than over another conversation's history. The least
    /// recently used wins ties.
    fn best(&self, free: &[usize], prompt: &[LlamaToken]) -> Option<(usize, usize)> {
        free.iter()
            .map(|&i| {
                let shared = self.tokens[i]
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                let lost = self.tokens[i].len() - shared;
                (i, shared, shared as i64 - lost as i64)
            })
            .max_by_key(|&(i, _, score)| (score, std::cmp::Reverse(self.used[i])))
            .map(|(i, shared, _)| (i, shared))
    }
}

enum Outcome {
    Continue,
    Done,
}

fn context_params(cfg: &SchedulerConfig, threads: usize) -> LlamaContextParams {
    let threads = i32::try_from(threads).unwrap_or(1);
    let n_batch = cfg.batch + cfg.parallel;
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(cfg.ctx_per_seq * cfg.parallel))
        .with_n_seq_max(cfg.parallel)
        // A KV stream per sequence: attention then reads only the
        // sequence's own cells. A shared pool makes every token attend over
        // (and mask out) every other sequence's cells, which on a CPU costs
        // more than the batching gains.
        .with_kv_unified(false)
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch.min(512))
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
}

/// Runs until every sender of `rx` is gone. `ready` receives the outcome
/// of context creation so that load errors reach the caller.
pub(crate) fn run(
    model: Arc<LlamaModel>,
    cfg: SchedulerConfig,
    rx: Receiver<Command>,
    stats: Arc<Stats>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let monitor = LoadMonitor::global();
    let mut threads = cfg.threads.count(&monitor);
    let mut ctx = match runtime::new_context(&model, context_params(&cfg, threads)) {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    stats.threads.store(threads, Ordering::Relaxed);
    let vocab = model.vocab();
    let n_vocab = model.n_vocab();
    let mut batch = LlamaBatch::new((cfg.batch + cfg.parallel) as usize, 1);
    let mut slots: Vec<Option<Slot>> = (0..cfg.parallel).map(|_| None).collect();
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut cache = PromptCache::new(slots.len());
    let mut piece = Vec::with_capacity(32);
    let mut busy = BusyPeriod::default();

    loop {
        // ---- intake
        let idle = slots.iter().all(Option::is_none) && queue.is_empty();
        let mut abort: Option<String> = None;
        if idle {
            busy.report();
            match rx.recv() {
                Ok(Command::Run(job)) => queue.push_back(job),
                Ok(Command::AbortAll(_)) => continue,
                Err(_) => return,
            }
            // Between busy periods no sequence is mid-answer, so this is
            // the moment to follow the machine's load. The new context takes
            // over the old one's KV cells: the cached prompts stay cached.
            let want = cfg.threads.count(&monitor);
            if want != threads {
                match runtime::renew_context(&model, context_params(&cfg, want), &ctx) {
                    Ok(c) => {
                        tracing::debug!(from = threads, to = want, "inference threads follow load");
                        ctx = c;
                        threads = want;
                        stats.threads.store(threads, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!("keeping {threads} threads: {e}"),
                }
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Command::Run(job)) => queue.push_back(job),
                Ok(Command::AbortAll(reason)) => abort = Some(reason),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if slots.iter().all(Option::is_none) && queue.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }

        if let Some(reason) = abort {
            let err = ApiError::unavailable(reason);
            for slot in slots.iter_mut() {
                if let Some(s) = slot.as_ref() {
                    let _ = s.tx.send(Err(err.clone()));
                    release(slot, &mut cache, &stats);
                }
            }
            for job in queue.drain(..) {
                stats.queued.fetch_sub(1, Ordering::Relaxed);
                let _ = job.tx.send(Err(err.clone()));
            }
            continue;
        }

        // ---- admit queued jobs into free slots, each where most of its
        // prompt is already cached
        loop {
            let free: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_none()).collect();
            if free.is_empty() {
                break;
            }
            let Some(job) = queue.pop_front() else { break };
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            if job.tx.is_closed() {
                continue;
            }
            let Some((i, shared)) = cache.best(&free, &job.tokens) else {
                break;
            };
            let seq = i as i32;
            let reuse = reusable(&mut ctx, seq, shared, job.tokens.len());
            cache.tokens[i].clear();
            cache.clock += 1;
            cache.used[i] = cache.clock;
            stats.active.fetch_add(1, Ordering::Relaxed);
            stats
                .cached_prompt_tokens
                .fetch_add(reuse as u64, Ordering::Relaxed);
            slots[i] = Some(Slot {
                seq,
                sampler: picker(
                    job.constraints,
                    job.grammar,
                    &job.sampling,
                    n_vocab,
                    job.max_new,
                ),
                text: TextAssembler::new(job.stop),
                prompt: job.tokens,
                cached: reuse,
                fed: Vec::new(),
                prefilled: reuse,
                pending: None,
                n_past: reuse as u32,
                generated: 0,
                max_new: job.max_new,
                ignore_eos: job.sampling.ignore_eos,
                top_logprobs: job.top_logprobs,
                tx: job.tx,
                logits_row: None,
                in_batch: 0,
            });
        }

        // ---- drop sequences whose client has gone
        for slot in slots.iter_mut() {
            if slot.as_ref().is_some_and(|s| s.tx.is_closed()) {
                release(slot, &mut cache, &stats);
            }
        }

        // ---- build the batch: decode tokens first, then prompt chunks
        batch.clear();
        let mut budget = cfg.batch as usize;
        for s in slots.iter_mut().flatten() {
            s.logits_row = None;
            s.in_batch = 0;
            if let Some(tok) = s.pending
                && batch.add(tok, s.n_past as i32, &[s.seq], true).is_ok()
            {
                s.logits_row = Some(batch.n_tokens() - 1);
                s.in_batch = 1;
            }
        }
        for s in slots.iter_mut().flatten() {
            if s.pending.is_some() || budget == 0 {
                continue;
            }
            let remaining = s.prompt.len() - s.prefilled;
            let take = remaining.min(budget);
            for k in 0..take {
                let pos = s.prefilled + k;
                let wants_logits = pos + 1 == s.prompt.len();
                if batch
                    .add(s.prompt[pos], pos as i32, &[s.seq], wants_logits)
                    .is_err()
                {
                    break;
                }
                s.in_batch += 1;
                if wants_logits {
                    s.logits_row = Some(batch.n_tokens() - 1);
                }
            }
            budget -= s.in_batch;
        }
        if batch.n_tokens() == 0 {
            continue;
        }

        // ---- decode
        let t_decode = std::time::Instant::now();
        let decoded = runtime::decode(&mut ctx, &mut batch);
        busy.decoded(t_decode, batch.n_tokens());
        if let Err(e) = decoded {
            tracing::error!("decode failed: {e}");
            for slot in slots.iter_mut() {
                if let Some(s) = slot.as_ref() {
                    let _ =
                        s.tx.send(Err(ApiError::internal(format!("inference failed: {e}"))));
                    release(slot, &mut cache, &stats);
                }
            }
            // What the cells hold after a failed decode is not known.
            let _ = ctx.clear_kv_cache_seq(None, None, None);
            cache.clear();
            continue;
        }

        // ---- advance every sequence that was in the batch
        for slot in slots.iter_mut() {
            let Some(s) = slot.as_mut() else { continue };
            if s.in_batch == 0 {
                continue;
            }
            if let Some(tok) = s.pending.take() {
                s.fed.push(tok);
            } else {
                s.prefilled += s.in_batch;
                stats
                    .prompt_tokens
                    .fetch_add(s.in_batch as u64, Ordering::Relaxed);
            }
            s.n_past += s.in_batch as u32;
            let Some(row) = s.logits_row else { continue };
            let t_sample = std::time::Instant::now();
            let outcome = sample_step(s, &ctx, row, &vocab, &mut piece, &cfg, &stats);
            busy.sample += t_sample.elapsed();
            if let Outcome::Done = outcome {
                release(slot, &mut cache, &stats);
            }
        }
    }
}

/// Where a busy period's time went, logged at debug level when the engine
/// goes idle: time in llama.cpp's decode against the rest of the loop
/// (batch building, sampling, sending) shows per-step overhead.
#[derive(Default)]
struct BusyPeriod {
    start: Option<std::time::Instant>,
    steps: u64,
    tokens: u64,
    decode: std::time::Duration,
    sample: std::time::Duration,
}

impl BusyPeriod {
    fn decoded(&mut self, t0: std::time::Instant, tokens: i32) {
        self.start.get_or_insert(t0);
        self.steps += 1;
        self.tokens += u64::try_from(tokens).unwrap_or(0);
        self.decode += t0.elapsed();
    }

    fn report(&mut self) {
        if let Some(start) = self.start.take() {
            let total = start.elapsed();
            tracing::debug!(
                steps = self.steps,
                tokens = self.tokens,
                decode_ms = self.decode.as_secs_f64() * 1e3,
                sample_ms = self.sample.as_secs_f64() * 1e3,
                other_ms = total.saturating_sub(self.decode).as_secs_f64() * 1e3,
                "engine busy period"
            );
        }
        *self = Self::default();
    }
}

/// How a sequence chooses its next token.
enum Picker {
    /// Unconstrained greedy decoding, without llama.cpp's candidate array.
    Greedy(Greedy),
    /// Greedy decoding held to a grammar: the token greedy decoding picks
    /// is checked against the grammar first, and the grammar's mask over
    /// the whole vocabulary is computed only when it is refused. The same
    /// token as masking first, since masking keeps an allowed maximum the
    /// maximum; the mask costs a walk over the vocabulary, the check a walk
    /// over one token's bytes (llama.cpp's server checks first the same
    /// way).
    Guided(Greedy, Vec<Matcher>),
    /// llama.cpp's sampler chain.
    Chain(LlamaSampler),
    /// llama.cpp's sampler chain held to a grammar, checked first as
    /// llama.cpp's server does: a token is drawn from the chain, and only
    /// when the grammar refuses it is it drawn again from the logits the
    /// grammar's mask leaves. Every token drawn keeps to the grammar.
    GuidedChain(LlamaSampler, Vec<Matcher>),
}

/// Whether every matcher takes `token` next.
fn passes(grammar: &mut [Matcher], token: i32) -> bool {
    u32::try_from(token).is_ok_and(|t| {
        grammar
            .iter_mut()
            .all(|m| m.validate_tokens(&[t]).is_ok_and(|n| n == 1))
    })
}

/// Whether a token passes every mask of `grammar`'s matchers, computed once;
/// a matcher that cannot give a mask masks nothing, as llama.cpp's
/// llguidance sampler does.
fn masked(grammar: &mut [Matcher]) -> impl Fn(usize) -> bool + use<> {
    let masks: Vec<_> = grammar
        .iter_mut()
        .filter_map(|m| m.compute_mask_or_eos().ok())
        .collect();
    move |t| u32::try_from(t).is_ok_and(|t| masks.iter().all(|m| m.is_allowed(t)))
}

/// The token chosen, into every matcher that has not stopped (consuming
/// into a stopped one poisons it).
fn consume(grammar: &mut [Matcher], token: i32) {
    for m in grammar.iter_mut() {
        if !m.is_stopped()
            && let Ok(t) = u32::try_from(token)
        {
            let _ = m.consume_token(t);
        }
    }
}

/// The token `chain` selects from `logits`, those `allowed` refuses set
/// to minus infinity; not accepted into the chain.
fn draw(chain: &mut LlamaSampler, logits: &[f32], allowed: impl Fn(usize) -> bool) -> LlamaToken {
    let mut arr = LlamaTokenDataArray::from_iter(
        logits.iter().enumerate().map(|(i, &l)| {
            let l = if allowed(i) { l } else { f32::NEG_INFINITY };
            LlamaTokenData::new(LlamaToken(i32::try_from(i).unwrap_or(i32::MAX)), l, 0.0)
        }),
        false,
    );
    arr.apply_sampler(chain);
    arr.selected_token().unwrap_or(LlamaToken(0))
}

impl Picker {
    fn pick(&mut self, ctx: &LlamaContext<'_>, row: i32) -> LlamaToken {
        match self {
            Picker::Greedy(g) => {
                let tok = LlamaToken(g.pick(ctx.get_logits_ith(row)) as i32);
                g.accept(tok.0);
                tok
            }
            Picker::Guided(g, grammar) => {
                let logits = ctx.get_logits_ith(row);
                let first = g.pick(logits);
                let tok = if passes(grammar, first as i32) {
                    first
                } else {
                    g.pick_where(logits, masked(grammar))
                } as i32;
                consume(grammar, tok);
                g.accept(tok);
                LlamaToken(tok)
            }
            Picker::Chain(c) => c.sample(ctx, row),
            Picker::GuidedChain(c, grammar) => {
                let logits = ctx.get_logits_ith(row);
                let first = draw(c, logits, |_| true);
                let tok = if passes(grammar, first.0) {
                    first
                } else {
                    draw(c, logits, masked(grammar))
                };
                consume(grammar, tok.0);
                c.accept(tok);
                tok
            }
        }
    }
}

/// How a request's tokens are chosen: greedy without llama.cpp's candidate
/// array where it can be, its sampler chain otherwise (a logit bias first);
/// either checked against the grammar, when there is one, before its mask
/// is computed.
fn picker(
    mut constraints: Vec<LlamaSampler>,
    grammar: Vec<Matcher>,
    sampling: &Sampling,
    n_vocab: i32,
    max_new: u32,
) -> Picker {
    if constraints.is_empty()
        && let Some(g) = Greedy::for_sampling(sampling, max_new)
    {
        return if grammar.is_empty() {
            Picker::Greedy(g)
        } else {
            Picker::Guided(g, grammar)
        };
    }
    constraints.push(sampler_chain(sampling, n_vocab, max_new));
    let chain = LlamaSampler::chain_simple(constraints);
    if grammar.is_empty() {
        Picker::Chain(chain)
    } else {
        Picker::GuidedChain(chain, grammar)
    }
}

fn sample_step(
    s: &mut Slot,
    ctx: &LlamaContext<'_>,
    row: i32,
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    piece: &mut Vec<u8>,
    cfg: &SchedulerConfig,
    stats: &Stats,
) -> Outcome {
    let tok = s.sampler.pick(ctx, row);
    s.generated += 1;
    stats.generated_tokens.fetch_add(1, Ordering::Relaxed);

    if !s.ignore_eos && vocab.is_eog(tok) {
        // The end-of-turn token is not part of the answer.
        s.generated -= 1;
        return finish(s, FinishReason::Stop);
    }

    piece.clear();
    vocab.token_to_piece_into(tok, piece, false, None);
    let entry = s.top_logprobs.map(|top| {
        let logits = ctx.get_logits_ith(row);
        let (lp, alts) = logprobs(logits, tok.0 as usize, usize::from(top));
        token_entry(vocab, piece, lp, &alts)
    });
    let step = s.text.push(piece, entry);
    send_delta(s, step.delta);
    if step.stopped {
        return finish_now(s, FinishReason::Stop);
    }
    if s.generated >= s.max_new || s.n_past + 1 >= cfg.ctx_per_seq {
        return finish(s, FinishReason::Length);
    }
    s.pending = Some(tok);
    Outcome::Continue
}

fn token_entry(
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    bytes: &[u8],
    logprob: f32,
    alts: &[(usize, f32)],
) -> TokenLogprob {
    let mut buf = Vec::with_capacity(16);
    TokenLogprob {
        token: String::from_utf8_lossy(bytes).into_owned(),
        logprob,
        bytes: Some(bytes.to_vec()),
        top_logprobs: alts
            .iter()
            .map(|&(id, lp)| {
                buf.clear();
                vocab.token_to_piece_into(LlamaToken(id as i32), &mut buf, false, None);
                TopLogprob {
                    token: String::from_utf8_lossy(&buf).into_owned(),
                    logprob: lp,
                    bytes: Some(buf.clone()),
                }
            })
            .collect(),
    }
}

fn send_delta(s: &Slot, delta: Delta) {
    if !delta.text.is_empty() || !delta.tokens.is_empty() {
        let _ = s.tx.send(Ok(Event::Delta(delta)));
    }
}

/// Ends the answer, releasing any text held back for stop matching.
fn finish(s: &mut Slot, reason: FinishReason) -> Outcome {
    let rest = s.text.finish();
    send_delta(s, rest.delta);
    finish_now(s, reason)
}

fn finish_now(s: &mut Slot, reason: FinishReason) -> Outcome {
    let _ = s.tx.send(Ok(Event::Finish(Finish {
        reason,
        usage: s.usage(),
    })));
    Outcome::Done
}

/// Ends a sequence's request; its cells stay, remembered for the next.
fn release(slot: &mut Option<Slot>, cache: &mut PromptCache, stats: &Stats) {
    if let Some(s) = slot.take() {
        let i = s.seq as usize;
        if let Some(entry) = cache.tokens.get_mut(i) {
            *entry = s.kv_tokens();
        }
        stats.active.fetch_sub(1, Ordering::Relaxed);
        stats.completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// How many of a prompt's first `shared` tokens sequence `seq` can keep.
/// At least one prompt token is always read again, for the logits of the
/// first answer token.
fn reusable(ctx: &mut LlamaContext<'_>, seq: i32, shared: usize, prompt_len: usize) -> usize {
    keep_prefix(ctx, seq as u32, shared.min(prompt_len.saturating_sub(1)))
}

/// Keeps sequence `seq`'s first `keep` cells and drops the rest; returns
/// how many were kept. A model whose cache lost early cells (sliding-window
/// attention) or cannot drop a tail (recurrent state) starts over: 0.
pub(crate) fn keep_prefix(ctx: &mut LlamaContext<'_>, seq: u32, keep: usize) -> usize {
    if keep > 0
        && ctx.kv_cache_seq_pos_min(seq as i32) == 0
        && ctx
            .clear_kv_cache_seq(Some(seq), u32::try_from(keep).ok(), None)
            .unwrap_or(false)
    {
        return keep;
    }
    let _ = ctx.clear_kv_cache_seq(Some(seq), None, None);
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: &[i32]) -> Vec<LlamaToken> {
        v.iter().copied().map(LlamaToken).collect()
    }

    #[test]
    fn requests_go_where_their_prefix_is_and_spare_other_histories() {
        let mut c = PromptCache::new(3);
        // 0: a long conversation; 1: only the system prompt; 2: empty.
        c.tokens[0] = toks(&[1, 2, 3, 10, 11, 12, 13, 14, 15, 16]);
        c.tokens[1] = toks(&[1, 2, 3, 20]);
        // The conversation's next turn goes to its history.
        let next = toks(&[1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17, 18]);
        assert_eq!(c.best(&[0, 1, 2], &next), Some((0, 10)));
        // A new conversation sharing the system prompt spares it.
        let other = toks(&[1, 2, 3, 30, 31]);
        assert_eq!(c.best(&[0, 1, 2], &other), Some((1, 3)));
        // Only busy slots but one: that one, whatever it holds.
        assert_eq!(c.best(&[0], &other), Some((0, 3)));
        assert_eq!(c.best(&[], &other), None);
        // Ties go to the least recently used.
        c.clear();
        c.used = vec![5, 1, 9];
        assert_eq!(c.best(&[0, 1, 2], &other), Some((1, 0)));
    }
}
