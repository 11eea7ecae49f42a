//! The gateway's routing and error statuses, with in-process nodes: a model hosted twice
//! survives losing one provider, and a busy model answers 429.

use std::time::Duration;

use mesh_node::{Node, NodeIdentity};
use mesh_testnet::inprocess::{builtin_engines, loopback_config, tcp_addr};
use serde_json::{json, Value};

async fn node_with_api(
    specs: &[(&str, &str)],
    bootstrap: Vec<libp2p::Multiaddr>,
    queue: usize,
) -> Node {
    let mut config = loopback_config(bootstrap);
    config.api = Some("127.0.0.1:0".parse().unwrap());
    config.serve.max_queue = queue;
    Node::start(NodeIdentity::generate(), builtin_engines(specs), config)
        .await
        .expect("node starts")
}

async fn chat(http: &reqwest::Client, gateway: &Node, model: &str, text: &str) -> (u16, Value) {
    let url = format!("http://{}/v1/chat/completions", gateway.api_addr().unwrap());
    let resp = http
        .post(url)
        .json(&json!({ "model": model, "messages": [{ "role": "user", "content": text }] }))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// The status of one chat completion, for calls run on their own task.
async fn status_of_chat(
    http: reqwest::Client,
    api: std::net::SocketAddr,
    model: &'static str,
    text: &'static str,
) -> u16 {
    http.post(format!("http://{api}/v1/chat/completions"))
        .json(&json!({ "model": model, "messages": [{ "role": "user", "content": text }] }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_hosted_twice_keeps_answering_when_one_provider_dies() {
    let b = node_with_api(&[], vec![], 16).await;
    let boot = vec![tcp_addr(&b).await];
    let a1 = node_with_api(&[("echo", "echo")], boot.clone(), 16).await;
    let a2 = node_with_api(&[("echo", "echo")], boot.clone(), 16).await;
    let c = node_with_api(&[], boot, 16).await;
    let http = reqwest::Client::new();

    // Both providers announce; wait until the gateway answers at all.
    let mut answered = false;
    for _ in 0..50 {
        if chat(&http, &c, "echo", "warm up").await.0 == 200 {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(answered, "the gateway never reached an echo provider");
    let mut found = c.client().find_providers("echo").await.unwrap();
    for _ in 0..25 {
        if found.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        found = c.client().find_providers("echo").await.unwrap();
    }
    assert_eq!(found.len(), 2, "both providers are in the DHT");

    a1.shutdown().await;
    for i in 0..10 {
        let (status, body) = chat(&http, &c, "echo", &format!("call {i}")).await;
        assert_eq!(status, 200, "call {i} after a provider died: {body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("echo: call {i}")
        );
    }
    for n in [c, a2, b] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_model_answers_429_and_bad_json_answers_400() {
    // Two slots (the testnet helper's builtin engines), no queue: a third call is refused at once.
    let a = node_with_api(&[("slow", "echo?delay_ms=300")], vec![], 0).await;
    let http = reqwest::Client::new();
    let first = tokio::spawn(status_of_chat(
        http.clone(),
        a.api_addr().unwrap(),
        "slow",
        "a b c d e f",
    ));
    let second = tokio::spawn(status_of_chat(
        http.clone(),
        a.api_addr().unwrap(),
        "slow",
        "a b c d e f",
    ));
    let mut waited = 0;
    while a.server().load() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
        assert!(waited < 250, "the first calls were never admitted");
    }
    let (status, body) = chat(&http, &a, "slow", "one more").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(second.await.unwrap(), 200);

    let resp = http
        .post(format!(
            "http://{}/v1/chat/completions",
            a.api_addr().unwrap()
        ))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_the_gateway() {
    let mut config = loopback_config(vec![]);
    config.api = Some("127.0.0.1:0".parse().unwrap());
    config.api_key = Some("s3cret".into());
    let a = Node::start(
        NodeIdentity::generate(),
        builtin_engines(&[("echo", "echo")]),
        config,
    )
    .await
    .unwrap();
    let url = format!("http://{}/v1/chat/completions", a.api_addr().unwrap());
    let body = json!({ "model": "echo", "messages": [{ "role": "user", "content": "hi" }] });
    let http = reqwest::Client::new();
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let mut req = http.post(&url).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{auth:?}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_api_key");
    }
    let resp = http
        .post(&url)
        .header("authorization", "Bearer s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_spread_over_the_providers_of_a_model() {
    let b = node_with_api(&[], vec![], 16).await;
    let boot = vec![tcp_addr(&b).await];
    // Each call takes about 0.5 s (5 words at 100 ms), so the four below overlap.
    let a1 = node_with_api(&[("slow", "echo?delay_ms=100")], boot.clone(), 16).await;
    let a2 = node_with_api(&[("slow", "echo?delay_ms=100")], boot.clone(), 16).await;
    let mut found = Vec::new();
    for _ in 0..50 {
        found = b.client().find_providers("slow").await.unwrap();
        if found.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(found.len(), 2, "both providers are in the DHT");
    let c = node_with_api(&[], boot, 16).await;
    let http = reqwest::Client::new();
    let (status, body) = chat(&http, &c, "slow", "warm up").await;
    assert_eq!(status, 200, "{body}");

    let before = (a1.server().runs("slow"), a2.server().runs("slow"));
    let api = c.api_addr().unwrap();
    let calls: Vec<_> = (0..4)
        .map(|_| tokio::spawn(status_of_chat(http.clone(), api, "slow", "a b c d")))
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    let served = (
        a1.server().runs("slow") - before.0,
        a2.server().runs("slow") - before.1,
    );
    assert_eq!(
        served,
        (2, 2),
        "four overlapping calls through one gateway go two to each provider"
    );
    for n in [c, a1, a2, b] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_deadlines_get_their_openai_statuses() {
    use mesh_node::auth::{Access, AccessConfig};
    // A provider that serves only allow-listed peers (none), and one whose calls may last 1 s.
    let mut closed = loopback_config(vec![]);
    closed.serve.access = AccessConfig {
        default: Access::Allow,
        ..Default::default()
    };
    let locked = Node::start(
        NodeIdentity::generate(),
        builtin_engines(&[("locked", "echo")]),
        closed,
    )
    .await
    .expect("node starts");
    let boot = vec![tcp_addr(&locked).await];
    let mut hasty = loopback_config(boot.clone());
    hasty.serve.max_deadline = Duration::from_secs(1);
    let hasty = Node::start(
        NodeIdentity::generate(),
        builtin_engines(&[("slow", "echo?delay_ms=400")]),
        hasty,
    )
    .await
    .expect("node starts");
    let c = node_with_api(&[], boot, 16).await;
    let http = reqwest::Client::new();

    let mut last = (0, Value::Null);
    for _ in 0..50 {
        last = chat(&http, &c, "locked", "hi").await;
        if last.0 != 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = last;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allow list"),
        "{body}"
    );
    assert_eq!(locked.server().runs("locked"), 0, "nothing computed");

    let mut last = (0, Value::Null);
    for _ in 0..50 {
        // 7 tokens at 400 ms each: longer than the provider's 1 s limit.
        last = chat(&http, &c, "slow", "a b c d e f").await;
        if last.0 != 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = last;
    assert_eq!(status, 504, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline"),
        "{body}"
    );
    for n in [c, hasty, locked] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capability_token_sent_in_x_mesh_token_opens_a_closed_model() {
    use mesh_node::auth::token::{issue, TokenRequest};
    use mesh_node::auth::{unix_now, Access, AccessConfig};
    let owner = NodeIdentity::generate();
    let mut config = loopback_config(vec![]);
    config.serve.access = AccessConfig {
        default: Access::Token,
        ..Default::default()
    };
    let a = Node::start(owner.clone(), builtin_engines(&[("paid", "echo")]), config)
        .await
        .expect("node starts");
    let c = node_with_api(&[], vec![tcp_addr(&a).await], 16).await;
    let now = unix_now();
    // The token names the gateway node: gateway calls run with its identity.
    let token = issue(
        &owner,
        &TokenRequest {
            subject: c.peer_id(),
            models: vec!["paid".into()],
            not_before: now - 60,
            expires: now + 600,
            max_requests: None,
        },
    )
    .unwrap()
    .to_text();
    let url = format!("http://{}/v1/chat/completions", c.api_addr().unwrap());
    let body = json!({ "model": "paid", "messages": [{ "role": "user", "content": "hi" }] });
    let http = reqwest::Client::new();
    let send = |token: Option<&str>| {
        let mut req = http.post(&url).json(&body);
        if let Some(t) = token {
            req = req.header("X-Mesh-Token", t);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let mut last = (0, Value::Null);
    for _ in 0..50 {
        last = send(None).await;
        if last.0 != 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last.0, 403, "{}", last.1);
    assert!(
        last.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no token"),
        "{}",
        last.1
    );
    let (status, answer) = send(Some(&token)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "echo: hi");
    let (status, _) = send(Some("mtk1.not-a-token")).await;
    assert_eq!(status, 400, "a malformed token is the client's error");
    assert_eq!(
        a.server().runs("paid"),
        1,
        "only the call with the token ran"
    );
    for n in [c, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_a_stream_cancels_the_remote_generation() {
    use futures::StreamExt;
    // 21 tokens at 200 ms each: about 4 s if nobody stops it.
    let a = node_with_api(&[("slow", "echo?delay_ms=200")], vec![], 16).await;
    let c = node_with_api(&[], vec![tcp_addr(&a).await], 16).await;
    let words = "w ".repeat(20);
    let url = format!("http://{}/v1/chat/completions", c.api_addr().unwrap());
    let body = json!({ "model": "slow", "stream": true,
                       "messages": [{ "role": "user", "content": words }] });
    let http = reqwest::Client::new();
    let mut response = None;
    for _ in 0..50 {
        let r = http.post(&url).json(&body).send().await.unwrap();
        if r.status() == 200 {
            response = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut chunks = response
        .expect("the gateway reached the model")
        .bytes_stream();
    let first = chunks.next().await.expect("a first chunk").unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    assert_eq!(a.server().load(), 1, "the generation runs on A");
    let hung_up = std::time::Instant::now();
    drop(chunks);
    while a.server().load() > 0 {
        assert!(
            hung_up.elapsed() < Duration::from_secs(2),
            "A still generates {:?} after the client hung up",
            hung_up.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in [c, a] {
        n.shutdown().await;
    }
}

/// Both nodes run Kademlia in client mode, so neither stores the other's provider records and
/// the DHT names no provider of `echo`; but the caller holds a connection to the provider (its
/// bootstrap peer). `any` finds it among the connected nodes (issue 15's churn soak: the DHT's
/// records can all be of nodes that left while live providers are connected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_the_dht_does_not_name_is_found_among_the_connected_nodes() {
    let mut config = loopback_config(vec![]);
    config.network.dht_server = false;
    let provider = Node::start(
        NodeIdentity::generate(),
        builtin_engines(&[("echo", "echo")]),
        config,
    )
    .await
    .expect("provider starts");
    let mut config = loopback_config(vec![tcp_addr(&provider).await]);
    config.network.dht_server = false;
    config.api = Some("127.0.0.1:0".parse().unwrap());
    let caller = Node::start(NodeIdentity::generate(), Vec::new(), config)
        .await
        .expect("caller starts");
    let client = caller.client();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !client.is_connected(&provider.peer_id()) {
        assert!(std::time::Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The DHT indeed names nobody.
    assert_eq!(client.find_providers("echo").await.unwrap(), Vec::new());
    let (status, body) = chat(&reqwest::Client::new(), &caller, "echo", "who hosts echo?").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "echo: who hosts echo?"
    );
    caller.shutdown().await;
    provider.shutdown().await;
}
