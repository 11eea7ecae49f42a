//! Tiny calls over the mesh against the same work over plain HTTP/1.1 keep-alive (axum +
//! hyper via reqwest): the baseline a user would otherwise pick.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use mesh_node::call::Calls;
use mesh_node::engine::builtin::Echo;
use mesh_node::engine::{Output, SharedEngine};
use mesh_node::{Node, NodeIdentity};
use mesh_protocol::{ChatMessage, InferRequest, InferResponse, Input, Role, SamplingParams};
use tokio_util::sync::CancellationToken;

use crate::inprocess::{loopback_config, tcp_addr};

/// The tiny call: one token of the echo model.
pub fn tiny_request() -> InferRequest {
    InferRequest {
        model: "echo".into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: "ping".into(),
            }],
        },
        params: SamplingParams {
            max_tokens: 1,
            ..Default::default()
        },
        deadline_ms: None,
        token: None,
        resume: None,
    }
}

/// One tiny call from `from` to `to`, checking the answer.
async fn tiny_call(from: &Node, to: &Node) -> anyhow::Result<()> {
    let mut call = from
        .client()
        .call(to.peer_id(), &tiny_request(), Duration::from_secs(10))
        .await?;
    let mut text = String::new();
    while let Some(frame) = call.next().await? {
        if let InferResponse::Delta { text: t, .. } = frame {
            text.push_str(&t);
        }
    }
    anyhow::ensure!(text == "echo:", "unexpected answer {text:?}");
    Ok(())
}

pub struct Fixture {
    server: Node,
    client: Node,
    http_url: String,
    http: reqwest::Client,
    http_shutdown: CancellationToken,
}

fn engine() -> SharedEngine {
    Arc::new(Echo::new("echo", Duration::ZERO, 8))
}

/// The HTTP baseline does what the mesh node does per call: run the engine on a blocking
/// thread and answer with its output and usage.
async fn http_infer(
    State(engine): State<SharedEngine>,
    Json(req): Json<InferRequest>,
) -> Json<serde_json::Value> {
    let out = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        let done = engine.run(
            &req,
            &mut |o| {
                if let Output::Delta { text: t, .. } = o {
                    text.push_str(&t);
                }
                Ok(())
            },
            &CancellationToken::new(),
        );
        (text, done.map(|c| c.completion_tokens).unwrap_or(0))
    })
    .await
    .unwrap_or_default();
    Json(serde_json::json!({ "text": out.0, "completion_tokens": out.1 }))
}

impl Fixture {
    pub async fn start() -> anyhow::Result<Fixture> {
        let mut config = loopback_config(vec![]);
        config.serve.max_queue = 256;
        let server = Node::start(NodeIdentity::generate(), vec![engine()], config).await?;
        let client = Node::start(
            NodeIdentity::generate(),
            vec![],
            loopback_config(vec![tcp_addr(&server).await]),
        )
        .await?;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_url = format!("http://{}/infer", listener.local_addr()?);
        let app = Router::new()
            .route("/infer", post(http_infer))
            .with_state(engine());
        let http_shutdown = CancellationToken::new();
        let stop = http_shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(Fixture {
            server,
            client,
            http_url,
            http,
            http_shutdown,
        })
    }

    async fn mesh_call(&self) -> anyhow::Result<()> {
        tiny_call(&self.client, &self.server).await
    }

    async fn http_call(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        let v: serde_json::Value = client
            .post(&self.http_url)
            .json(&tiny_request())
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(v["text"] == "echo:", "unexpected answer {v}");
        Ok(())
    }

    pub async fn mesh_round_trips(&self, n: usize) -> anyhow::Result<Vec<Duration>> {
        self.mesh_call().await?; // warm: connection and stream protocol negotiated
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.mesh_call().await?;
            out.push(t.elapsed());
        }
        Ok(out)
    }

    pub async fn http_round_trips(&self, n: usize) -> anyhow::Result<Vec<Duration>> {
        self.http_call(&self.http).await?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.http_call(&self.http).await?;
            out.push(t.elapsed());
        }
        Ok(out)
    }

    /// Calls completed per second with `in_flight` calls always outstanding on one connection.
    pub async fn mesh_throughput(
        &self,
        in_flight: usize,
        for_how_long: Duration,
    ) -> anyhow::Result<f64> {
        super::calls_per_second(in_flight, for_how_long, || self.mesh_call()).await
    }

    /// The same with HTTP/1.1: one connection per call in flight (HTTP/1.1 cannot multiplex).
    pub async fn http_throughput(
        &self,
        in_flight: usize,
        for_how_long: Duration,
    ) -> anyhow::Result<f64> {
        super::calls_per_second(in_flight, for_how_long, || self.http_call(&self.http)).await
    }

    /// A new node each time: dial, Noise, Yamux, stream, call.
    pub async fn mesh_cold_calls(&self, n: usize) -> anyhow::Result<Vec<Duration>> {
        let addr = tcp_addr(&self.server).await;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut config = loopback_config(vec![]);
            config.network.listen = vec![];
            config.network.dht_server = false;
            let node = Node::start(NodeIdentity::generate(), vec![], config).await?;
            let t = Instant::now();
            node.client().dial(addr.clone()).await?;
            tiny_call(&node, &self.server).await?;
            out.push(t.elapsed());
            node.shutdown().await;
        }
        Ok(out)
    }

    /// A new TCP connection each time.
    pub async fn http_cold_calls(&self, n: usize) -> anyhow::Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .tcp_nodelay(true)
                .build()?;
            let t = Instant::now();
            self.http_call(&client).await?;
            out.push(t.elapsed());
        }
        Ok(out)
    }

    pub async fn stop(self) {
        self.http_shutdown.cancel();
        self.client.shutdown().await;
        self.server.shutdown().await;
    }
}
