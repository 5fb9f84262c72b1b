//! The engine on real models: generation, sampling controls, limits,
//! cancellation, continuous batching.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tandem_api::{
    Answer, Event, FinishReason, GenerateRequest, Input, LogprobRequest, Message, Sampling,
    SamplingPreset,
};
use tandem_engine::{EngineConfig, LocalEngine, Threads};
use tandem_testkit::{GEMMA_270M, QWEN_05B, SMOLLM2, model_path};

/// One engine shared by the tests that only need answers.
fn shared() -> &'static LocalEngine {
    static E: OnceLock<LocalEngine> = OnceLock::new();
    E.get_or_init(|| {
        LocalEngine::load(EngineConfig::new(SMOLLM2, model_path(SMOLLM2))).expect("load")
    })
}

/// An engine of its own, for tests that read the engine's counters.
fn private(parallel: u32, max_queue: usize) -> LocalEngine {
    let mut cfg = EngineConfig::new(SMOLLM2, model_path(SMOLLM2));
    cfg.parallel = parallel;
    cfg.max_queue = max_queue;
    cfg.context = Some(1024);
    cfg.threads = Threads::Fixed(1);
    LocalEngine::load(cfg).expect("load")
}

fn chat(model: &str, user: &str) -> GenerateRequest {
    GenerateRequest {
        choices: 1,
        model: model.into(),
        input: Input::Chat {
            messages: vec![Message::new("user", user)],
            continue_from: None,
        },
        sampling: Sampling::greedy(),
        max_tokens: Some(48),
        stop: vec![],
        logprobs: None,
        stream: false,
        include_usage: false,
        extra: Default::default(),
    }
}

/// A parameter a request leaves out comes from the configured pin, else the
/// GGUF's recommendation, else llama.cpp server's defaults (this GGUF
/// recommends nothing); a configured system message joins only
/// conversations that bring none.
#[test]
fn sampling_defaults_fill_what_the_request_leaves_out() {
    let mut cfg = EngineConfig::new(SMOLLM2, model_path(SMOLLM2));
    cfg.sampling = SamplingPreset {
        temperature: Some(0.3),
        repeat_penalty: Some(1.2),
        ..SamplingPreset::default()
    };
    cfg.default_system = Some("Answer briefly.".into());
    cfg.context = Some(256);
    cfg.parallel = 1;
    let e = LocalEngine::load(cfg).expect("load");
    let p = e.sampling_preset();
    assert_eq!(p.temperature, Some(0.3));
    assert_eq!(p.repeat_penalty, Some(1.2));
    assert_eq!(p.top_k, SamplingPreset::LLAMA_SERVER.top_k);
    assert_eq!(p.top_p, SamplingPreset::LLAMA_SERVER.top_p);
    assert_eq!(p.min_p, SamplingPreset::LLAMA_SERVER.min_p);
    let asked = Sampling {
        top_k: Some(5),
        temperature: Some(0.0),
        ..Sampling::default()
    };
    let s = e.effective_sampling(&asked);
    assert_eq!(
        (s.top_k, s.temperature, s.min_p),
        (Some(5), Some(0.0), Some(0.05))
    );

    let plain = e
        .render(&Input::Chat {
            messages: vec![Message::new("user", "Hi")],
            continue_from: None,
        })
        .unwrap();
    assert!(plain.contains("Answer briefly."), "{plain}");
    let own = e
        .render(&Input::Chat {
            messages: vec![
                Message::new("system", "Be a pirate."),
                Message::new("user", "Hi"),
            ],
            continue_from: None,
        })
        .unwrap();
    assert!(
        own.contains("Be a pirate.") && !own.contains("Answer briefly."),
        "{own}"
    );
}

async fn answer(engine: &LocalEngine, req: GenerateRequest) -> Answer {
    Answer::collect(engine.submit(req).expect("submit"))
        .await
        .expect("answer")
}

async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn greedy_answer_names_paris_and_is_deterministic() {
    let e = shared();
    let req = chat(
        SMOLLM2,
        "What is the capital of France? Answer in one word.",
    );
    let a = answer(e, req.clone()).await;
    assert!(a.text.contains("Paris"), "answer: {:?}", a.text);
    assert_eq!(a.finish.reason, FinishReason::Stop);
    let b = answer(e, req).await;
    assert_eq!(a.text, b.text);
}

#[tokio::test]
async fn max_tokens_and_usage_hold() {
    let e = shared();
    let mut req = chat(SMOLLM2, "Write a long story about a dragon.");
    req.max_tokens = Some(7);
    let a = answer(e, req).await;
    assert_eq!(a.finish.reason, FinishReason::Length);
    assert_eq!(a.finish.usage.completion_tokens, 7);
    assert_eq!(
        a.finish.usage.total_tokens,
        a.finish.usage.prompt_tokens + a.finish.usage.completion_tokens
    );
    let rendered = e
        .render(&Input::Chat {
            messages: vec![Message::new("user", "Write a long story about a dragon.")],
            continue_from: None,
        })
        .unwrap();
    assert_eq!(
        a.finish.usage.prompt_tokens as usize,
        e.count_tokens(&rendered)
    );
}

#[tokio::test]
async fn stop_sequence_cuts_the_answer() {
    let e = shared();
    let free = answer(e, chat(SMOLLM2, "Count from 1 to 10, separated by commas.")).await;
    assert!(free.text.contains('5'), "{:?}", free.text);
    let cut_at = free.text.find('5').unwrap();
    let mut req = chat(SMOLLM2, "Count from 1 to 10, separated by commas.");
    req.stop = vec!["5".into()];
    let a = answer(e, req).await;
    assert_eq!(a.finish.reason, FinishReason::Stop);
    assert_eq!(a.text, free.text[..cut_at]);
}

#[tokio::test]
async fn seeded_sampling_repeats_and_temperature_varies() {
    let e = shared();
    let mut req = chat(SMOLLM2, "Name a random animal and describe it.");
    req.sampling = Sampling {
        temperature: Some(1.2),
        top_p: Some(0.95),
        top_k: Some(50),
        seed: Some(42),
        presence_penalty: 0.5,
        frequency_penalty: 0.5,
        ignore_eos: false,
        ..Sampling::default()
    };
    let a = answer(e, req.clone()).await;
    let b = answer(e, req.clone()).await;
    assert_eq!(a.text, b.text, "same seed, same answer");
    let mut texts = std::collections::HashSet::new();
    for seed in 1..=4 {
        req.sampling.seed = Some(seed);
        texts.insert(answer(e, req.clone()).await.text);
    }
    assert!(texts.len() > 1, "different seeds should differ: {texts:?}");
}

#[tokio::test]
async fn logprobs_are_consistent() {
    let e = shared();
    let mut req = chat(SMOLLM2, "Say hello.");
    req.max_tokens = Some(5);
    req.logprobs = Some(LogprobRequest { top: 3 });
    let a = answer(e, req).await;
    assert_eq!(a.tokens.len(), a.finish.usage.completion_tokens as usize);
    let joined: Vec<u8> = a
        .tokens
        .iter()
        .flat_map(|t| t.bytes.clone().unwrap())
        .collect();
    assert_eq!(String::from_utf8_lossy(&joined), a.text);
    for t in &a.tokens {
        assert!(t.logprob <= 0.0);
        assert_eq!(t.top_logprobs.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t.top_logprobs[0].token, t.token);
        assert!((t.top_logprobs[0].logprob - t.logprob).abs() < 1e-4);
        let mass: f32 = t.top_logprobs.iter().map(|x| x.logprob.exp()).sum();
        assert!(mass <= 1.0 + 1e-4);
        assert!(
            t.top_logprobs
                .windows(2)
                .all(|w| w[0].logprob >= w[1].logprob)
        );
    }
}

#[tokio::test]
async fn too_long_prompt_and_too_many_tokens_are_refused() {
    let e = private(1, 4);
    let long = "word ".repeat(3000);
    let err = e.submit(chat(SMOLLM2, &long)).err().expect("refused");
    assert_eq!(err.status, 400);
    assert_eq!(err.code.as_deref(), Some("context_length_exceeded"));
    let mut req = chat(SMOLLM2, "hi");
    req.max_tokens = Some(1_000_000);
    let err = e.submit(req).err().expect("refused");
    assert_eq!(err.param.as_deref(), Some("max_tokens"));
    let mut req = chat(SMOLLM2, "hi");
    req.model = "other".into();
    assert_eq!(e.submit(req).err().expect("refused").status, 404);
}

#[tokio::test]
async fn dropping_the_stream_frees_the_engine() {
    let e = private(2, 8);
    let mut req = chat(SMOLLM2, "Tell me a very long story.");
    req.max_tokens = Some(900);
    req.sampling.ignore_eos = true;
    let mut s = e.submit(req).unwrap();
    // Read a few tokens, then walk away.
    let mut got = 0;
    while got < 3 {
        if let Some(Ok(Event::Delta(_))) = s.next().await {
            got += 1;
        }
    }
    assert_eq!(e.stats().active, 1);
    let before = e.stats().generated_tokens;
    drop(s);
    assert!(wait_until(|| e.stats().active == 0).await, "slot not freed");
    let after = e.stats().generated_tokens;
    assert!(after - before < 50, "kept generating after the client left");
    // And it serves the next request.
    let a = answer(&e, chat(SMOLLM2, "Say hi.")).await;
    assert!(!a.text.is_empty());
}

#[tokio::test]
async fn requests_decode_together_and_excess_waits_or_is_refused() {
    let e = private(3, 1);
    let mut streams = Vec::new();
    for i in 0..3 {
        let mut req = chat(SMOLLM2, &format!("Write story number {i}."));
        req.max_tokens = Some(60);
        req.sampling.ignore_eos = true;
        streams.push(e.submit(req).unwrap());
    }
    // All three are admitted at once (continuous batching), not queued.
    assert!(
        wait_until(|| e.stats().active == 3).await,
        "{:?}",
        e.stats()
    );
    // A fourth waits in the queue; a fifth finds the queue full.
    let mut queued_req = chat(SMOLLM2, "Queued.");
    queued_req.max_tokens = Some(4);
    let queued = e.submit(queued_req).unwrap();
    let err = e.submit(chat(SMOLLM2, "One too many.")).err().expect("503");
    assert_eq!(err.status, 503);
    let answers = futures::future::join_all(streams.into_iter().map(Answer::collect)).await;
    for a in answers {
        assert_eq!(a.unwrap().finish.usage.completion_tokens, 60);
    }
    let q = Answer::collect(queued).await.unwrap();
    assert_eq!(q.finish.usage.completion_tokens, 4);
}

#[tokio::test]
async fn continuation_picks_up_where_text_left_off() {
    let e = shared();
    let full = answer(
        e,
        chat(
            SMOLLM2,
            "What is the capital of France? Answer in one word.",
        ),
    )
    .await;
    let split = full.text.len() / 2;
    let split = (0..=split)
        .rev()
        .find(|&i| full.text.is_char_boundary(i))
        .unwrap();
    let mut req = chat(
        SMOLLM2,
        "What is the capital of France? Answer in one word.",
    );
    if let Input::Chat { continue_from, .. } = &mut req.input {
        *continue_from = Some(full.text[..split].to_owned());
    }
    let rest = answer(e, req).await;
    assert!(
        format!("{}{}", &full.text[..split], rest.text).contains("Paris"),
        "{:?} + {:?}",
        &full.text[..split],
        rest.text
    );
}

#[tokio::test]
async fn qwen2_and_gemma3_load_and_generate() {
    let qwen = LocalEngine::load(EngineConfig::new(QWEN_05B, model_path(QWEN_05B))).unwrap();
    let a = answer(
        &qwen,
        chat(
            QWEN_05B,
            "What is the capital of France? Answer in one word.",
        ),
    )
    .await;
    assert!(a.text.contains("Paris"), "{:?}", a.text);
    drop(qwen);

    let gemma = LocalEngine::load(EngineConfig::new(GEMMA_270M, model_path(GEMMA_270M))).unwrap();
    // A base model: no chat template, so chat is refused with a pointer to
    // completions, and completions work.
    assert!(!gemma.has_chat_template());
    let err = gemma
        .submit(chat(GEMMA_270M, "hi"))
        .err()
        .expect("no template");
    assert_eq!(err.status, 400);
    assert!(err.message.contains("/v1/completions"), "{}", err.message);
    let mut req = chat(GEMMA_270M, "unused");
    req.input = Input::text(
        "Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of Spain?\nA: Madrid\nQ: What is the capital of France?\nA:",
    );
    req.max_tokens = Some(4);
    let a = answer(&gemma, req).await;
    assert!(a.text.contains("Paris"), "{:?}", a.text);
}

fn conversation(model: &str, turns: &[(&str, &str)], next: &str) -> GenerateRequest {
    let mut req = chat(model, next);
    if let Input::Chat { messages, .. } = &mut req.input {
        let mut all = vec![Message::new(
            "system",
            "You are a concise assistant for a travel agency. Answer in one or two sentences.",
        )];
        for (user, assistant) in turns {
            all.push(Message::new("user", *user));
            all.push(Message::new("assistant", *assistant));
        }
        all.push(Message::new("user", next));
        *messages = all;
    }
    req.max_tokens = Some(40);
    req.logprobs = Some(LogprobRequest { top: 2 });
    req
}

/// llama.cpp's CPU kernels give logits that depend slightly on the shape
/// of the batch a token was read in: the same prompt read in chunks of 7 or
/// of 512 tokens differs by up to 0.08 in a token's log-probability on AVX2
/// (AMD EPYC), and read 4 tokens at a time instead of 512 by up to 0.15 on
/// AVX-512 (Xeon), two cold engines, no reuse; one token at a time can pick
/// the other of two near-tied tokens (measured on this model; llama.cpp
/// documents the same for its server's `cache_prompt`). Reused cells were
/// read in other shapes than a cold prefill, so two greedy answers agree
/// token for token up to the first near-tie of the reference, where either
/// may be chosen. A wrong position or a stale cell would break far more.
fn same_up_to_near_ties(got: &Answer, reference: &Answer) {
    for (i, (g, r)) in got.tokens.iter().zip(&reference.tokens).enumerate() {
        if g.token != r.token {
            let alts = &r.top_logprobs;
            assert!(
                alts.len() >= 2 && (alts[0].logprob - alts[1].logprob).abs() < 0.25,
                "token {i} differs ({:?} vs {:?}) without a near-tie: {alts:?}",
                g.token,
                r.token
            );
            return;
        }
        assert!(
            (g.logprob - r.logprob).abs() < 0.25,
            "token {i} {:?}: logprob {} vs {}",
            g.token,
            g.logprob,
            r.logprob
        );
    }
    assert_eq!(got.text, reference.text);
}

/// A conversation's next turn reads only what is new, and answers exactly
/// as a cold engine does, token for token.
#[tokio::test]
async fn the_next_turn_reuses_the_cached_prefix_and_answers_alike() {
    let mut cfg = EngineConfig::new(QWEN_05B, model_path(QWEN_05B));
    cfg.parallel = 2;
    cfg.context = Some(2048);
    cfg.threads = Threads::Fixed(2);
    let warm = LocalEngine::load(cfg.clone()).unwrap();

    let q1 = "Which city is the capital of Portugal?";
    let first = answer(&warm, conversation(QWEN_05B, &[], q1)).await;
    assert_eq!(first.finish.usage.cached_tokens(), 0, "nothing cached yet");
    let q2 = "And what is a famous dish there?";
    let req2 = conversation(QWEN_05B, &[(q1, first.text.as_str())], q2);
    let second = answer(&warm, req2.clone()).await;
    let prompt = second.finish.usage.prompt_tokens;
    let cached = second.finish.usage.cached_tokens();
    assert!(
        cached >= 30 && cached < prompt,
        "the history is reused, the new message read: {cached} of {prompt}"
    );
    assert_eq!(warm.stats().cached_prompt_tokens, u64::from(cached));

    // The same request again: all but the last prompt token is cached.
    let again = answer(&warm, req2.clone()).await;
    assert_eq!(again.finish.usage.cached_tokens(), prompt - 1);

    let cold = LocalEngine::load(cfg).unwrap();
    let reference = answer(&cold, req2).await;
    assert_eq!(reference.finish.usage.cached_tokens(), 0);
    same_up_to_near_ties(&second, &reference);
    same_up_to_near_ties(&again, &reference);
}

/// A model with sliding-window attention (Gemma 3) reuses what its cache
/// still holds and gives the answer a cold engine gives.
#[tokio::test]
async fn sliding_window_models_reuse_safely() {
    let mut cfg = EngineConfig::new(GEMMA_270M, model_path(GEMMA_270M));
    cfg.parallel = 1;
    cfg.context = Some(1024);
    // Fixed: following the load would start a new context (and cache)
    // between requests when the machine's load changes.
    cfg.threads = Threads::Fixed(2);
    let warm = LocalEngine::load(cfg.clone()).unwrap();
    let base =
        "Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of Spain?\nA: Madrid\n";
    let mut req = chat(GEMMA_270M, "unused");
    req.max_tokens = Some(6);
    req.input = Input::text(format!("{base}Q: What is the capital of France?\nA:"));
    let _ = answer(&warm, req.clone()).await;
    req.input = Input::text(format!("{base}Q: What is the capital of Germany?\nA:"));
    let second = answer(&warm, req.clone()).await;
    assert!(
        second.finish.usage.cached_tokens() > 10,
        "{:?}",
        second.finish.usage
    );
    let cold = LocalEngine::load(cfg).unwrap();
    let reference = answer(&cold, req).await;
    assert_eq!(second.text, reference.text);
    assert!(second.text.contains("Berlin"), "{:?}", second.text);
}

/// Requests with shared and distinct prefixes, more than there are
/// sequences, decoded together: each answers as a cold engine answers it,
/// and the conversations' next turns find their histories.
#[tokio::test]
async fn shared_and_distinct_prefixes_interleave_correctly() {
    let mut cfg = EngineConfig::new(QWEN_05B, model_path(QWEN_05B));
    cfg.parallel = 2;
    cfg.context = Some(2048);
    cfg.threads = Threads::Fixed(2);
    let warm = LocalEngine::load(cfg.clone()).unwrap();
    // A conversation without the travel agency's system prompt (the
    // template's own instead), so that it shares almost nothing with one
    // that has it.
    let plain = |turns: &[(&str, &str)], next: &str| {
        let mut req = conversation(QWEN_05B, turns, next);
        if let Input::Chat { messages, .. } = &mut req.input {
            messages.remove(0);
        }
        req
    };

    // Two conversations, each left cached in its own sequence.
    let (qa, qb) = (
        "Which city is the capital of Portugal?",
        "What currency does Japan use?",
    );
    let a = answer(&warm, conversation(QWEN_05B, &[], qa)).await;
    let b = answer(&warm, plain(&[], qb)).await;
    let requests = [
        conversation(
            QWEN_05B,
            &[(qa, a.text.as_str())],
            "And its most famous dish?",
        ),
        plain(&[(qb, b.text.as_str())], "Can I pay by card there?"),
        // Shares the system prompt with the first.
        conversation(QWEN_05B, &[], "Name one museum in Madrid."),
        plain(&[], "Count from one to five in French."),
    ];
    let got = futures::future::join_all(requests.iter().map(|r| answer(&warm, r.clone()))).await;
    let cached: Vec<u32> = got.iter().map(|g| g.finish.usage.cached_tokens()).collect();
    assert!(
        cached[0] > 30 && cached[1] > 30,
        "each next turn finds its history: {cached:?}"
    );

    let cold = LocalEngine::load(cfg).unwrap();
    for (req, g) in requests.into_iter().zip(&got) {
        let reference = answer(&cold, req).await;
        same_up_to_near_ties(g, &reference);
    }
}

/// The first step of a speculative session reads only what a finished
/// session's cells do not already hold, and gives the logits a fresh engine
/// gives; a session still open is never read from.
#[tokio::test]
async fn sessions_reuse_what_finished_sessions_left() {
    use tandem_api::{KvSession, SessionModel};
    let mut cfg = EngineConfig::new(QWEN_05B, model_path(QWEN_05B));
    cfg.parallel = 1;
    cfg.sessions = 2;
    cfg.context = Some(1024);
    cfg.threads = Threads::Fixed(2);
    let warm = LocalEngine::load(cfg.clone()).unwrap();
    let prompt = SessionModel::prepare(
        &warm,
        &conversation(QWEN_05B, &[], "Name a river in Spain."),
    )
    .unwrap()
    .tokens;
    let n = prompt.len();
    let argmax = |row: &[f32]| tandem_engine::sampling::argmax(row);

    let first = warm.open_session().await.unwrap();
    let rows = first.eval(0, prompt.clone(), 1).await.unwrap();
    let next = argmax(&rows[0]) as i32;
    first.eval(n as u32, vec![next], 1).await.unwrap();
    // Open while the first is: nothing to reuse.
    let second = warm.open_session().await.unwrap();
    second.eval(0, prompt.clone(), 1).await.unwrap();
    assert_eq!(warm.stats().cached_prompt_tokens, 0);
    drop(first);
    drop(second);

    // The same prompt and one more token: all but the rows asked for are
    // found in one of the finished sessions' cells.
    let mut longer = prompt.clone();
    longer.push(next);
    let third = warm.open_session().await.unwrap();
    let got = third.eval(0, longer.clone(), 2).await.unwrap();
    assert_eq!(warm.stats().cached_prompt_tokens, (n - 1) as u64);

    let cold = LocalEngine::load(cfg).unwrap();
    let fresh = cold.open_session().await.unwrap();
    let want = fresh.eval(0, longer, 2).await.unwrap();
    // Cells read in other batch shapes differ in the last bits (see
    // `same_up_to_near_ties`): the distributions agree closely; a stale or
    // misplaced cell would change them wholesale.
    let probs = |row: &[f32]| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = row.iter().map(|l| (l - max).exp()).sum();
        row.iter()
            .map(|l| (l - max).exp() / z)
            .collect::<Vec<f32>>()
    };
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(argmax(g), argmax(w));
        let (pg, pw) = (probs(g), probs(w));
        let worst = pg
            .iter()
            .zip(&pw)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 0.03, "probabilities differ by {worst}");
    }
}
