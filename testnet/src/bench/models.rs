//! Real-model throughput, in-process: SmolLM2 generation and MiniLM embeddings.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_node::engine::bert::BertEngine;
use mesh_node::engine::gguf::GgufEngine;
use mesh_node::engine::{Engine, Output};
use mesh_protocol::{ChatMessage, InferRequest, Input, Role, SamplingParams};
use tokio_util::sync::CancellationToken;

use super::Stats;

/// The prompt used for generation benchmarks: it draws a long answer.
pub const STORY_PROMPT: &str = "Write a long story about a robot who learns to paint.";

fn models_dir() -> anyhow::Result<PathBuf> {
    std::env::var_os("MESH_MODELS")
        .map(PathBuf::from)
        .ok_or_else(|| {
            anyhow::anyhow!("set MESH_MODELS to the fetched models (testnet/bench.sh does)")
        })
}

/// Greedy generation of up to `tokens` tokens, `runs` times after one warm-up run.
pub fn generate(tokens: u32, runs: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let path = models_dir()?.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let load_start = Instant::now();
    let engine = GgufEngine::load("smol", &path, 1).map_err(anyhow::Error::msg)?;
    let load_ms = load_start.elapsed().as_millis();
    let input = Input::Chat {
        messages: vec![ChatMessage {
            role: Role::User,
            content: STORY_PROMPT.into(),
        }],
    };
    let prompt_text = engine.prompt_text(&input)?;
    let request = InferRequest {
        model: "smol".into(),
        input,
        params: SamplingParams {
            max_tokens: tokens,
            ..Default::default()
        },
        deadline_ms: None,
        token: None,
    };
    let mut ttft = Vec::new();
    let mut decode_tps = Vec::new();
    let mut generated = 0;
    let mut prompt_tokens = 0;
    for run in 0..=runs {
        let start = Instant::now();
        let mut first = None;
        let done = engine.run(
            &request,
            &mut |o| {
                if let Output::Delta(_) = o {
                    first.get_or_insert_with(|| start.elapsed());
                }
                Ok(())
            },
            &CancellationToken::new(),
        )?;
        let total = start.elapsed();
        let first = first.unwrap_or(total);
        if run == 0 {
            continue; // warm-up
        }
        generated = done.completion_tokens;
        prompt_tokens = done.prompt_tokens;
        ttft.push(first);
        let decode = (total - first).as_secs_f64();
        decode_tps.push(f64::from(done.completion_tokens.saturating_sub(1)) / decode);
    }
    decode_tps.sort_by(f64::total_cmp);
    let ttft = Stats::of(&ttft);
    Ok(vec![serde_json::json!({
        "bench": "generate", "engine": "mesh (candle)", "load_ms": load_ms,
        "prompt_tokens": prompt_tokens, "completion_tokens": generated, "runs": runs,
        "ttft_p50_ms": ttft.p50_us as f64 / 1000.0,
        "decode_tokens_per_s_median": decode_tps[decode_tps.len() / 2],
        "prompt_text": prompt_text,
    })])
}

/// Sentences for the embedding benchmark (varied lengths, 8 to 20 words).
pub const SENTENCES: &[&str] = &[
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse along the beach at sunset.",
    "A woman is playing the violin in front of a small audience.",
    "Two men pushed carts through the woods while it was raining.",
    "A monkey is playing drums.",
    "The new movie is awesome for kids and their parents alike.",
];

/// Embeddings per second at batch sizes 1, 8 and 32, each for `for_how_long`.
pub fn embed(for_how_long: Duration) -> anyhow::Result<Vec<serde_json::Value>> {
    let dir = models_dir()?.join("all-minilm-l6-v2");
    let engine = BertEngine::load("minilm", &dir, 1).map_err(anyhow::Error::msg)?;
    let cancel = CancellationToken::new();
    let mut out = Vec::new();
    for batch in [1usize, 8, 32] {
        let texts: Vec<String> = (0..batch)
            .map(|i| SENTENCES[i % SENTENCES.len()].to_string())
            .collect();
        engine.embed(&texts, &cancel)?; // warm-up
        let start = Instant::now();
        let mut embedded = 0usize;
        while start.elapsed() < for_how_long {
            embedded += engine.embed(&texts, &cancel)?.0.len();
        }
        out.push(serde_json::json!({
            "bench": "embed", "engine": "mesh (candle)", "batch": batch,
            "embeddings_per_s": embedded as f64 / start.elapsed().as_secs_f64(),
        }));
    }
    Ok(out)
}
