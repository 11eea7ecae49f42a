//! The NDJSON lines of a streamed `/api/chat` or `/api/generate` answer, from the call's
//! events: a pure mapping ([`LineFramer`]), and the statistics of the last line from mesh's
//! own measurements ([`stats`]): durations in nanoseconds, as Ollama reports them.
//!
//! A stream is one line per delta (`done: false`), then one `done: true` line with the
//! statistics; a call that fails after the stream began ends with `{"error": "..."}`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_protocol::{FinishReason, Role, Usage};

use super::error::OllamaError;
use super::schema::{AnswerMessage, Chunk, ErrorBody, Stats};
use crate::dispatch::{CallEvent, CallFailure};
use crate::openai::stream::Framer;

/// Which answer the lines carry: chat's `message` or generate's `response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Generate,
}

const NS_PER_MS: u64 = 1_000_000;

/// Milliseconds as Ollama's nanoseconds; a remote node's absurd figure saturates.
pub(crate) fn ns(ms: u64) -> u64 {
    ms.saturating_mul(NS_PER_MS)
}

/// The statistics of a finished call, from its `done` event: the whole call as this node
/// timed it (`total_duration`), reaching the serving node (`load_duration`: mesh's models stay
/// loaded, so this is the time before the node could start), and the serving node's compute,
/// split at the first token (`prompt_eval_duration` up to it, `eval_duration` after it).
pub(crate) fn stats(finish: FinishReason, usage: &Usage, connect_ms: u64, total_ms: u64) -> Stats {
    Stats {
        done_reason: done_reason(finish).into(),
        total_duration: ns(total_ms),
        load_duration: ns(connect_ms),
        prompt_eval_count: usage.prompt_tokens,
        prompt_eval_duration: ns(usage.time_to_first_token_ms),
        eval_count: usage.completion_tokens,
        eval_duration: ns(usage.total_ms.saturating_sub(usage.time_to_first_token_ms)),
    }
}

/// Ollama's `done_reason`: `length` when the limit cut the answer, else `stop`.
pub(crate) fn done_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Complete => "stop",
    }
}

/// A time as Ollama writes it: RFC 3339 in UTC, with microseconds.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// The current time, as [`rfc3339`] writes it.
pub(crate) fn now() -> String {
    rfc3339(SystemTime::now())
}

/// One line of a stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Line {
    Chunk(Chunk),
    Error(ErrorBody),
}

impl Line {
    /// The line as NDJSON: one JSON object and a newline.
    pub(crate) fn text(&self) -> String {
        let mut text = match self {
            Line::Chunk(c) => serde_json::to_string(c),
            Line::Error(e) => serde_json::to_string(e),
        }
        .expect("lines serialize");
        text.push('\n');
        text
    }
}

/// The lines of one streamed answer.
pub(crate) struct LineFramer {
    pub(crate) kind: Kind,
    pub(crate) model: String,
    /// The `created_at` of each line (the clock, replaced in tests).
    pub(crate) clock: fn() -> String,
    pub(crate) finished: bool,
}

impl LineFramer {
    pub(crate) fn new(kind: Kind, model: String) -> Self {
        LineFramer {
            kind,
            model,
            clock: now,
            finished: false,
        }
    }

    /// A line, or a whole answer, with `text` and, when done, its statistics.
    pub(crate) fn chunk(&self, text: String, stats: Option<Stats>) -> Chunk {
        let (message, response) = match self.kind {
            Kind::Chat => (
                Some(AnswerMessage {
                    role: Role::Assistant,
                    content: text,
                }),
                None,
            ),
            Kind::Generate => (None, Some(text)),
        };
        Chunk {
            model: self.model.clone(),
            created_at: (self.clock)(),
            message,
            response,
            done: stats.is_some(),
            stats,
        }
    }

    fn fail(&mut self, failure: CallFailure) -> Vec<Line> {
        self.finished = true;
        vec![Line::Error(OllamaError::from_mesh(failure).body())]
    }
}

impl Framer for LineFramer {
    type Frame = Line;

    fn on_event(&mut self, event: CallEvent) -> Vec<Line> {
        if self.finished {
            return Vec::new();
        }
        match event {
            CallEvent::Delta { text } => vec![Line::Chunk(self.chunk(text, None))],
            CallEvent::Done {
                finish_reason,
                usage,
                connect_ms,
                total_ms,
                ..
            } => {
                self.finished = true;
                let stats = stats(finish_reason, &usage, connect_ms, total_ms);
                vec![Line::Chunk(self.chunk(String::new(), Some(stats)))]
            }
            CallEvent::Error(failure) => self.fail(failure),
            CallEvent::Connected { .. }
            | CallEvent::Started { .. }
            | CallEvent::Embeddings { .. } => Vec::new(),
        }
    }

    fn on_end(&mut self) -> Vec<Line> {
        if self.finished {
            return Vec::new();
        }
        self.fail(CallFailure::network(
            mesh_protocol::ErrorCode::Internal,
            "the call ended without an answer",
        ))
    }

    fn is_finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{delta, done_with};
    use mesh_protocol::{ErrorCode, WireError};
    use serde_json::{json, Value};

    #[test]
    fn a_serving_nodes_absurd_figures_saturate_instead_of_overflowing() {
        let usage = Usage {
            prompt_tokens: u32::MAX,
            completion_tokens: u32::MAX,
            cached_tokens: 0,
            time_to_first_token_ms: u64::MAX,
            total_ms: u64::MAX,
        };
        let s = stats(FinishReason::Stop, &usage, 3, 7);
        assert_eq!(s.prompt_eval_duration, u64::MAX);
        assert_eq!(s.eval_duration, 0);
        assert_eq!((s.total_duration, s.load_duration), (7_000_000, 3_000_000));
        assert_eq!(s.eval_count, u32::MAX);
    }

    fn framer(kind: Kind) -> LineFramer {
        LineFramer {
            clock: || "2024-01-01T00:00:00.000000Z".into(),
            ..LineFramer::new(kind, "smol:latest".into())
        }
    }

    fn lines(f: &mut LineFramer, events: Vec<CallEvent>) -> Vec<Value> {
        let mut out = Vec::new();
        for e in events {
            out.extend(f.on_event(e));
        }
        out.extend(f.on_end());
        out.iter()
            .map(|l| {
                let text = l.text();
                assert!(text.ends_with('\n') && !text.trim_end().contains('\n'));
                serde_json::from_str(&text).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_chat_stream_is_message_lines_then_done_with_the_timings_in_nanoseconds() {
        let usage = Usage {
            prompt_tokens: 12,
            completion_tokens: 7,
            cached_tokens: 0,
            time_to_first_token_ms: 40,
            total_ms: 140,
        };
        let out = lines(
            &mut framer(Kind::Chat),
            vec![
                CallEvent::Started { queue_ms: 0 },
                delta("Par"),
                delta("is"),
                done_with(FinishReason::Stop, usage, 3, 150),
                delta("late"),
            ],
        );
        let at = "2024-01-01T00:00:00.000000Z";
        assert_eq!(
            out,
            [
                json!({ "model": "smol:latest", "created_at": at, "done": false,
                        "message": { "role": "assistant", "content": "Par" } }),
                json!({ "model": "smol:latest", "created_at": at, "done": false,
                        "message": { "role": "assistant", "content": "is" } }),
                json!({ "model": "smol:latest", "created_at": at, "done": true,
                        "message": { "role": "assistant", "content": "" },
                        "done_reason": "stop",
                        "total_duration": 150_000_000u64, "load_duration": 3_000_000u64,
                        "prompt_eval_count": 12, "prompt_eval_duration": 40_000_000u64,
                        "eval_count": 7, "eval_duration": 100_000_000u64 }),
            ]
        );
    }

    #[test]
    fn a_generate_stream_carries_response_and_a_failure_ends_it_with_an_error_line() {
        let failure = CallFailure::remote(WireError::new(ErrorCode::Overloaded, "busy"));
        let out = lines(
            &mut framer(Kind::Generate),
            vec![delta("Once"), CallEvent::Error(failure), delta("late")],
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["response"], "Once");
        assert!(out[0].get("message").is_none());
        assert_eq!(out[1], json!({ "error": "busy" }));
        let cut = lines(&mut framer(Kind::Generate), vec![delta("x")]);
        assert!(cut[1]["error"]
            .as_str()
            .unwrap()
            .contains("without an answer"));
        let length = lines(
            &mut framer(Kind::Generate),
            vec![done_with(FinishReason::Length, Usage::default(), 0, 0)],
        );
        assert_eq!(length[0]["done_reason"], "length");
        assert_eq!(length[0]["response"], "");
    }

    #[test]
    fn timings_never_underflow_and_times_are_rfc3339() {
        let odd = Usage {
            time_to_first_token_ms: 9,
            total_ms: 5,
            ..Usage::default()
        };
        assert_eq!(stats(FinishReason::Stop, &odd, 0, 0).eval_duration, 0);
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_709_210_096_123_456);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.123456Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339(t), "2099-12-31T23:59:59.000000Z");
    }
}
