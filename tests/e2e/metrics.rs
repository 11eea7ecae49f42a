//! `GET /metrics` on real in-process nodes: a scrape parses as OpenMetrics text in the official
//! Python client's parser, and the counters move as calls are answered and refused, on the
//! serving node and on the calling one. (Hole-punched calls are checked in the NAT lab, which
//! scrapes its nodes.)

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use mesh_node::auth::AccessConfig;
use mesh_node::Node;
use mesh_testnet::inprocess::tcp_addr;
use serde_json::{json, Value};

use crate::mesh_api::{echo_and_secret_provider, node_with_api};

/// Scrapes `node`'s `/metrics` and parses it with `prometheus_client`'s OpenMetrics parser
/// (Python, the official client library): every sample as `[name, labels, value]`.
async fn scrape(node: &Node) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let url = format!("http://{}/metrics", node.api_addr().unwrap());
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let text = resp.text().await.unwrap();
    let python = std::env::var("MESH_TEST_PYTHON").expect("MESH_TEST_PYTHON (scripts/test.sh)");
    let parse = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", parse])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    samples
}

/// The value of the sample `name` whose labels include every one of `labels` (0 if none).
fn value(
    samples: &[(String, BTreeMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

async fn mesh_infer(api: std::net::SocketAddr, target: &str, model: &str) -> Value {
    let spec =
        json!({ "target": target, "model": model, "prompts": ["count me"], "deadline_ms": 30000 });
    let events = crate::mesh_api::infer_events(&api.to_string(), &spec, |_| {}).await;
    events.last().expect("an event").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_parses_and_counts_answered_and_refused_calls_on_both_sides() {
    let provider = echo_and_secret_provider().await;
    let boot = tcp_addr(&provider).await;
    let caller = node_with_api(&[], vec![boot], AccessConfig::default()).await;
    let target = provider.peer_id().to_string();

    let before = scrape(&provider).await;
    let answered = |s: &[_]| {
        value(
            s,
            "mesh_calls_served_total",
            &[("model", "echo"), ("outcome", "answered")],
        )
    };
    assert_eq!(answered(&before), 0.0);

    for _ in 0..3 {
        let done = mesh_infer(caller.api_addr().unwrap(), &target, "echo").await;
        assert_eq!(done["event"], "done", "{done}");
    }
    let refused = mesh_infer(caller.api_addr().unwrap(), &target, "secret").await;
    assert_eq!(refused["code"], "unauthorized", "{refused}");

    let served = scrape(&provider).await;
    assert_eq!(answered(&served), 3.0);
    let unauthorized = [
        ("model", "secret"),
        ("outcome", "refused"),
        ("code", "unauthorized"),
    ];
    assert_eq!(
        value(&served, "mesh_calls_served_total", &unauthorized),
        1.0
    );
    assert_eq!(
        value(
            &served,
            "mesh_first_output_seconds_count",
            &[("model", "echo")]
        ),
        3.0
    );
    assert!(value(&served, "mesh_tokens_generated_total", &[("model", "echo")]) >= 3.0);
    assert_eq!(value(&served, "mesh_busy_slots", &[("model", "echo")]), 0.0);
    assert_eq!(value(&served, "mesh_peers", &[("path", "direct")]), 1.0);
    assert_eq!(
        value(&served, "mesh_dht_records", &[("path", "own_keys")]),
        2.0
    );
    // libp2p's own, in the same scrape: connections and bytes.
    assert!(value(&served, "libp2p_swarm_connections_established_total", &[]) >= 1.0);
    assert!(value(&served, "libp2p_bandwidth_bytes_total", &[]) > 0.0);

    let made = scrape(&caller).await;
    assert_eq!(
        value(
            &made,
            "mesh_calls_made_total",
            &[
                ("model", "echo"),
                ("outcome", "answered"),
                ("path", "direct")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            &made,
            "mesh_calls_made_total",
            &[
                ("model", "secret"),
                ("outcome", "refused"),
                ("code", "unauthorized")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &made,
            "mesh_made_first_frame_seconds_count",
            &[("model", "echo")]
        ),
        3.0
    );
    // No peer ids and no prompts in any label.
    for (name, labels, _) in made.iter().chain(served.iter()) {
        for v in labels.values() {
            assert!(!v.starts_with("12D3KooW"), "{name} {labels:?}");
            assert!(!v.contains("count me"), "{name} {labels:?}");
        }
    }
    caller.shutdown().await;
    provider.shutdown().await;
}
