//! The model's own reading of a prompt: its last layer's hidden state after
//! it has read the prompt, which the router's probe scores ("will this
//! model get it right?") before anything is generated.
//!
//! A reading is the mean of the last layer's output over the prompt's
//! tokens followed by the last token's output ([`width`] numbers). The
//! prompt is framed as `"{text}\nAnswer:"`, so the last token is where the
//! model is about to answer. Training (`tandem router read`, then
//! `tandem router train --readings`) and requests read prompts through this
//! same function.
//!
//! Requests' readings run on their own thread with their own llama.cpp context in
//! embedding mode (sharing the model's weights), started on first use, so
//! the continuous-batching scheduler stays as it is and engines whose
//! router does not read prompts pay nothing.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use tokio::sync::oneshot;

use crate::load::LoadMonitor;
use crate::{Threads, runtime};

/// Tokens of a prompt that are read: its last ones when it is longer
/// (where the question usually is).
pub const MAX_TOKENS: usize = 1024;

/// Numbers in a reading of `model`'s prompts.
pub fn width(model: &LlamaModel) -> usize {
    width_of(usize::try_from(model.n_embd_out()).unwrap_or(0))
}

/// Numbers in a reading of a layer `d` wide, the last layer's or a
/// block's: the mean over the prompt's positions, then the last one's.
pub fn width_of(d: usize) -> usize {
    2 * d
}

/// Tokens decoded at once. Every position's output is kept, and llama.cpp
/// sizes its output buffers (a vocabulary-wide row of logits each, beside
/// the hidden state) by the batch: a quarter of the window keeps them to
/// about 150 MB for a 150k-token vocabulary.
const CHUNK: usize = 256;

/// A context that reads prompts (embedding mode, every position's output).
pub fn context(model: &LlamaModel, threads: usize) -> Result<LlamaContext<'_>, String> {
    let threads = i32::try_from(threads.max(1)).unwrap_or(1);
    let chunk = u32::try_from(CHUNK).unwrap_or(256);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(u32::try_from(MAX_TOKENS).unwrap_or(1024)))
        .with_n_batch(chunk)
        .with_n_ubatch(chunk)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_embeddings(true)
        .with_pooling_type(LlamaPoolingType::None);
    runtime::new_context(model, params)
}

/// `text` as every reading frames it: the last token is where the model is
/// about to answer.
pub(crate) fn framed(text: &str) -> String {
    format!("{text}\nAnswer:")
}

/// Cuts a prompt's tokens to the last [`MAX_TOKENS`]; none is an error.
pub(crate) fn keep_last<T>(tokens: &mut Vec<T>) -> Result<(), String> {
    if tokens.is_empty() {
        return Err("the prompt has no tokens".into());
    }
    if tokens.len() > MAX_TOKENS {
        tokens.drain(..tokens.len() - MAX_TOKENS);
    }
    Ok(())
}

/// The reading of `text` (see the module's doc).
pub fn read(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    text: &str,
) -> Result<Vec<f32>, String> {
    let mut tokens = model.vocab().tokenize(framed(text).as_bytes(), true, false);
    keep_last(&mut tokens)?;
    ctx.clear_kv_cache();
    let d = usize::try_from(model.n_embd_out()).unwrap_or(0);
    let mut out = vec![0f32; width_of(d)];
    let n = tokens.len();
    let mut batch = LlamaBatch::new(CHUNK, 1);
    for (c, chunk) in tokens.chunks(CHUNK).enumerate() {
        batch.clear();
        for (j, &t) in chunk.iter().enumerate() {
            let pos = i32::try_from(c * CHUNK + j).map_err(|e| e.to_string())?;
            batch
                .add(t, pos, &[0], true)
                .map_err(|e| format!("cannot batch the prompt: {e}"))?;
        }
        runtime::decode(ctx, &mut batch).map_err(|e| format!("cannot read the prompt: {e}"))?;
        for j in 0..chunk.len() {
            let row = ctx
                .embeddings_ith(i32::try_from(j).unwrap_or(i32::MAX))
                .map_err(|e| format!("no hidden state for token {}: {e}", c * CHUNK + j))?;
            for (m, &v) in out[..d].iter_mut().zip(row) {
                *m += v / n as f32;
            }
            if c * CHUNK + j + 1 == n {
                for (o, &v) in out[d..].iter_mut().zip(row) {
                    *o = v;
                }
            }
        }
    }
    Ok(out)
}

pub(crate) type Job = (String, oneshot::Sender<Result<Vec<f32>, String>>);

/// Starts the reading thread; returns once its context exists.
pub(crate) fn start(
    model: Arc<LlamaModel>,
    threads: Threads,
    name: &str,
) -> Result<Sender<Job>, String> {
    runtime::spawn_worker(format!("tandem-reader-{name}"), move |rx, ready| {
        run(model, threads, rx, ready)
    })
}

fn run(
    model: Arc<LlamaModel>,
    threads: Threads,
    rx: Receiver<Job>,
    ready: Sender<Result<(), String>>,
) {
    let threads = threads.count(&LoadMonitor::global());
    let mut ctx = match context(&model, threads) {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while let Ok((text, reply)) = rx.recv() {
        if reply.is_closed() {
            continue;
        }
        let _ = reply.send(read(&model, &mut ctx, &text));
    }
}

/// Reads every text of `texts` with the model at `path` on `threads`
/// threads, handing each reading (in order) to `each`, which returns
/// `false` to stop. Blocking: for batch jobs such as `tandem router read`.
pub fn read_all<'a>(
    path: &std::path::Path,
    threads: usize,
    texts: impl IntoIterator<Item = &'a str>,
    mut each: impl FnMut(Result<Vec<f32>, String>) -> bool,
) -> Result<(), String> {
    let backend = runtime::backend()?;
    let model = LlamaModel::load_from_file(backend, path, &Default::default())
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    let mut ctx = context(&model, threads)?;
    for text in texts {
        if !each(read(&model, &mut ctx, text)) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_the_same_whoever_takes_it_and_differs_between_prompts() {
        let path = tandem_testkit::model_path(tandem_testkit::SMOLLM2);
        let texts = [
            "What is 2 + 2?",
            "Name the capital of France.",
            "What is 2 + 2?",
        ];
        let mut batch = Vec::new();
        read_all(&path, 2, texts, |r| {
            batch.push(r.expect("read"));
            true
        })
        .expect("model");
        let backend = runtime::backend().expect("backend");
        let model = LlamaModel::load_from_file(backend, &path, &Default::default()).expect("load");
        let w = width(&model);
        assert!(w > 0 && batch.iter().all(|r| r.len() == w));
        assert!(batch.iter().flatten().all(|v| v.is_finite()));
        // The context is cleared between prompts: a prompt read after
        // another reads as it does alone, on any thread count.
        assert_eq!(batch[0], batch[2]);
        assert_ne!(batch[0], batch[1]);
        let mut ctx = context(&model, 1).expect("context");
        let alone = read(&model, &mut ctx, texts[1]).expect("read");
        let close = alone
            .iter()
            .zip(&batch[1])
            .all(|(a, b)| (a - b).abs() <= 1e-3 * (1.0 + a.abs()));
        assert!(close, "the same prompt read differently");
        // The mean and the last position are different halves.
        assert_ne!(alone[..w / 2], alone[w / 2..]);
        // Any text is read; none panics, an empty one has the framing's
        // tokens, and a long one keeps its last tokens.
        for text in ["", "\u{0}", "🙂 ß 日本語", &"word ".repeat(3000)] {
            let r = read(&model, &mut ctx, text).expect("any text is read");
            assert_eq!(r.len(), w);
        }
    }
}
