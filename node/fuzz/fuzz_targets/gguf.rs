//! Feeds arbitrary bytes, seeded with the real model files' headers, to everything a load
//! reads before any weight: mesh's GGUF header reader, the tensor extents, the tokenizer,
//! chat template and stop tokens, and the llama forward pass's shape
//! (`mesh_node::engine::gguf_meta::inspect`). Seeds: `testnet/gguf-seeds.py`. Run:
//! `cargo fuzz run gguf` in node/ (commands in docs/benchmarks.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(seen) = mesh_node::engine::gguf_meta::inspect(data) {
        // Each tensor in the index takes at least 20 bytes of the file (GGUF v1: 4-byte lengths).
        assert!(seen.tensors as u64 * 20 <= data.len() as u64);
    }
});
