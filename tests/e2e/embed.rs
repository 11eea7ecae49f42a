//! mesh's own BERT forward pass on the real all-MiniLM-L6-v2 files: its vectors against
//! candle-transformers' BERT (the engine mesh used before) and the known cosines, packed batches
//! against single texts, and truncation.

use mesh_node::engine::bert::BertEngine;
use tokio_util::sync::CancellationToken;

fn minilm_dir() -> std::path::PathBuf {
    mesh_tests::models_dir().join("all-minilm-l6-v2")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let (na, nb) = (
        a.iter().map(|x| x * x).sum::<f32>().sqrt(),
        b.iter().map(|x| x * x).sum::<f32>().sqrt(),
    );
    dot / (na * nb)
}

/// Texts of every kind: short, long, punctuation, numbers, other scripts, and one past the
/// 256-token limit.
fn texts() -> Vec<String> {
    let mut t: Vec<String> = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A monkey is playing drums.",
        "Two men pushed carts through the woods while it was raining, and nobody stopped them.",
        "Ünïcödé, émojis 🚀 and 数字 123,456.78 — all in one line!",
        "x",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    t.push("The robot painted another canvas in shades of blue. ".repeat(40));
    t
}

/// The vectors candle-transformers' BERT gives for `texts`, one text at a time, pooled and
/// normalised as sentence-transformers does.
fn candle_vectors(texts: &[String]) -> Vec<Vec<f32>> {
    use candle_core::{DType, Device, Tensor};
    use candle_transformers::models::bert::{BertModel, Config};
    let dir = minilm_dir();
    let config: Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = BertModel::load(vb, &config).unwrap();
    let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: 256,
            ..Default::default()
        }))
        .unwrap();
    texts
        .iter()
        .map(|t| {
            let e = tokenizer.encode(t.as_str(), true).unwrap();
            let ids = Tensor::new(e.get_ids(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let types = ids.zeros_like().unwrap();
            let hidden = model.forward(&ids, &types, None).unwrap();
            let mean: Vec<f32> = hidden
                .mean(1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
            mean.iter().map(|v| v / norm).collect()
        })
        .collect()
}

#[test]
fn minilm_vectors_equal_candle_transformers_and_batches_equal_single_texts() {
    let engine = BertEngine::load("minilm", &minilm_dir(), 1).expect("MiniLM loads");
    let texts = texts();
    let cancel = CancellationToken::new();
    let (batched, tokens) = engine.embed(&texts, &cancel).unwrap();
    assert_eq!(batched.len(), texts.len());
    // Truncated at 256 tokens (with [CLS] and [SEP]).
    assert!(tokens < 7 * 40 + 256, "{tokens} tokens");
    let reference = candle_vectors(&texts);
    let mut worst = 1f32;
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(batched[i].len(), 384);
        let norm: f32 = batched[i].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "unit length");
        let c = cosine(&batched[i], &reference[i]);
        worst = worst.min(c);
        assert!(c >= 0.9999, "{text:?}: cosine {c} with candle-transformers");
        // Alone, the same text gives the same vector as in the packed batch.
        let (alone, _) = engine.embed(std::slice::from_ref(text), &cancel).unwrap();
        assert!(cosine(&alone[0], &batched[i]) > 0.999_999, "{text:?} alone");
    }
    eprintln!("worst cosine with candle-transformers: {worst:.7}");
    // The known pair: 0.755 (sentence-transformers and an independent numpy pass).
    let food = cosine(&batched[0], &batched[1]);
    assert!((food - 0.7553).abs() < 0.001, "food/bread {food}");
    assert!(cosine(&batched[0], &batched[3]).abs() < 0.2);
}

#[test]
fn many_texts_run_in_bounded_forward_passes_and_a_cancelled_call_stops() {
    let engine = BertEngine::load("minilm", &minilm_dir(), 1).unwrap();
    // More texts and tokens than one forward pass takes.
    let many: Vec<String> = (0..150)
        .map(|i| format!("Sentence number {i} is about {}.", "art ".repeat(i % 60)))
        .collect();
    let cancel = CancellationToken::new();
    let (vectors, _) = engine.embed(&many, &cancel).unwrap();
    assert_eq!(vectors.len(), 150);
    let (first, _) = engine.embed(&many[..1], &cancel).unwrap();
    assert!(cosine(&first[0], &vectors[0]) > 0.999_999);
    let (last, _) = engine.embed(&many[149..], &cancel).unwrap();
    assert!(cosine(&last[0], &vectors[149]) > 0.999_999);
    cancel.cancel();
    assert!(engine.embed(&many, &cancel).is_err());
}
