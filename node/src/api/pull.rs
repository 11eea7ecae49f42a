//! `POST /v1/mesh/pull`: the node pulls a model's file from the peers that hold it, through its
//! own swarm (its connections, hole punches and identity), into its models directory
//! ([`crate::blobs::job`]). The answer is JSON lines: `located`, `progress` lines, then `done`
//! or `error`. Closing the response stops the pull (it resumes next time). `mesh model pull`
//! uses it when a node runs here. The files pulled are served onward at once, under the policy
//! a model of the entry's name has on this node, and announced in the DHT.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc;

use super::ApiState;
use crate::blobs::job::{run_job, PullEvent, PullRequest};

pub(super) async fn pull_route(
    State(state): State<ApiState>,
    Json(request): Json<PullRequest>,
) -> Response {
    let (tx, rx) = mpsc::channel::<PullEvent>(64);
    tokio::spawn(async move {
        match state.models_dir.clone() {
            Some(dir) => {
                if let Some(pulled) = run_job(&state.client, &dir, &request, &tx).await {
                    // Served onward at once, and announced, like the hosted models' files.
                    for sha256 in state.server.share_pulled(&pulled.entry, pulled.blobs) {
                        if let Err(e) = state.client.provide_blob(&sha256).await {
                            tracing::warn!("cannot announce the file pulled: {e}");
                        }
                    }
                }
            }
            None => {
                let message = "this node has no models directory to pull into".to_string();
                let error = PullEvent::Error {
                    code: "failed".into(),
                    message,
                };
                let _ = tx.send(error).await;
            }
        }
    });
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_string(&event).expect("events serialize");
        line.push('\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}
