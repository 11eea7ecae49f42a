//! Real swarms on loopback, in-process: discovery through the DHT, streamed calls, and every
//! failure a caller must see clearly.

use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt};
use mesh_node::call::{CallError, Calls};
use mesh_node::network::client::INFER;
use mesh_node::Node;
use mesh_protocol::{
    ChatMessage, ErrorCode, FinishReason, InferRequest, InferResponse, Input, Role, SamplingParams,
};
use mesh_testnet::inprocess::{builtin_engines, start_node, tcp_addr};

const IDLE: Duration = Duration::from_secs(10);

fn chat(model: &str, text: &str) -> InferRequest {
    InferRequest {
        model: model.into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: text.into(),
            }],
        },
        params: SamplingParams {
            max_tokens: 64,
            ..Default::default()
        },
        deadline_ms: None,
        token: None,
        resume: None,
    }
}

/// Polls the DHT until it names a provider, for at most 10 s.
async fn providers_of(node: &Node, model: &str) -> Vec<libp2p::PeerId> {
    let start = Instant::now();
    loop {
        let found = node.client().find_providers(model).await.unwrap();
        if !found.is_empty() || start.elapsed() > Duration::from_secs(10) {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs a call to the end: the concatenated deltas and the final frame.
async fn run_call(
    node: &Node,
    peer: libp2p::PeerId,
    req: &InferRequest,
) -> Result<(String, InferResponse), CallError> {
    let mut call = node.client().call(peer, req, IDLE).await?;
    let mut text = String::new();
    let mut frames = Vec::new();
    while let Some(frame) = call.next().await? {
        if let InferResponse::Delta { text: t, .. } = &frame {
            text.push_str(t);
        }
        frames.push(frame);
    }
    assert!(
        matches!(frames.first(), Some(InferResponse::Started { .. })),
        "{frames:?}"
    );
    Ok((text, frames.pop().unwrap()))
}

/// A hosts a model, B is only a bootstrap peer, C knows only B.
async fn three_nodes() -> (Node, Node, Node) {
    let b = start_node(vec![], vec![]).await;
    let b_addr = tcp_addr(&b).await;
    let a = start_node(
        builtin_engines(&[
            ("echo", "echo"),
            ("slow-echo", "echo?delay_ms=100"),
            ("embed", "hash-embed"),
        ]),
        vec![b_addr.clone()],
    )
    .await;
    let c = start_node(vec![], vec![b_addr]).await;
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_finds_a_through_b_and_streams_an_answer() {
    let (a, b, c) = three_nodes().await;
    let found = providers_of(&c, "echo").await;
    assert_eq!(
        found,
        vec![a.peer_id()],
        "C must find exactly A through B's DHT"
    );

    let (text, last) = run_call(&c, a.peer_id(), &chat("echo", "hello from C"))
        .await
        .unwrap();
    assert_eq!(text, "echo: hello from C");
    match last {
        InferResponse::Done {
            finish_reason,
            usage,
            ..
        } => {
            assert_eq!(finish_reason, FinishReason::Stop);
            assert_eq!(usage.completion_tokens, 4);
        }
        other => panic!("expected done, got {other:?}"),
    }

    // The catalog C fetched is signed by A.
    let (cards, _) = c.client().catalog(a.peer_id()).await.unwrap();
    let names: Vec<_> = cards.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["echo", "embed", "slow-echo"]);

    // Embeddings come back as vectors.
    let embed = InferRequest {
        input: Input::Embed {
            texts: vec!["a".into(), "b c".into()],
        },
        ..chat("embed", "")
    };
    let (_, last) = run_call(&c, a.peer_id(), &embed).await.unwrap();
    assert!(matches!(
        last,
        InferResponse::Done {
            finish_reason: FinishReason::Complete,
            ..
        }
    ));

    for n in [c, a, b] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_and_unknown_peer_are_clear_errors() {
    let (a, b, c) = three_nodes().await;
    providers_of(&c, "echo").await;

    match run_call(&c, a.peer_id(), &chat("no-such-model", "hi")).await {
        Err(CallError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::UnknownModel);
            assert!(
                e.message.contains("echo"),
                "lists what it hosts: {}",
                e.message
            );
        }
        other => panic!("expected unknown_model, got {other:?}"),
    }
    assert!(c
        .client()
        .find_providers("no-such-model")
        .await
        .unwrap()
        .is_empty());

    let nobody = mesh_node::NodeIdentity::generate().peer_id();
    let start = Instant::now();
    match run_call(&c, nobody, &chat("echo", "hi")).await {
        Err(CallError::Network(msg)) => assert!(msg.contains("not found"), "{msg}"),
        other => panic!("expected a network error, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(25));

    // Still serving.
    assert!(run_call(&c, a.peer_id(), &chat("echo", "still here"))
        .await
        .is_ok());
    for n in [c, a, b] {
        n.shutdown().await;
    }
}

/// Sends raw bytes on an inference stream and returns the first frame the node answers.
async fn raw_exchange(from: &Node, to: libp2p::PeerId, bytes: &[u8]) -> Option<InferResponse> {
    let mut stream = from.client().open_stream(to, INFER).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let _ = stream.flush().await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(IDLE, stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the node must answer or close within {IDLE:?}"
    );
    mesh_protocol::decode_frame::<InferResponse>(&buf, mesh_protocol::DEFAULT_MAX_FRAME_LEN)
        .ok()
        .flatten()
        .map(|(frame, _)| frame)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_get_bad_request_and_the_node_keeps_serving() {
    let a = start_node(builtin_engines(&[("echo", "echo")]), vec![]).await;
    let c = start_node(vec![], vec![tcp_addr(&a).await]).await;

    // A well-formed length prefix around bytes that are not CBOR.
    let garbage = [0x04, 0xff, 0xff, 0xff, 0xff];
    match raw_exchange(&c, a.peer_id(), &garbage).await {
        Some(InferResponse::Error(e)) => assert_eq!(e.code, ErrorCode::BadRequest, "{e}"),
        other => panic!("expected bad_request, got {other:?}"),
    }

    // A prefix announcing 64 MiB: refused before the node reads or allocates it.
    let mut huge = mesh_protocol::frame::encode_prefix(64 << 20);
    huge.extend_from_slice(&[0u8; 32]);
    match raw_exchange(&c, a.peer_id(), &huge).await {
        Some(InferResponse::Error(e)) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("exceeds"), "{e}");
        }
        other => panic!("expected bad_request, got {other:?}"),
    }

    // Valid CBOR of the wrong shape.
    let wrong = mesh_protocol::encode_frame(&"just a string", 1024).unwrap();
    assert!(matches!(
        raw_exchange(&c, a.peer_id(), &wrong).await,
        Some(InferResponse::Error(e)) if e.code == ErrorCode::BadRequest
    ));

    // Bad parameters are refused by the node itself (sent raw, past the client's own check).
    let mut bad = chat("echo", "hi");
    bad.params.temperature = f32::NAN;
    let frame = mesh_protocol::encode_frame(&bad, 1024).unwrap();
    match raw_exchange(&c, a.peer_id(), &frame).await {
        Some(InferResponse::Error(e)) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("temperature"), "{e}");
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
    assert_eq!(
        a.server().runs("echo"),
        0,
        "nothing computed for refused calls"
    );

    let (text, _) = run_call(&c, a.peer_id(), &chat("echo", "ok"))
        .await
        .unwrap();
    assert_eq!(text, "echo: ok");
    c.shutdown().await;
    a.shutdown().await;
}

/// A serving node A, a caller C, and a call from C to A that has started and would take
/// about 10 s to finish (50 words at 200 ms each).
async fn slow_call_in_progress() -> (Node, Node, mesh_node::call::Call<libp2p::Stream>) {
    let a = start_node(
        builtin_engines(&[("slow-echo", "echo?delay_ms=200")]),
        vec![],
    )
    .await;
    let c = start_node(vec![], vec![tcp_addr(&a).await]).await;
    let long = "word ".repeat(50);
    let mut call = c
        .client()
        .call(a.peer_id(), &chat("slow-echo", &long), IDLE)
        .await
        .unwrap();
    assert!(matches!(
        call.next().await.unwrap(),
        Some(InferResponse::Started { .. })
    ));
    (a, c, call)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_hanging_up_cancels_the_compute() {
    let (a, c, mut call) = slow_call_in_progress().await;
    assert!(matches!(
        call.next().await.unwrap(),
        Some(InferResponse::Delta { .. })
    ));
    drop(call);

    // The node notices and frees the slot long before the 10 s the answer would take.
    let start = Instant::now();
    while a.server().load() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "call still admitted after hang-up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (text, _) = run_call(&c, a.peer_id(), &chat("slow-echo", "again"))
        .await
        .unwrap();
    assert_eq!(text, "echo: again");
    c.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_going_away_mid_stream_ends_the_call_with_an_error() {
    let (a, c, mut call) = slow_call_in_progress().await;
    a.shutdown().await;

    let start = Instant::now();
    let end = loop {
        match call.next().await {
            Ok(Some(InferResponse::Delta { .. })) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(end, Err(CallError::Closed) | Err(CallError::Network(_))),
        "{end:?}"
    );
    assert!(
        start.elapsed() < IDLE,
        "the caller learns within a bounded time"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_overloaded_at_once() {
    // 2 slots + 16 queued = 18 admitted; the 19th and later are refused at once.
    let a = start_node(
        builtin_engines(&[("slow-echo", "echo?delay_ms=300")]),
        vec![],
    )
    .await;
    let c = start_node(vec![], vec![tcp_addr(&a).await]).await;
    // 18 calls at once, each run to the end on its own task.
    let mut calls = Vec::new();
    for _ in 0..18 {
        let client = c.client();
        let peer = a.peer_id();
        calls.push(tokio::spawn(async move {
            let mut call = client
                .call(peer, &chat("slow-echo", "a b c"), Duration::from_secs(30))
                .await?;
            while call.next().await?.is_some() {}
            Ok::<(), CallError>(())
        }));
    }
    // Wait until all 18 are admitted.
    let start = Instant::now();
    while a.server().load() < 18 {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    match run_call(&c, a.peer_id(), &chat("slow-echo", "one more")).await {
        Err(CallError::Remote(e)) => assert_eq!(e.code, ErrorCode::Overloaded),
        other => panic!("expected overloaded, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "overloaded is answered at once"
    );
    for call in calls {
        call.await.unwrap().expect("admitted calls all finish");
    }
    c.shutdown().await;
    a.shutdown().await;
}

/// A node's `mesh_connections_trimmed_total`.
fn trimmed(node: &Node) -> f64 {
    let text = node.metrics_text();
    text.lines()
        .find_map(|l| l.strip_prefix("mesh_connections_trimmed_total "))
        .and_then(|v| v.parse().ok())
        .expect("the node counts trimmed connections")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_high_mark_a_node_closes_idle_kademlia_connections_and_keeps_a_callers() {
    use mesh_node::network::trim::Watermarks;
    use mesh_node::NodeIdentity;

    // A hub that trims past 3 connections down to 2, and six nodes joined through it; A hosts
    // a model and the hub calls it, so their connection carried a mesh stream.
    let mut config = mesh_testnet::inprocess::loopback_config(vec![]);
    config.network.connection_marks = Watermarks {
        low: 2,
        high: 3,
        grace: Duration::from_secs(1),
    };
    let hub = Node::start(NodeIdentity::generate(), vec![], config)
        .await
        .unwrap();
    let hub_addr = tcp_addr(&hub).await;
    let a = start_node(builtin_engines(&[("echo", "echo")]), vec![hub_addr.clone()]).await;
    let mut others = Vec::new();
    for _ in 0..5 {
        others.push(start_node(vec![], vec![hub_addr.clone()]).await);
    }
    let mut events = hub.client().events();
    let (text, _) = run_call(&hub, a.peer_id(), &chat("echo", "before"))
        .await
        .unwrap();
    assert_eq!(text, "echo: before");

    // The check runs every 10 s; six connections past a high mark of 3 go down to 2, the
    // caller's kept: at least 4 closed (more if the others come back and go again).
    let start = Instant::now();
    while trimmed(&hub) < 4.0 {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "the hub trimmed {} of its {} peers' connections",
            trimmed(&hub),
            hub.client().peers().await.unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Others were disconnected; A never was.
    let mut disconnected = Vec::new();
    loop {
        match events.try_recv() {
            Ok(mesh_node::network::NetworkEvent::Disconnected { peer }) => disconnected.push(peer),
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                panic!("{n} network events were missed")
            }
            Err(_) => break,
        }
    }
    assert!(!disconnected.is_empty(), "trimming disconnected nobody");
    assert!(
        !disconnected.contains(&a.peer_id()),
        "the connection that carried a call was closed"
    );
    // The hub still serves the mesh: a trimmed node finds A through it, and calls it.
    let found = providers_of(&others[0], "echo").await;
    assert_eq!(found, vec![a.peer_id()]);
    let (text, _) = run_call(&others[0], a.peer_id(), &chat("echo", "after"))
        .await
        .unwrap();
    assert_eq!(text, "echo: after");

    for n in others.into_iter().chain([a, hub]) {
        n.shutdown().await;
    }
}
