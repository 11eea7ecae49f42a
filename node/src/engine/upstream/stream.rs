//! Reading a streamed answer from the upstream: its bytes, capped ([`capped`]); server-sent
//! events parsed from them by `eventsource-stream` (which handles `\r\n`, multi-line `data`,
//! comments and a BOM); each event's chunk folded into the call's output ([`Answer`]).
//!
//! The caps apply to the bytes before the parser, which would otherwise buffer a line without
//! end for ever.

use std::fmt;
use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use mesh_protocol::{FinishReason, WireError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::http::{upstream_error, IDLE_TIMEOUT, MAX_BODY};
use crate::engine::{cancelled, Completion, Output};
use crate::openai_schema::{finish_reason_from, StreamEvent};

/// Longest server-sent event line accepted from the upstream.
const MAX_LINE: usize = 1 << 20;

/// How much a stream may send, and how long it may be silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    pub line: usize,
    pub body: usize,
    pub idle: Duration,
}

/// The limits of every upstream stream.
pub(super) const LIMITS: Limits = Limits {
    line: MAX_LINE,
    body: MAX_BODY,
    idle: IDLE_TIMEOUT,
};

/// Why the byte stream was cut off.
#[derive(Debug)]
pub(super) enum ReadError<E> {
    Transport(E),
    Idle(Duration),
    LineTooLong(usize),
    TooLarge(usize),
}

impl<E: fmt::Display> fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Transport(e) => write!(f, "stream broke: {e}"),
            ReadError::Idle(idle) => write!(f, "no data for {idle:?}"),
            ReadError::LineTooLong(max) => write!(f, "event line exceeds {max} bytes"),
            ReadError::TooLarge(max) => write!(f, "answer exceeds {max} bytes"),
        }
    }
}

/// What has been counted of the byte stream so far.
struct Counted<S> {
    bytes: S,
    limits: Limits,
    total: usize,
    /// Bytes since the last line end (`\n` or `\r`).
    line: usize,
    failed: bool,
}

impl<S> Counted<S> {
    fn count<E>(&mut self, chunk: &[u8]) -> Result<(), ReadError<E>> {
        self.total += chunk.len();
        if self.total > self.limits.body {
            return Err(ReadError::TooLarge(self.limits.body));
        }
        for (i, piece) in chunk.split(|&b| b == b'\n' || b == b'\r').enumerate() {
            let len = if i == 0 {
                self.line + piece.len()
            } else {
                piece.len()
            };
            if len > self.limits.line {
                return Err(ReadError::LineTooLong(self.limits.line));
            }
            self.line = len;
        }
        Ok(())
    }
}

/// `bytes`, ended by an error once a line or the whole exceeds its limit, or after `idle`
/// without a byte.
pub(super) fn capped<S, B, E>(
    bytes: S,
    limits: Limits,
) -> impl Stream<Item = Result<B, ReadError<E>>>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
{
    let state = Counted {
        bytes,
        limits,
        total: 0,
        line: 0,
        failed: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.failed {
            return None;
        }
        let item = match tokio::time::timeout(s.limits.idle, s.bytes.next()).await {
            Err(_) => Err(ReadError::Idle(s.limits.idle)),
            Ok(None) => return None,
            Ok(Some(Err(e))) => Err(ReadError::Transport(e)),
            Ok(Some(Ok(chunk))) => s.count(chunk.as_ref()).map(|()| chunk),
        };
        s.failed = item.is_err();
        Some((item, s))
    })
}

/// What one event does to the answer.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Step {
    /// Text to pass on.
    Text(String),
    /// Nothing to pass on (a role, a finish reason, usage).
    Nothing,
    /// `[DONE]`: the answer is complete.
    Done,
}

/// A streamed answer, as far as it has come.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Answer {
    finish: Option<FinishReason>,
    /// `(prompt, completion)` tokens, if the upstream said.
    usage: Option<(u32, u32)>,
    deltas: u32,
}

impl Answer {
    /// Folds in the data of one event.
    pub(super) fn on_data(&mut self, data: &str) -> Result<Step, WireError> {
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(Step::Done);
        }
        let chunk = match serde_json::from_str(data) {
            Ok(StreamEvent::Chunk(chunk)) => chunk,
            Ok(StreamEvent::Failed { error }) => return Err(upstream_error(format!("{error}"))),
            Err(e) => return Err(upstream_error(format!("bad event {data:?}: {e}"))),
        };
        if let Some(u) = chunk.usage {
            self.usage = Some((u.prompt_tokens, u.completion_tokens));
        }
        let Some(choice) = chunk.choices.first() else {
            return Ok(Step::Nothing);
        };
        if let Some(reason) = &choice.finish_reason {
            self.finish = Some(finish_reason_from(reason));
        }
        let text = choice.text();
        if text.is_empty() {
            return Ok(Step::Nothing);
        }
        self.deltas += 1;
        Ok(Step::Text(text.to_string()))
    }

    pub(super) fn completion(&self) -> Completion {
        // Servers that send no usage: count the streamed deltas (one token each for llama.cpp).
        let (prompt_tokens, completion_tokens) = self.usage.unwrap_or((0, self.deltas));
        Completion {
            finish_reason: self.finish.unwrap_or(FinishReason::Stop),
            prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
            resumed_tokens: 0,
            stages: Vec::new(),
        }
    }
}

fn event_error<E: fmt::Display>(e: EventStreamError<ReadError<E>>) -> WireError {
    upstream_error(match e {
        EventStreamError::Transport(e) => e.to_string(),
        EventStreamError::Utf8(e) => format!("the stream is not UTF-8: {e}"),
        EventStreamError::Parser(e) => format!("not an event stream: {e:?}"),
    })
}

/// Reads a streamed chat or completion answer from `bytes` to `[DONE]` (or its end), sending
/// each piece of text to `out` as it comes.
pub(super) async fn read_answer<S, B, E>(
    bytes: S,
    limits: Limits,
    out: &mpsc::Sender<Output>,
    cancel: &CancellationToken,
) -> Result<Completion, WireError>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: fmt::Display,
{
    let events = capped(bytes, limits).eventsource();
    let mut events = std::pin::pin!(events);
    let mut answer = Answer::default();
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return Err(cancelled()),
            next = events.next() => match next {
                None => break,
                Some(Err(e)) => return Err(event_error(e)),
                Some(Ok(event)) => event,
            },
        };
        match answer.on_data(&event.data)? {
            Step::Text(text) => out
                .send(Output::text(text))
                .await
                .map_err(|_| cancelled())?,
            Step::Nothing => {}
            Step::Done => break,
        }
    }
    Ok(answer.completion())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// A llama.cpp-style chat stream, with what the SSE format allows around it: a comment, a
    /// `data` split over two lines, `\r\n` line ends, an `event:` name and a final usage chunk.
    const LLAMA_STREAM: &str = concat!(
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}],",
        "\"created\":1733100000,\"id\":\"chatcmpl-x\",\"model\":\"smollm2\",\"object\":\"chat.completion.chunk\"}\n\n",
        ": ping\n\n",
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"The capital\"}}],",
        "\"created\":1733100000,\"id\":\"chatcmpl-x\",\"model\":\"smollm2\",\"object\":\"chat.completion.chunk\"}\r\n\r\n",
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\n",
        "data: \"delta\":{\"content\":\" is Paris\"}}],\"object\":\"chat.completion.chunk\"}\n\n",
        "event: message\r\ndata: {\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"delta\":{}}],",
        "\"object\":\"chat.completion.chunk\"}\r\n\r\n",
        "data: {\"choices\":[],\"usage\":{\"completion_tokens\":3,\"prompt_tokens\":12,\"total_tokens\":15}}\n\n",
        "data: [DONE]\n\n",
    );

    /// `text` as a byte stream in pieces of `size` bytes, as a network delivers it.
    fn pieces(text: &str, size: usize) -> impl Stream<Item = Result<Vec<u8>, Infallible>> + Unpin {
        let chunks: Vec<_> = text
            .as_bytes()
            .chunks(size)
            .map(|c| Ok(c.to_vec()))
            .collect();
        futures::stream::iter(chunks)
    }

    async fn read(
        bytes: impl Stream<Item = Result<Vec<u8>, Infallible>> + Unpin,
        limits: Limits,
    ) -> (Result<Completion, WireError>, Vec<Output>) {
        let (tx, mut rx) = mpsc::channel(64);
        let result = read_answer(bytes, limits, &tx, &CancellationToken::new()).await;
        drop(tx);
        let mut outputs = Vec::new();
        while let Some(o) = rx.recv().await {
            outputs.push(o);
        }
        (result, outputs)
    }

    fn small(line: usize, body: usize) -> Limits {
        Limits {
            line,
            body,
            idle: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_llama_cpp_stream_becomes_deltas_and_a_completion() {
        // Whole, and cut at every few bytes (through `\r\n` pairs and UTF-8 alike).
        for size in [LLAMA_STREAM.len(), 7, 1] {
            let (result, outputs) = read(pieces(LLAMA_STREAM, size), LIMITS).await;
            assert_eq!(
                outputs,
                [Output::text("The capital"), Output::text(" is Paris")],
                "pieces of {size}"
            );
            assert_eq!(
                result.unwrap(),
                Completion {
                    finish_reason: FinishReason::Length,
                    prompt_tokens: 12,
                    completion_tokens: 3,
                    cached_tokens: 0,
                    resumed_tokens: 0,
                    stages: Vec::new(),
                },
                "pieces of {size}"
            );
        }
    }

    #[tokio::test]
    async fn without_usage_the_deltas_are_counted_and_done_ends_the_answer() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"text\":\"Hel\"}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\"lo\",\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\"after done\"}]}\n\n",
        );
        let (result, outputs) = read(pieces(stream, 5), LIMITS).await;
        assert_eq!(outputs.len(), 2, "nothing after [DONE]: {outputs:?}");
        let completion = result.unwrap();
        assert_eq!(completion.finish_reason, FinishReason::Stop);
        assert_eq!(
            (completion.prompt_tokens, completion.completion_tokens),
            (0, 2)
        );
    }

    #[tokio::test]
    async fn errors_in_the_stream_fail_the_call() {
        let error =
            "data: {\"error\":{\"code\":500,\"message\":\"boom\",\"type\":\"server_error\"}}\n\n";
        let (result, _) = read(pieces(error, 64), LIMITS).await;
        let err = result.unwrap_err();
        assert!(
            err.message.starts_with("upstream: ") && err.message.contains("boom"),
            "{err:?}"
        );
        let (result, _) = read(pieces("data: {not json\n\n", 64), LIMITS).await;
        assert!(result.unwrap_err().message.contains("bad event"));
    }

    #[tokio::test]
    async fn a_line_or_an_answer_over_its_cap_is_cut_off() {
        let event = "data: {\"choices\":[{\"index\":0,\"text\":\"abc\"}]}\n\n";
        // The event line is 44 bytes: a cap of 44 passes it, 43 does not, in any pieces.
        for size in [1, 10, 100] {
            assert!(read(pieces(event, size), small(44, 1000)).await.0.is_ok());
            let err = read(pieces(event, size), small(43, 1000))
                .await
                .0
                .unwrap_err();
            assert_eq!(
                err.message, "upstream: event line exceeds 43 bytes",
                "pieces of {size}"
            );
        }
        // Many short lines add up to the body cap.
        let many = event.repeat(10);
        let (result, outputs) = read(pieces(&many, 46), small(100, 460)).await;
        assert!(result.is_ok());
        assert_eq!(outputs.len(), 10);
        let (result, outputs) = read(pieces(&many, 46), small(100, 459)).await;
        assert_eq!(
            result.unwrap_err().message,
            "upstream: answer exceeds 459 bytes"
        );
        assert_eq!(outputs.len(), 9, "what came before the cap went on");
        // A line without end never reaches the parser's buffer past the real cap.
        let endless = format!("data: {}", "x".repeat(MAX_LINE));
        let err = read(pieces(&endless, 64 << 10), LIMITS)
            .await
            .0
            .unwrap_err();
        assert_eq!(
            err.message,
            format!("upstream: event line exceeds {MAX_LINE} bytes")
        );
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out() {
        let limits = Limits {
            idle: Duration::from_millis(50),
            ..LIMITS
        };
        // One event, then silence: the event goes on, then the call fails.
        let event = "data: {\"choices\":[{\"index\":0,\"text\":\"a\"}]}\n\n";
        let bytes = pieces(event, 64).chain(futures::stream::pending());
        let (result, outputs) = read(bytes, limits).await;
        assert_eq!(outputs, [Output::text("a")]);
        assert_eq!(result.unwrap_err().message, "upstream: no data for 50ms");
    }

    #[tokio::test]
    async fn cancelling_stops_the_read() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (tx, _rx) = mpsc::channel(1);
        let silent = futures::stream::pending::<Result<Vec<u8>, Infallible>>();
        let err = read_answer(silent, LIMITS, &tx, &cancel).await.unwrap_err();
        assert_eq!(err, cancelled());
    }
}
