//! Process-wide llama.cpp state. The backend may be initialised once per
//! process, and creating contexts concurrently is not sound in llama.cpp, so
//! both go through here.

use std::sync::{Mutex, OnceLock};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
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
    let _guard = CONTEXT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    model
        .new_context(backend, params)
        .map_err(|e| format!("cannot create an inference context: {e}"))
}
