//! `tandem bench`: the engine measured against a plain llama.cpp decode loop
//! through the same library, on the same GGUF and thread count, in one run.
//!
//! Both sides are timed the same way within one answer: prefill is the
//! time from submission to the first token, decode speed is the remaining
//! tokens over the time from the first token to the last. Runs alternate
//! between the two sides so that a change in machine load hits both; the
//! ratios reported are medians of per-run ratios.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;
use tandem_api::{ApiError, Event, GenerateRequest, Input, Sampling};

use tandem_engine::{EngineConfig, EngineError, LocalEngine, Threads, runtime};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model_id: String,
    pub path: PathBuf,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
    /// Concurrent streams compared with one stream.
    pub streams: usize,
    /// Print every run's figures to stderr.
    pub verbose: bool,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Throughput {
    pub prefill_tps: f64,
    pub decode_tps: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
    pub reference: Throughput,
    pub engine: Throughput,
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
    pub streams: usize,
    pub one_stream_tps: f64,
    pub many_streams_tps: f64,
    pub concurrency_ratio: f64,
    /// The same ratio for a bare llama.cpp batched decode loop (decode only).
    pub llama_batch_ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A prompt of about `n` tokens of ordinary prose.
fn prompt_text(model: &LlamaModel, n: usize) -> String {
    const PROSE: &str = "The river ran quietly past the old mill, where the miller's children \
        counted boats and argued about the weather, the price of flour, and whether the \
        bridge would survive another winter of floods. ";
    let mut text = String::new();
    while model.vocab().tokenize(text.as_bytes(), false, false).len() < n {
        text.push_str(PROSE);
    }
    let tokens = model.vocab().tokenize(text.as_bytes(), false, false);
    let mut out = Vec::new();
    for t in &tokens[..n] {
        model.vocab().token_to_piece_into(*t, &mut out, false, None);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The reference: llama.cpp's simplest generation loop, one sequence.
fn reference_run(
    model: &LlamaModel,
    tokens: &[LlamaToken],
    n_gen: usize,
    threads: usize,
) -> Result<(Duration, Duration), EngineError> {
    let n_ctx = (tokens.len() + n_gen + 256).div_ceil(256) * 256;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx as u32))
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32);
    let mut ctx = runtime::new_context(model, params).map_err(EngineError::Context)?;
    let mut batch = LlamaBatch::new(512, 1);
    let mut sampler = LlamaSampler::greedy();
    let decode_err = |e: llama_cpp_2::DecodeError| EngineError::Context(e.to_string());

    let t0 = Instant::now();
    for (c, chunk) in tokens.chunks(512).enumerate() {
        batch.clear();
        for (i, &t) in chunk.iter().enumerate() {
            let pos = c * 512 + i;
            batch
                .add(t, pos as i32, &[0], pos + 1 == tokens.len())
                .map_err(|e| EngineError::Context(e.to_string()))?;
        }
        ctx.decode(&mut batch).map_err(decode_err)?;
    }
    let mut tok = sampler.sample(&ctx, batch.n_tokens() - 1);
    let mut piece = Vec::new();
    model
        .vocab()
        .token_to_piece_into(tok, &mut piece, false, None);
    let t1 = Instant::now();
    for i in 1..n_gen {
        batch.clear();
        batch
            .add(tok, (tokens.len() + i - 1) as i32, &[0], true)
            .map_err(|e| EngineError::Context(e.to_string()))?;
        ctx.decode(&mut batch).map_err(decode_err)?;
        tok = sampler.sample(&ctx, 0);
        piece.clear();
        model
            .vocab()
            .token_to_piece_into(tok, &mut piece, false, None);
    }
    // (prefill with the first token, the remaining tokens)
    Ok((t1 - t0, t1.elapsed()))
}

/// llama.cpp's own batching gain: `n` sequences decoded in one batch per
/// step, against one. This is the ceiling the engine's scheduler can reach
/// with this model's weight format on this CPU.
fn reference_batch_tps(
    model: &LlamaModel,
    n: usize,
    steps: usize,
    threads: usize,
) -> Result<f64, EngineError> {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new((512 * n) as u32))
        .with_n_seq_max(n as u32)
        .with_n_batch(512)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32);
    let mut ctx = runtime::new_context(model, params).map_err(EngineError::Context)?;
    let mut batch = LlamaBatch::new(512, n as i32);
    let err = |e: String| EngineError::Context(e);
    let prompt = model.vocab().tokenize(
        b"Once upon a time, in a quiet village by the sea,",
        false,
        false,
    );
    for s in 0..n {
        for (i, &t) in prompt.iter().enumerate() {
            batch
                .add(t, i as i32, &[s as i32], i + 1 == prompt.len())
                .map_err(|e| err(e.to_string()))?;
        }
    }
    ctx.decode(&mut batch).map_err(|e| err(e.to_string()))?;
    let mut samplers: Vec<_> = (0..n).map(|_| LlamaSampler::greedy()).collect();
    let mut next: Vec<LlamaToken> = (0..n)
        .map(|s| samplers[s].sample(&ctx, ((s + 1) * prompt.len() - 1) as i32))
        .collect();
    let t0 = Instant::now();
    for k in 0..steps {
        batch.clear();
        for (s, &t) in next.iter().enumerate() {
            batch
                .add(t, (prompt.len() + k) as i32, &[s as i32], true)
                .map_err(|e| err(e.to_string()))?;
        }
        ctx.decode(&mut batch).map_err(|e| err(e.to_string()))?;
        for (s, t) in next.iter_mut().enumerate() {
            *t = samplers[s].sample(&ctx, s as i32);
        }
    }
    Ok((n * steps) as f64 / t0.elapsed().as_secs_f64())
}

fn request(model: &str, prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        choices: 1,
        model: model.to_owned(),
        input: Input::text(prompt),
        sampling: Sampling {
            ignore_eos: true,
            ..Sampling::greedy()
        },
        max_tokens: Some(max_tokens as u32),
        stop: Vec::new(),
        logprobs: None,
        stream: true,
        include_usage: false,
        extra: Default::default(),
    }
}

/// One timed answer: when its first token arrived, when it ended, and
/// how many tokens it had.
struct Timed {
    first: Duration,
    total: Duration,
    tokens: u32,
}

async fn engine_run(engine: &LocalEngine, req: GenerateRequest) -> Result<Timed, ApiError> {
    let t0 = Instant::now();
    let mut first = None;
    let mut s = engine.submit(req)?;
    while let Some(ev) = s.next().await {
        match ev? {
            Event::Delta(_) => {
                first.get_or_insert_with(|| t0.elapsed());
            }
            Event::Finish(f) => {
                let total = t0.elapsed();
                return Ok(Timed {
                    first: first.unwrap_or(total),
                    total,
                    tokens: f.usage.completion_tokens,
                });
            }
        }
    }
    Err(ApiError::internal("stream ended early"))
}

async fn streams_tps(
    engine: &LocalEngine,
    prompt: &str,
    n_gen: usize,
    n: usize,
) -> Result<f64, ApiError> {
    let t0 = Instant::now();
    // Each stream's prompt opens differently: none is read from another's
    // (or an earlier run's) cached prefix.
    let runs = (0..n).map(|_| {
        let p = format!("[{}] {prompt}", fastrand::u32(..));
        engine_run(engine, request(engine.model_id(), &p, n_gen))
    });
    let results = futures::future::join_all(runs).await;
    let mut tokens = 0u64;
    for r in results {
        tokens += u64::from(r?.tokens);
    }
    Ok(tokens as f64 / t0.elapsed().as_secs_f64())
}

pub fn run(cfg: &BenchConfig) -> Result<BenchReport, EngineError> {
    let backend = runtime::backend().map_err(EngineError::Context)?;
    let model = LlamaModel::load_from_file(backend, &cfg.path, &LlamaModelParams::default())
        .map_err(|e| EngineError::Load {
            path: cfg.path.clone(),
            reason: e.to_string(),
        })?;
    let prompt = prompt_text(&model, cfg.prompt_tokens);
    let short_prompt = prompt_text(&model, 32);

    let mut ecfg = EngineConfig::new(cfg.model_id.clone(), cfg.path.clone());
    ecfg.threads = Threads::Fixed(cfg.threads);
    ecfg.parallel = ecfg.parallel.max(cfg.streams as u32);
    ecfg.context = Some(((cfg.prompt_tokens + cfg.gen_tokens + 64) as u32).max(512));
    let engine = LocalEngine::load(ecfg)?;
    // Both sides read exactly the same tokens.
    let add_bos = model.vocab().should_add_bos();
    let tokens = model.vocab().tokenize(prompt.as_bytes(), add_bos, true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EngineError::Context(e.to_string()))?;
    let api = |e: ApiError| EngineError::Context(e.message);

    // Warm caches and page in the weights on both sides.
    reference_run(&model, &tokens[..tokens.len().min(32)], 8, cfg.threads)?;
    rt.block_on(engine_run(
        &engine,
        request(&cfg.model_id, &short_prompt, 8),
    ))
    .map_err(api)?;

    let (mut rp, mut rd, mut ep, mut ed) = (vec![], vec![], vec![], vec![]);
    let decode_steps = (cfg.gen_tokens.max(2) - 1) as f64;
    for _ in 0..cfg.runs {
        // The engine keeps a finished request's prefix cached: every run's
        // prompt opens with its own marker so that both sides read it all.
        let prompt = format!("[{}] {prompt}", fastrand::u32(..));
        let tokens = model.vocab().tokenize(prompt.as_bytes(), add_bos, true);
        let (prefill, decode) = reference_run(&model, &tokens, cfg.gen_tokens, cfg.threads)?;
        rp.push(tokens.len() as f64 / prefill.as_secs_f64());
        rd.push(decode_steps / decode.as_secs_f64());

        let run = rt
            .block_on(engine_run(
                &engine,
                request(&cfg.model_id, &prompt, cfg.gen_tokens),
            ))
            .map_err(api)?;
        ep.push(tokens.len() as f64 / run.first.as_secs_f64());
        ed.push(f64::from(run.tokens.max(2) - 1) / (run.total - run.first).as_secs_f64());
        if cfg.verbose {
            let i = rp.len() - 1;
            eprintln!(
                "run {i}: prefill tok/s reference {:.1} engine {:.1} | decode tok/s reference {:.1} engine {:.1}",
                rp[i], ep[i], rd[i], ed[i]
            );
        }
    }

    let (mut one, mut many, mut raw) = (vec![], vec![], vec![]);
    for _ in 0..cfg.runs {
        let single = reference_batch_tps(&model, 1, cfg.gen_tokens, cfg.threads)?;
        let batched = reference_batch_tps(&model, cfg.streams, cfg.gen_tokens, cfg.threads)?;
        raw.push(batched / single);
        one.push(
            rt.block_on(streams_tps(&engine, &short_prompt, cfg.gen_tokens, 1))
                .map_err(api)?,
        );
        many.push(
            rt.block_on(streams_tps(
                &engine,
                &short_prompt,
                cfg.gen_tokens,
                cfg.streams,
            ))
            .map_err(api)?,
        );
    }

    // Ratios are taken per run, between measurements made moments apart,
    // then their median: slow drifts in the machine's speed cancel out.
    let paired = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    let prefill_ratio = paired(&ep, &rp);
    let decode_ratio = paired(&ed, &rd);
    let concurrency_ratio = paired(&many, &one);
    let reference = Throughput {
        prefill_tps: median(rp),
        decode_tps: median(rd),
    };
    let engine_tp = Throughput {
        prefill_tps: median(ep),
        decode_tps: median(ed),
    };
    let (one, many) = (median(one), median(many));
    Ok(BenchReport {
        model: cfg.model_id.clone(),
        threads: cfg.threads,
        prompt_tokens: tokens.len(),
        gen_tokens: cfg.gen_tokens,
        runs: cfg.runs,
        prefill_ratio,
        decode_ratio,
        reference,
        engine: engine_tp,
        streams: cfg.streams,
        one_stream_tps: one,
        many_streams_tps: many,
        concurrency_ratio,
        llama_batch_ratio: median(raw),
    })
}
