//! Splitting a model's layers across real `mesh join` processes: the stage protocol against
//! local compute, answers equal to one node's, a lost stage replaced mid-generation, refusals.

use mesh_node::engine::llama::{Llama, Parts, WeightFormat};
use mesh_node::split::link::{SessionSpec, StageLink};
use mesh_protocol::{HiddenFormat, LayerRange};
use mesh_testnet::inprocess::start_node;

fn smollm2() -> std::path::PathBuf {
    mesh_tests::models_dir().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn load(layers: std::ops::Range<usize>, ends: bool) -> Llama {
    let mut file = std::fs::File::open(smollm2()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    Llama::load_parts(
        &content,
        &mut file,
        WeightFormat::default(),
        &Parts { layers, ends },
    )
    .unwrap()
}

fn sha256() -> String {
    mesh_node::models::sha256_file(&smollm2()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_computes_what_its_layers_compute_here() {
    let path = smollm2();
    let stage = mesh_tests::JoinedNode::start(&[
        "--model",
        &format!("smol={}", path.display()),
        "--layers",
        "10..30",
    ]);
    let me = start_node(vec![], vec![stage.addr().parse().unwrap()]).await;
    let peer = stage.peer_id().parse().unwrap();
    let layers = LayerRange {
        start: 10,
        end: 30,
        total: 30,
    };
    let spec = SessionSpec {
        model: "smol".into(),
        weights_sha256: sha256(),
        max_positions: 64,
        format: HiddenFormat::F32,
        token: None,
    };
    let mut link = StageLink::open(&me.client(), peer, layers, &spec)
        .await
        .unwrap();
    let head = load(0..10, true);
    let tail = load(10..30, false);
    let prompt: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253, 5356];
    let mut cache = head.new_cache(0..10, 64);
    let mut here = tail.new_cache(10..30, 64);
    for piece in [&prompt[..5], &prompt[5..6], &prompt[6..]] {
        let mut h = head.embed(piece).unwrap();
        head.forward_layers(&mut cache, &mut h).unwrap();
        let remote = link.step(&h).await.unwrap();
        let mut local = h.clone();
        tail.forward_layers(&mut here, &mut local).unwrap();
        assert_eq!(remote, local, "after {} positions", link.positions);
    }
    me.shutdown().await;
}

/// A `mesh join` hosting `layers` of SmolLM2 (all of it for `None`), joined through `boot`.
fn host(layers: Option<&str>, boot: Option<&str>, extra: &[&str]) -> mesh_tests::JoinedNode {
    let model = format!("smol={}", smollm2().display());
    let mut args = vec!["--model", model.as_str()];
    if let Some(l) = layers {
        args.extend(["--layers", l]);
    }
    if let Some(b) = boot {
        args.extend(["--bootstrap", b]);
    }
    args.extend_from_slice(extra);
    mesh_tests::JoinedNode::start(&args)
}

/// The greedy answer of one node holding the whole model, in this process.
fn reference(question: &str, max_tokens: u32) -> String {
    use mesh_node::engine::{Engine, EngineOptions, Output};
    static ENGINE: std::sync::OnceLock<mesh_node::engine::gguf::GgufEngine> =
        std::sync::OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        mesh_node::engine::gguf::GgufEngine::load("smol", &smollm2(), &EngineOptions::new(1))
            .unwrap()
    });
    let request = mesh_protocol::InferRequest {
        model: "smol".into(),
        input: mesh_protocol::Input::Chat {
            messages: vec![mesh_protocol::ChatMessage {
                role: mesh_protocol::Role::User,
                content: question.into(),
            }],
        },
        params: mesh_protocol::SamplingParams {
            max_tokens,
            ..Default::default()
        },
        deadline_ms: None,
        token: None,
        resume: None,
    };
    let mut text = String::new();
    engine
        .run(
            &request,
            &mut |o| {
                if let Output::Delta { text: t, .. } = o {
                    text.push_str(&t);
                }
                Ok(())
            },
            &tokio_util::sync::CancellationToken::new(),
        )
        .unwrap();
    text
}

fn spec(question: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({
        "target": "any", "model": "smol", "prompts": [question],
        "params": {"max_tokens": max_tokens, "temperature": 0.0}, "deadline_ms": 120000
    })
}

/// Streams `/v1/mesh/infer` on `node`'s API; calls `each` on every event line as it comes, and
/// returns all of them.
async fn infer(
    node: &mesh_tests::JoinedNode,
    spec: &serde_json::Value,
    each: impl FnMut(&serde_json::Value),
) -> Vec<serde_json::Value> {
    let api = format!("127.0.0.1:{}", node.api_port());
    crate::mesh_api::infer_events(&api, spec, each).await
}

use crate::mesh_api::text_of;

fn done_of(events: &[serde_json::Value]) -> &serde_json::Value {
    let last = events.last().expect("events");
    assert_eq!(last["event"], "done", "{last}");
    last
}

/// Waits until `head` can plan its call (its stages found in the DHT).
async fn until_split_answers(head: &mesh_tests::JoinedNode) {
    for _ in 0..100 {
        let events = infer(head, &spec("Hi", 1), |_| {}).await;
        if events.last().is_some_and(|e| e["event"] == "done") {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("the head never planned its stages: {}", head.stderr());
}

const QUESTIONS: [&str; 3] = [
    "Name the capital of France.",
    "What color is the sky on a clear day?",
    "What is the largest planet in our solar system?",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_split_across_processes_answers_as_one_node_does() {
    let first = host(Some("10..20"), None, &[]);
    let boot = first.addr();
    let second = host(Some("20..30"), Some(&boot), &[]);
    // Three processes: the head (0..10) and two stages.
    let head = host(Some("0..10"), Some(&boot), &[]);
    // Two processes: a head of 0..20 and the second stage.
    let head2 = host(Some("0..20"), Some(&boot), &[]);
    until_split_answers(&head).await;
    until_split_answers(&head2).await;
    for question in QUESTIONS {
        let want = reference(question, 32);
        for (h, stages) in [(&head, vec!["10..20", "20..30"]), (&head2, vec!["20..30"])] {
            let events = infer(h, &spec(question, 32), |_| {}).await;
            assert_eq!(text_of(&events), want, "{question:?}");
            let done = done_of(&events);
            assert_eq!(done["receipt_verified"], true);
            let got: Vec<&str> = done["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["layers"].as_str().unwrap())
                .collect();
            assert_eq!(got, stages, "{done}");
            for s in done["stages"].as_array().unwrap() {
                assert_eq!(s["path"], "direct");
                assert!(
                    s["receipt_sha256"].as_str().is_some_and(|h| h.len() == 64),
                    "{s}"
                );
                assert!(s["steps"].as_u64().unwrap() >= 2);
            }
        }
    }
    // The OpenAI gateway streams the split model like any other.
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", head.api_port());
    let body = reqwest::Client::new()
        .post(url)
        .json(&serde_json::json!({
            "model": "smol", "stream": true, "temperature": 0, "max_tokens": 32,
            "messages": [{"role": "user", "content": QUESTIONS[0]}]
        }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let streamed: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed, reference(QUESTIONS[0], 32));
    assert!(body.trim_end().ends_with("data: [DONE]"));
    // A stage holds about its share of the model: a third of the layers, no embedding.
    let rss = |n: &mesh_tests::JoinedNode| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", n.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap()
            .to_string();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    eprintln!(
        "RSS: stage 10..20 {} KiB, stage 20..30 {} KiB, head 0..10 {} KiB",
        rss(&first),
        rss(&second),
        rss(&head)
    );
}

/// The stage among `stages` with a session open now (polls their status).
async fn busy_stage(stages: &[&mesh_tests::JoinedNode]) -> usize {
    for _ in 0..200 {
        for (i, s) in stages.iter().enumerate() {
            let url = format!("http://127.0.0.1:{}/v1/mesh/status", s.api_port());
            let status: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            if status["stages"][0]["sessions"].as_u64().unwrap_or(0) > 0 {
                return i;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no stage has a session open");
}

fn kill(node: &mut mesh_tests::JoinedNode) {
    node.child.kill().unwrap();
    node.child.wait().unwrap();
}

const STORY: &str = "Write a long story about a robot who learns to paint.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_killed_mid_generation_is_replaced_and_the_answer_is_unchanged() {
    let mut a = host(Some("10..30"), None, &[]);
    let boot = a.addr();
    let mut b = host(Some("10..30"), Some(&boot), &[]);
    let head = host(Some("0..10"), Some(&boot), &[]);
    until_split_answers(&head).await;
    let want = reference(STORY, 120);
    let mut deltas = 0;
    let (tx, rx) = std::sync::mpsc::channel();
    let story = spec(STORY, 120);
    let stream = infer(&head, &story, |e| {
        if e["event"] == "delta" {
            deltas += 1;
            if deltas == 5 {
                let _ = tx.send(());
            }
        }
    });
    let killer = async {
        // After a few tokens, the stage in use dies without a word.
        while rx.try_recv().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let busy = busy_stage(&[&a, &b]).await;
        if busy == 0 {
            kill(&mut a)
        } else {
            kill(&mut b)
        }
    };
    let (events, ()) = tokio::join!(stream, killer);
    assert_eq!(
        text_of(&events),
        want,
        "the stream goes on with the same tokens"
    );
    let done = done_of(&events);
    let stages = done["stages"].as_array().unwrap();
    assert_eq!(
        stages.len(),
        2,
        "the lost stage and its replacement: {done}"
    );
    assert_eq!(stages[0]["replacement"], false);
    assert_eq!(stages[1]["replacement"], true);
    assert_ne!(stages[0]["peer"], stages[1]["peer"]);
    assert!(!events.iter().any(|e| e["event"] == "error"));

    // With no node left for the layers, the call fails within bounded time and says which.
    let began = std::time::Instant::now();
    let mut survivor = if a.child.try_wait().unwrap().is_none() {
        a
    } else {
        b
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let mut deltas = 0;
    let story = spec(STORY, 120);
    let stream = infer(&head, &story, |e| {
        if e["event"] == "delta" {
            deltas += 1;
            if deltas == 5 {
                let _ = tx.send(());
            }
        }
    });
    let killer = async {
        while rx.try_recv().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        kill(&mut survivor);
    };
    let (events, ()) = tokio::join!(stream, killer);
    let last = events.last().unwrap();
    assert_eq!(last["event"], "error", "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains("10..30") && message.contains("stage"),
        "{message}"
    );
    assert!(began.elapsed() < std::time::Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_killed_mid_answer_is_resumed_elsewhere_with_the_same_text() {
    let mut p1 = host(None, None, &[]);
    let boot = p1.addr();
    let mut p2 = host(None, Some(&boot), &[]);
    // The caller hosts nothing: every call goes to a provider.
    let caller = mesh_tests::JoinedNode::start(&["--bootstrap", &boot]);
    let want = reference(STORY, 120);
    for _ in 0..100 {
        if done_of_ok(&infer(&caller, &spec("Hi", 1), |_| {}).await) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let load = |n: &mesh_tests::JoinedNode| {
        let url = format!("http://127.0.0.1:{}/v1/mesh/status", n.api_port());
        async move {
            let s: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            s["load"].as_u64().unwrap_or(0)
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let mut deltas = 0;
    let story = spec(STORY, 120);
    let stream = infer(&caller, &story, |e| {
        if e["event"] == "delta" {
            deltas += 1;
            if deltas == 5 {
                let _ = tx.send(());
            }
        }
    });
    let killer = async {
        while rx.try_recv().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if load(&p1).await > 0 {
            kill(&mut p1)
        } else {
            kill(&mut p2)
        }
    };
    let (events, ()) = tokio::join!(stream, killer);
    assert_eq!(
        text_of(&events),
        want,
        "the same text, carried on elsewhere"
    );
    let done = done_of(&events);
    let resumed = done["resumed"]
        .as_array()
        .expect("the done line says it resumed");
    assert_eq!(resumed.len(), 1, "{done}");
    assert!(resumed[0]["tokens"].as_u64().unwrap() >= 5);
    assert_eq!(done["usage"]["completion_tokens"], 120);
    assert_eq!(done["receipt_verified"], true);

    // The same through the OpenAI gateway's stream: a provider dies mid-answer, the SSE
    // stream goes on without a break.
    let survivor = if p1.child.try_wait().unwrap().is_none() {
        p1
    } else {
        p2
    };
    let p3 = host(None, Some(&boot_of(&survivor)), &[]);
    let mut providers = [survivor, p3];
    wait_for_providers(&caller, 2).await;
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", caller.api_port());
    let body = serde_json::json!({
        "model": "smol", "stream": true, "temperature": 0, "max_tokens": 120,
        "messages": [{"role": "user", "content": STORY}]
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let sse = async {
        use futures::StreamExt;
        let resp = reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap();
        let mut stream = resp.bytes_stream();
        let mut raw = String::new();
        let mut pieces = 0;
        while let Some(chunk) = stream.next().await {
            raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            pieces += 1;
            if pieces == 5 {
                let _ = tx.send(());
            }
        }
        raw
    };
    let killer = async {
        while rx.try_recv().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let busy = if load(&providers[0]).await > 0 { 0 } else { 1 };
        kill(&mut providers[busy]);
    };
    let (raw, ()) = tokio::join!(sse, killer);
    let streamed: String = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            assert!(v.get("error").is_none(), "{v}");
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed, want);
    assert!(raw.trim_end().ends_with("data: [DONE]"));
}

fn boot_of(node: &mesh_tests::JoinedNode) -> String {
    node.addr()
}

/// Waits until `caller` finds `n` providers of smol in the DHT.
async fn wait_for_providers(caller: &mesh_tests::JoinedNode, n: usize) {
    let url = format!("http://127.0.0.1:{}/v1/mesh/models", caller.api_port());
    for _ in 0..150 {
        let rows: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        let hosts = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["model"] == "smol")
            .count();
        if hosts >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("{n} providers never showed up");
}

fn done_of_ok(events: &[serde_json::Value]) -> bool {
    events.last().is_some_and(|e| e["event"] == "done")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_refuse_what_they_must_and_keep_serving() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use mesh_protocol::frame::{decode_frame, encode_frame, DEFAULT_MAX_FRAME_LEN};
    use mesh_protocol::{StageRequest, StageResponse};
    // A stage closed to everyone but one peer.
    let closed = host(
        Some("10..30"),
        None,
        &[
            "--allow",
            &mesh_node::NodeIdentity::generate().peer_id().to_string(),
        ],
    );
    let me = start_node(vec![], vec![closed.addr().parse().unwrap()]).await;
    let peer = closed.peer_id().parse().unwrap();
    let layers = LayerRange {
        start: 10,
        end: 30,
        total: 30,
    };
    let mut spec = SessionSpec {
        model: "smol".into(),
        weights_sha256: sha256(),
        max_positions: 64,
        format: HiddenFormat::F32,
        token: None,
    };
    let e = StageLink::open(&me.client(), peer, layers, &spec)
        .await
        .err()
        .unwrap();
    assert_eq!(
        e.refused.unwrap().code,
        mesh_protocol::ErrorCode::Unauthorized
    );
    drop(closed);

    let open = host(Some("10..30"), None, &[]);
    let me2 = start_node(vec![], vec![open.addr().parse().unwrap()]).await;
    let peer = open.peer_id().parse().unwrap();
    // Other weights, or layers it does not hold.
    spec.weights_sha256 = "00".repeat(32);
    let e = StageLink::open(&me2.client(), peer, layers, &spec)
        .await
        .err()
        .unwrap();
    assert!(e.reason.contains("other weights"), "{e}");
    spec.weights_sha256 = sha256();
    let e = StageLink::open(
        &me2.client(),
        peer,
        LayerRange {
            start: 5,
            end: 30,
            total: 30,
        },
        &spec,
    )
    .await
    .err()
    .unwrap();
    assert!(e.reason.contains("not 5..30"), "{e}");
    // A step of the wrong size, a step that skips positions, and one past the session's room:
    // each ends its own session with a clear error.
    let frames: [(StageRequest, &str); 3] = [
        (
            StageRequest::Step {
                start: 0,
                rows: 2,
                hidden: vec![0; 17],
            },
            "bytes of hidden states",
        ),
        (
            StageRequest::Step {
                start: 3,
                rows: 1,
                hidden: vec![0; 576 * 4],
            },
            "starts at position 3",
        ),
        (
            StageRequest::Step {
                start: 0,
                rows: 65,
                hidden: vec![0; 65 * 576 * 4],
            },
            "at most 64",
        ),
    ];
    for (bad, why) in frames {
        let mut stream = me2
            .client()
            .open_stream(peer, mesh_node::network::STAGE)
            .await
            .unwrap();
        let open = StageRequest::Open {
            model: "smol".into(),
            weights_sha256: sha256(),
            layers,
            max_positions: 64,
            hidden: HiddenFormat::F32,
            token: None,
        };
        for frame in [open, bad] {
            stream
                .write_all(&encode_frame(&frame, DEFAULT_MAX_FRAME_LEN).unwrap())
                .await
                .unwrap();
        }
        stream.close().await.unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.unwrap();
        let mut replies = Vec::new();
        let mut rest = &bytes[..];
        while let Ok(Some((frame, used))) =
            decode_frame::<StageResponse>(rest, DEFAULT_MAX_FRAME_LEN)
        {
            replies.push(frame);
            rest = &rest[used..];
        }
        assert!(
            matches!(replies[0], StageResponse::Opened { width: 576, .. }),
            "{replies:?}"
        );
        match &replies[1] {
            StageResponse::Error(e) => assert!(e.message.contains(why), "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
    // And a good session still runs.
    let mut link = StageLink::open(&me2.client(), peer, layers, &spec)
        .await
        .unwrap();
    let hidden = mesh_node::engine::llama::Hidden {
        rows: 1,
        data: vec![0.01; 576],
    };
    assert_eq!(link.step(&hidden).await.unwrap().rows, 1);
    assert!(
        link.close().await.is_some(),
        "a closed session has its receipt"
    );
    me.shutdown().await;
    me2.shutdown().await;
}
