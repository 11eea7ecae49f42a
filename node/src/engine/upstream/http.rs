//! Talking HTTP to the upstream: the client, its timeouts, POSTing a request, reading an
//! answer up to a size limit, the model list, and the mesh error an HTTP status means.

use std::time::Duration;

use futures::StreamExt;
use mesh_protocol::{ErrorCode, WireError};
use reqwest::StatusCode;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::cancelled;
use crate::openai_schema::ModelList;

/// Most bytes of one upstream answer (a generation's whole stream, or an embedding response).
pub(super) const MAX_BODY: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Silence from the upstream after which a call fails, when the call has no earlier deadline.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the model list may take when the model loads.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of an upstream's error body quoted in the mesh error.
const MAX_DETAIL: usize = 2048;

/// The HTTP client for one upstream.
pub(super) fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot set up an HTTP client: {e}"))
}

/// A failure of the upstream, as the mesh reports it.
pub(super) fn upstream_error(message: String) -> WireError {
    WireError::new(ErrorCode::Internal, format!("upstream: {message}"))
}

/// The mesh error for an upstream's HTTP error status.
pub(super) fn error_code(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        400 | 413 | 422 => ErrorCode::BadRequest,
        404 => ErrorCode::UnknownModel,
        429 | 503 => ErrorCode::Overloaded,
        _ => ErrorCode::Internal,
    }
}

/// The ids of the models the upstream lists at `url` (`…/models`).
pub(super) async fn list_models(http: &reqwest::Client, url: &str) -> Result<Vec<String>, String> {
    let response = tokio::time::timeout(LIST_TIMEOUT, http.get(url).send())
        .await
        .map_err(|_| format!("{url} did not answer within {} s", LIST_TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    let body = read_limited(response).await.map_err(|e| e.message)?;
    model_ids(&body).map_err(|e| format!("{url}: not a model list: {e}"))
}

/// The ids in a model list; entries without one are skipped.
fn model_ids(body: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    let list: ModelList = serde_json::from_slice(body)?;
    Ok(list
        .data
        .into_iter()
        .map(|m| m.id)
        .filter(|id| !id.is_empty())
        .collect())
}

/// POSTs `body` as JSON; a non-success status becomes the matching mesh error.
pub(super) async fn send(
    http: &reqwest::Client,
    url: &str,
    body: &impl Serialize,
    cancel: &CancellationToken,
) -> Result<reqwest::Response, WireError> {
    let response = tokio::select! {
        _ = cancel.cancelled() => return Err(cancelled()),
        r = tokio::time::timeout(IDLE_TIMEOUT, http.post(url).json(body).send()) => r
            .map_err(|_| upstream_error(format!("no answer within {IDLE_TIMEOUT:?}")))?
            .map_err(|e| upstream_error(format!("cannot reach {url}: {e}")))?,
    };
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let detail = read_limited(response)
        .await
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(MAX_DETAIL)]).into_owned())
        .unwrap_or_default();
    Err(WireError::new(
        error_code(status),
        format!("upstream answered {status}: {detail}"),
    ))
}

/// The whole body of an answer, at most [`MAX_BODY`] bytes, with [`IDLE_TIMEOUT`] between
/// pieces.
pub(super) async fn read_limited(response: reqwest::Response) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(IDLE_TIMEOUT, bytes.next())
        .await
        .map_err(|_| upstream_error(format!("no data for {IDLE_TIMEOUT:?}")))?
    {
        let chunk = chunk.map_err(|e| upstream_error(format!("answer broke: {e}")))?;
        if out.len() + chunk.len() > MAX_BODY {
            return Err(upstream_error(format!("answer exceeds {MAX_BODY} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_to_mesh_errors() {
        let code = |s: u16| error_code(StatusCode::from_u16(s).unwrap());
        for s in [400, 413, 422] {
            assert_eq!(code(s), ErrorCode::BadRequest, "{s}");
        }
        assert_eq!(code(404), ErrorCode::UnknownModel);
        assert_eq!(code(429), ErrorCode::Overloaded);
        assert_eq!(code(503), ErrorCode::Overloaded);
        for s in [401, 500, 502] {
            assert_eq!(code(s), ErrorCode::Internal, "{s}");
        }
    }

    #[test]
    fn model_lists_of_real_servers_parse() {
        // llama.cpp's server (abridged) and Ollama's.
        let llama = br#"{"object":"list","data":[{"id":"smollm2-upstream","object":"model",
            "created":1700000000,"owned_by":"llamacpp","meta":{"n_ctx_train":8192}}]}"#;
        assert_eq!(model_ids(llama).unwrap(), ["smollm2-upstream"]);
        let ollama = br#"{"object":"list","data":[{"id":"qwen2:0.5b","object":"model",
            "created":1718000000,"owned_by":"library"},{"object":"model"}]}"#;
        assert_eq!(model_ids(ollama).unwrap(), ["qwen2:0.5b"], "no id: skipped");
        assert_eq!(
            model_ids(br#"{"object":"list"}"#).unwrap(),
            Vec::<String>::new()
        );
        assert!(model_ids(b"<html>").is_err());
    }
}
