//! Built-in deterministic models, so the network can be tested and demonstrated without
//! model files. They are honest about what they are: the card's architecture says `builtin-*`.
//!
//! - `builtin:echo`: a "chat model" that answers `echo: <last user message>`, one word per
//!   token, optionally pausing between tokens (to exercise streaming and cancellation).
//! - `builtin:hash-embed`: 64-dimensional unit vectors of hashed character trigrams.

use std::time::Duration;

use mesh_protocol::{FinishReason, InferRequest, Input, ModelCard, Role, Task, WireError};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{cancelled, Completion, Engine, Output, Sink};

/// Longest input the built-in models accept, in words (their "context").
pub const BUILTIN_CONTEXT: u32 = 4096;
pub const HASH_EMBED_DIMS: usize = 64;

/// Parses a `builtin:...` model spec: `builtin:echo`, `builtin:echo?delay_ms=50`,
/// `builtin:hash-embed`.
pub fn from_spec(name: &str, spec: &str, max_concurrency: u32) -> Result<Box<dyn Engine>, String> {
    let (kind, query) = spec.split_once('?').unwrap_or((spec, ""));
    let mut delay = Duration::ZERO;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("delay_ms", v)) => {
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("delay_ms must be a whole number, got {v:?}"))?;
                delay = Duration::from_millis(ms.min(10_000));
            }
            _ => return Err(format!("unknown option {pair:?} in {spec:?}")),
        }
    }
    match kind {
        "echo" => Ok(Box::new(Echo::new(name, delay, max_concurrency))),
        "hash-embed" => Ok(Box::new(HashEmbed::new(name, max_concurrency))),
        other => Err(format!(
            "unknown built-in model {other:?}; known: echo, hash-embed"
        )),
    }
}

fn card(name: &str, task: Task, architecture: &str, max_concurrency: u32) -> ModelCard {
    ModelCard {
        name: name.to_string(),
        task,
        architecture: architecture.to_string(),
        parameters: 0,
        quantization: "none".to_string(),
        context_length: BUILTIN_CONTEXT,
        embedding_dims: (task == Task::Embed).then_some(HASH_EMBED_DIMS as u32),
        sha256: hex::encode(Sha256::digest(architecture.as_bytes())),
        license: Some("Apache-2.0".into()),
        max_concurrency,
        layers: None,
        blob_root: None,
        files: Vec::new(),
    }
}

pub struct Echo {
    card: ModelCard,
    delay: Duration,
}

impl Echo {
    pub fn new(name: &str, delay: Duration, max_concurrency: u32) -> Echo {
        Echo {
            card: card(name, Task::Generate, "builtin-echo", max_concurrency),
            delay,
        }
    }
}

impl Engine for Echo {
    fn card(&self) -> &ModelCard {
        &self.card
    }

    fn run(
        &self,
        request: &InferRequest,
        sink: &mut Sink<'_>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let prompt = match &request.input {
            Input::Chat { messages } => messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            Input::Completion { prompt } => prompt.clone(),
            Input::Embed { .. } => return Err(super::wrong_task(&self.card)),
        };
        let words: Vec<&str> = prompt.split_whitespace().collect();
        if words.len() as u32 > BUILTIN_CONTEXT {
            return Err(WireError::bad_request(format!(
                "prompt has {} words; {} takes at most {BUILTIN_CONTEXT}",
                words.len(),
                self.card.name
            )));
        }
        let answer: Vec<String> = std::iter::once("echo:".to_string())
            .chain(words.iter().map(|w| format!(" {w}")))
            .collect();
        let max = request.params.max_tokens as usize;
        let mut completion_tokens = 0;
        for piece in answer.iter().take(max) {
            if cancel.is_cancelled() {
                return Err(cancelled());
            }
            if !self.delay.is_zero() {
                std::thread::sleep(self.delay);
            }
            sink(Output::text(piece.clone())).map_err(|_| cancelled())?;
            completion_tokens += 1;
        }
        Ok(Completion {
            finish_reason: if answer.len() > max {
                FinishReason::Length
            } else {
                FinishReason::Stop
            },
            prompt_tokens: words.len() as u32,
            completion_tokens,
            cached_tokens: 0,
            resumed_tokens: 0,
            stages: Vec::new(),
        })
    }
}

pub struct HashEmbed {
    card: ModelCard,
}

impl HashEmbed {
    pub fn new(name: &str, max_concurrency: u32) -> HashEmbed {
        HashEmbed {
            card: card(name, Task::Embed, "builtin-hash-embed", max_concurrency),
        }
    }

    /// Sums a hashed one-hot vector per character trigram, then L2-normalises.
    pub fn embed(text: &str) -> Vec<f32> {
        let chars: Vec<char> = format!("  {}  ", text.to_lowercase()).chars().collect();
        let mut v = vec![0f32; HASH_EMBED_DIMS];
        for w in chars.windows(3) {
            let digest = Sha256::digest(w.iter().collect::<String>().as_bytes());
            let slot = digest[0] as usize % HASH_EMBED_DIMS;
            v[slot] += if digest[1] & 1 == 0 { 1.0 } else { -1.0 };
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

impl Engine for HashEmbed {
    fn card(&self) -> &ModelCard {
        &self.card
    }

    fn run(
        &self,
        request: &InferRequest,
        sink: &mut Sink<'_>,
        cancel: &CancellationToken,
    ) -> Result<Completion, WireError> {
        let Input::Embed { texts } = &request.input else {
            return Err(super::wrong_task(&self.card));
        };
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        let vectors: Vec<Vec<f32>> = texts.iter().map(|t| Self::embed(t)).collect();
        let prompt_tokens = texts.iter().map(|t| t.chars().count() as u32).sum();
        sink(Output::Embeddings(vectors)).map_err(|_| cancelled())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::{ChatMessage, SamplingParams};

    fn chat(text: &str, max_tokens: u32) -> InferRequest {
        InferRequest {
            model: "e".into(),
            input: Input::Chat {
                messages: vec![ChatMessage {
                    role: Role::User,
                    content: text.into(),
                }],
            },
            params: SamplingParams {
                max_tokens,
                ..Default::default()
            },
            deadline_ms: None,
            token: None,
            resume: None,
        }
    }

    fn collect(
        engine: &dyn Engine,
        req: &InferRequest,
    ) -> (Vec<Output>, Result<Completion, WireError>) {
        let mut out = Vec::new();
        let r = engine.run(
            req,
            &mut |o| {
                out.push(o);
                Ok(())
            },
            &CancellationToken::new(),
        );
        (out, r)
    }

    #[test]
    fn echo_streams_one_word_per_token_and_honours_max_tokens() {
        let e = Echo::new("e", Duration::ZERO, 1);
        let (out, r) = collect(&e, &chat("hello mesh world", 10));
        let text: String = out
            .iter()
            .map(|o| match o {
                Output::Delta { text, .. } => text.as_str(),
                _ => panic!("unexpected {o:?}"),
            })
            .collect();
        assert_eq!(text, "echo: hello mesh world");
        let c = r.unwrap();
        assert_eq!(
            (c.completion_tokens, c.finish_reason),
            (4, FinishReason::Stop)
        );

        let (out, r) = collect(&e, &chat("hello mesh world", 2));
        assert_eq!(out.len(), 2);
        assert_eq!(r.unwrap().finish_reason, FinishReason::Length);
    }

    #[test]
    fn echo_stops_when_the_sink_is_gone() {
        let e = Echo::new("e", Duration::ZERO, 1);
        let mut n = 0;
        let r = e.run(
            &chat("a b c d", 10),
            &mut |_| {
                n += 1;
                if n == 2 {
                    Err(super::super::Gone)
                } else {
                    Ok(())
                }
            },
            &CancellationToken::new(),
        );
        assert!(r.is_err());
        assert_eq!(n, 2);
    }

    #[test]
    fn hash_embeddings_are_unit_and_similar_texts_are_closer() {
        let a = HashEmbed::embed("a man is eating food");
        let b = HashEmbed::embed("a man is eating bread");
        let c = HashEmbed::embed("quantum chromodynamics");
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        assert!((dot(&a, &a) - 1.0).abs() < 1e-5);
        assert!(dot(&a, &b) > dot(&a, &c));
    }

    #[test]
    fn specs_parse_and_reject_nonsense() {
        assert!(from_spec("x", "echo?delay_ms=5", 1).is_ok());
        assert!(from_spec("x", "hash-embed", 1).is_ok());
        assert!(from_spec("x", "echo?delay_ms=abc", 1).is_err());
        assert!(from_spec("x", "gpt5", 1).is_err());
        assert!(from_spec("x", "echo?colour=red", 1).is_err());
    }
}
