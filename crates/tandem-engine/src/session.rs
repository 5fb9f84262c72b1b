//! Sessions: sequences whose KV cache lives across calls, for speculative
//! decoding. A draft model extends its sequence a token at a time and rolls
//! back what the target rejected; a target model reads a round's new tokens
//! and draft in one forward pass and keeps only the accepted prefix.
//!
//! A finished session's cells stay: a new session is placed, at its first
//! step, on the free sequence that holds most of its tokens, and reads only
//! the rest (the engine's scheduler does the same for requests).
//!
//! Sessions run on their own thread with their own llama.cpp context
//! (sharing the model's weights), started on first use, so that the
//! continuous-batching scheduler stays as it is and engines that never
//! serve a session pay nothing for them.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tandem_api::ApiError;
use tokio::sync::oneshot;

use crate::load::LoadMonitor;
use crate::scheduler::keep_prefix;
use crate::{Stats, Threads, runtime};
use std::sync::atomic::Ordering;

use tandem_api::Rows;

pub(crate) enum SessionCmd {
    Open(oneshot::Sender<Result<u32, ApiError>>),
    Eval {
        /// The session (not the sequence, chosen at its first step).
        id: u32,
        keep: u32,
        tokens: Vec<i32>,
        rows: usize,
        reply: oneshot::Sender<Result<Rows, ApiError>>,
    },
    /// Ends a session; its sequence's cells stay for a later one to reuse.
    Close(u32),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionConfig {
    pub ctx_per_seq: u32,
    pub slots: u32,
    pub batch: u32,
    pub threads: Threads,
}

/// Starts the session thread; returns once its context exists.
pub(crate) fn start(
    model: Arc<LlamaModel>,
    cfg: SessionConfig,
    name: &str,
    stats: Arc<Stats>,
) -> Result<Sender<SessionCmd>, String> {
    runtime::spawn_worker(format!("tandem-sessions-{name}"), move |rx, ready| {
        run(model, cfg, rx, ready, stats)
    })
}

fn run(
    model: Arc<LlamaModel>,
    cfg: SessionConfig,
    rx: Receiver<SessionCmd>,
    ready: Sender<Result<(), String>>,
    stats: Arc<Stats>,
) {
    let threads = cfg.threads.count(&LoadMonitor::global());
    let threads = i32::try_from(threads).unwrap_or(1);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(cfg.ctx_per_seq * cfg.slots))
        .with_n_seq_max(cfg.slots)
        .with_kv_unified(false)
        .with_n_batch(cfg.batch)
        .with_n_ubatch(cfg.batch.min(512))
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = match runtime::new_context(&model, params) {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let n_vocab = model.n_vocab();
    let mut seqs = Sequences::new(cfg.slots as usize);
    let mut batch = LlamaBatch::new(cfg.batch as usize, 1);

    while let Ok(cmd) = rx.recv() {
        match cmd {
            SessionCmd::Open(reply) => {
                let result = seqs.open().ok_or_else(|| {
                    ApiError::unavailable(format!(
                        "all {} speculative sessions are in use",
                        cfg.slots
                    ))
                });
                let _ = reply.send(result);
            }
            SessionCmd::Close(id) => seqs.close(id),
            SessionCmd::Eval {
                id,
                keep,
                tokens,
                rows,
                reply,
            } => {
                if reply.is_closed() {
                    continue;
                }
                let end = keep as usize + tokens.len();
                let result = if tokens.is_empty() || rows == 0 || rows > tokens.len() {
                    Err(ApiError::invalid_param(
                        "tokens",
                        "a session step needs new tokens and at most one row per token",
                    ))
                } else if end > cfg.ctx_per_seq as usize {
                    Err(ApiError::context_length_exceeded(format!(
                        "This session holds at most {} tokens; this step would make it {end}.",
                        cfg.ctx_per_seq
                    )))
                } else if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
                    Err(ApiError::invalid_param(
                        "tokens",
                        format!("token id {bad} is outside the vocabulary (0..{n_vocab})"),
                    ))
                } else if let Some((seq, first)) = seqs.bind(id, keep, &tokens) {
                    // A session's first step may start where a finished
                    // session's cells still hold the same tokens (the
                    // verifier reads a conversation's history once, not
                    // every turn); the rows asked for are always read.
                    let skip = match (first, keep) {
                        (true, 0) => {
                            let shared = seqs.shared(seq, &tokens).min(tokens.len() - rows);
                            keep_prefix(&mut ctx, seq, shared)
                        }
                        (true, _) => keep_prefix(&mut ctx, seq, 0),
                        (false, _) => 0,
                    };
                    stats
                        .cached_prompt_tokens
                        .fetch_add(skip as u64, Ordering::Relaxed);
                    let kept = keep + skip as u32;
                    let r = eval(
                        &mut ctx,
                        &mut batch,
                        cfg.batch as usize,
                        seq,
                        kept,
                        &tokens[skip..],
                        rows,
                    );
                    seqs.record(seq, kept, &tokens[skip..], r.is_ok());
                    r
                } else {
                    Err(ApiError::invalid_param("session", "this session is closed"))
                };
                let _ = reply.send(result);
            }
        }
    }
}

/// The session thread's sequences: which open session (if any) each one
/// serves, and the tokens its cells hold, kept after the session closes.
/// A session is bound to a sequence at its first step, where its tokens are
/// known, to the free sequence that shares most of them.
struct Sequences {
    owner: Vec<Option<u32>>,
    tokens: Vec<Vec<i32>>,
    used: Vec<u64>,
    /// Open sessions not yet bound to a sequence.
    pending: Vec<u32>,
    next_id: u32,
    clock: u64,
}

impl Sequences {
    fn new(n: usize) -> Self {
        Self {
            owner: vec![None; n],
            tokens: vec![Vec::new(); n],
            used: vec![0; n],
            pending: Vec::new(),
            next_id: 0,
            clock: 0,
        }
    }

    /// A new session's id, or `None` when every sequence is spoken for.
    fn open(&mut self) -> Option<u32> {
        let busy = self.owner.iter().filter(|o| o.is_some()).count() + self.pending.len();
        if busy >= self.owner.len() {
            return None;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.pending.push(id);
        Some(id)
    }

    fn close(&mut self, id: u32) {
        self.pending.retain(|&p| p != id);
        for o in &mut self.owner {
            if *o == Some(id) {
                *o = None;
            }
        }
    }

    /// The sequence serving session `id`, and whether this is its first
    /// step (the session was bound to it just now).
    fn bind(&mut self, id: u32, keep: u32, tokens: &[i32]) -> Option<(u32, bool)> {
        if let Some(i) = self.owner.iter().position(|&o| o == Some(id)) {
            return Some((i as u32, false));
        }
        let at = self.pending.iter().position(|&p| p == id)?;
        // Scored as the engine's scheduler scores its sequences: tokens saved
        // minus cached tokens thrown away; the least recently used breaks ties.
        let i = (0..self.owner.len())
            .filter(|&i| self.owner[i].is_none())
            .max_by_key(|&i| {
                let shared = if keep == 0 {
                    self.shared(i as u32, tokens)
                } else {
                    0
                };
                let lost = self.tokens[i].len() - shared;
                (shared as i64 - lost as i64, std::cmp::Reverse(self.used[i]))
            })?;
        self.pending.swap_remove(at);
        self.owner[i] = Some(id);
        self.clock += 1;
        self.used[i] = self.clock;
        if keep > 0 {
            // A first step that keeps cells it never wrote: none are reused.
            self.tokens[i].clear();
        }
        Some((i as u32, true))
    }

    /// Tokens at the start of `tokens` that sequence `seq` holds.
    fn shared(&self, seq: u32, tokens: &[i32]) -> usize {
        self.tokens.get(seq as usize).map_or(0, |held| {
            held.iter().zip(tokens).take_while(|(a, b)| a == b).count()
        })
    }

    /// After a step read `tokens` from position `keep`: what the cells hold.
    /// After a failed step what the cells hold is not known: nothing.
    fn record(&mut self, seq: u32, keep: u32, tokens: &[i32], ok: bool) {
        if let Some(held) = self.tokens.get_mut(seq as usize) {
            held.truncate(if ok { keep as usize } else { 0 });
            if ok {
                held.extend_from_slice(tokens);
            }
        }
    }
}

/// Drops the sequence's cells from `keep` on, then reads `tokens` after
/// them in batch-sized chunks, keeping the logits of the last `rows`.
fn eval(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    batch: &mut LlamaBatch,
    chunk: usize,
    seq: u32,
    keep: u32,
    tokens: &[i32],
    rows: usize,
) -> Result<Rows, ApiError> {
    let _ = ctx.clear_kv_cache_seq(Some(seq), Some(keep), None);
    let first_row = tokens.len() - rows;
    let mut out = Vec::with_capacity(rows);
    for (c, part) in tokens.chunks(chunk).enumerate() {
        batch.clear();
        let base = c * chunk;
        for (j, &t) in part.iter().enumerate() {
            let i = base + j;
            batch
                .add(
                    LlamaToken(t),
                    (keep as usize + i) as i32,
                    &[seq as i32],
                    i >= first_row,
                )
                .map_err(|e| ApiError::internal(format!("session batch: {e}")))?;
        }
        runtime::decode(ctx, batch)
            .map_err(|e| ApiError::internal(format!("inference failed: {e}")))?;
        for j in 0..part.len() {
            if base + j >= first_row {
                out.push(ctx.get_logits_ith(j as i32).to_vec());
            }
        }
    }
    Ok(out)
}

/// One session's sequence. Dropping it frees the sequence.
pub struct Session {
    /// The session thread's id for it.
    pub(crate) id: u32,
    pub(crate) tx: Sender<SessionCmd>,
    pub(crate) context: u32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.id).finish()
    }
}

impl tandem_api::KvSession for Session {
    fn context_length(&self) -> u32 {
        self.context
    }

    fn eval(
        &self,
        keep: u32,
        tokens: Vec<i32>,
        rows: usize,
    ) -> futures::future::BoxFuture<'static, Result<Rows, ApiError>> {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(SessionCmd::Eval {
            id: self.id,
            keep,
            tokens,
            rows,
            reply,
        });
        Box::pin(async move {
            sent.map_err(|_| ApiError::internal("the session thread has stopped"))?;
            rx.await
                .map_err(|_| ApiError::internal("the session thread has stopped"))?
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.tx.send(SessionCmd::Close(self.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_bind_where_their_tokens_are_and_never_to_an_open_one() {
        let mut s = Sequences::new(2);
        let a = s.open().unwrap();
        let b = s.open().unwrap();
        assert_eq!(s.open(), None, "two sequences, two sessions");
        let (sa, first) = s.bind(a, 0, &[1, 2, 3]).unwrap();
        assert!(first);
        s.record(sa, 0, &[1, 2, 3, 4], true);
        assert_eq!(s.bind(a, 4, &[5]), Some((sa, false)));
        let (sb, _) = s.bind(b, 0, &[1, 2, 3]).unwrap();
        assert_ne!(sa, sb, "an open session's sequence is not shared");
        s.record(sb, 0, &[9], true);
        s.close(a);
        s.close(b);
        assert_eq!(s.bind(a, 0, &[1]), None, "a closed session cannot step");

        // The next session goes where its prefix is.
        let c = s.open().unwrap();
        assert_eq!(s.bind(c, 0, &[1, 2, 3, 4, 7]), Some((sa, true)));
        assert_eq!(s.shared(sa, &[1, 2, 3, 4, 7]), 4);
        // A failed step leaves nothing to reuse.
        s.record(sa, 0, &[1, 2], false);
        assert_eq!(s.shared(sa, &[1, 2]), 0);
    }
}
