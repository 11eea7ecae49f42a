//! The inspector's routes: the calls kept (`GET /v1/mesh/calls`, `GET /v1/mesh/calls/{id}`),
//! the capture switch (`GET`/`PUT /v1/mesh/capture`), replay
//! (`POST /v1/mesh/calls/{id}/replay`, which `mesh replay` and the console use), and the live
//! feed (`GET /v1/mesh/events`, server-sent events).
//!
//! The feed holds one of the API's request places for as long as it is open, so at most
//! [`MAX_EVENT_SUBSCRIBERS`] feeds are open at once; a subscriber too slow for
//! [`crate::inspector::EVENT_BACKLOG`] events gets a `lagged` event saying how many it missed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Semaphore};

use mesh_protocol::SignedToken;

use super::ApiState;
use crate::dispatch::Target;
use crate::inspector::{CallRecord, ReplayError, ReplayTo};

/// `/v1/mesh/events` feeds open at once.
pub const MAX_EVENT_SUBSCRIBERS: usize = 8;

/// How often an idle feed sends a comment, so proxies and browsers keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What `GET /v1/mesh/calls` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallList {
    /// Whether calls made now keep their bodies.
    pub capture: bool,
    /// Newest first, without bodies.
    pub calls: Vec<CallRecord>,
}

/// The capture switch, as `GET`/`PUT /v1/mesh/capture` carry it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CaptureSwitch {
    pub capture: bool,
}

/// What `POST /v1/mesh/calls/{id}/replay` takes.
#[derive(Debug, Default, Deserialize)]
pub struct ReplayRequest {
    /// `same` (the default: the node that answered), `any`, or a peer id.
    #[serde(default)]
    pub to: Option<String>,
    /// A capability token (`mtk1.…`), for a call that carried one.
    #[serde(default)]
    pub token: Option<String>,
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": { "message": message, "type": kind } });
    (status, Json(body)).into_response()
}

pub(super) async fn calls(State(state): State<ApiState>) -> Json<CallList> {
    let inspector = &state.telemetry.inspector;
    Json(CallList {
        capture: inspector.capturing(),
        calls: inspector.calls(),
    })
}

pub(super) async fn call(State(state): State<ApiState>, Path(id): Path<u64>) -> Response {
    match state.telemetry.inspector.call(id) {
        Some(record) => Json(record).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            ReplayError::NotFound(id).to_string(),
        ),
    }
}

pub(super) async fn capture(State(state): State<ApiState>) -> Json<CaptureSwitch> {
    Json(CaptureSwitch {
        capture: state.telemetry.inspector.capturing(),
    })
}

pub(super) async fn set_capture(
    State(state): State<ApiState>,
    Json(switch): Json<CaptureSwitch>,
) -> Json<CaptureSwitch> {
    state.telemetry.inspector.set_capture(switch.capture);
    tracing::info!(
        capture = switch.capture,
        "the inspector's capture was switched"
    );
    Json(switch)
}

/// Replays call `id`: the answer streams as `/v1/mesh/infer`'s does (JSON lines of call
/// events), and the new call's id is in the `x-mesh-call-id` header.
pub(super) async fn replay(
    State(state): State<ApiState>,
    Path(id): Path<u64>,
    request: Option<Json<ReplayRequest>>,
) -> Response {
    let request = request.map(|Json(r)| r).unwrap_or_default();
    let to = match request.to.as_deref().unwrap_or("same") {
        "same" => ReplayTo::Same,
        other => match other.parse::<Target>() {
            Ok(target) => ReplayTo::Target(target),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("to: {e}, or `same`"),
                )
            }
        },
    };
    let token = match request.token.as_deref().map(SignedToken::from_text) {
        None => None,
        Some(Ok(token)) => Some(token),
        Some(Err(e)) => {
            let message = format!("token: {e}");
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        }
    };
    let spec = match state.telemetry.inspector.replay_spec(id, to, token) {
        Ok(spec) => spec,
        Err(e @ ReplayError::NotFound(_)) => {
            return error(StatusCode::NOT_FOUND, "not_found", e.to_string())
        }
        Err(e) => return error(StatusCode::CONFLICT, "invalid_request_error", e.to_string()),
    };
    let (new_id, events) = state.dispatch_inspected(spec, Some(id));
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .header("x-mesh-call-id", new_id.to_string())
        .body(axum::body::Body::from_stream(super::ndjson_lines(events)))
        .expect("static headers are valid")
}

/// `GET /v1/mesh/events`: the live feed as server-sent events, named `call_started`,
/// `call_ended`, `peer_connected`, `peer_disconnected` (and `lagged`), each with a JSON body.
pub(super) async fn events(State(state): State<ApiState>) -> Response {
    let Ok(place) = state.event_feeds.clone().try_acquire_owned() else {
        let message = format!(
            "{MAX_EVENT_SUBSCRIBERS} event feeds are open already; close one and try again"
        );
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
    };
    let feed = state.telemetry.inspector.subscribe();
    Sse::new(feed_events(feed, place))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

fn feed_events(
    feed: broadcast::Receiver<crate::inspector::MeshEvent>,
    place: tokio::sync::OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((feed, place), |(mut feed, place)| async move {
        let event = match feed.recv().await {
            Ok(event) => Event::default()
                .event(event.name())
                .json_data(&event)
                .unwrap_or_else(|_| Event::default().event("error")),
            Err(broadcast::error::RecvError::Lagged(missed)) => Event::default()
                .event("lagged")
                .data(serde_json::json!({ "missed": missed }).to_string()),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), (feed, place)))
    })
}

/// The places of the open feeds.
pub(crate) fn feed_places() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_EVENT_SUBSCRIBERS))
}
