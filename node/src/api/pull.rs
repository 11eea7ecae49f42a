//! `POST /v1/mesh/pull`: the node pulls a model's file from the peers that hold it, through its
//! own swarm (its connections, hole punches and identity), into its models directory
//! ([`crate::blobs::job`]). The answer is JSON lines: `located`, `progress` lines, then `done`
//! or `error`. Closing the response stops the pull (it resumes next time). `mesh model pull`
//! uses it when a node runs here.

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
            Some(dir) => run_job(&state.client, &dir, &request, &tx).await,
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
