//! Readings at an inner layer: the output of transformer block `L` (llama.cpp's
//! `l_out-L` tensor), copied out during the prompt's forward pass through the
//! scheduler's evaluation callback, which then stops the pass — the blocks
//! after `L` and the vocabulary-wide logits are never computed.
//!
//! The wrapper crate does not expose that callback, so this module keeps a
//! llama.cpp model and context of its own through the C API (the model file
//! is memory-mapped again; its pages are shared with any other mapping of
//! it). Everything unsafe about it stays here.

use std::ffi::{CStr, CString, c_void};
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::load::LoadMonitor;
use crate::reading::{self, Job, MAX_TOKENS};
use crate::{Threads, runtime};

/// Tokens decoded at once (no outputs are kept, so no output buffers to
/// bound; the window is the one the last-layer reading uses).
const CHUNK: usize = 256;

/// What the evaluation callback fills: for each wanted layer, the mean of
/// its output over the prompt's tokens and the last token's output.
struct Tap {
    /// `l_out-L` for each wanted layer, in the order asked for.
    names: Vec<CString>,
    /// Index in `names` of the deepest layer: the pass stops after it.
    deepest: usize,
    /// Width of a layer's output.
    d: usize,
    /// Tokens of the whole prompt, tokens of this chunk, and whether this
    /// chunk ends the prompt.
    n: usize,
    chunk: usize,
    last_chunk: bool,
    /// Per wanted layer: `[mean; last]` (2 × `d`).
    out: Vec<Vec<f32>>,
    /// Per wanted layer: whether this chunk's output was seen.
    seen: Vec<bool>,
    scratch: Vec<f32>,
}

impl Tap {
    fn wanted(&self, t: *const sys::ggml_tensor) -> Option<usize> {
        // SAFETY: the scheduler hands the callback live tensors, whose
        // `name` is a NUL-terminated array (ggml truncates names to fit).
        let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) };
        self.names.iter().position(|n| n.as_c_str() == name)
    }

    /// Copies a wanted layer's output for this chunk into its reading.
    fn take(&mut self, i: usize, t: *const sys::ggml_tensor) {
        // SAFETY: as in `wanted`; `ne` and `type_` are plain fields.
        let (kind, ne0, ne1) = unsafe { ((*t).type_, (*t).ne[0], (*t).ne[1]) };
        let (Ok(ne0), Ok(ne1)) = (usize::try_from(ne0), usize::try_from(ne1)) else {
            return;
        };
        if kind != sys::GGML_TYPE_F32 || ne0 != self.d || ne1 != self.chunk {
            return;
        }
        self.scratch.resize(ne0 * ne1, 0.0);
        // SAFETY: the tensor holds `ne0 × ne1` contiguous f32 (a block's
        // residual output), which is what `scratch` has room for.
        unsafe {
            sys::ggml_backend_tensor_get(
                t,
                self.scratch.as_mut_ptr().cast::<c_void>(),
                0,
                self.scratch.len() * std::mem::size_of::<f32>(),
            );
        }
        let n = self.n as f32;
        let (Some(out), Some(seen)) = (self.out.get_mut(i), self.seen.get_mut(i)) else {
            return;
        };
        let (mean, last) = out.split_at_mut(self.d);
        for row in self.scratch.chunks_exact(self.d) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v / n;
            }
        }
        if self.last_chunk
            && let Some(row) = self.scratch.chunks_exact(self.d).last()
        {
            last.copy_from_slice(row);
        }
        *seen = true;
    }
}

/// The scheduler's evaluation callback: asked whether a tensor is wanted
/// (`ask`), then handed each wanted one once computed; returning `false`
/// then stops the pass.
unsafe extern "C" fn observe(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    // A panic must not unwind into C: any turns into "stop the pass", and
    // the missing output fails the reading.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `user` is the `Tap` the context was created with, which
        // outlives it, and only the decoding thread touches it.
        let tap = unsafe { &mut *user.cast::<Tap>() };
        let wanted = tap.wanted(t);
        if ask {
            return wanted.is_some();
        }
        match wanted {
            Some(i) => {
                tap.take(i, t);
                i != tap.deepest
            }
            None => true,
        }
    }))
    .unwrap_or(false)
}

/// How many blocks the model at `path` has, from its metadata
/// (`ARCH.block_count`; the weights are not read).
pub fn depth(path: &Path) -> Result<u32, String> {
    use llama_cpp_2::gguf::GgufContext;
    let gguf = GgufContext::from_file(path)
        .ok_or_else(|| format!("{} is not a GGUF file", path.display()))?;
    let key = |k: &str| Some(gguf.find_key(k)).filter(|&i| i >= 0);
    let arch = key("general.architecture")
        .and_then(|i| gguf.val_str(i))
        .ok_or_else(|| format!("{} names no architecture", path.display()))?;
    let i = key(&format!("{arch}.block_count"))
        .ok_or_else(|| format!("{} gives no block count", path.display()))?;
    match gguf.kv_type(i) {
        sys::GGUF_TYPE_UINT32 => Ok(gguf.val_u32(i)),
        sys::GGUF_TYPE_INT32 => u32::try_from(gguf.val_i32(i)).map_err(|e| e.to_string()),
        _ => Err(format!(
            "{}'s block count is not an integer",
            path.display()
        )),
    }
}

/// A model and a context that read prompts at inner layers.
pub struct LayerReader {
    model: NonNull<sys::llama_model>,
    ctx: NonNull<sys::llama_context>,
    /// Owned (from `Box::into_raw`, freed in `Drop`) and reached only
    /// through this pointer, which llama.cpp's callback shares: no `Box`
    /// or reference to it outlives a call into llama.cpp.
    tap: NonNull<Tap>,
    /// Width of a block's output.
    d: usize,
    layers: Vec<u32>,
}

// SAFETY: the model, the context and the tap are used by one thread at a
// time (`&mut self`), which llama.cpp allows; nothing else holds the
// pointers (the context's callback runs on the thread that decodes).
unsafe impl Send for LayerReader {}

impl LayerReader {
    /// Loads the model at `path` and a context reading the outputs of
    /// blocks `layers` (0-based) on `threads` threads.
    pub fn new(path: &Path, layers: &[u32], threads: usize) -> Result<Self, String> {
        runtime::backend()?;
        if layers.is_empty() {
            return Err("no layer to read".into());
        }
        let cpath = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{} has a NUL in its name", path.display()))?;
        // SAFETY: default parameters and a NUL-terminated path; a null
        // result is checked.
        let model = NonNull::new(unsafe {
            sys::llama_model_load_from_file(cpath.as_ptr(), sys::llama_model_default_params())
        })
        .ok_or_else(|| format!("cannot load {}", path.display()))?;
        // SAFETY: `model` is a live model.
        let (n_layer, n_embd) = unsafe {
            (
                sys::llama_model_n_layer(model.as_ptr()),
                sys::llama_model_n_embd(model.as_ptr()),
            )
        };
        let free_model = |e: String| {
            // SAFETY: nothing else holds `model`.
            unsafe { sys::llama_model_free(model.as_ptr()) };
            e
        };
        if let Some(&bad) = layers.iter().find(|&&l| i64::from(l) >= i64::from(n_layer)) {
            return Err(free_model(format!(
                "{} has blocks 0 to {}: no block {bad}",
                path.display(),
                n_layer - 1
            )));
        }
        let d = usize::try_from(n_embd).unwrap_or(0);
        let deepest = layers
            .iter()
            .enumerate()
            .max_by_key(|(_, l)| **l)
            .map_or(0, |(i, _)| i);
        let tap = Box::new(Tap {
            names: layers
                .iter()
                .map(|l| CString::new(format!("l_out-{l}")).unwrap_or_default())
                .collect(),
            deepest,
            d,
            n: 0,
            chunk: 0,
            last_chunk: false,
            out: vec![vec![0.0; reading::width_of(d)]; layers.len()],
            seen: vec![false; layers.len()],
            scratch: Vec::new(),
        });
        let tap = NonNull::from(Box::leak(tap));
        let free_tap = |e: String| {
            // SAFETY: from `Box::leak` above, not yet handed to a reader.
            drop(unsafe { Box::from_raw(tap.as_ptr()) });
            e
        };
        let threads = i32::try_from(threads.max(1)).unwrap_or(1);
        let chunk = u32::try_from(CHUNK).unwrap_or(256);
        // SAFETY: plain defaults, then plain fields; the callback's data is
        // the `Tap`, which the reader owns and frees after the context.
        let ctx = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = u32::try_from(MAX_TOKENS).unwrap_or(1024);
            p.n_batch = chunk;
            p.n_ubatch = chunk;
            p.n_seq_max = 1;
            p.n_threads = threads;
            p.n_threads_batch = threads;
            p.embeddings = false;
            p.no_perf = true;
            p.cb_eval = Some(observe);
            p.cb_eval_user_data = tap.as_ptr().cast::<c_void>();
            runtime::with_context_lock(|| sys::llama_init_from_model(model.as_ptr(), p))
        };
        let ctx = NonNull::new(ctx).ok_or_else(|| {
            free_model(free_tap(format!(
                "cannot create a reading context for {}",
                path.display()
            )))
        })?;
        Ok(Self {
            model,
            ctx,
            tap,
            d,
            layers: layers.to_vec(),
        })
    }

    /// The tap, between calls into llama.cpp.
    fn tap(&mut self) -> &mut Tap {
        // SAFETY: the reader owns the tap; llama.cpp touches it only inside
        // `llama_decode`, which is never called while this borrow lives
        // (`&mut self`).
        unsafe { self.tap.as_mut() }
    }

    /// The blocks read, in the order readings are returned.
    pub fn layers(&self) -> &[u32] {
        &self.layers
    }

    /// Numbers in each layer's reading.
    pub fn width(&self) -> usize {
        reading::width_of(self.d)
    }

    fn tokens(&self, text: &str) -> Result<Vec<sys::llama_token>, String> {
        let framed = reading::framed(text);
        let len = i32::try_from(framed.len()).map_err(|_| "the prompt is too long".to_string())?;
        // SAFETY: `model` is live; its vocabulary lives as long.
        let vocab = unsafe { sys::llama_model_get_vocab(self.model.as_ptr()) };
        let mut tokens = vec![0 as sys::llama_token; framed.len() + 2];
        for _ in 0..2 {
            let cap = i32::try_from(tokens.len()).unwrap_or(i32::MAX);
            // SAFETY: `framed` is `len` bytes; `tokens` has room for `cap`.
            let n = unsafe {
                sys::llama_tokenize(
                    vocab,
                    framed.as_ptr().cast(),
                    len,
                    tokens.as_mut_ptr(),
                    cap,
                    true,
                    false,
                )
            };
            match usize::try_from(n) {
                Ok(n) => {
                    tokens.truncate(n);
                    return Ok(tokens);
                }
                // A negative count is the room it needs.
                Err(_) => tokens.resize(n.unsigned_abs() as usize, 0),
            }
        }
        Err("cannot tokenize the prompt".into())
    }

    /// The reading of `text` at each layer of [`Self::layers`], framed and
    /// cut as [`crate::reading::read`] frames and cuts it.
    pub fn read(&mut self, text: &str) -> Result<Vec<Vec<f32>>, String> {
        let mut tokens = self.tokens(text)?;
        reading::keep_last(&mut tokens)?;
        let n = tokens.len();
        self.tap().n = n;
        for o in &mut self.tap().out {
            o.iter_mut().for_each(|v| *v = 0.0);
        }
        // SAFETY: `ctx` is live; clearing its memory is always allowed.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true) };
        let chunk_cap = i32::try_from(CHUNK).unwrap_or(256);
        // SAFETY: a batch of `CHUNK` tokens, one sequence; freed below.
        let mut batch = unsafe { sys::llama_batch_init(chunk_cap, 0, 1) };
        let result = (|| {
            for (c, chunk) in tokens.chunks(CHUNK).enumerate() {
                let tap = self.tap();
                tap.chunk = chunk.len();
                tap.last_chunk = (c + 1) * CHUNK >= n;
                tap.seen.iter_mut().for_each(|s| *s = false);
                for (j, &t) in chunk.iter().enumerate() {
                    let pos = i32::try_from(c * CHUNK + j).map_err(|e| e.to_string())?;
                    // SAFETY: `j < CHUNK`, the batch's capacity, and each
                    // token's sequence array holds one id.
                    unsafe {
                        *batch.token.add(j) = t;
                        *batch.pos.add(j) = pos;
                        *batch.n_seq_id.add(j) = 1;
                        *(*batch.seq_id.add(j)) = 0;
                        // Only the chunk's last token asks for an output, and
                        // the pass stops before the output is computed.
                        *batch.logits.add(j) = i8::from(j + 1 == chunk.len());
                    }
                }
                batch.n_tokens = i32::try_from(chunk.len()).unwrap_or(chunk_cap);
                let ctx = self.ctx.as_ptr();
                // SAFETY: a filled batch for a live context.
                let rc = runtime::decoding(|| unsafe { sys::llama_decode(ctx, batch) });
                if rc != 0 {
                    return Err(format!("cannot read the prompt (llama_decode {rc})"));
                }
                if let Some(i) = self.tap().seen.iter().position(|s| !s) {
                    return Err(format!(
                        "block {} gave no output",
                        self.layers.get(i).copied().unwrap_or_default()
                    ));
                }
            }
            Ok(())
        })();
        // SAFETY: the batch made above, freed once.
        unsafe { sys::llama_batch_free(batch) };
        result.map(|()| self.tap().out.clone())
    }
}

/// Starts a reading thread for block `layer` of the model at `path`;
/// returns once its reader exists.
pub(crate) fn start(
    path: std::path::PathBuf,
    layer: u32,
    threads: Threads,
    name: &str,
) -> Result<std::sync::mpsc::Sender<Job>, String> {
    runtime::spawn_worker(format!("tandem-reader-{name}-{layer}"), move |rx, ready| {
        let threads = threads.count(&LoadMonitor::global());
        let mut reader = match LayerReader::new(&path, &[layer], threads) {
            Ok(r) => {
                let _ = ready.send(Ok(()));
                r
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let rx: std::sync::mpsc::Receiver<Job> = rx;
        while let Ok((text, reply)) = rx.recv() {
            if reply.is_closed() {
                continue;
            }
            let reading = reader
                .read(&text)
                .and_then(|mut r| r.pop().ok_or_else(|| "no reading".to_string()));
            let _ = reply.send(reading);
        }
    })
}

impl Drop for LayerReader {
    fn drop(&mut self) {
        // SAFETY: the context goes before the model it was made from, and
        // before the `Tap` it points to, each freed once.
        unsafe {
            sys::llama_free(self.ctx.as_ptr());
            sys::llama_model_free(self.model.as_ptr());
            drop(Box::from_raw(self.tap.as_ptr()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inner_layer_is_read_the_same_way_every_time_and_the_pass_stops_after_it() {
        let path = tandem_testkit::model_path(tandem_testkit::SMOLLM2);
        assert_eq!(depth(&path), Ok(30));
        assert!(depth(Path::new("/nonexistent.gguf")).is_err());
        let mut two = LayerReader::new(&path, &[10, 3], 2).expect("reader");
        assert_eq!(two.layers(), [10, 3]);
        let w = two.width();
        let a = two.read("What is 2 + 2?").expect("read");
        let b = two.read("Name the capital of France.").expect("read");
        let again = two.read("What is 2 + 2?").expect("read");
        assert_eq!(a.len(), 2);
        assert!(a.iter().chain(&b).all(|r| r.len() == w));
        assert!(a.iter().flatten().all(|v| v.is_finite()));
        // Cleared between prompts; prompts and blocks differ; the mean and
        // the last position are different halves.
        assert_eq!(a, again);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[0], a[1]);
        assert_ne!(a[0][..w / 2], a[0][w / 2..]);
        // A block read alone reads as it does beside a deeper one (the pass
        // stopping early changes nothing before it), on another thread count.
        let mut one = LayerReader::new(&path, &[3], 1).expect("reader");
        let alone = one.read("What is 2 + 2?").expect("read");
        let close = alone[0]
            .iter()
            .zip(&a[1])
            .all(|(x, y)| (x - y).abs() <= 1e-3 * (1.0 + x.abs()));
        assert!(close, "block 3 read differently");
        // A prompt longer than a chunk reads its last tokens, chunk by chunk;
        // any text is read.
        for text in ["", "\u{0}", "🙂 ß 日本語", &"word ".repeat(3000)] {
            let r = two.read(text).expect("any text is read");
            assert!(
                r.iter()
                    .all(|x| x.len() == w && x.iter().all(|v| v.is_finite()))
            );
        }
        // A block the model does not have, or none, is an error.
        let err = LayerReader::new(&path, &[999], 1)
            .err()
            .expect("no block 999");
        assert!(err.contains("no block 999"), "{err}");
        assert!(LayerReader::new(&path, &[], 1).is_err());
    }
}
