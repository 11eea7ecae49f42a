//! The console's live data on real in-process nodes: the event stream of `/v1/mesh/events`
//! against the calls made, the inspector's capture (redacted) and replay to the same node and
//! to another; and the console itself in a real browser (headless Chromium driven through
//! chromedriver by Python's selenium), which sees the peers and models, chats, finds its call in
//! the inspector and replays it, saving screenshots under `target/console-screenshots/`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use mesh_node::auth::AccessConfig;
use mesh_testnet::inprocess::tcp_addr;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::mesh_api::{echo_and_secret_provider, node_with_api};

/// Follows `api`'s `/v1/mesh/events` with a real SSE parser: (event name, JSON body) as they
/// come. Returns once the feed answered.
async fn follow(api: SocketAddr) -> mpsc::UnboundedReceiver<(String, Value)> {
    let resp = reqwest::get(format!("http://{api}/v1/mesh/events"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut events = resp.bytes_stream().eventsource();
        while let Some(Ok(event)) = events.next().await {
            let data = serde_json::from_str(&event.data).unwrap();
            if tx.send((event.event, data)).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next `count` `call_ended` events of a feed (other events skipped), by call id.
async fn ended(
    feed: &mut mpsc::UnboundedReceiver<(String, Value)>,
    count: usize,
) -> HashMap<u64, Value> {
    let mut seen = HashMap::new();
    let mut started = 0;
    while seen.len() < count {
        let (name, data) = tokio::time::timeout(Duration::from_secs(20), feed.recv())
            .await
            .expect("the feed goes quiet")
            .expect("the feed ended");
        match name.as_str() {
            "call_started" => {
                assert_eq!(data["state"], "running", "{data}");
                started += 1;
            }
            "call_ended" => {
                seen.insert(data["id"].as_u64().unwrap(), data);
            }
            _ => {}
        }
    }
    assert_eq!(
        started, count,
        "each call is told when it starts, then when it ends"
    );
    seen
}

async fn infer(api: SocketAddr, spec: Value) -> Vec<Value> {
    crate::mesh_api::infer_events(&api.to_string(), &spec, |_| {}).await
}

fn echo_to(target: &str, prompt: &str) -> Value {
    json!({ "target": target, "model": "echo", "prompts": [prompt], "deadline_ms": 30000 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_tells_each_call_made_and_served_as_it_happens() {
    let provider = echo_and_secret_provider().await;
    let caller = node_with_api(
        &[],
        vec![tcp_addr(&provider).await],
        AccessConfig::default(),
    )
    .await;
    let (made_api, served_api) = (caller.api_addr().unwrap(), provider.api_addr().unwrap());
    let mut made_feed = follow(made_api).await;
    let mut served_feed = follow(served_api).await;
    let target = provider.peer_id().to_string();

    for prompt in ["one", "two"] {
        let events = infer(made_api, echo_to(&target, prompt)).await;
        assert_eq!(events.last().unwrap()["event"], "done");
    }
    let refused =
        json!({ "target": target, "model": "secret", "prompts": ["x"], "deadline_ms": 30000 });
    let events = infer(made_api, refused).await;
    assert_eq!(events.last().unwrap()["code"], "unauthorized");

    let made = ended(&mut made_feed, 3).await;
    let list: Value = reqwest::get(format!("http://{made_api}/v1/mesh/calls"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<u64> = list["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    let mut ids: Vec<u64> = made.keys().copied().collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(
        listed, ids,
        "the feed and the inspector name the same calls"
    );
    let states: Vec<(&str, &str)> = ids
        .iter()
        .rev()
        .map(|id| {
            let call = &made[id];
            assert_eq!(call["direction"], "out");
            assert_eq!(call["peer"], target.as_str());
            (
                call["model"].as_str().unwrap(),
                call["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("echo", "answered"),
            ("echo", "answered"),
            ("secret", "refused")
        ]
    );
    let first = &made[ids.last().unwrap()];
    assert_eq!(first["path"], "direct");
    assert!(first["receipt"].as_str().unwrap().starts_with("mrc1."));
    assert_eq!(first["receipt_verified"], true);
    assert!(first["tokens"].as_u64().unwrap() >= 1);
    let refusal = &made[&ids[0]];
    assert_eq!(refusal["code"], "unauthorized");
    assert!(!refusal["message"].as_str().unwrap().is_empty());
    assert!(
        refusal.get("capture").is_none(),
        "capture is off by default"
    );

    let served = ended(&mut served_feed, 3).await;
    let mut served_states: Vec<(u64, &str)> = served
        .iter()
        .map(|(id, call)| {
            assert_eq!(call["direction"], "in");
            assert_eq!(call["peer"], caller.peer_id().to_string());
            (*id, call["state"].as_str().unwrap())
        })
        .collect();
    served_states.sort_unstable();
    let served_states: Vec<&str> = served_states.into_iter().map(|(_, s)| s).collect();
    assert_eq!(served_states, ["answered", "answered", "refused"]);
    caller.shutdown().await;
    provider.shutdown().await;
}

async fn post(url: String, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The JSON lines of a replay's answer.
async fn lines(resp: reqwest::Response) -> Vec<Value> {
    let text = resp.text().await.unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_call_is_redacted_and_replays_to_the_same_node_or_another() {
    let first = node_with_api(&[("echo", "echo")], vec![], AccessConfig::default()).await;
    let boot = tcp_addr(&first).await;
    let second = node_with_api(
        &[("echo", "echo")],
        vec![boot.clone()],
        AccessConfig::default(),
    )
    .await;
    let caller = node_with_api(&[], vec![boot], AccessConfig::default()).await;
    let api = caller.api_addr().unwrap();
    let base = format!("http://{api}/v1/mesh");
    let to_first = first.peer_id().to_string();

    let uncaptured = infer(api, echo_to(&to_first, "not kept")).await;
    assert_eq!(uncaptured.last().unwrap()["event"], "done");
    let resp = reqwest::Client::new()
        .put(format!("{base}/capture"))
        .json(&json!({ "capture": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let secret = "my key is sk-proj-0123456789abcdefghijkl, keep it";
    let answered = infer(api, echo_to(&to_first, secret)).await;
    assert_eq!(answered.last().unwrap()["event"], "done");

    let calls: Value = reqwest::get(format!("{base}/calls"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls["capture"], true);
    let (captured_id, uncaptured_id) = (
        calls["calls"][0]["id"].as_u64().unwrap(),
        calls["calls"][1]["id"].as_u64().unwrap(),
    );
    let call: Value = reqwest::get(format!("{base}/calls/{captured_id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let prompt = call["capture"]["request"]["prompts"][0].as_str().unwrap();
    assert_eq!(prompt, "my key is [redacted], keep it");
    let response = call["capture"]["response"].as_str().unwrap();
    assert!(!response.contains("sk-proj"), "{response}");
    assert!(!response.is_empty());

    let same = post(format!("{base}/calls/{captured_id}/replay"), json!({})).await;
    assert_eq!(same.status(), 200);
    let same_id: u64 = same.headers()["x-mesh-call-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let events = lines(same).await;
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["peer"], to_first.as_str());
    let to_second = second.peer_id().to_string();
    let other = post(
        format!("{base}/calls/{captured_id}/replay"),
        json!({ "to": to_second }),
    )
    .await;
    let other_id: u64 = other.headers()["x-mesh-call-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let done = lines(other).await.pop().unwrap();
    assert_eq!(done["peer"], to_second.as_str(), "{done}");
    for id in [same_id, other_id] {
        let replayed: Value = reqwest::get(format!("{base}/calls/{id}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(replayed["replay_of"], captured_id);
        assert_eq!(replayed["state"], "answered");
    }

    let refused = post(format!("{base}/calls/{uncaptured_id}/replay"), json!({})).await;
    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("capture"),
        "{body}"
    );
    let missing = post(format!("{base}/calls/999999/replay"), json!({})).await;
    assert_eq!(missing.status(), 404);
    let bad = post(
        format!("{base}/calls/{captured_id}/replay"),
        json!({ "to": "nobody" }),
    )
    .await;
    assert_eq!(bad.status(), 400);
    for node in [caller, second, first] {
        node.shutdown().await;
    }
}

/// The Python with selenium that scripts/test.sh prepares, and Debian's chromium and
/// chromedriver.
fn browser_tools() -> (String, &'static str, &'static str) {
    let python = std::env::var("MESH_TEST_PYTHON").expect(
        "MESH_TEST_PYTHON is not set: run the tests with scripts/test.sh (it installs selenium)",
    );
    let (chromium, driver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
    for tool in [chromium, driver] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
        );
    }
    (python, chromium, driver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser_shows_the_mesh_chats_inspects_and_replays() {
    let (python, chromium, driver) = browser_tools();
    let first = node_with_api(
        &[("echo", "echo"), ("embed", "hash-embed")],
        vec![],
        AccessConfig::default(),
    )
    .await;
    let boot = tcp_addr(&first).await;
    let second = node_with_api(
        &[("echo", "echo")],
        vec![boot.clone()],
        AccessConfig::default(),
    )
    .await;
    let console = node_with_api(&[], vec![boot], AccessConfig::default()).await;
    // The console's node sees both providers before the page loads.
    let client = console.client();
    mesh_testnet::attack::until_providers(&client, "echo", 2, Duration::from_secs(20))
        .await
        .unwrap();
    let shots =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/fixtures/console_browser.py");
    let expect = json!({
        "url": format!("http://{}/", console.api_addr().unwrap()),
        "me": console.peer_id().to_string(),
        "peers": [first.peer_id().to_string(), second.peer_id().to_string()],
        "models": ["echo", "embed"],
        "chromium": chromium,
        "driver": driver,
        "screenshots": shots,
    });
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(expect.to_string())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), out)
        .await
        .expect("the browser test finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    // What the page showed against what the node did.
    let calls: Value = reqwest::get(format!(
        "http://{}/v1/mesh/calls",
        console.api_addr().unwrap()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let calls = calls["calls"].as_array().unwrap();
    let chat_id = seen["chat_call"].as_u64().unwrap();
    let replay_id = seen["replay_call"].as_u64().unwrap();
    let chat = calls
        .iter()
        .find(|c| c["id"] == chat_id)
        .expect("the chat's call");
    let replay = calls
        .iter()
        .find(|c| c["id"] == replay_id)
        .expect("the replay");
    assert_eq!(chat["state"], "answered");
    assert_eq!(replay["replay_of"], chat_id);
    assert_eq!(replay["state"], "answered");
    assert_eq!(replay["peer"], chat["peer"], "replayed to the same node");
    for name in [
        "console-overview.png",
        "console-chat.png",
        "console-inspector.png",
        "console-replay.png",
    ] {
        let size = std::fs::metadata(shots.join(name)).map_or(0, |m| m.len());
        assert!(size > 10_000, "{name}: {size} bytes");
    }
    for node in [console, second, first] {
        node.shutdown().await;
    }
}
