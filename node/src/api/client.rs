//! A typed client of a running node's HTTP API, for the short-lived commands (`mesh infer`,
//! `mesh peers`, `mesh models`, and `mesh join`'s check for a node already running).
//!
//! The node is found through its `node.json` in the data directory: the process it names must
//! be alive, and `GET /v1/mesh/whoami` (the one route that needs no API key) must answer with
//! that node's peer id and its signature of a fresh challenge ([`super::proof`]). So a stale
//! file, another node on the port, or a process that took the port after the node died is
//! never sent a prompt, a token or the API key. Every request's timeout and the NDJSON
//! decoding of `/v1/mesh/infer` live here, in one place.
//!
//! When the node requires an API key, every request carries it as `Authorization: Bearer`:
//! the key recorded in `node.json` (private to the home's owner), else `$MESH_API_KEY`.

use std::time::Duration;

use futures::StreamExt;
use mesh_protocol::ErrorCode;
use tokio::sync::mpsc;

use crate::api::Status;
use crate::directory::Listing;
use crate::dispatch::{CallEvent, CallFailure, InferSpec};
use crate::home::{Home, RuntimeInfo};
use crate::network::PeerSummary;

/// Connecting to the node's API on loopback.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The status probe that decides whether the node runs at all.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// The peer list: one round trip through the node's swarm task.
const PEERS_TIMEOUT: Duration = Duration::from_secs(5);
/// The model list: the node asks every peer it knows for its catalog (5 s each, in parallel).
const MODELS_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest NDJSON line accepted from `/v1/mesh/infer` (a batch of embeddings is the
/// largest event: 32 vectors of 1,024 floats is under 1 MiB of JSON).
pub const MAX_EVENT_LINE: usize = 16 * 1024 * 1024;
/// Events decoded ahead of the consumer.
const EVENT_QUEUE: usize = 64;
/// The API key to send when `node.json` records none (the same variable `mesh join` reads).
pub const API_KEY_ENV: &str = "MESH_API_KEY";

#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("the node's API at {api} did not answer: {source}")]
    Unreachable {
        api: std::net::SocketAddr,
        source: reqwest::Error,
    },
    #[error("the node's API at {api} answered {status}")]
    Status {
        api: std::net::SocketAddr,
        status: reqwest::StatusCode,
    },
    #[error("the node running with this home (its API at {api}) refused this command's API key ({status}): the key in its node.json or ${API_KEY_ENV} must be the node's --api-key")]
    Refused {
        api: std::net::SocketAddr,
        status: reqwest::StatusCode,
    },
    #[error("the server on {api}, where this home's node.json says its node serves its API, answers as node {peer_id} but cannot prove it holds that node's key: nothing was sent to it. Stop whatever listens there, or remove the stale {node_json}")]
    Impostor {
        api: std::net::SocketAddr,
        peer_id: String,
        node_json: String,
    },
    #[error("the server on {api}, where this home's node.json says its node serves its API, does not prove which node it is (no {}): either the node runs an older mesh (restart it with this version) or something else took its port. Nothing was sent to it; if no node runs, remove the stale {node_json}", super::guard::WHOAMI_PATH)]
    Unproven {
        api: std::net::SocketAddr,
        node_json: String,
    },
    #[error("the node said: {message}")]
    Said {
        status: reqwest::StatusCode,
        message: String,
    },
    #[error("the node's API at {api} sent a body that does not decode: {source}")]
    Body {
        api: std::net::SocketAddr,
        source: reqwest::Error,
    },
}

/// The node running with a home, reached through its API.
#[derive(Debug, Clone)]
pub struct LocalApi {
    api: std::net::SocketAddr,
    http: reqwest::Client,
    info: RuntimeInfo,
    status: Status,
}

impl LocalApi {
    /// The node running with `home`, if its API answers and is that node; an error when a
    /// node answers there but refuses this command's API key (it runs, but cannot be used).
    pub async fn find(home: &Home) -> Result<Option<LocalApi>, ApiClientError> {
        let Some(info) = home.read_runtime() else {
            return Ok(None);
        };
        let Some(api) = info.api else {
            return Ok(None);
        };
        if !process_alive(info.pid) {
            // The node died without removing its file: nothing of this home runs there.
            return Ok(None);
        }
        // First the node proves who it is, on the one route that needs no key: nothing else,
        // the key included, goes to a server that cannot.
        let Ok(plain) = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
        else {
            return Ok(None);
        };
        let challenge = super::proof::challenge();
        let asked = plain
            .get(format!(
                "http://{api}{}?challenge={}",
                super::guard::WHOAMI_PATH,
                hex::encode(challenge)
            ))
            .timeout(STATUS_TIMEOUT)
            .send()
            .await;
        // Nothing listening: no node runs here.
        let Ok(answer) = asked else {
            return Ok(None);
        };
        let node_json = || home.control_file().display().to_string();
        let code = answer.status();
        if code == reqwest::StatusCode::SERVICE_UNAVAILABLE
            || code == reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            // The node is there but at its limit of requests: say so, do not call it an impostor.
            return Err(ApiClientError::Status { api, status: code });
        }
        let Ok(whoami) = answer.json::<super::Whoami>().await else {
            return Err(ApiClientError::Unproven {
                api,
                node_json: node_json(),
            });
        };
        if whoami.peer_id != info.peer_id {
            // Another node took the port since: this home's node is not running.
            return Ok(None);
        }
        if !super::proof::verify(&info.peer_id, &challenge, Some(&whoami.proof)) {
            return Err(ApiClientError::Impostor {
                api,
                peer_id: info.peer_id,
                node_json: node_json(),
            });
        }
        let key = info
            .api_key
            .clone()
            .or_else(|| std::env::var(API_KEY_ENV).ok())
            .filter(|k| !k.is_empty());
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = key {
            let Ok(mut value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            else {
                return Ok(None);
            };
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let Ok(http) = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .default_headers(headers)
            .build()
        else {
            return Ok(None);
        };
        // The node has proven it runs: from here a failure is this node's, not "no node".
        let response = http
            .get(format!("http://{api}/v1/mesh/status"))
            .timeout(STATUS_TIMEOUT)
            .send()
            .await
            .map_err(|source| ApiClientError::Unreachable { api, source })?;
        let code = response.status();
        if code == reqwest::StatusCode::UNAUTHORIZED || code == reqwest::StatusCode::FORBIDDEN {
            return Err(ApiClientError::Refused { api, status: code });
        }
        if !code.is_success() {
            return Err(ApiClientError::Status { api, status: code });
        }
        let status = response
            .json::<Status>()
            .await
            .map_err(|source| ApiClientError::Body { api, source })?;
        if status.peer_id != info.peer_id {
            // Another server between the two requests: it proved nothing.
            return Err(ApiClientError::Unproven {
                api,
                node_json: node_json(),
            });
        }
        Ok(Some(LocalApi {
            api,
            http,
            info,
            status,
        }))
    }

    /// What the node wrote to `node.json`.
    pub fn info(&self) -> &RuntimeInfo {
        &self.info
    }

    /// The node's status when it was found.
    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.api
    }

    /// `GET /v1/mesh/peers`.
    pub async fn peers(&self) -> Result<Vec<PeerSummary>, ApiClientError> {
        self.get_json("/v1/mesh/peers", PEERS_TIMEOUT).await
    }

    /// `GET /v1/mesh/models`.
    pub async fn models(&self) -> Result<Vec<Listing>, ApiClientError> {
        self.get_json("/v1/mesh/models", MODELS_TIMEOUT).await
    }

    /// `POST /v1/mesh/infer`: the call's events, the last being `done` or `error` (a failure
    /// of the API itself arrives as a network error event). Dropping the receiver hangs up,
    /// which cancels the call on the serving node.
    pub fn infer(&self, spec: InferSpec) -> mpsc::Receiver<CallEvent> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let this = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = this.stream_infer(&spec, &tx) => {
                    if let Err(message) = result {
                        let failure = CallFailure::network(ErrorCode::Internal, message);
                        let _ = tx.send(CallEvent::Error(failure)).await;
                    }
                }
                // Hanging up drops the HTTP response, which cancels the call in the node.
                () = tx.closed() => {}
            }
        });
        rx
    }

    async fn stream_infer(
        &self,
        spec: &InferSpec,
        tx: &mpsc::Sender<CallEvent>,
    ) -> Result<(), String> {
        let response = self
            .http
            .post(format!("http://{}/v1/mesh/infer", self.api))
            .json(spec)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("the local node's API failed: {e}"))?;
        stream_events(response, tx).await
    }

    /// `POST /v1/mesh/calls/{id}/replay`: the new call's id in the inspector, and its events as
    /// [`LocalApi::infer`] gives them. `to`: `same`, `any` or a peer id.
    pub async fn replay(
        &self,
        id: u64,
        to: &str,
        token: Option<&str>,
    ) -> Result<(u64, mpsc::Receiver<CallEvent>), ApiClientError> {
        let api = self.api;
        let body = serde_json::json!({ "to": to, "token": token });
        let response = self
            .http
            .post(format!("http://{api}/v1/mesh/calls/{id}/replay"))
            .json(&body)
            .send()
            .await
            .map_err(|source| ApiClientError::Unreachable { api, source })?;
        let response = said(response).await?;
        let new_id = response
            .headers()
            .get("x-mesh-call-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(async move {
            tokio::select! {
                result = stream_events(response, &tx) => {
                    if let Err(message) = result {
                        let failure = CallFailure::network(ErrorCode::Internal, message);
                        let _ = tx.send(CallEvent::Error(failure)).await;
                    }
                }
                () = tx.closed() => {}
            }
        });
        Ok((new_id, rx))
    }

    /// The inspector's capture switch: set to `on` if given; its state after.
    pub async fn capture(&self, on: Option<bool>) -> Result<bool, ApiClientError> {
        let api = self.api;
        let url = format!("http://{api}/v1/mesh/capture");
        let request = match on {
            Some(on) => self
                .http
                .put(url)
                .json(&serde_json::json!({ "capture": on })),
            None => self.http.get(url),
        };
        let response = request
            .timeout(STATUS_TIMEOUT)
            .send()
            .await
            .map_err(|source| ApiClientError::Unreachable { api, source })?;
        let switch: serde_json::Value = said(response)
            .await?
            .json()
            .await
            .map_err(|source| ApiClientError::Body { api, source })?;
        Ok(switch["capture"].as_bool().unwrap_or(false))
    }

    /// What the node saw of its network (`GET /v1/mesh/diagnosis`).
    pub async fn diagnosis(
        &self,
    ) -> Result<crate::network::diagnosis::NetworkDiagnosis, ApiClientError> {
        self.get_json("/v1/mesh/diagnosis", PEERS_TIMEOUT).await
    }

    /// One peer as connected now, connecting first (`GET /v1/mesh/diagnosis/{peer}`).
    pub async fn diagnose_peer(
        &self,
        peer: &str,
    ) -> Result<super::diagnose::PeerDiagnosis, ApiClientError> {
        let timeout = super::diagnose::PEER_CONNECT_TIMEOUT + PEERS_TIMEOUT;
        self.get_json(&format!("/v1/mesh/diagnosis/{peer}"), timeout)
            .await
    }

    /// `POST /v1/mesh/pull`: the node pulls a model's file; its events, the last being `done`
    /// or `error`. Dropping the receiver stops the pull.
    pub async fn pull(
        &self,
        request: &crate::blobs::job::PullRequest,
    ) -> Result<mpsc::Receiver<crate::blobs::job::PullEvent>, ApiClientError> {
        let api = self.api;
        let response = self
            .http
            .post(format!("http://{api}/v1/mesh/pull"))
            .json(request)
            .send()
            .await
            .map_err(|source| ApiClientError::Unreachable { api, source })?;
        let response = said(response).await?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(async move {
            use crate::blobs::job::PullEvent;
            let mut body = response.bytes_stream();
            let mut lines = NdjsonLines::default();
            let fail = |message: String| PullEvent::Error {
                code: "network".into(),
                message,
            };
            loop {
                let chunk = tokio::select! {
                    chunk = body.next() => chunk,
                    () = tx.closed() => return,
                };
                let Some(chunk) = chunk else {
                    let _ = tx
                        .send(fail("the local node ended the pull's answer early".into()))
                        .await;
                    return;
                };
                let lines = chunk
                    .map_err(|e| format!("the local node's answer broke off: {e}"))
                    .and_then(|c| lines.push(&c));
                let lines = match lines {
                    Ok(lines) => lines,
                    Err(e) => {
                        let _ = tx.send(fail(e)).await;
                        return;
                    }
                };
                for line in lines {
                    let event = match serde_json::from_slice::<PullEvent>(&line) {
                        Ok(event) => event,
                        Err(e) => fail(format!("bad line from the local node: {e}")),
                    };
                    let last = matches!(event, PullEvent::Done { .. } | PullEvent::Error { .. });
                    if tx.send(event).await.is_err() || last {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// The inspector's calls, newest first (`GET /v1/mesh/calls`).
    pub async fn calls(&self) -> Result<super::inspect::CallList, ApiClientError> {
        self.get_json("/v1/mesh/calls", STATUS_TIMEOUT).await
    }
}

/// `response` if it succeeded, else the node's error message.
async fn said(response: reqwest::Response) -> Result<reqwest::Response, ApiClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let message = body["error"]["message"]
        .as_str()
        .map_or_else(|| status.to_string(), str::to_string);
    Err(ApiClientError::Said { status, message })
}

/// Decodes the JSON lines of a call's events from `response` onto `tx`, up to `done` or
/// `error`.
async fn stream_events(
    response: reqwest::Response,
    tx: &mpsc::Sender<CallEvent>,
) -> Result<(), String> {
    let mut body = response.bytes_stream();
    let mut lines = NdjsonLines::default();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("the local node's answer broke off: {e}"))?;
        for line in lines.push(&chunk)? {
            let event = serde_json::from_slice::<CallEvent>(&line)
                .map_err(|e| format!("bad line from the local node: {e}"))?;
            let last = matches!(event, CallEvent::Done { .. } | CallEvent::Error(_));
            if tx.send(event).await.is_err() || last {
                return Ok(());
            }
        }
    }
    Err("the local node ended the answer early".into())
}

impl LocalApi {
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<T, ApiClientError> {
        let api = self.api;
        let response = self
            .http
            .get(format!("http://{api}{path}"))
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| ApiClientError::Unreachable { api, source })?;
        if !response.status().is_success() {
            return Err(ApiClientError::Status {
                api,
                status: response.status(),
            });
        }
        response
            .json()
            .await
            .map_err(|source| ApiClientError::Body { api, source })
    }
}

/// Whether process `pid` is alive: it exists, whether or not this user may signal it.
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        // 0 and negative ids name process groups, not a process.
        return false;
    }
    // SAFETY: signal 0 checks for the process and sends nothing.
    let sent = unsafe { libc::kill(pid, 0) };
    sent == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Splits a byte stream into newline-terminated lines, none longer than [`MAX_EVENT_LINE`].
#[derive(Default)]
struct NdjsonLines {
    buf: Vec<u8>,
}

impl NdjsonLines {
    /// Takes the next chunk; returns the lines it completed.
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        self.buf.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            if line.len() > 1 {
                lines.push(line);
            }
        }
        if self.buf.len() > MAX_EVENT_LINE {
            return Err(format!(
                "a line from the local node is over {MAX_EVENT_LINE} bytes"
            ));
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_pid_past_the_kernel_limit_is_not() {
        assert!(process_alive(std::process::id()));
        // Linux pids stop at 2^22; 0 would mean this process group.
        assert!(!process_alive(1 << 23));
        assert!(!process_alive(0));
        assert!(!process_alive(u32::MAX));
        // pid 1 is alive, whoever owns it.
        assert!(process_alive(1));
    }

    #[test]
    fn lines_split_across_chunks_come_out_whole() {
        let mut lines = NdjsonLines::default();
        assert!(lines.push(b"{\"event\":\"sta").unwrap().is_empty());
        let out = lines
            .push(b"rted\",\"queue_ms\":0}\n\n{\"event\":\"delta\",\"text\":\"a\"}\n{")
            .unwrap();
        assert_eq!(
            out,
            vec![
                b"{\"event\":\"started\",\"queue_ms\":0}\n".to_vec(),
                b"{\"event\":\"delta\",\"text\":\"a\"}\n".to_vec(),
            ]
        );
        let event: CallEvent = serde_json::from_slice(&out[1]).unwrap();
        assert_eq!(event, CallEvent::Delta { text: "a".into() });
        assert_eq!(lines.buf, b"{");
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut lines = NdjsonLines::default();
        let chunk = vec![b'x'; 1024 * 1024];
        for _ in 0..16 {
            lines.push(&chunk).unwrap();
        }
        let err = lines.push(b"x").unwrap_err();
        assert!(err.contains("over"), "{err}");
    }
}
