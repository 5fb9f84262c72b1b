//! Sessions: sequences whose KV cache lives across calls, for speculative
//! decoding. A draft model extends its sequence a token at a time and rolls
//! back what the target rejected; a target model reads a round's new tokens
//! and draft in one forward pass and keeps only the accepted prefix.
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
use crate::{Threads, runtime};

use tandem_api::Rows;

pub(crate) enum SessionCmd {
    Open(oneshot::Sender<Result<u32, ApiError>>),
    Eval {
        seq: u32,
        keep: u32,
        tokens: Vec<i32>,
        rows: usize,
        reply: oneshot::Sender<Result<Rows, ApiError>>,
    },
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
) -> Result<Sender<SessionCmd>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("tandem-sessions-{name}"))
        .spawn(move || run(model, cfg, rx, ready_tx))
        .map_err(|e| format!("cannot start the session thread: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(tx),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the session thread died".into()),
    }
}

fn run(
    model: Arc<LlamaModel>,
    cfg: SessionConfig,
    rx: Receiver<SessionCmd>,
    ready: Sender<Result<(), String>>,
) {
    let threads = match cfg.threads {
        Threads::Fixed(n) => n.max(1),
        Threads::Auto => LoadMonitor::global().suggested_threads(),
    };
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
    let mut used = vec![false; cfg.slots as usize];
    let mut batch = LlamaBatch::new(cfg.batch as usize, 1);

    while let Ok(cmd) = rx.recv() {
        match cmd {
            SessionCmd::Open(reply) => {
                let free = used.iter().position(|u| !u);
                let result = match free {
                    Some(i) => {
                        used[i] = true;
                        let _ = ctx.clear_kv_cache_seq(Some(i as u32), None, None);
                        Ok(i as u32)
                    }
                    None => Err(ApiError::unavailable(format!(
                        "all {} speculative sessions are in use",
                        cfg.slots
                    ))),
                };
                let _ = reply.send(result);
            }
            SessionCmd::Close(seq) => {
                if let Some(u) = used.get_mut(seq as usize) {
                    *u = false;
                    let _ = ctx.clear_kv_cache_seq(Some(seq), None, None);
                }
            }
            SessionCmd::Eval {
                seq,
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
                } else {
                    eval(
                        &mut ctx,
                        &mut batch,
                        cfg.batch as usize,
                        seq,
                        keep,
                        &tokens,
                        rows,
                    )
                };
                let _ = reply.send(result);
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
        ctx.decode(batch)
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
    pub(crate) seq: u32,
    pub(crate) tx: Sender<SessionCmd>,
    pub(crate) context: u32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("seq", &self.seq).finish()
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
            seq: self.seq,
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
        let _ = self.tx.send(SessionCmd::Close(self.seq));
    }
}
