//! CPU kernels shared by the engines: the compute pool, f32 vector kernels, and quantized
//! matrices with their products.
//!
//! - [`pool`]: the compute threads, sized once by `--threads`.
//! - [`simd`]: f32 kernels (dot, norms, softmax, activations) compiled for the CPU at hand.
//! - [`quant`]: quantized weights and activations in the layouts the kernels read.
//! - [`qdot`]: products of quantized weights and activations (AVX-512 VNNI, AVX-VNNI, AVX2).
//! - [`sgemm`]: dense f32 products with weights packed at load (the embedding engine).

pub mod pool;
pub mod qdot;
pub mod quant;
pub mod sgemm;
pub mod simd;

pub use pool::Pool;
pub use quant::{QActs, QFormat, QMatrix};
