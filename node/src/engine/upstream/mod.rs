//! A model served by an OpenAI-compatible server this node can reach (llama.cpp's server,
//! llama-cpp-python, Ollama, vLLM, LM Studio), offered to the mesh as if it were local.
//!
//! Spec: `openai+http://HOST:PORT/v1[#REMOTE_MODEL]` for chat models and
//! `openai-embed+http://HOST:PORT/v1[#REMOTE_MODEL]` for embedding models. Without
//! `#REMOTE_MODEL` the server's first listed model is used. The server is asked for its model
//! list when the model loads, so a wrong address or model fails `mesh join` at once.
//!
//! Generation streams: the request goes out with `stream: true` and each server-sent event's
//! delta becomes a mesh `delta` as it arrives. A call the caller abandons drops the HTTP
//! response, which closes the connection, which is how these servers learn to stop. Only plain
//! HTTP is spoken (no TLS): the upstream is meant to be on this machine or its LAN.

use std::time::Duration;

use futures::StreamExt;
use mesh_protocol::{
    ErrorCode, FinishReason, InferRequest, Input, ModelCard, Role, Task, WireError,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{cancelled, Completion, Engine, Output, Sink};

/// Longest server-sent event line accepted from the upstream.
const MAX_LINE: usize = 1 << 20;
/// Most bytes of one upstream answer (a generation's whole stream, or an embedding response).
const MAX_BODY: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Silence from the upstream after which a call fails, when the call has no earlier deadline.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct UpstreamEngine {
    card: ModelCard,
    upstream: Upstream,
    runtime: tokio::runtime::Handle,
}

/// What a call needs to talk to the upstream; cloned into the task that does.
#[derive(Clone)]
struct Upstream {
    name: String,
    base: String,
    remote_model: String,
    http: reqwest::Client,
}

/// Output handed from the HTTP task to the engine's blocking thread.
enum Piece {
    Delta(String),
    Vectors(Vec<Vec<f32>>),
}

type Pieces = tokio::sync::mpsc::Sender<Piece>;

async fn emit(pieces: &Pieces, piece: Piece) -> Result<(), WireError> {
    pieces.send(piece).await.map_err(|_| cancelled())
}

/// Whether `source` names an upstream server.
pub fn is_upstream(source: &str) -> bool {
    source.starts_with("openai+") || source.starts_with("openai-embed+")
}

impl UpstreamEngine {
    /// Connects to the upstream named by `source` and checks it serves the model.
    /// Must be called inside a multi-threaded tokio runtime.
    pub fn load(name: &str, source: &str, max_concurrency: u32) -> Result<Self, String> {
        let (task, rest) = if let Some(rest) = source.strip_prefix("openai-embed+") {
            (Task::Embed, rest)
        } else if let Some(rest) = source.strip_prefix("openai+") {
            (Task::Generate, rest)
        } else {
            return Err("an upstream model starts with openai+ or openai-embed+".into());
        };
        let (base, remote) = match rest.split_once('#') {
            Some((base, model)) if !model.is_empty() => (base, Some(model.to_string())),
            Some((base, _)) => (base, None),
            None => (rest, None),
        };
        if !base.starts_with("http://") {
            return Err(format!(
                "{base:?}: only http:// upstreams are supported (the upstream is meant to be local)"
            ));
        }
        let base = base.trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot set up an HTTP client: {e}"))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            "an upstream model must be loaded inside the node's runtime".to_string()
        })?;
        let listed = {
            let (http, url) = (http.clone(), format!("{base}/models"));
            tokio::task::block_in_place(|| runtime.block_on(list_models(&http, &url)))?
        };
        let remote_model = match remote {
            Some(model) if listed.contains(&model) => model,
            Some(model) => {
                return Err(format!(
                    "{base} does not serve {model:?}; it serves: {}",
                    listed.join(", ")
                ))
            }
            None => listed
                .first()
                .cloned()
                .ok_or_else(|| format!("{base}/models lists no model"))?,
        };
        let card = ModelCard {
            name: name.to_string(),
            task,
            architecture: "openai-upstream".into(),
            parameters: 0,
            quantization: "unknown".into(),
            // Unknown here: the upstream checks the context itself and its refusal comes back
            // as a bad request.
            context_length: 0,
            embedding_dims: None,
            sha256: String::new(),
            license: None,
            max_concurrency,
        };
        Ok(UpstreamEngine {
            upstream: Upstream {
                name: card.name.clone(),
                base,
                remote_model,
                http,
            },
            card,
            runtime,
        })
    }
}

impl Upstream {
    fn chat_body(&self, request: &InferRequest) -> Result<(String, Value), WireError> {
        let p = &request.params;
        let mut body = json!({
            "model": self.remote_model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        if let Some(top_p) = p.top_p {
            body["top_p"] = json!(top_p);
        }
        if let Some(top_k) = p.top_k {
            body["top_k"] = json!(top_k);
        }
        if let Some(seed) = p.seed {
            body["seed"] = json!(seed);
        }
        if !p.stop.is_empty() {
            body["stop"] = json!(p.stop);
        }
        match &request.input {
            Input::Chat { messages } => {
                let messages: Vec<Value> = messages
                    .iter()
                    .map(|m| {
                        let role = match m.role {
                            Role::System => "system",
                            Role::User => "user",
                            Role::Assistant => "assistant",
                        };
                        json!({ "role": role, "content": m.content })
                    })
                    .collect();
                body["messages"] = json!(messages);
                Ok((format!("{}/chat/completions", self.base), body))
            }
            Input::Completion { prompt } => {
                body["prompt"] = json!(prompt);
                Ok((format!("{}/completions", self.base), body))
            }
            Input::Embed { .. } => Err(WireError::bad_request(format!(
                "model {:?} generates text and cannot embed",
                self.name
            ))),
        }
    }

    async fn generate(
        &self,
        request: &InferRequest,
        pieces: &Pieces,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let (url, body) = self.chat_body(request)?;
        let response = send(&self.http, &url, &body, cancel).await?;
        let mut bytes = response.bytes_stream();
        let mut line = Vec::new();
        let mut total = 0usize;
        let mut finish = FinishReason::Stop;
        let mut usage: Option<(u32, u32)> = None;
        let mut deltas = 0u32;
        loop {
            let chunk = tokio::select! {
                _ = cancel.cancelled() => return Err(cancelled()),
                next = tokio::time::timeout(IDLE_TIMEOUT, bytes.next()) => match next {
                    Err(_) => return Err(upstream_error(format!("no data for {IDLE_TIMEOUT:?}"))),
                    Ok(None) => break,
                    Ok(Some(Err(e))) => return Err(upstream_error(format!("stream broke: {e}"))),
                    Ok(Some(Ok(chunk))) => chunk,
                },
            };
            total += chunk.len();
            if total > MAX_BODY {
                return Err(upstream_error(format!("answer exceeds {MAX_BODY} bytes")));
            }
            for &byte in chunk.iter() {
                if byte != b'\n' {
                    if line.len() >= MAX_LINE {
                        return Err(upstream_error(format!(
                            "event line exceeds {MAX_LINE} bytes"
                        )));
                    }
                    line.push(byte);
                    continue;
                }
                let text = String::from_utf8_lossy(&line).trim().to_string();
                line.clear();
                let Some(data) = text.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    return Ok(completion(finish, usage, deltas));
                }
                let event: Value = serde_json::from_str(data)
                    .map_err(|e| upstream_error(format!("bad event {data:?}: {e}")))?;
                if let Some(err) = event.get("error") {
                    return Err(upstream_error(format!("{err}")));
                }
                if let Some(u) = event.get("usage").filter(|u| !u.is_null()) {
                    let count = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
                    usage = Some((count("prompt_tokens"), count("completion_tokens")));
                }
                let Some(choice) = event["choices"].get(0) else {
                    continue;
                };
                let text = choice["delta"]["content"]
                    .as_str()
                    .or_else(|| choice["text"].as_str())
                    .unwrap_or("");
                if !text.is_empty() {
                    deltas += 1;
                    emit(pieces, Piece::Delta(text.to_string())).await?;
                }
                match choice["finish_reason"].as_str() {
                    Some("length") => finish = FinishReason::Length,
                    Some(_) => finish = FinishReason::Stop,
                    None => {}
                }
            }
        }
        Ok(completion(finish, usage, deltas))
    }

    async fn embed(
        &self,
        texts: &[String],
        pieces: &Pieces,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let body = json!({ "model": self.remote_model, "input": texts });
        let url = format!("{}/embeddings", self.base);
        let response = send(&self.http, &url, &body, cancel).await?;
        let answer = tokio::select! {
            _ = cancel.cancelled() => return Err(cancelled()),
            body = read_limited(response) => body?,
        };
        let value: Value = serde_json::from_slice(&answer)
            .map_err(|e| upstream_error(format!("bad embeddings answer: {e}")))?;
        let mut data: Vec<&Value> = value["data"]
            .as_array()
            .ok_or_else(|| upstream_error("embeddings answer without data".into()))?
            .iter()
            .collect();
        data.sort_by_key(|d| d["index"].as_u64().unwrap_or(0));
        let vectors: Vec<Vec<f32>> = data
            .iter()
            .map(|d| {
                d["embedding"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .filter_map(Value::as_f64)
                            .map(|x| x as f32)
                            .collect()
                    })
                    .ok_or_else(|| upstream_error("an embedding is not a list of numbers".into()))
            })
            .collect::<Result<_, _>>()?;
        if vectors.len() != texts.len() {
            return Err(upstream_error(format!(
                "{} texts sent, {} vectors returned",
                texts.len(),
                vectors.len()
            )));
        }
        let prompt_tokens = value["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32;
        emit(pieces, Piece::Vectors(vectors)).await?;
        Ok(Completion {
            finish_reason: FinishReason::Complete,
            prompt_tokens,
            completion_tokens: 0,
        })
    }
}

impl Engine for UpstreamEngine {
    fn card(&self) -> &ModelCard {
        &self.card
    }

    fn run(
        &self,
        request: &InferRequest,
        sink: &mut Sink<'_>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let embed = match (&request.input, self.card.task) {
            (Input::Embed { texts }, Task::Embed) => Some(texts.clone()),
            (Input::Embed { .. }, Task::Generate) | (_, Task::Embed) => {
                return Err(WireError::bad_request(format!(
                    "model {:?} is a {:?} model and cannot take this input",
                    self.card.name, self.card.task
                )))
            }
            _ => None,
        };
        // The HTTP exchange runs on the runtime; this blocking thread hands its output to the
        // sink (which blocks on the caller's flow control). Dropping the task's handle on any
        // exit aborts it, which closes the upstream connection.
        let (pieces, mut received) = tokio::sync::mpsc::channel(16);
        let (upstream, request, cancel) = (self.upstream.clone(), request.clone(), cancel.clone());
        let task = self.runtime.spawn(async move {
            match embed {
                Some(texts) => upstream.embed(&texts, &pieces, &cancel).await,
                None => upstream.generate(&request, &pieces, &cancel).await,
            }
        });
        let _abort = AbortOnDrop(task.abort_handle());
        while let Some(piece) = received.blocking_recv() {
            let output = match piece {
                Piece::Delta(text) => Output::Delta(text),
                Piece::Vectors(vectors) => Output::Embeddings(vectors),
            };
            sink(output).map_err(|_| cancelled())?;
        }
        match self.runtime.block_on(task) {
            Ok(result) => result,
            Err(e) => Err(upstream_error(format!("the upstream task failed: {e}"))),
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn completion(finish: FinishReason, usage: Option<(u32, u32)>, deltas: u32) -> Completion {
    // Servers that send no usage: count the streamed deltas (one token each for llama.cpp).
    let (prompt_tokens, completion_tokens) = usage.unwrap_or((0, deltas));
    Completion {
        finish_reason: finish,
        prompt_tokens,
        completion_tokens,
    }
}

fn upstream_error(message: String) -> WireError {
    WireError::new(ErrorCode::Internal, format!("upstream: {message}"))
}

async fn list_models(http: &reqwest::Client, url: &str) -> Result<Vec<String>, String> {
    let response = tokio::time::timeout(Duration::from_secs(10), http.get(url).send())
        .await
        .map_err(|_| format!("{url} did not answer within 10 s"))?
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    let body = read_limited(response).await.map_err(|e| e.message)?;
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not a model list: {e}"))?;
    Ok(value["data"]
        .as_array()
        .map(|models| {
            models
                .iter()
                .filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// POSTs `body`; a non-success status becomes the matching mesh error.
async fn send(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
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
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(2048)]).into_owned())
        .unwrap_or_default();
    let code = match status.as_u16() {
        400 | 413 | 422 => ErrorCode::BadRequest,
        404 => ErrorCode::UnknownModel,
        429 | 503 => ErrorCode::Overloaded,
        _ => ErrorCode::Internal,
    };
    Err(WireError::new(
        code,
        format!("upstream answered {status}: {detail}"),
    ))
}

async fn read_limited(response: reqwest::Response) -> Result<Vec<u8>, WireError> {
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
    fn specs_are_checked_before_any_connection() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let err = UpstreamEngine::load("m", "openai+https://example.org/v1", 1)
                .err()
                .unwrap();
            assert!(err.contains("only http://"), "{err}");
            // Nothing listens on port 9 (discard) on loopback here: a clear load error.
            let err = UpstreamEngine::load("m", "openai+http://127.0.0.1:9/v1#x", 1)
                .err()
                .unwrap();
            assert!(
                err.contains("cannot reach http://127.0.0.1:9/v1/models"),
                "{err}"
            );
        });
        assert!(is_upstream("openai+http://127.0.0.1:8000/v1"));
        assert!(is_upstream("openai-embed+http://127.0.0.1:8000/v1"));
        assert!(!is_upstream("smollm2-135m-instruct"));
    }
}
