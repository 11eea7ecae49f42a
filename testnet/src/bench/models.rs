//! Real-model throughput, in-process: SmolLM2 generation and MiniLM embeddings.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_node::engine::bert::BertEngine;
use mesh_node::engine::gguf::GgufEngine;
use mesh_node::engine::llama::WeightFormat;
use mesh_node::engine::prompt_cache::PromptCache;
use mesh_node::engine::{Engine, EngineOptions, Output};
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

/// A text of about `words` words for the long-prompt cases: numbered sentences, so that no
/// two stretches tokenize alike.
fn long_text(words: usize) -> String {
    let mut text = String::from("Summarize these notes in one sentence.\n");
    let mut i = 0;
    while text.split_whitespace().count() < words {
        i += 1;
        text.push_str(&format!(
            "Note {i}: the robot painted canvas number {i} in shades of blue and grey, then \
             wrote down what it had learned about light, colour and patience. "
        ));
    }
    text
}

fn chat(text: &str, tokens: u32) -> InferRequest {
    InferRequest {
        model: "smol".into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: text.into(),
            }],
        },
        params: SamplingParams {
            max_tokens: tokens,
            ..Default::default()
        },
        deadline_ms: None,
        token: None,
        resume: None,
    }
}

/// One case's figures over `runs` timed runs (after one untimed warm-up run).
fn measure(
    engine: &GgufEngine,
    request: &InferRequest,
    runs: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut ttft = Vec::new();
    let mut decode_tps = Vec::new();
    let (mut generated, mut prompt_tokens, mut cached) = (0, 0, 0);
    for run in 0..=runs {
        let start = Instant::now();
        let mut first = None;
        let done = engine.run(
            request,
            &mut |o| {
                if let Output::Delta { text: _, .. } = o {
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
        (generated, prompt_tokens, cached) = (
            done.completion_tokens,
            done.prompt_tokens,
            done.cached_tokens,
        );
        ttft.push(first);
        let decode = (total - first).as_secs_f64();
        decode_tps.push(f64::from(done.completion_tokens.saturating_sub(1)) / decode);
    }
    decode_tps.sort_by(f64::total_cmp);
    let ttft = Stats::of(&ttft);
    Ok(serde_json::json!({
        "prompt_tokens": prompt_tokens, "cached_tokens": cached,
        "completion_tokens": generated, "runs": runs,
        "ttft_p50_ms": ttft.p50_us as f64 / 1000.0,
        "decode_tokens_per_s_median": decode_tps[decode_tps.len() / 2],
    }))
}

fn load_smol(format: WeightFormat, cache_mib: usize) -> anyhow::Result<(GgufEngine, u128)> {
    let path = models_dir()?.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let options = EngineOptions {
        max_concurrency: 1,
        weight_format: format,
        prompt_cache: Arc::new(PromptCache::new(cache_mib << 20)),
    };
    let load_start = Instant::now();
    let engine = GgufEngine::load("smol", &path, &options).map_err(anyhow::Error::msg)?;
    Ok((engine, load_start.elapsed().as_millis()))
}

/// SmolLM2, greedy, in-process. The cases, each written with its prompt text to
/// `prompt_dir/CASE.txt` so llama.cpp can be given exactly the same text:
/// - `fresh`: the 42-token story prompt, no prompt cache, `tokens` tokens;
/// - `repeat`: the same prompt again with the prompt cache on (time to first token);
/// - `long`: a prompt of about 1,000 tokens, no cache (time to first token);
/// - `deep`: a prompt of about 2,000 tokens, then 64 tokens decoded there.
pub fn generate(
    tokens: u32,
    runs: usize,
    format: WeightFormat,
    prompt_dir: Option<&std::path::Path>,
    only: Option<&str>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let (fresh_engine, load_ms) = load_smol(format, 0)?;
    let (cached_engine, _) = load_smol(format, 64)?;
    let cases: [(&str, String, u32, &GgufEngine); 4] = [
        ("fresh", STORY_PROMPT.to_string(), tokens, &fresh_engine),
        ("repeat", STORY_PROMPT.to_string(), 16, &cached_engine),
        ("long", long_text(620), 16, &fresh_engine),
        ("deep", long_text(1240), 64, &fresh_engine),
    ];
    let mut out = Vec::new();
    for (case, text, max_tokens, engine) in cases {
        if only.is_some_and(|o| !o.split(',').any(|c| c == case)) {
            continue;
        }
        let request = chat(&text, max_tokens);
        if let Some(dir) = prompt_dir {
            let prompt = engine.prompt_text(&request.input)?;
            std::fs::write(dir.join(format!("{case}.txt")), prompt)?;
        }
        let mut line = measure(engine, &request, runs)?;
        line["bench"] = "generate".into();
        line["case"] = case.into();
        line["engine"] = format!("mesh ({format} weights)").into();
        line["load_ms"] = (load_ms as u64).into();
        out.push(line);
    }
    Ok(out)
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
            "bench": "embed", "engine": "mesh", "batch": batch,
            "embeddings_per_s": embedded as f64 / start.elapsed().as_secs_f64(),
        }));
    }
    Ok(out)
}
