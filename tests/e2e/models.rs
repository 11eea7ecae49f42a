//! Real models through the mesh: SmolLM2 (GGUF, candle) and MiniLM (BERT, candle).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mesh_node::call::{CallError, Calls};
use mesh_node::engine::{self, ModelSpec, SharedEngine};
use mesh_node::Node;
use mesh_protocol::{
    ChatMessage, ErrorCode, FinishReason, InferRequest, InferResponse, Input, Role, SamplingParams,
};
use mesh_testnet::inprocess::{start_node, tcp_addr};
use tokio_util::sync::CancellationToken;

const IDLE: Duration = Duration::from_secs(60);

fn load(name: &str, source: &str) -> SharedEngine {
    let spec: ModelSpec = format!("{name}={source}").parse().unwrap();
    engine::load(&spec, &mesh_tests::models_dir(), 2).expect("model loads")
}

/// Both real models, loaded once for the whole test binary.
fn engines() -> &'static (SharedEngine, SharedEngine) {
    static ENGINES: OnceLock<(SharedEngine, SharedEngine)> = OnceLock::new();
    ENGINES.get_or_init(|| {
        (
            load("smol", "smollm2-135m-instruct"),
            load("minilm", "all-minilm-l6-v2"),
        )
    })
}

fn chat(text: &str, max_tokens: u32) -> InferRequest {
    InferRequest {
        model: "smol".into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: text.into(),
            }],
        },
        params: SamplingParams {
            max_tokens,
            ..Default::default()
        },
        deadline_ms: None,
        token: None,
        resume: None,
    }
}

fn embed(texts: &[&str]) -> InferRequest {
    InferRequest {
        model: "minilm".into(),
        input: Input::Embed {
            texts: texts.iter().map(|t| t.to_string()).collect(),
        },
        params: SamplingParams::default(),
        deadline_ms: None,
        token: None,
        resume: None,
    }
}

/// Runs `request` on `engine` in this process: the deltas and the completion.
fn in_process(engine: &SharedEngine, request: &InferRequest) -> (Vec<String>, engine::Completion) {
    let mut deltas = Vec::new();
    let completion = engine
        .run(
            request,
            &mut |out| {
                if let engine::Output::Delta { text: t, .. } = out {
                    deltas.push(t);
                }
                Ok(())
            },
            &CancellationToken::new(),
        )
        .expect("in-process run");
    (deltas, completion)
}

async fn mesh_pair() -> (Node, Node) {
    let (smol, minilm) = engines();
    let a = start_node(vec![smol.clone(), minilm.clone()], vec![]).await;
    let c = start_node(vec![], vec![tcp_addr(&a).await]).await;
    (a, c)
}

async fn through_mesh(
    c: &Node,
    a: &Node,
    request: &InferRequest,
) -> Result<(Vec<InferResponse>, InferResponse), CallError> {
    let mut call = c.client().call(a.peer_id(), request, IDLE).await?;
    let mut frames = Vec::new();
    while let Some(frame) = call.next().await? {
        frames.push(frame);
    }
    let last = frames.pop().expect("a done frame");
    Ok((frames, last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_through_the_mesh_matches_in_process_and_names_paris() {
    let (a, c) = mesh_pair().await;
    let request = chat("Name the capital of France.", 24);
    let (local_deltas, local) = in_process(&engines().0, &request);

    let (frames, done) = through_mesh(&c, &a, &request).await.unwrap();
    let remote_deltas: Vec<String> = frames
        .iter()
        .filter_map(|f| match f {
            InferResponse::Delta { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        remote_deltas, local_deltas,
        "same pieces, in the same order"
    );
    let text: String = remote_deltas.concat();
    assert!(text.contains("Paris"), "{text:?}");
    match done {
        InferResponse::Done {
            usage,
            finish_reason,
            ..
        } => {
            assert_eq!(usage.completion_tokens, local.completion_tokens);
            assert_eq!(usage.prompt_tokens, local.prompt_tokens);
            assert_eq!(finish_reason, local.finish_reason);
            assert_eq!(
                finish_reason,
                FinishReason::Stop,
                "ends its turn with <|im_end|>"
            );
            assert!(usage.time_to_first_token_ms <= usage.total_ms);
        }
        other => panic!("expected done, got {other:?}"),
    }
    // Every delta is whole UTF-8 by construction (String); none is empty.
    assert!(remote_deltas.iter().all(|d| !d.is_empty()));
    c.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_is_repeatable_with_a_seed_and_honours_max_tokens_and_stop() {
    let smol = &engines().0;
    let mut request = chat("What color is the sky on a clear day?", 12);
    request.params.temperature = 0.8;
    request.params.top_p = Some(0.9);
    request.params.seed = Some(42);
    let (a, _) = in_process(smol, &request);
    let (b, cb) = in_process(smol, &request);
    assert_eq!(a, b, "same seed, same answer");
    assert!(cb.completion_tokens <= 12);

    let mut short = chat("What is the largest planet in our solar system?", 3);
    short.params.temperature = 0.0;
    let (_, c) = in_process(smol, &short);
    assert_eq!(
        (c.completion_tokens, c.finish_reason),
        (3, FinishReason::Length)
    );

    // Greedy answer, then the same with a stop sequence taken from inside it.
    let full = chat("What is the largest planet in our solar system?", 24);
    let (pieces, _) = in_process(smol, &full);
    let text = pieces.concat();
    let stop = "solar";
    assert!(text.contains(stop), "{text:?}");
    let mut stopped = full.clone();
    stopped.params.stop = vec![stop.into()];
    let (pieces, c) = in_process(smol, &stopped);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(pieces.concat(), text[..text.find(stop).unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_through_the_mesh_are_unit_vectors_with_the_known_cosines() {
    let (a, c) = mesh_pair().await;
    let request = embed(&[
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome for kids.",
    ]);
    let (frames, done) = through_mesh(&c, &a, &request).await.unwrap();
    let vectors = frames
        .iter()
        .find_map(|f| match f {
            InferResponse::Embeddings { vectors } => Some(vectors.clone()),
            _ => None,
        })
        .expect("an embeddings frame");
    assert_eq!(vectors.len(), 3);
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    for v in &vectors {
        assert_eq!(v.len(), 384);
        assert!((dot(v, v) - 1.0).abs() < 1e-4);
    }
    let related = dot(&vectors[0], &vectors[1]);
    let unrelated = dot(&vectors[0], &vectors[2]);
    assert!((related - 0.755).abs() < 0.01, "cosine {related}");
    assert!(unrelated.abs() < 0.1, "cosine {unrelated}");
    assert!(matches!(
        done,
        InferResponse::Done {
            finish_reason: FinishReason::Complete,
            ..
        }
    ));

    // A batch gives the same vectors as one-by-one (padding never leaks into the mean).
    let (single, _) = through_mesh(&c, &a, &embed(&["A man is eating food."]))
        .await
        .unwrap();
    let single = single
        .iter()
        .find_map(|f| match f {
            InferResponse::Embeddings { vectors } => Some(vectors[0].clone()),
            _ => None,
        })
        .unwrap();
    assert!(dot(&single, &vectors[0]) > 0.9999);
    c.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_clear_bad_requests_and_nothing_crashes() {
    let (a, c) = mesh_pair().await;
    let long = "word ".repeat(9000);
    let mut cases: Vec<(&str, InferRequest)> = vec![
        ("empty", chat("", 8)),
        ("context", chat(&long, 8)),
        ("max_tokens", chat("hi", 0)),
        ("temperature", {
            let mut r = chat("hi", 8);
            r.params.temperature = -1.0;
            r
        }),
        ("temperature", {
            let mut r = chat("hi", 8);
            r.params.temperature = f32::NAN;
            r
        }),
        ("top_p", {
            let mut r = chat("hi", 8);
            r.params.top_p = Some(f32::NAN);
            r
        }),
        ("cannot take", embed(&["x"]).with_model("smol")),
        ("cannot take", chat("hi", 8).with_model("minilm")),
    ];
    cases.push(("not host", chat("hi", 8).with_model("no-such-model")));
    for (needle, request) in cases {
        // Sent raw, so the node's own checks are what is tested.
        let mut stream = c
            .client()
            .open_stream(a.peer_id(), mesh_node::network::client::INFER)
            .await
            .unwrap();
        mesh_node::wire::write_frame(&mut stream, &request, 1 << 20)
            .await
            .unwrap();
        let reply: InferResponse = mesh_node::wire::read_frame(&mut stream, 1 << 20)
            .await
            .unwrap()
            .unwrap();
        match reply {
            InferResponse::Error(e) => {
                let want = if needle == "not host" {
                    ErrorCode::UnknownModel
                } else {
                    ErrorCode::BadRequest
                };
                assert_eq!(e.code, want, "{needle}: {e}");
                assert!(e.message.contains(needle), "{needle}: {e}");
            }
            other => panic!("{needle}: expected an error, got {other:?}"),
        }
    }
    // The node still serves.
    let (_, done) = through_mesh(&c, &a, &chat("Name the capital of France.", 4))
        .await
        .unwrap();
    assert!(matches!(done, InferResponse::Done { .. }));
    c.shutdown().await;
    a.shutdown().await;
}

trait WithModel {
    fn with_model(self, model: &str) -> Self;
}

impl WithModel for InferRequest {
    fn with_model(mut self, model: &str) -> Self {
        self.model = model.into();
        self
    }
}

#[test]
fn corrupt_and_truncated_model_files_are_clear_load_errors() {
    let dir = mesh_tests::models_dir();
    let tmp = tempfile::tempdir().unwrap();
    let gguf =
        std::fs::read(dir.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated.gguf", gguf[..gguf.len() / 2].to_vec()),
        ("header-only.gguf", gguf[..4096].to_vec()),
        ("magic-only.gguf", b"GGUF".to_vec()),
        ("garbage.gguf", vec![0x5a; 10_000]),
    ];
    for (name, bytes) in cases {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let spec: ModelSpec = format!("m={}", path.display()).parse().unwrap();
        let err = engine::load(&spec, &dir, 1)
            .err()
            .unwrap_or_else(|| panic!("{name} loaded"));
        assert!(
            err.to_string().contains("cannot load model"),
            "{name}: {err}"
        );
    }

    // A BERT directory with its weights cut short.
    let bert = tmp.path().join("bert");
    std::fs::create_dir(&bert).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join("all-minilm-l6-v2").join(f), bert.join(f)).unwrap();
    }
    let weights = std::fs::read(dir.join("all-minilm-l6-v2/model.safetensors")).unwrap();
    std::fs::write(
        bert.join("model.safetensors"),
        &weights[..weights.len() / 3],
    )
    .unwrap();
    let spec: ModelSpec = format!("b={}", bert.display()).parse().unwrap();
    let err = engine::load(&spec, &dir, 1)
        .err()
        .expect("truncated safetensors refused");
    assert!(err.to_string().contains("safetensors"), "{err}");

    let spec: ModelSpec = "x=smollm2-135m-instruct".parse().unwrap();
    let err = engine::load(&spec, tmp.path(), 1)
        .err()
        .expect("not fetched there");
    assert!(err.to_string().contains("mesh model fetch"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_generations_all_get_the_greedy_answer() {
    let (a, c) = mesh_pair().await;
    let request = chat("What is the largest planet in our solar system?", 16);
    let (expected, _) = in_process(&engines().0, &request);
    let calls = (0..3).map(|_| {
        let (c, a, request) = (&c, &a, request.clone());
        async move { through_mesh(c, a, &request).await }
    });
    for result in futures::future::join_all(calls).await {
        let (frames, _) = result.unwrap();
        let text: Vec<String> = frames
            .iter()
            .filter_map(|f| match f {
                InferResponse::Delta { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(text, expected);
    }
    let _ = Arc::strong_count(&engines().0);
    c.shutdown().await;
    a.shutdown().await;
}

#[test]
fn gguf_tokenizer_matches_llama_cpp_token_for_token() {
    // Fixture written by testnet/reference/llama_cpp_tokens.py: llama.cpp's own tokenizer
    // on the same GGUF, an independent implementation.
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/smollm2_tokens.json")).unwrap();
    let path =
        mesh_tests::models_dir().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let engine =
        mesh_node::engine::gguf::GgufEngine::load("smol", &path, &engine::EngineOptions::new(1))
            .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = engine
            .tokenizer()
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, expected, "token ids differ for {text:?}");
        // And the ids decode back to the text.
        let back = engine.tokenizer().decode(&ids, false).unwrap();
        assert_eq!(back, text);
    }
}
