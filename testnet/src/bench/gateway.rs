//! The OpenAI-compatible gateway: a chat completion through node C's gateway to SmolLM2 on
//! node A, against the same request on A's engine in-process; and requests/s through the
//! gateway with 32 concurrent clients (the echo model, so the network path is what is timed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_node::engine::builtin::Echo;
use mesh_node::engine::gguf::GgufEngine;
use mesh_node::engine::SharedEngine;
use mesh_node::{Node, NodeIdentity};
use mesh_protocol::{ChatMessage, InferRequest, Input, Role, SamplingParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Stats;
use crate::inprocess::{loopback_config, tcp_addr};

const PROMPT: &str = "Name the capital of France.";

pub async fn run(
    runs: usize,
    clients: usize,
    seconds: Duration,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let models = std::env::var_os("MESH_MODELS")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("set MESH_MODELS (testnet/bench.sh does)"))?;
    let path = models.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let smol: SharedEngine = Arc::new(
        GgufEngine::load("smol", &path, &mesh_node::engine::EngineOptions::new(2))
            .map_err(anyhow::Error::msg)?,
    );
    let echo: SharedEngine = Arc::new(Echo::new("echo", Duration::ZERO, 8));

    let mut a_config = loopback_config(vec![]);
    a_config.serve.max_queue = 256;
    let a = Node::start(NodeIdentity::generate(), vec![smol.clone(), echo], a_config).await?;
    let mut c_config = loopback_config(vec![tcp_addr(&a).await]);
    c_config.api = Some("127.0.0.1:0".parse()?);
    let c = Node::start(NodeIdentity::generate(), vec![], c_config).await?;
    let url = format!("http://{}/v1/chat/completions", c.api_addr().expect("api"));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let body = |model: &str| {
        json!({ "model": model, "temperature": 0, "max_tokens": 16,
                "messages": [{ "role": "user", "content": PROMPT }] })
    };
    let request = InferRequest {
        model: "smol".into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: PROMPT.into(),
            }],
        },
        params: SamplingParams {
            max_tokens: 16,
            ..Default::default()
        },
        deadline_ms: None,
        token: None,
        resume: None,
    };

    // Warm both paths, then interleave.
    let post = |model: &'static str| {
        let (http, url, body) = (http.clone(), url.clone(), body(model));
        async move {
            let v: serde_json::Value = http
                .post(&url)
                .json(&body)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    let in_process = || {
        let (smol, request) = (smol.clone(), request.clone());
        tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            smol.run(
                &request,
                &mut |o| {
                    if let mesh_node::engine::Output::Delta { text: t, .. } = o {
                        text.push_str(&t);
                    }
                    Ok(())
                },
                &CancellationToken::new(),
            )
            .map(|_| text)
        })
    };
    let via_gateway = post("smol").await?;
    let local = in_process().await??;
    anyhow::ensure!(
        via_gateway == local,
        "gateway {via_gateway:?} != in-process {local:?}"
    );
    let (mut gw, mut ip) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        post("smol").await?;
        gw.push(t.elapsed());
        let t = Instant::now();
        in_process().await??;
        ip.push(t.elapsed());
    }
    let (gw, ip) = (Stats::of(&gw), Stats::of(&ip));
    let mut out = vec![json!({
        "bench": "gateway", "case": "smollm2_chat_16_tokens", "runs": runs,
        "gateway_p50_ms": gw.p50_us as f64 / 1000.0, "in_process_p50_ms": ip.p50_us as f64 / 1000.0,
        "overhead_p50_ms": (gw.p50_us as f64 - ip.p50_us as f64) / 1000.0,
    })];

    post("echo").await?;
    let rate = super::calls_per_second(clients, seconds, || async {
        post("echo").await.map(|_| ())
    })
    .await?;
    out.push(json!({
        "bench": "gateway", "case": "echo_requests_per_s", "clients": clients,
        "requests_per_s": rate,
    }));
    c.shutdown().await;
    a.shutdown().await;
    Ok(out)
}
