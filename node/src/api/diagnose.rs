//! What `mesh doctor` asks the running node: `GET /v1/mesh/diagnosis` (observed addresses,
//! port mappings, hole punches) and `GET /v1/mesh/diagnosis/{peer}` (that peer as connected
//! now, connecting first if it is not, so the doctor can say why calls take their path).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::ApiState;
use crate::network::diagnosis::NetworkDiagnosis;
use crate::network::PeerSummary;

/// How long `GET /v1/mesh/diagnosis/{peer}` tries to connect a peer it is not connected to.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `GET /v1/mesh/diagnosis/{peer}` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerDiagnosis {
    pub peer: String,
    /// The peer as connected now (after a connect, if it was not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<PeerSummary>,
    /// Why connecting to it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_error: Option<String>,
}

fn unavailable(message: String) -> Response {
    let body = serde_json::json!({ "error": { "message": message, "type": "unavailable" } });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

pub(super) async fn diagnosis(State(state): State<ApiState>) -> Response {
    match state.client.diagnosis().await {
        Ok(report) => Json::<NetworkDiagnosis>(report).into_response(),
        Err(e) => unavailable(e.to_string()),
    }
}

pub(super) async fn peer(State(state): State<ApiState>, Path(peer): Path<String>) -> Response {
    let Ok(id) = peer.parse::<PeerId>() else {
        let message = format!("{peer:?} is not a peer id (they start with 12D3KooW)");
        let body =
            serde_json::json!({ "error": { "message": message, "type": "invalid_request_error" } });
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    };
    let connect_error = if state.client.is_connected(&id) {
        None
    } else {
        match tokio::time::timeout(PEER_CONNECT_TIMEOUT, state.client.connect(id)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "no connection within {} s",
                PEER_CONNECT_TIMEOUT.as_secs()
            )),
        }
    };
    let summary = match state.client.peers().await {
        Ok(peers) => peers.into_iter().find(|p| p.peer_id == id),
        Err(e) => return unavailable(e.to_string()),
    };
    Json(PeerDiagnosis {
        peer,
        summary,
        connect_error,
    })
    .into_response()
}
