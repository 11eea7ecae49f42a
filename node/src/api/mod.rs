//! The node's HTTP API on loopback: status and peers for `mesh peers` and friends, and the
//! OpenAI-compatible gateway ([`crate::openai`]) and Ollama's API ([`crate::ollama`]).
//!
//! Bound to loopback by default. Every route sits behind [`guard`]: the `Host` and `Origin`
//! checks against DNS rebinding, the API key (if any), and bounds on concurrency and body
//! size. A call made through the API acts as the node's owner (docs/security.md).

pub mod client;
pub mod console;
pub mod diagnose;
pub mod guard;
pub mod inspect;
pub mod proof;
pub mod pull;
pub(crate) mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) use state::ApiState;

use crate::dispatch::{CallEvent, InferSpec};
use crate::network::{Client, Path, PeerSummary};
use crate::serve::Server;

/// What `GET /v1/mesh/status` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub models: Vec<mesh_protocol::ModelCard>,
    pub load: u32,
    /// Reachability, external addresses and relays; absent from older nodes.
    #[serde(default)]
    pub network: Option<crate::network::NetworkStatus>,
    /// The ranges of layers this node runs for heads, with their sessions open now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<crate::serve::StageStatus>,
    /// Each hosted model's calls waiting and slots computing, now.
    #[serde(default)]
    pub model_loads: Vec<ModelLoad>,
    /// The calls this node served in the last minute, by outcome.
    #[serde(default)]
    pub served_last_minute: crate::metrics::LastMinute,
}

/// One hosted model's queue, in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelLoad {
    pub model: String,
    pub queued: u32,
    pub busy: u32,
}

/// `GET /v1/mesh/whoami?challenge=HEX`: the 32 bytes the node signs to prove who it is.
#[derive(Debug, Default, Deserialize)]
struct WhoamiQuery {
    challenge: Option<String>,
}

/// What `GET /v1/mesh/whoami` returns: the node's peer id, and the node key's signature of the
/// challenge ([`proof`]). The one route that answers without the API key; it tells nothing
/// the mesh does not know (the peer id) and signs only under its own context.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Whoami {
    pub peer_id: String,
    pub proof: String,
}

async fn whoami(State(state): State<ApiState>, Query(query): Query<WhoamiQuery>) -> Response {
    match query.challenge.as_deref().and_then(proof::parse_challenge) {
        Some(challenge) => Json(Whoami {
            peer_id: state.client.local_peer_id().to_string(),
            proof: proof::prove(state.server.identity(), &challenge),
        })
        .into_response(),
        None => {
            let message = "give a challenge: 32 bytes in hex (64 characters), as ?challenge=HEX";
            let body = serde_json::json!({ "error": { "message": message, "type": "invalid_request_error" } });
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
    }
}

pub use guard::ApiAccess;

/// What the API's handlers share besides the network and the server.
pub struct ApiContext {
    /// The providers `any` calls through the API may use (`--trust-provider`).
    pub trust: Arc<crate::dispatch::ProviderTrust>,
    /// What `GET /metrics`, the inspector and `/v1/mesh/events` show.
    pub telemetry: crate::metrics::Telemetry,
    /// Where `POST /v1/mesh/pull` puts model files (`None`: it cannot).
    pub models_dir: Option<std::path::PathBuf>,
}

/// Serves the API on `listener` until `shutdown` fires, every route behind [`guard`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    client: Client,
    server: Arc<Server>,
    access: ApiAccess,
    context: ApiContext,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let ApiContext {
        trust,
        telemetry,
        models_dir,
    } = context;
    let guard = Arc::new(guard::Guard::new(listener.local_addr()?, &access));
    let app = Router::new()
        .route("/v1/mesh/status", get(status))
        .route(guard::WHOAMI_PATH, get(whoami))
        .route("/v1/mesh/peers", get(peers))
        .route("/v1/mesh/models", get(models))
        .route("/v1/mesh/infer", axum::routing::post(infer))
        .route("/metrics", get(metrics))
        .route("/v1/mesh/calls", get(inspect::calls))
        .route("/v1/mesh/calls/{id}", get(inspect::call))
        .route(
            "/v1/mesh/calls/{id}/replay",
            axum::routing::post(inspect::replay),
        )
        .route(
            "/v1/mesh/capture",
            get(inspect::capture).put(inspect::set_capture),
        )
        .route("/v1/mesh/events", get(inspect::events))
        .route("/v1/mesh/pull", axum::routing::post(pull::pull_route))
        .route("/v1/mesh/diagnosis", get(diagnose::diagnosis))
        .route("/v1/mesh/diagnosis/{peer}", get(diagnose::peer))
        .route("/", get(console::root))
        .route("/console.js", get(console::script))
        .route("/console.css", get(console::style))
        .merge(crate::openai::router())
        .merge(crate::ollama::router())
        .with_state(ApiState {
            client,
            server,
            providers: Default::default(),
            trust,
            telemetry,
            event_feeds: inspect::feed_places(),
            models_dir,
        });
    let app = guard::apply(app, guard);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds the API address, explaining the usual failure. An address off loopback needs a
/// key: the API acts as the node's owner.
pub async fn bind(addr: SocketAddr, access: &ApiAccess) -> Result<tokio::net::TcpListener, String> {
    if !addr.ip().is_loopback() && access.key.as_deref().is_none_or(str::is_empty) {
        return Err(format!(
            "refusing to serve the API on {addr} without a key: off loopback, anyone who can reach it would act as this node's owner. Set one with --api-key KEY (or the MESH_API_KEY environment variable), or keep the API on loopback with --api 127.0.0.1:7440"
        ));
    }
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot serve the API on {addr}: {e} (another node running? pick one with --api 127.0.0.1:PORT, or port 0 for any)")
    })
}

struct ApiError(String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": { "message": self.0, "type": "unavailable" } })),
        )
            .into_response()
    }
}

async fn status(State(state): State<ApiState>) -> Result<Json<Status>, ApiError> {
    let listen_addrs = state
        .client
        .listen_addrs()
        .await
        .map_err(|e| ApiError(e.to_string()))?;
    Ok(Json(Status {
        peer_id: state.client.local_peer_id().to_string(),
        listen_addrs: listen_addrs.iter().map(|a| a.to_string()).collect(),
        models: state.server.cards().cloned().collect(),
        load: state.server.load(),
        stages: state.server.stage_statuses(),
        model_loads: state
            .server
            .model_loads()
            .into_iter()
            .map(|(model, queued, busy)| ModelLoad {
                model,
                queued,
                busy,
            })
            .collect(),
        served_last_minute: state.telemetry.metrics.last_minute(),
        network: Some(
            state
                .client
                .status()
                .await
                .map_err(|e| ApiError(e.to_string()))?,
        ),
    }))
}

/// `GET /metrics`: Prometheus (OpenMetrics) text. The gauges are read at the scrape: each
/// hosted model's queue, the peers by path, the relays held, the DHT store.
async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    let telemetry = &state.telemetry;
    let m = &telemetry.metrics;
    for (model, queued, busy) in state.server.model_loads() {
        m.model_load(&model, queued, busy);
    }
    if let Ok(peers) = state.client.peers().await {
        let paths = [Path::Direct, Path::HolePunched, Path::Relayed];
        let by_path: Vec<(&str, usize)> = paths
            .iter()
            .map(|path| {
                (
                    path.as_str(),
                    peers.iter().filter(|p| p.path == *path).count(),
                )
            })
            .collect();
        m.peers_by_path(&by_path);
    }
    if let Ok(status) = state.client.status().await {
        m.network(status.relays.len(), &status.dht);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(&telemetry.registry),
    )
}

/// `GET /v1/mesh/models`: every model this node can see, with its host, load and card.
async fn models(State(state): State<ApiState>) -> Json<Vec<crate::directory::Listing>> {
    Json(crate::directory::list(&state.client, Some(&state.server)).await)
}

async fn peers(State(state): State<ApiState>) -> Result<Json<Vec<PeerSummary>>, ApiError> {
    state
        .client
        .peers()
        .await
        .map(Json)
        .map_err(|e| ApiError(e.to_string()))
}

/// `POST /v1/mesh/infer` with an [`InferSpec`]: streams [`CallEvent`]s as JSON lines, the last
/// being `done` or `error`. Closing the response cancels the call on the serving node.
///
/// A body that is JSON but not a valid spec (a bad target or token) is answered like any
/// other bad request, as a `bad_request` error event; a body that is not JSON at all gets
/// axum's rejection.
async fn infer(
    State(state): State<ApiState>,
    spec: Result<Json<InferSpec>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let events = match spec {
        Ok(Json(spec)) => state.dispatch(spec),
        Err(axum::extract::rejection::JsonRejection::JsonDataError(e)) => {
            let (tx, rx) = mpsc::channel(1);
            let failure = crate::dispatch::CallFailure::remote(
                mesh_protocol::WireError::bad_request(e.body_text()),
            );
            let _ = tx.try_send(CallEvent::Error(failure));
            rx
        }
        Err(rejection) => return rejection.into_response(),
    };
    let lines = ndjson_lines(events);
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(lines))
        .expect("static headers are valid")
}

pub(crate) fn ndjson_lines(
    rx: mpsc::Receiver<CallEvent>,
) -> impl futures::Stream<Item = Result<String, std::convert::Infallible>> {
    futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_string(&event).expect("events serialize");
        line.push('\n');
        Some((Ok(line), rx))
    })
}
