//! One plan for the compute threads: `--threads N` sizes everything that computes.
//!
//! - mesh's own forward passes (llama GGUF and BERT) run on [`super::cpu::Pool`] (the calling
//!   thread plus `N - 1` workers);
//! - candle's quantized models (gemma3 and qwen3, which mesh's forward pass does not cover
//!   yet) run on candle's own pool, sized by `CANDLE_NUM_THREADS`;
//! - the tokenizer's batch encoding uses rayon's global pool, sized by `RAYON_NUM_THREADS`;
//! - the async runtime's threads only move bytes and sleep while a model computes.
//!
//! Every pool reads its size once, when first used, so [`configure`] must run before any
//! model loads and before other threads start (the CLI calls it first thing in `main`).

/// Sizes both compute pools: `threads` if given, else what the environment already says,
/// else the CPUs this process may use. Returns the size chosen.
pub fn configure(threads: Option<usize>) -> usize {
    let from_env = std::env::var("CANDLE_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0);
    let n = threads
        .filter(|n| *n > 0)
        .or(from_env)
        .unwrap_or_else(default_threads);
    super::cpu::Pool::configure_global(n);
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if threads.is_some() || std::env::var_os(var).is_none() {
            // Before any other thread exists: see the module comment.
            std::env::set_var(var, n.to_string());
        }
    }
    n
}

/// The CPUs this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
