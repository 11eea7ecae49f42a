//! A model served by an OpenAI-compatible server this node can reach (llama.cpp's server,
//! llama-cpp-python, Ollama, vLLM, LM Studio), offered to the mesh as if it were local.
//!
//! Spec ([`UpstreamSpec`]): `openai+http://HOST:PORT/v1[#REMOTE_MODEL]` for chat models and
//! `openai-embed+http://HOST:PORT/v1[#REMOTE_MODEL]` for embedding models. Without
//! `#REMOTE_MODEL` the server's first listed model is used. The server is asked for its model
//! list when the model loads, so a wrong address or model fails `mesh join` at once.
//!
//! Generation streams: the request goes out with `stream: true` and each server-sent event's
//! delta becomes a mesh `delta` as it arrives ([`stream`]). A call the caller abandons drops
//! the HTTP response, which closes the connection, which is how these servers learn to stop.
//! Only plain HTTP is spoken (no TLS): the upstream is meant to be on this machine or its LAN.
//! The JSON both ways is [`crate::openai_schema`], the gateway's own.
//!
//! - [`spec`]: parsing the spec, without a connection.
//! - `http`: the HTTP client, sending, size-limited reading, the model list, statuses.
//! - `stream`: reading a streamed answer, with its size caps.

mod http;
pub mod spec;
mod stream;

use mesh_protocol::{FinishReason, InferRequest, Input, ModelCard, Task, WireError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

pub use spec::{is_upstream, UpstreamSpec};

use super::{cancelled, Completion, Engine, Output, Sink};
use crate::openai_schema::{
    ChatRequest, CompletionRequest, EmbeddingInput, EmbeddingsRequest, EmbeddingsResponse, Message,
    Stop, StreamOptions, Vector,
};
use http::upstream_error;

/// Outputs queued between the HTTP task and the engine's blocking thread.
const OUTPUT_QUEUE: usize = 16;

pub struct UpstreamEngine {
    card: ModelCard,
    upstream: Upstream,
    runtime: tokio::runtime::Handle,
}

/// What a call needs to talk to the upstream; cloned into the task that does.
#[derive(Clone)]
struct Upstream {
    name: String,
    spec: UpstreamSpec,
    remote_model: String,
    http: reqwest::Client,
}

impl UpstreamEngine {
    /// Connects to the upstream named by `source` and checks it serves the model.
    /// Must be called inside a multi-threaded tokio runtime.
    pub fn load(name: &str, source: &str, max_concurrency: u32) -> Result<Self, String> {
        let spec = UpstreamSpec::parse(source)?;
        let http = http::client()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            "an upstream model must be loaded inside the node's runtime".to_string()
        })?;
        let listed = {
            let (http, url) = (http.clone(), spec.url("models"));
            tokio::task::block_in_place(|| runtime.block_on(http::list_models(&http, &url)))?
        };
        let remote_model = match &spec.remote_model {
            Some(model) if listed.contains(model) => model.clone(),
            Some(model) => {
                return Err(format!(
                    "{} does not serve {model:?}; it serves: {}",
                    spec.base,
                    listed.join(", ")
                ))
            }
            None => listed
                .first()
                .cloned()
                .ok_or_else(|| format!("{} lists no model", spec.url("models")))?,
        };
        let card = ModelCard {
            name: name.to_string(),
            task: spec.task,
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
            layers: None,
            blob_root: None,
            files: Vec::new(),
        };
        Ok(UpstreamEngine {
            upstream: Upstream {
                name: card.name.clone(),
                spec,
                remote_model,
                http,
            },
            card,
            runtime,
        })
    }
}

/// The upstream request for a generation: where it goes and what it says.
#[derive(Debug, Clone, PartialEq)]
enum GenerateRequest {
    /// `POST …/chat/completions`: the upstream applies its chat template.
    Chat(ChatRequest),
    /// `POST …/completions`: a bare prompt.
    Completion(CompletionRequest),
}

impl Upstream {
    fn generate_request(&self, request: &InferRequest) -> Result<GenerateRequest, WireError> {
        let p = &request.params;
        let stop = (!p.stop.is_empty()).then(|| Stop::Many(p.stop.clone()));
        let stream_options = Some(StreamOptions {
            include_usage: true,
        });
        match &request.input {
            Input::Chat { messages } => Ok(GenerateRequest::Chat(ChatRequest {
                model: self.remote_model.clone(),
                messages: messages.iter().map(Message::from).collect(),
                stream: true,
                stream_options,
                max_tokens: Some(p.max_tokens),
                temperature: Some(p.temperature),
                top_p: p.top_p,
                top_k: p.top_k,
                seed: p.seed,
                stop,
                ..ChatRequest::default()
            })),
            Input::Completion { prompt } => Ok(GenerateRequest::Completion(CompletionRequest {
                model: self.remote_model.clone(),
                prompt: prompt.clone(),
                stream: true,
                stream_options,
                max_tokens: Some(p.max_tokens),
                temperature: Some(p.temperature),
                top_p: p.top_p,
                top_k: p.top_k,
                seed: p.seed,
                stop,
            })),
            Input::Embed { .. } => Err(WireError::bad_request(format!(
                "model {:?} generates text and cannot embed",
                self.name
            ))),
        }
    }

    async fn generate(
        &self,
        request: &InferRequest,
        out: &mpsc::Sender<Output>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let response = match self.generate_request(request)? {
            GenerateRequest::Chat(body) => {
                let url = self.spec.url("chat/completions");
                http::send(&self.http, &url, &body, cancel).await?
            }
            GenerateRequest::Completion(body) => {
                let url = self.spec.url("completions");
                http::send(&self.http, &url, &body, cancel).await?
            }
        };
        stream::read_answer(response.bytes_stream(), stream::LIMITS, out, cancel).await
    }

    async fn embed(
        &self,
        texts: &[String],
        out: &mpsc::Sender<Output>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let body = EmbeddingsRequest {
            model: self.remote_model.clone(),
            input: EmbeddingInput::Many(texts.to_vec()),
            encoding_format: None,
        };
        let url = self.spec.url("embeddings");
        let response = http::send(&self.http, &url, &body, cancel).await?;
        let answer = tokio::select! {
            _ = cancel.cancelled() => return Err(cancelled()),
            body = http::read_limited(response) => body?,
        };
        let (vectors, prompt_tokens) = embeddings_answer(&answer, texts.len())?;
        out.send(Output::Embeddings(vectors))
            .await
            .map_err(|_| cancelled())?;
        Ok(Completion {
            finish_reason: FinishReason::Complete,
            prompt_tokens,
            completion_tokens: 0,
            cached_tokens: 0,
            resumed_tokens: 0,
            stages: Vec::new(),
        })
    }
}

/// The vectors of an embeddings answer in input order, and its prompt tokens; `expected` is
/// how many texts were sent.
fn embeddings_answer(body: &[u8], expected: usize) -> Result<(Vec<Vec<f32>>, u32), WireError> {
    let mut answer: EmbeddingsResponse = serde_json::from_slice(body)
        .map_err(|e| upstream_error(format!("bad embeddings answer: {e}")))?;
    answer.data.sort_by_key(|d| d.index);
    let vectors: Vec<Vec<f32>> = answer
        .data
        .into_iter()
        .map(|d| match d.embedding {
            Vector::Float(v) => Ok(v),
            Vector::Base64(_) => Err(upstream_error(
                "an embedding is not a list of numbers".into(),
            )),
        })
        .collect::<Result<_, _>>()?;
    if vectors.len() != expected {
        return Err(upstream_error(format!(
            "{expected} texts sent, {} vectors returned",
            vectors.len()
        )));
    }
    Ok((vectors, answer.usage.prompt_tokens))
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
                return Err(super::wrong_task(&self.card))
            }
            _ => None,
        };
        // The HTTP exchange runs on the runtime; this blocking thread hands its output to the
        // sink (which blocks on the caller's flow control). Dropping the task's handle on any
        // exit aborts it, which closes the upstream connection.
        let (out, mut received) = mpsc::channel(OUTPUT_QUEUE);
        let (upstream, request, cancel) = (self.upstream.clone(), request.clone(), cancel.clone());
        let task = AbortOnDropHandle::new(self.runtime.spawn(async move {
            match embed {
                Some(texts) => upstream.embed(&texts, &out, &cancel).await,
                None => upstream.generate(&request, &out, &cancel).await,
            }
        }));
        while let Some(output) = received.blocking_recv() {
            sink(output).map_err(|_| cancelled())?;
        }
        match self.runtime.block_on(task) {
            Ok(result) => result,
            Err(e) => Err(upstream_error(format!("the upstream task failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::{ChatMessage, Role, SamplingParams};
    use serde_json::json;

    fn upstream(task: Task) -> Upstream {
        let source = match task {
            Task::Generate => "openai+http://127.0.0.1:8080/v1#smollm2",
            Task::Embed => "openai-embed+http://127.0.0.1:8080/v1#minilm",
        };
        let spec = UpstreamSpec::parse(source).unwrap();
        Upstream {
            name: "smol-up".into(),
            remote_model: spec.remote_model.clone().unwrap(),
            spec,
            http: reqwest::Client::new(),
        }
    }

    fn request(input: Input, params: SamplingParams) -> InferRequest {
        InferRequest {
            model: "smol-up".into(),
            input,
            params,
            deadline_ms: None,
            token: None,
            resume: None,
        }
    }

    fn body(r: GenerateRequest) -> serde_json::Value {
        match r {
            GenerateRequest::Chat(b) => serde_json::to_value(b).unwrap(),
            GenerateRequest::Completion(b) => serde_json::to_value(b).unwrap(),
        }
    }

    #[test]
    fn a_chat_call_is_a_streamed_chat_request_upstream() {
        let params = SamplingParams {
            max_tokens: 24,
            temperature: 0.5,
            top_p: Some(0.75),
            top_k: Some(40),
            seed: Some(7),
            stop: vec!["END".into()],
        };
        let messages = vec![
            ChatMessage {
                role: Role::System,
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: Role::User,
                content: "Hi".into(),
            },
        ];
        let r = upstream(Task::Generate)
            .generate_request(&request(Input::Chat { messages }, params))
            .unwrap();
        assert!(matches!(r, GenerateRequest::Chat(_)));
        assert_eq!(
            body(r),
            json!({
                "model": "smollm2",
                "messages": [{ "role": "system", "content": "Be brief." }, { "role": "user", "content": "Hi" }],
                "stream": true, "stream_options": { "include_usage": true },
                "max_tokens": 24, "temperature": 0.5, "top_p": 0.75, "top_k": 40, "seed": 7,
                "stop": ["END"],
            })
        );
    }

    #[test]
    fn a_prompt_is_a_completion_request_with_only_the_set_fields() {
        let r = upstream(Task::Generate)
            .generate_request(&request(
                Input::Completion {
                    prompt: "Once".into(),
                },
                SamplingParams::default(),
            ))
            .unwrap();
        assert!(matches!(r, GenerateRequest::Completion(_)));
        assert_eq!(
            body(r),
            json!({
                "model": "smollm2", "prompt": "Once", "stream": true,
                "stream_options": { "include_usage": true }, "max_tokens": 256, "temperature": 0.0,
            })
        );
        let err = upstream(Task::Generate)
            .generate_request(&request(
                Input::Embed {
                    texts: vec!["x".into()],
                },
                SamplingParams::default(),
            ))
            .unwrap_err();
        assert_eq!(err.code, mesh_protocol::ErrorCode::BadRequest);
    }

    #[test]
    fn embeddings_answers_are_put_in_input_order_and_checked() {
        // Out of order, as some servers answer a batch; with fields mesh does not read.
        let answer = br#"{"object":"list","model":"minilm","data":[
            {"object":"embedding","index":1,"embedding":[0.5,0.25]},
            {"object":"embedding","index":0,"embedding":[1,-1]}],
            "usage":{"prompt_tokens":6,"total_tokens":6}}"#;
        let (vectors, tokens) = embeddings_answer(answer, 2).unwrap();
        assert_eq!(vectors, [vec![1.0, -1.0], vec![0.5, 0.25]]);
        assert_eq!(tokens, 6);
        let err = embeddings_answer(answer, 3).unwrap_err();
        assert_eq!(err.message, "upstream: 3 texts sent, 2 vectors returned");
        let base64 = br#"{"data":[{"index":0,"embedding":"AACAPw=="}]}"#;
        assert_eq!(
            embeddings_answer(base64, 1).unwrap_err().message,
            "upstream: an embedding is not a list of numbers"
        );
        let no_usage = br#"{"data":[{"embedding":[0.5]}]}"#;
        assert_eq!(
            embeddings_answer(no_usage, 1).unwrap(),
            (vec![vec![0.5]], 0)
        );
        assert!(embeddings_answer(b"{}", 1)
            .unwrap_err()
            .message
            .contains("bad embeddings answer"));
    }
}
