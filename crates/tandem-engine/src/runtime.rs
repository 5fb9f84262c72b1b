//! Process-wide llama.cpp state. The backend may be initialised once per
//! process, and creating contexts concurrently is not sound in llama.cpp, so
//! both go through here.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Mutex, Once, OnceLock, PoisonError, RwLock};

use llama_cpp_2::DecodeError;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
static CONTEXT_LOCK: Mutex<()> = Mutex::new(());

/// The llama.cpp backend, initialised on first use with its logs routed to
/// `tracing` (target `llama_cpp_2`), where they stay quiet unless asked for.
pub fn backend() -> Result<&'static LlamaBackend, String> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| format!("cannot initialise llama.cpp: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A new llama.cpp context, created under the process-wide lock.
pub fn new_context(
    model: &LlamaModel,
    params: LlamaContextParams,
) -> Result<LlamaContext<'_>, String> {
    let backend = backend()?;
    with_context_lock(|| model.new_context(backend, params))
        .map_err(|e| format!("cannot create an inference context: {e}"))
}

/// Runs `create` (which creates a llama.cpp context) under the
/// process-wide lock.
pub(crate) fn with_context_lock<T>(create: impl FnOnce() -> T) -> T {
    let _guard = CONTEXT_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    create()
}

/// A context for `params` (the same shape as `old`'s, other threads)
/// holding everything `old` holds: the KV cells of every sequence, so that
/// prompts cached there stay cached. Copying them costs a pass over the
/// cached tokens' keys and values; reading those tokens again costs a
/// forward pass over them.
pub fn renew_context<'m>(
    model: &'m LlamaModel,
    params: LlamaContextParams,
    old: &LlamaContext<'m>,
) -> Result<LlamaContext<'m>, String> {
    let mut new = new_context(model, params)?;
    let mut state = vec![0u8; old.get_state_size()];
    // SAFETY: `state` holds `get_state_size()` bytes, the most that
    // copying the state writes.
    let written = unsafe { old.copy_state_data(state.as_mut_ptr()) };
    if written > state.len() {
        return Err("the inference state outgrew its buffer".into());
    }
    // SAFETY: `state` is a whole state written by a context of the same
    // model and shape a moment ago, which is what reading one expects.
    let read = unsafe { new.set_state_data(&state[..written]) };
    if read != written {
        return Err(format!(
            "the inference state did not carry over ({read} of {written} bytes)"
        ));
    }
    Ok(new)
}

/// Held shared by every decode, and for good by the process's exit.
static DECODES: RwLock<()> = RwLock::new(());
static EXIT_HOOK: Once = Once::new();

/// `ctx.decode(batch)`, unless the process is exiting: then it never
/// returns (the process ends around it).
///
/// At exit the C runtime runs llama.cpp's static destructors while engine
/// threads may be in the middle of a decode that uses what they free (a
/// request dropped just before `tandem serve` stops, or a test binary's
/// end): a crash after everything worked. The first exit handler to run is
/// ours: it waits for the decodes under way and keeps any other from
/// starting. It is registered after the first decode, by which time
/// llama.cpp has registered the destructors of what decoding uses (exit
/// handlers run in reverse order).
pub fn decode(ctx: &mut LlamaContext<'_>, batch: &mut LlamaBatch<'_>) -> Result<(), DecodeError> {
    decoding(|| ctx.decode(batch))
}

/// Runs `decode` (one llama.cpp decode) as [`decode`] runs its own.
pub(crate) fn decoding<T>(decode: impl FnOnce() -> T) -> T {
    let decoded = {
        let _running = DECODES.read().unwrap_or_else(PoisonError::into_inner);
        decode()
    };
    EXIT_HOOK.call_once(|| {
        // SAFETY: `hold_decodes` is an `extern "C" fn()` that neither
        // unwinds nor returns early, as `atexit` expects of a handler.
        if unsafe { libc::atexit(hold_decodes) } != 0 {
            tracing::warn!("cannot register the engine's exit handler");
        }
    });
    decoded
}

extern "C" fn hold_decodes() {
    std::mem::forget(DECODES.write().unwrap_or_else(PoisonError::into_inner));
}

/// Starts a named thread that serves jobs from a channel once it has built
/// what it needs (a context borrowing the model, so built on the thread):
/// `body` reports through its second argument whether it could, and the
/// caller gets the sender only then, so a model that cannot get a context
/// fails the call that asked for it.
pub(crate) fn spawn_worker<J: Send + 'static>(
    name: String,
    body: impl FnOnce(Receiver<J>, Sender<Result<(), String>>) + Send + 'static,
) -> Result<Sender<J>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || body(rx, ready_tx))
        .map_err(|e| format!("cannot start the thread {name}: {e}"))?;
    match ready_rx.recv() {
        Ok(started) => started.map(|()| tx),
        Err(_) => Err(format!("the thread {name} died while starting")),
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::params::LlamaModelParams;

    use super::*;

    #[test]
    fn a_renewed_context_goes_on_from_what_the_old_one_read() {
        let path = tandem_testkit::model_path(tandem_testkit::SMOLLM2);
        let model = LlamaModel::load_from_file(
            backend().expect("backend"),
            &path,
            &LlamaModelParams::default(),
        )
        .expect("model");
        let params = |threads: i32| {
            LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(512))
                .with_n_threads(threads)
                .with_n_threads_batch(threads)
        };
        // A conversation of a few hundred tokens, as the prompt cache holds.
        let text = "Alice asked where the river starts. Bob said in the hills. ".repeat(25)
            + "The capital of France is";
        let prompt = model.vocab().tokenize(text.as_bytes(), true, false);
        let mut old = new_context(&model, params(1)).expect("context");
        let mut batch = LlamaBatch::new(512, 1);
        batch.add_sequence(&prompt, 0, false).expect("batch");
        let t = std::time::Instant::now();
        old.decode(&mut batch).expect("prompt");
        let read = t.elapsed();
        let t = std::time::Instant::now();
        let mut renewed = renew_context(&model, params(2), &old).expect("renew");
        // Not asserted (shared machines are noisy); printed for the README.
        eprintln!(
            "{} tokens: read in {read:?} on one thread, carried over in {:?}",
            prompt.len(),
            t.elapsed()
        );
        assert_eq!(renewed.kv_cache_seq_pos_max(0), prompt.len() as i32 - 1);

        // One more token on each. Carried over to the same thread count,
        // the next logits are the old context's to the bit; to another, they
        // are those of reading the whole prompt again there (thread counts
        // change the rounding, so that is the reference, not `old`).
        let next = model.vocab().tokenize(b" Paris", false, false)[0];
        let step = |ctx: &mut LlamaContext| {
            let mut b = LlamaBatch::new(1, 1);
            b.add(next, prompt.len() as i32, &[0], true).expect("batch");
            ctx.decode(&mut b).expect("step");
            ctx.get_logits_ith(0).to_vec()
        };
        let mut same = renew_context(&model, params(1), &old).expect("renew");
        let mut reread = new_context(&model, params(2)).expect("context");
        let mut batch = LlamaBatch::new(512, 1);
        batch.add_sequence(&prompt, 0, false).expect("batch");
        reread.decode(&mut batch).expect("prompt");
        let a = step(&mut old);
        assert_eq!(step(&mut same), a, "renewed on the same threads");
        let b = step(&mut renewed);
        assert_eq!(b, step(&mut reread), "renewed on two threads");
        // Without the old cells the same step reads nothing before it: the
        // renewed context's answer is not a fresh context's.
        let mut fresh = new_context(&model, params(2)).expect("context");
        let mut b1 = LlamaBatch::new(1, 1);
        b1.add(next, 0, &[0], true).expect("batch");
        fresh.decode(&mut b1).expect("fresh step");
        let differs = fresh
            .get_logits_ith(0)
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(differs > 1.0, "a fresh context gave the same logits");
    }
}
