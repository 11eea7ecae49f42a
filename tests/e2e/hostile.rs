//! Hostile peers, reproduced with mesh's own crates against real in-process nodes: providers
//! that refuse, stall or lie about their weights next to an honest one, and a peer that opens
//! stalled streams by the hundred. Honest callers are served throughout.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use mesh_node::auth::{Access, AccessConfig};
use mesh_node::{Node, NodeIdentity};
use mesh_testnet::attack::{self, hostile, Act};
use mesh_testnet::inprocess::{builtin_engines, loopback_config, tcp_addr};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Where the half-open flood comes from: another loopback address than the honest nodes'
/// (raw sockets can bind it; libp2p cannot, see `attack::Netns`).
const FLOOD_IP: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

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
    attack::until_providers(&node.client(), model, count, Duration::from_secs(20))
        .await
        .unwrap();
}

/// One `/v1/mesh/infer` call: its `done` or `error` event.
async fn mesh_infer(api: std::net::SocketAddr, spec: Value) -> Value {
    let events = crate::mesh_api::infer_events(&api.to_string(), &spec, |_| {}).await;
    events.last().expect("an event").clone()
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

/// An honest provider of `m` (and of `slow`, an echo that takes 50 ms a token, to keep it
/// busy): the node, its TCP address, and the weights `m` is announced with.
async fn honest_provider() -> (Node, Multiaddr, String) {
    let honest = node(
        &[("m", "echo"), ("slow", "echo?delay_ms=50")],
        vec![],
        AccessConfig::default(),
        false,
    )
    .await;
    let boot = tcp_addr(&honest).await;
    let weights = honest.cards()[0].sha256.clone();
    (honest, boot, weights)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_reaches_the_honest_provider_past_refusing_stalling_denying_and_lying_ones() {
    let open = AccessConfig::default();
    let (honest, boot, weights) = honest_provider().await;
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
    let keep_busy = keep_busy(&caller, &honest, "slow").await;

    let api = caller.api_addr().unwrap();
    let http = reqwest::Client::new();
    let pinned = format!("m@sha256:{weights}");
    let started = Instant::now();
    for i in 0..8 {
        let done = mesh_infer(
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

/// Keeps `provider` busy with one long call from a dispatcher of `caller`'s (no cache), so the
/// load it reports is 1, until the returned receiver drops.
async fn keep_busy(
    caller: &Node,
    provider: &Node,
    model: &str,
) -> tokio::sync::mpsc::Receiver<mesh_node::dispatch::CallEvent> {
    let busy = mesh_node::dispatch::Dispatcher {
        client: caller.client(),
        local: None,
        cache: None,
        trust: Default::default(),
        metrics: Default::default(),
    };
    let long = vec!["word"; 2000].join(" ");
    let mut events = busy.dispatch(
        serde_json::from_value(json!({
            "target": provider.peer_id().to_string(), "model": model,
            "prompts": [long], "deadline_ms": 120000, "params": { "max_tokens": 4000, "temperature": 0.0 }
        }))
        .unwrap(),
    );
    while !matches!(
        events.recv().await,
        Some(mesh_node::dispatch::CallEvent::Started { .. })
    ) {}
    assert_eq!(provider.server().load(), 1);
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_claims_to_be_idle_but_answers_slowly_gets_one_call_then_comes_last() {
    let open = AccessConfig::default();
    let (honest, boot, weights) = honest_provider().await;
    // Claims the honest weights and load 0, and makes every call wait 1.5 s for its first
    // frame: no stall (that would take 5 s), just slow.
    let slowpoke = hostile(
        Act::Slow(Duration::from_millis(1500)),
        "m",
        &weights,
        boot.clone(),
    )
    .await;
    let caller = node(&[], vec![boot], open, true).await;
    until_providers(&caller, "m", 2).await;
    // The honest node reports load 1: on claims alone, the slow one would get every call.
    let _busy = keep_busy(&caller, &honest, "slow").await;

    let api = caller.api_addr().unwrap();
    let http = reqwest::Client::new();
    let mut peers = Vec::new();
    for i in 0..6 {
        let done = mesh_infer(
            api,
            json!({ "target": "any", "model": "m", "prompts": [format!("call {i}")], "deadline_ms": 30000 }),
        )
        .await;
        assert_eq!(done["event"], "done", "call {i}: {done}");
        peers.push(done["peer"].as_str().unwrap().to_string());
        let (status, body) = chat(&http, api, "m").await;
        assert_eq!(status, 200, "gateway call {i}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], "echo: hi");
    }
    // Its claim won the first call; what this node measured decided every one after it.
    assert_eq!(peers[0], slowpoke.peer.to_string());
    assert!(
        peers[1..]
            .iter()
            .all(|p| *p == honest.peer_id().to_string()),
        "{peers:?}"
    );
    assert_eq!(slowpoke.calls.load(Ordering::SeqCst), 1);
    caller.shutdown().await;
    honest.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_numbers_a_provider_can_send_break_nothing_and_the_gateway_keeps_answering() {
    // This profile checks overflow: a sum of remote numbers that overflowed would panic here.
    let open = AccessConfig::default();
    let boot_node = node(&[], vec![], open.clone(), false).await;
    let boot = tcp_addr(&boot_node).await;
    let inflater = hostile(Act::Inflate, "big", &"a".repeat(64), boot.clone()).await;
    let caller = node(&[], vec![boot], open, true).await;
    until_providers(&caller, "big", 1).await;
    let (api, http) = (caller.api_addr().unwrap(), reqwest::Client::new());
    for round in 0..3 {
        let (status, body) = chat(&http, api, "big").await;
        assert_eq!(status, 200, "round {round}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], "inflated");
        assert_eq!(body["usage"]["prompt_tokens"], u32::MAX);
        let done = mesh_infer(
            api,
            json!({ "target": "any", "model": "big", "prompts": ["x"], "deadline_ms": 10000 }),
        )
        .await;
        assert_eq!(done["event"], "done", "round {round}: {done}");
        // Streamed through the gateway too, then the Ollama API.
        let resp = http
            .post(format!("http://{api}/v1/chat/completions"))
            .json(
                &json!({ "model": "big", "stream": true, "stream_options": {"include_usage": true},
                           "messages": [{ "role": "user", "content": "hi" }] }),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("inflated") && text.contains("[DONE]"),
            "{text}"
        );
        let resp = http
            .post(format!("http://{api}/api/chat"))
            .json(&json!({ "model": "big", "stream": false,
                           "messages": [{ "role": "user", "content": "hi" }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            200,
            "{}",
            resp.text().await.unwrap()
        );
    }
    assert_eq!(inflater.calls.load(Ordering::SeqCst), 12);
    caller.shutdown().await;
    boot_node.shutdown().await;
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
    let mut stalled = attack::stalled_streams(&attacker.client(), target.peer_id(), 300).await;
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
            metrics: Default::default(),
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
    let answered = attack::refused(&mut stalled, Duration::from_millis(200)).await;
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
        metrics: Default::default(),
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
    let mut flood = attack::half_open(FLOOD_IP, ([127, 0, 0, 1], port).into(), 200).await;
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

/// The connections `target` holds from any of `ips`, as its own peer table counts them (a
/// sybil sees its connection established a moment before the node refuses it, so the
/// sybils' own count runs ahead of the truth).
async fn connections_from(target: &Node, ips: &[String]) -> usize {
    let peers = target.client().peers().await.unwrap();
    peers
        .iter()
        .flat_map(|p| p.addresses.iter())
        .filter(|a| ips.iter().any(|ip| a.contains(ip.as_str())))
        .count()
}

/// [`connections_from`] once it has stopped changing (checked every 100 ms, for at most 5 s).
async fn settled_connections_from(target: &Node, ips: &[String]) -> usize {
    let mut held = connections_from(target, ips).await;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = connections_from(target, ips).await;
        if now == held {
            break;
        }
        held = now;
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_sybils_from_one_ip_leave_the_node_able_to_dial_out_and_serve_its_friend() {
    // libp2p on loopback always dials from 127.0.0.1, so the sybils run in a network
    // namespace of their own, which needs root.
    let netns = match attack::Netns::create() {
        Ok(netns) => netns,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the sybil test, but it could not: {why}"
            );
            eprintln!("skipped: {why}");
            return;
        }
    };
    let friend = NodeIdentity::generate();
    let access = AccessConfig {
        default: Access::Allow,
        allow: vec![friend.peer_id()],
        ..AccessConfig::default()
    };
    let mut config = loopback_config(vec![]);
    config.serve.access = access;
    let facing: Multiaddr = format!("/ip4/{}/tcp/0", netns.host_ip()).parse().unwrap();
    config.network.listen.push(facing);
    let target = Node::start(
        NodeIdentity::generate(),
        builtin_engines(&[("echo", "echo")]),
        config,
    )
    .await
    .expect("the node starts");
    let addr = tcp_addr(&target).await;
    let from_namespace = target
        .client()
        .listen_addrs()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.to_string().contains(&netns.host_ip().to_string()))
        .expect("an address facing the namespace")
        .with_p2p(target.peer_id())
        .unwrap();
    // In waves, as a patient attacker would: a burst is mostly turned away at the handshake.
    let stop = CancellationToken::new();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    let inside = stop.clone();
    let sybils = netns.run(move || async move {
        attack::sybils_in_waves(&from_namespace, 300, 30, &inside).await;
        let _ = held_tx.send(());
        inside.cancelled().await;
    });
    held_rx.await.expect("the sybils ran");
    // Counted on the node (see `connections_from`).
    let inside = netns.inside_ip().to_string();
    let held = settled_connections_from(&target, std::slice::from_ref(&inside)).await;
    eprintln!("sybils from {inside} holding a connection: {held} of 300");
    assert!(held > 32 && held <= 64, "one IP holds {held} connections");

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
    sybils.join().unwrap().unwrap();
    caller.shutdown().await;
    other.shutdown().await;
    target.shutdown().await;
}

/// A node with only a wildcard TCP listener (so only AutoNAT can confirm an address for it),
/// joined to one AutoNAT server at each of `server_ips`.
async fn behind_autonat(server_ips: &[&str]) -> (Node, Vec<Node>) {
    let mut servers = Vec::new();
    for ip in server_ips {
        let mut config = loopback_config(vec![]);
        config.network.listen = vec![format!("/ip4/{ip}/tcp/0").parse().unwrap()];
        servers.push(
            Node::start(NodeIdentity::generate(), Vec::new(), config)
                .await
                .expect("server starts"),
        );
    }
    let mut bootstrap = Vec::new();
    for server in &servers {
        bootstrap.push(tcp_addr(server).await);
    }
    let mut config = loopback_config(bootstrap);
    config.network.listen = vec!["/ip4/0.0.0.0/tcp/0".parse().unwrap()];
    config.network.autonat_retry = Duration::from_secs(1);
    let node = Node::start(NodeIdentity::generate(), Vec::new(), config)
        .await
        .expect("node starts");
    (node, servers)
}

/// Whether `status` lists a confirmed address that is not through a relay.
fn direct_external(status: &mesh_node::network::NetworkStatus) -> bool {
    status
        .external_addrs
        .iter()
        .any(|a| !a.contains("p2p-circuit"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autonat_dial_backs_from_one_ip_do_not_make_a_node_public_and_two_ips_do() {
    use mesh_node::network::Reachability;
    // Three AutoNAT servers at one IP: their dial-backs succeed (AutoNAT itself says public),
    // but the node does not believe them.
    let (node, servers) = behind_autonat(&["127.0.0.2", "127.0.0.2", "127.0.0.2"]).await;
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut autonat_said_public = false;
    while Instant::now() < deadline {
        let status = node.client().status().await.unwrap();
        autonat_said_public |= status.autonat == Reachability::Public;
        assert_ne!(status.reachability, Reachability::Public, "{status:?}");
        assert!(!direct_external(&status), "{status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        autonat_said_public,
        "the servers' dial-backs never succeeded: the check above proved nothing"
    );
    node.shutdown().await;
    for server in servers {
        server.shutdown().await;
    }

    // Two servers at two IPs: the address is confirmed.
    let (node, servers) = behind_autonat(&["127.0.0.2", "127.0.0.3"]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = node.client().status().await.unwrap();
        if direct_external(&status) || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(direct_external(&status), "{status:?}");
    assert_eq!(status.reachability, Reachability::Public);
    assert!(
        status
            .external_addrs
            .iter()
            .any(|a| a.starts_with("/ip4/127.0.0.1/tcp/")),
        "{status:?}"
    );
    node.shutdown().await;
    for server in servers {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kademlia_flood_of_keys_and_addresses_is_bounded_and_the_nodes_own_records_survive() {
    let open = AccessConfig::default();
    let target = node(&[("m", "echo")], vec![], open.clone(), false).await;
    let boot = tcp_addr(&target).await;
    let before = target.client().status().await.unwrap().dht;
    assert!(before.own_keys >= 1, "{before:?}");

    // 300 keys, each announced with 300 made-up addresses.
    let report = attack::kad_flood(
        target.peer_id(),
        boot.clone(),
        300,
        300,
        30,
        Duration::from_secs(120),
    )
    .await
    .unwrap();
    assert_eq!(report.keys, 300);
    let flooder = report.peer.unwrap();
    let after = target.client().status().await.unwrap().dht;
    eprintln!("flood: {report:?}; the target's store before {before:?}, after {after:?}");
    // The flood reached the store (it holds records of the flooder's, with addresses cut
    // down from 300), and no more of it than one peer's share.
    assert_eq!(after.remote_providers, 1, "{after:?}");
    assert_eq!(
        after.most_keys_of_one_provider,
        mesh_node::network::provider_store::MAX_KEYS_PER_PROVIDER
    );
    assert_eq!(
        after.most_addresses_in_one_record,
        mesh_node::network::provider_store::MAX_ADDRESSES_PER_RECORD
    );
    assert!(
        after.remote_addresses
            <= after.remote_records * mesh_node::network::provider_store::MAX_ADDRESSES_PER_RECORD
    );
    assert_eq!(
        after.own_keys, before.own_keys,
        "the node's own records survive"
    );

    // A node that joins after the flood finds the target's model, and its call answers.
    let caller = node(&[], vec![boot], open, false).await;
    attack::until_providers(&caller.client(), "m", 1, Duration::from_secs(20))
        .await
        .unwrap();
    let found = caller.client().find_providers("m").await.unwrap();
    assert!(found.contains(&target.peer_id()), "{found:?}");
    assert!(!found.contains(&flooder));
    let dispatcher = mesh_node::dispatch::Dispatcher {
        client: caller.client(),
        local: None,
        cache: None,
        trust: Default::default(),
        metrics: Default::default(),
    };
    let mut events = dispatcher.dispatch(
        serde_json::from_value(json!({ "target": "any", "model": "m", "prompts": ["after the flood"], "deadline_ms": 30000 }))
            .unwrap(),
    );
    let mut answered = false;
    while let Some(event) = events.recv().await {
        if let mesh_node::dispatch::CallEvent::Done { .. } = event {
            answered = true;
        }
    }
    assert!(answered, "the call after the flood answers");
    caller.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_sybils_from_four_ips_fill_the_inbound_share_an_idle_one_gives_its_place() {
    let mut namespaces = Vec::new();
    for _ in 0..4 {
        match attack::Netns::create() {
            Ok(netns) => namespaces.push(netns),
            Err(why) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI must run the eviction test, but it could not: {why}"
                );
                eprintln!("skipped: {why}");
                return;
            }
        }
    }
    let mut config = loopback_config(vec![]);
    for netns in &namespaces {
        let facing: Multiaddr = format!("/ip4/{}/tcp/0", netns.host_ip()).parse().unwrap();
        config.network.listen.push(facing);
    }
    let share = (config.network.max_connections / 4 * 3) as usize;
    let per_ip = (config.network.max_connections / 4) as usize;
    let target = Node::start(
        NodeIdentity::generate(),
        builtin_engines(&[("echo", "echo")]),
        config,
    )
    .await
    .expect("the node starts");
    let addr = tcp_addr(&target).await;
    let listen = target.client().listen_addrs().await.unwrap();
    // 60 sybils from each of four IPs: 240 against a share of 192, 64 a IP.
    let stop = CancellationToken::new();
    let mut threads = Vec::new();
    for netns in &namespaces {
        let to = listen
            .iter()
            .find(|a| a.to_string().contains(&netns.host_ip().to_string()))
            .expect("an address facing the namespace")
            .clone()
            .with_p2p(target.peer_id())
            .unwrap();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        let inside = stop.clone();
        threads.push(netns.run(move || async move {
            attack::sybils_in_waves(&to, 60, 30, &inside).await;
            let _ = held_tx.send(());
            inside.cancelled().await;
        }));
        held_rx.await.expect("the sybils ran");
    }
    let insides: Vec<String> = namespaces
        .iter()
        .map(|n| n.inside_ip().to_string())
        .collect();
    let held = settled_connections_from(&target, &insides).await;
    eprintln!("sybils from four IPs holding a connection: {held} of 240 (share {share})");
    assert!(
        held <= share && held + 4 >= share,
        "{held} sybils held, share {share}"
    );
    assert!(held <= 4 * per_ip);

    // Once the sybils have been idle for the eviction age, a fresh caller takes one's place.
    tokio::time::sleep(
        mesh_node::network::inbound_guard::IDLE_BEFORE_EVICTION + Duration::from_secs(1),
    )
    .await;
    let before = connections_from(&target, &insides).await;
    let mut config = loopback_config(vec![addr]);
    config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    let caller = Node::start(NodeIdentity::generate(), Vec::new(), config)
        .await
        .expect("the caller joins");
    assert_eq!(
        call_text(&caller, target.peer_id(), "echo", "in place of a sybil").await,
        Ok("echo: in place of a sybil".to_string())
    );
    // The evicted connection closes a moment after the caller's is accepted.
    let mut after = connections_from(&target, &insides).await;
    for _ in 0..50 {
        if after < before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = connections_from(&target, &insides).await;
    }
    eprintln!("sybils holding a connection before the caller joined: {before}, after: {after}");
    assert!(
        after < before,
        "no sybil gave its place: {after} of {before}"
    );
    stop.cancel();
    for thread in threads {
        thread.join().unwrap().unwrap();
    }
    caller.shutdown().await;
    target.shutdown().await;
}
