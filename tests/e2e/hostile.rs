//! Hostile peers, reproduced with mesh's own crates against real in-process nodes: providers
//! that refuse, stall or lie about their weights next to an honest one, and a peer that opens
//! stalled streams by the hundred. Honest callers are served throughout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId};
use mesh_node::auth::{Access, AccessConfig};
use mesh_node::wire::{read_frame, write_frame};
use mesh_node::{Node, NodeIdentity};
use mesh_protocol::frame::{encode_body, DEFAULT_MAX_FRAME_LEN};
use mesh_protocol::ids::{CATALOG_PROTOCOL, INFER_PROTOCOL};
use mesh_protocol::{
    CatalogRequest, CatalogResponse, ErrorCode, FinishReason, InferRequest, InferResponse,
    ModelCard, SignedModelCard, Usage, WireError,
};
use mesh_testnet::inprocess::{builtin_engines, loopback_config, tcp_addr};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// What a hostile provider does with the calls it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    /// Reads the request and never answers, holding the stream open.
    Stall,
    /// Answers at once, from weights other than the ones its name stands for.
    Lie,
    /// Says it does not host the model it announced.
    Deny,
}

/// A provider built from mesh's network crate, not from its server: it announces `model` in
/// the DHT with a card it signs itself, claims to be idle, and does `act` with every call.
struct Hostile {
    peer: PeerId,
    /// The swarm's task runs while a client of it lives.
    _client: mesh_node::network::Client,
    calls: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn hostile(act: Act, model: &str, sha256: &str, bootstrap: Multiaddr) -> Hostile {
    let identity = NodeIdentity::generate();
    let config = loopback_config(vec![bootstrap.clone()]).network;
    let shutdown = CancellationToken::new();
    let (client, mut inbound, event_loop) =
        mesh_node::network::new(&identity, &config, shutdown.clone()).expect("a swarm");
    let mut events = client.events();
    tokio::spawn(event_loop.run());
    // As a node does: announce once listening on every address, so the records carry them,
    // and once the bootstrap node is in the routing table, so they reach it.
    let mut listening = 0;
    while listening < config.listen.len() {
        if let Ok(mesh_node::network::NetworkEvent::Listening(_)) = events.recv().await {
            listening += 1;
        }
    }
    let boot_peer = client.dial(bootstrap).await.expect("joins");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.known_peers().await.unwrap().contains(&boot_peer) {
        assert!(
            Instant::now() < deadline,
            "the bootstrap node never entered the table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.provide(model).await.expect("announces");
    let card = ModelCard {
        name: model.into(),
        task: mesh_protocol::Task::Generate,
        architecture: "llama".into(),
        parameters: 0,
        quantization: "Q4_1".into(),
        context_length: 2048,
        embedding_dims: None,
        sha256: sha256.into(),
        license: None,
        max_concurrency: 64,
        layers: None,
    };
    let bytes = encode_body(&card).unwrap();
    let signed = SignedModelCard {
        signature: identity
            .sign(&SignedModelCard::signed_message(&bytes))
            .to_vec(),
        card: bytes,
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (_, protocol, mut stream) = tokio::select! {
                next = inbound.recv() => match next { Some(s) => s, None => return },
                () = stop.cancelled() => return,
            };
            if protocol.as_ref() == CATALOG_PROTOCOL {
                let signed = signed.clone();
                tokio::spawn(async move {
                    let _ = read_frame::<CatalogRequest, _>(&mut stream, 1024).await;
                    let answer = CatalogResponse {
                        cards: vec![signed],
                        load: 0,
                    };
                    let _ = write_frame(&mut stream, &answer, DEFAULT_MAX_FRAME_LEN).await;
                    let _ = stream.close().await;
                });
                continue;
            }
            if protocol.as_ref() != INFER_PROTOCOL {
                continue;
            }
            counted.fetch_add(1, Ordering::SeqCst);
            let request = read_frame::<InferRequest, _>(&mut stream, DEFAULT_MAX_FRAME_LEN).await;
            let frames = match (act, request) {
                (Act::Stall, _) => {
                    held.push(stream);
                    continue;
                }
                (Act::Lie, Ok(Some(request))) => vec![
                    InferResponse::Started {
                        model: request.model,
                        queue_ms: 0,
                    },
                    InferResponse::Delta {
                        text: "a lie".into(),
                        tokens: Vec::new(),
                    },
                    InferResponse::Done {
                        finish_reason: FinishReason::Stop,
                        usage: Usage::default(),
                        receipt: None,
                        stages: Vec::new(),
                    },
                ],
                (Act::Deny, _) | (Act::Lie, _) => vec![InferResponse::Error(WireError::new(
                    ErrorCode::UnknownModel,
                    "not here",
                ))],
            };
            for frame in frames {
                let _ = write_frame(&mut stream, &frame, DEFAULT_MAX_FRAME_LEN).await;
            }
            let _ = stream.close().await;
        }
    });
    Hostile {
        _client: client,
        peer: identity.peer_id(),
        calls,
        shutdown,
    }
}

async fn node(
    engines: &[(&str, &str)],
    bootstrap: Vec<Multiaddr>,
    access: AccessConfig,
    api: bool,
) -> Node {
    let mut config = loopback_config(bootstrap);
    config.serve.access = access;
    if api {
        config.api = Some("127.0.0.1:0".parse().unwrap());
    }
    Node::start(NodeIdentity::generate(), builtin_engines(engines), config)
        .await
        .expect("node starts")
}

/// Waits until the DHT names `count` providers of `model` to `node`.
async fn until_providers(node: &Node, model: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = node
            .client()
            .find_providers(model)
            .await
            .unwrap_or_default();
        if found.len() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the DHT names {} of {count} providers",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One `/v1/mesh/infer` call: its `done` or `error` event.
async fn mesh_infer(http: &reqwest::Client, api: std::net::SocketAddr, spec: Value) -> Value {
    let body = http
        .post(format!("http://{api}/v1/mesh/infer"))
        .json(&spec)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let last = body.lines().last().expect("an event");
    let mut last: Value = serde_json::from_str(last).unwrap();
    last["all"] = Value::String(body.clone());
    last
}

async fn chat(http: &reqwest::Client, api: std::net::SocketAddr, model: &str) -> (u16, Value) {
    let resp = http
        .post(format!("http://{api}/v1/chat/completions"))
        .json(&json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_reaches_the_honest_provider_past_refusing_stalling_denying_and_lying_ones() {
    let open = AccessConfig::default();
    let honest = node(
        &[("m", "echo"), ("slow", "echo?delay_ms=50")],
        vec![],
        open.clone(),
        false,
    )
    .await;
    let boot = tcp_addr(&honest).await;
    let weights = honest.cards()[0].sha256.clone();
    // A real node whose policy refuses this caller (`unauthorized`).
    let closed = AccessConfig {
        default: Access::Token,
        ..AccessConfig::default()
    };
    let refuser = node(&[("m", "echo")], vec![boot.clone()], closed, false).await;
    // Peers that claim the honest weights and stall or deny, and one that claims others.
    let staller = hostile(Act::Stall, "m", &weights, boot.clone()).await;
    let denier = hostile(Act::Deny, "m", &weights, boot.clone()).await;
    let liar = hostile(Act::Lie, "m", &"f".repeat(64), boot.clone()).await;
    let caller = node(&[], vec![boot], open, true).await;
    until_providers(&caller, "m", 5).await;
    // The honest node is busy with a long call, so the others, which claim to be idle (or
    // are), come first: every kind of misbehaviour is met before the honest node answers.
    let busy = mesh_node::dispatch::Dispatcher {
        client: caller.client(),
        local: None,
        cache: None,
        trust: Default::default(),
    };
    let long = vec!["word"; 2000].join(" ");
    let mut keep_busy = busy.dispatch(
        serde_json::from_value(json!({
            "target": honest.peer_id().to_string(), "model": "slow",
            "prompts": [long], "deadline_ms": 120000, "params": { "max_tokens": 4000, "temperature": 0.0 }
        }))
        .unwrap(),
    );
    while !matches!(
        keep_busy.recv().await,
        Some(mesh_node::dispatch::CallEvent::Started { .. })
    ) {}
    assert_eq!(honest.server().load(), 1);

    let api = caller.api_addr().unwrap();
    let http = reqwest::Client::new();
    let pinned = format!("m@sha256:{weights}");
    let started = Instant::now();
    for i in 0..8 {
        let done = mesh_infer(
            &http,
            api,
            json!({ "target": "any", "model": "m", "weights": weights, "prompts": [format!("call {i}")], "deadline_ms": 30000 }),
        )
        .await;
        assert_eq!(done["event"], "done", "call {i}: {done}");
        assert_eq!(done["peer"], honest.peer_id().to_string(), "call {i}");
        let (status, body) = chat(&http, api, &pinned).await;
        assert_eq!(status, 200, "gateway call {i}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], "echo: hi");
    }
    // A pinned name never reached the liar; the others were tried at most a few times each,
    // then backed off.
    assert_eq!(liar.calls.load(Ordering::SeqCst), 0);
    let (stalled, denied) = (
        staller.calls.load(Ordering::SeqCst),
        denier.calls.load(Ordering::SeqCst),
    );
    assert!(
        (1..=2).contains(&stalled),
        "the staller got {stalled} calls"
    );
    assert!((1..=2).contains(&denied), "the denier got {denied} calls");
    eprintln!(
        "16 calls in {:?}; staller {stalled}, denier {denied}, liar 0",
        started.elapsed()
    );

    // Unpinned, the liar's weights are a choice like any other; pinned to weights nobody
    // serves, the call fails and says who serves what.
    let other = "0".repeat(64);
    let refused = mesh_infer(
        &http,
        api,
        json!({ "target": "any", "model": format!("m@sha256:{other}"), "prompts": ["x"], "deadline_ms": 10000 }),
    )
    .await;
    assert_eq!(refused["event"], "error", "{refused}");
    assert_eq!(refused["code"], "unknown_model");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains(&liar.peer.to_string()), "{message}");
    assert!(message.contains("other weights"), "{message}");
    assert_eq!(liar.calls.load(Ordering::SeqCst), 0);

    // A malformed pin is a bad request, before any lookup.
    let (status, body) = chat(&http, api, "m@sha256:abc").await;
    assert_eq!(status, 400, "{body}");
    drop(keep_busy);
    caller.shutdown().await;
    refuser.shutdown().await;
    honest.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_models_name_is_pinned_to_its_weights_without_being_asked() {
    let open = AccessConfig::default();
    let boot_node = node(&[], vec![], open.clone(), false).await;
    let boot = tcp_addr(&boot_node).await;
    let known = mesh_node::models::KNOWN_MODELS[0];
    let liar = hostile(Act::Lie, known.name, &"e".repeat(64), boot.clone()).await;
    let caller = node(&[], vec![boot], open, true).await;
    until_providers(&caller, known.name, 1).await;
    let (status, body) = chat(
        &reqwest::Client::new(),
        caller.api_addr().unwrap(),
        known.name,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(known.files[0].sha256), "{message}");
    assert_eq!(
        liar.calls.load(Ordering::SeqCst),
        0,
        "the liar got the prompt"
    );
    caller.shutdown().await;
    boot_node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_stalled_streams_from_one_peer_leave_others_served_on_open_and_token_models() {
    // The node: one open model, one token model; the attacker; an honest caller with a token.
    let owner = NodeIdentity::generate();
    let mut config = loopback_config(vec![]);
    config.serve.access = AccessConfig {
        models: [("closed".to_string(), Access::Token)]
            .into_iter()
            .collect(),
        ..AccessConfig::default()
    };
    let target = Node::start(
        owner.clone(),
        builtin_engines(&[("open", "echo"), ("closed", "echo")]),
        config,
    )
    .await
    .expect("node starts");
    let addr = tcp_addr(&target).await;
    let attacker = node(&[], vec![addr.clone()], AccessConfig::default(), false).await;
    let honest_id = NodeIdentity::generate();
    let honest = Node::start(
        honest_id.clone(),
        Vec::new(),
        loopback_config(vec![addr.clone()]),
    )
    .await
    .expect("caller starts");

    // 300 streams that announce a 1 MiB request and send nothing more.
    let client = attacker.client();
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let protocol = libp2p::StreamProtocol::new(INFER_PROTOCOL);
        match client.open_stream(target.peer_id(), protocol).await {
            Ok(mut stream) => {
                let _ = stream.write_all(&[0x80, 0x80, 0x40]).await;
                let _ = stream.flush().await;
                stalled.push(stream);
            }
            Err(_) => break,
        }
    }
    assert!(
        stalled.len() >= 100,
        "the attack opened {} streams",
        stalled.len()
    );

    let now = mesh_node::auth::unix_now();
    let token = mesh_node::auth::token::issue(
        &owner,
        &mesh_node::auth::token::TokenRequest {
            subject: honest_id.peer_id(),
            models: vec!["closed".into()],
            not_before: now.saturating_sub(60),
            expires: now + 3600,
            max_requests: None,
        },
    )
    .unwrap();
    for (model, token) in [("open", None), ("closed", Some(token))] {
        let begun = Instant::now();
        let spec = mesh_node::dispatch::InferSpec {
            token,
            ..serde_json::from_value(json!({
                "target": target.peer_id().to_string(), "model": model,
                "prompts": ["during the attack"], "deadline_ms": 20000
            }))
            .unwrap()
        };
        let dispatcher = mesh_node::dispatch::Dispatcher {
            client: honest.client(),
            local: None,
            cache: None,
            trust: Default::default(),
        };
        let mut events = dispatcher.dispatch(spec);
        let mut text = String::new();
        let mut last = None;
        while let Some(event) = events.recv().await {
            if let mesh_node::dispatch::CallEvent::Delta { text: t } = &event {
                text.push_str(t);
            }
            last = Some(event);
        }
        assert!(
            matches!(last, Some(mesh_node::dispatch::CallEvent::Done { .. })),
            "{model}: {last:?}"
        );
        assert_eq!(text, "echo: during the attack", "{model}");
        eprintln!(
            "{model} answered in {:?} during the attack",
            begun.elapsed()
        );
    }
    // Streams past the attacker's share were refused at once: it holds no more than its share.
    let answered = futures::stream::iter(stalled.iter_mut())
        .filter_map(|s| async move {
            let r = tokio::time::timeout(
                Duration::from_millis(200),
                read_frame::<InferResponse, _>(s, DEFAULT_MAX_FRAME_LEN),
            )
            .await;
            matches!(r, Ok(Ok(Some(InferResponse::Error(_))))).then_some(())
        })
        .count()
        .await;
    assert!(
        answered >= stalled.len() - 32,
        "{answered} of {} stalled streams were refused",
        stalled.len()
    );
    drop(stalled);
    honest.shutdown().await;
    attacker.shutdown().await;
    target.shutdown().await;
}

/// A node that allows only `friend`, hosting the echo model, listening on 127.0.0.1.
async fn closed_node(friend: PeerId) -> Node {
    let access = AccessConfig {
        default: Access::Allow,
        allow: vec![friend],
        ..AccessConfig::default()
    };
    node(&[("echo", "echo")], vec![], access, false).await
}

/// Calls `model` on `target` from `caller`: the answer's text, or the failure.
async fn call_text(
    caller: &Node,
    target: PeerId,
    model: &str,
    prompt: &str,
) -> Result<String, String> {
    let dispatcher = mesh_node::dispatch::Dispatcher {
        client: caller.client(),
        local: None,
        cache: None,
        trust: Default::default(),
    };
    let spec = serde_json::from_value(json!({
        "target": target.to_string(), "model": model, "prompts": [prompt], "deadline_ms": 20000
    }))
    .unwrap();
    let mut events = dispatcher.dispatch(spec);
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            mesh_node::dispatch::CallEvent::Delta { text: t } => text.push_str(&t),
            mesh_node::dispatch::CallEvent::Done { .. } => return Ok(text),
            mesh_node::dispatch::CallEvent::Error(e) => return Err(e.to_string()),
            _ => {}
        }
    }
    Err("no answer".into())
}

/// The TCP port `node` listens on.
async fn tcp_port(node: &Node) -> u16 {
    tcp_addr(node)
        .await
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_tcp_flood_from_one_ip_leaves_room_for_a_fresh_caller() {
    let friend = NodeIdentity::generate();
    let target = closed_node(friend.peer_id()).await;
    let port = tcp_port(&target).await;
    // 200 sockets from 127.0.0.2 that never begin a handshake (more than the node's 64
    // pending handshakes in all).
    let mut flood = Vec::new();
    for _ in 0..200 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(stream) = socket.connect(([127, 0, 0, 1], port).into()).await {
            flood.push(stream);
        }
    }
    assert!(flood.len() >= 100, "{} sockets opened", flood.len());
    // A fresh caller from another IP joins and is answered during the flood.
    let mut config = loopback_config(vec![tcp_addr(&target).await]);
    config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    let caller = Node::start(friend, Vec::new(), config)
        .await
        .expect("the caller joins during the flood");
    assert_eq!(
        call_text(&caller, target.peer_id(), "echo", "past the flood").await,
        Ok("echo: past the flood".to_string())
    );
    // The node cuts a handshake that never comes (the transport's timeout): every flood
    // socket is closed by the node, not left to hold a place.
    let closed = futures::future::join_all(flood.iter_mut().map(|s| async move {
        let mut byte = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(s, &mut byte);
        matches!(
            tokio::time::timeout(Duration::from_secs(30), read).await,
            Ok(Ok(0) | Err(_))
        )
    }))
    .await;
    assert!(
        closed.iter().all(|c| *c),
        "some half-open sockets were kept"
    );
    caller.shutdown().await;
    target.shutdown().await;
}

/// A bare libp2p peer with a fresh peer id that dials `target` from 127.0.0.2 and holds the
/// connection: one of many throwaway identities.
async fn sybil(target: Multiaddr) -> Option<libp2p::Swarm<libp2p::swarm::dummy::Behaviour>> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .ok()?
        .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
        .ok()?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    // Listening on 127.0.0.2 makes its dials leave from that address (port reuse).
    swarm
        .listen_on("/ip4/127.0.0.2/tcp/0".parse().unwrap())
        .ok()?;
    swarm.dial(target).ok()?;
    Some(swarm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_sybils_from_one_ip_leave_the_node_able_to_dial_out_and_serve_its_friend() {
    let friend = NodeIdentity::generate();
    let target = closed_node(friend.peer_id()).await;
    let addr = tcp_addr(&target).await;
    let mut swarms = Vec::new();
    for _ in 0..300 {
        if let Some(s) = sybil(addr.clone()).await {
            swarms.push(s);
        }
    }
    // Drive every sybil until its dial settles (connected, or refused by the node).
    let (connected, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = CancellationToken::new();
    for mut swarm in swarms {
        let (connected, refused, stop) = (connected.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            let mut counted = false;
            loop {
                let event = tokio::select! {
                    e = swarm.select_next_some() => e,
                    () = stop.cancelled() => return,
                };
                match event {
                    libp2p::swarm::SwarmEvent::ConnectionEstablished { .. } if !counted => {
                        counted = true;
                        connected.fetch_add(1, Ordering::SeqCst);
                    }
                    libp2p::swarm::SwarmEvent::ConnectionClosed { .. } if counted => {
                        counted = false;
                        connected.fetch_sub(1, Ordering::SeqCst);
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    libp2p::swarm::SwarmEvent::OutgoingConnectionError { .. } => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected.load(Ordering::SeqCst) + refused.load(Ordering::SeqCst) < 300 {
        assert!(Instant::now() < deadline, "the sybils' dials never settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = connected.load(Ordering::SeqCst);
    eprintln!("sybils holding a connection: {held} of 300");
    assert!(held > 0 && held <= 64, "one IP holds {held} connections");

    // The node still dials out...
    let other = node(&[("echo", "echo")], vec![], AccessConfig::default(), false).await;
    let dialled = target.client().dial(tcp_addr(&other).await).await;
    assert_eq!(
        dialled.ok(),
        Some(other.peer_id()),
        "the node cannot dial out"
    );
    // ...and its friend, from another IP, is served.
    let mut config = loopback_config(vec![addr]);
    config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    let caller = Node::start(friend, Vec::new(), config)
        .await
        .expect("the friend joins");
    assert_eq!(
        call_text(&caller, target.peer_id(), "echo", "among sybils").await,
        Ok("echo: among sybils".to_string())
    );
    stop.cancel();
    caller.shutdown().await;
    other.shutdown().await;
    target.shutdown().await;
}
