//! A node's API as the tests use it: an in-process node with its API on a free port
//! ([`node_with_api`]), and `POST /v1/mesh/infer`, posting an `InferSpec` and splitting the
//! NDJSON answer into events.

use futures::StreamExt;
use mesh_node::auth::{Access, AccessConfig};
use mesh_node::{Node, NodeIdentity};
use mesh_testnet::inprocess::{builtin_engines, loopback_config};
use serde_json::Value;

/// An in-process node hosting `engines` (builtin specs) under `access`, joined through
/// `bootstrap`, with its HTTP API on a free loopback port.
pub async fn node_with_api(
    engines: &[(&str, &str)],
    bootstrap: Vec<libp2p::Multiaddr>,
    access: AccessConfig,
) -> Node {
    let mut config = loopback_config(bootstrap);
    config.serve.access = access;
    config.api = Some("127.0.0.1:0".parse().unwrap());
    Node::start(NodeIdentity::generate(), builtin_engines(engines), config)
        .await
        .expect("node starts")
}

/// A provider with its API, hosting `echo` open to all and `secret` (an echo too) only for
/// callers with a capability token.
pub async fn echo_and_secret_provider() -> Node {
    let access = AccessConfig {
        models: [("secret".to_string(), Access::Token)]
            .into_iter()
            .collect(),
        ..AccessConfig::default()
    };
    node_with_api(&[("echo", "echo"), ("secret", "echo")], vec![], access).await
}

/// Streams `/v1/mesh/infer` on the API at `api` (`HOST:PORT`, with or without `http://`),
/// calls `each` on every event as it arrives, and returns all of them.
pub async fn infer_events(api: &str, spec: &Value, mut each: impl FnMut(&Value)) -> Vec<Value> {
    let base = if api.starts_with("http") {
        api.to_string()
    } else {
        format!("http://{api}")
    };
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/mesh/infer"))
        .json(spec)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let (mut buf, mut events) = (Vec::new(), Vec::new());
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.unwrap());
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: Value = serde_json::from_slice(&line).unwrap();
            each(&event);
            events.push(event);
        }
    }
    events
}

/// The text of an answer's `delta` events, joined.
pub fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["event"] == "delta")
        .filter_map(|e| e["text"].as_str())
        .collect()
}
