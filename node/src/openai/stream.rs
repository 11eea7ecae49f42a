//! What every streamed answer shares, whichever API it speaks: waiting for the call to start
//! ([`first_event`], so that a refusal still gets its HTTP status), and a body that maps the
//! call's events to frames as they arrive ([`frames`]) through a pure [`Framer`] (the
//! `chat.completion.chunk`s of chat, the `text_completion`s of completions, the Responses
//! API's events, Ollama's NDJSON lines).
//!
//! The body owns the event receiver: a client that hangs up drops the body and the receiver
//! with it, which cancels the call on the serving node.

use std::collections::VecDeque;

use futures::Stream;
use mesh_protocol::ErrorCode;
use tokio::sync::mpsc;

use crate::dispatch::{CallEvent, CallFailure};

/// A pure mapping from a call's events to the frames of one streamed answer.
pub(crate) trait Framer: Send + 'static {
    type Frame: Send + 'static;

    /// What one call event adds to the stream; nothing once the stream is finished.
    fn on_event(&mut self, event: CallEvent) -> Vec<Self::Frame>;

    /// The events ended: whatever closes the stream, unless it was sent already.
    fn on_end(&mut self) -> Vec<Self::Frame>;

    /// True once the last frame was made.
    fn is_finished(&self) -> bool;
}

/// The call's first event after it reached a node (`started`, or an answer), or its failure:
/// a stream begins only once there is something to stream.
pub(crate) async fn first_event(
    events: &mut mpsc::Receiver<CallEvent>,
) -> Result<CallEvent, CallFailure> {
    loop {
        match events.recv().await {
            Some(CallEvent::Connected { .. }) => continue,
            Some(CallEvent::Error(failure)) => return Err(failure),
            Some(other) => return Ok(other),
            None => return Err(CallFailure::network(ErrorCode::Internal, "no answer")),
        }
    }
}

/// The frames of a streamed answer: `queued` first, then those of every event as it arrives,
/// until the framer is finished.
pub(crate) fn frames<F: Framer>(
    framer: F,
    events: mpsc::Receiver<CallEvent>,
    queued: VecDeque<F::Frame>,
) -> impl Stream<Item = F::Frame> + Send {
    futures::stream::unfold(
        (framer, events, queued),
        |(mut framer, mut events, mut queued)| async move {
            loop {
                if let Some(frame) = queued.pop_front() {
                    return Some((frame, (framer, events, queued)));
                }
                if framer.is_finished() {
                    return None;
                }
                match events.recv().await {
                    Some(event) => queued.extend(framer.on_event(event)),
                    None => queued.extend(framer.on_end()),
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// Numbers the deltas; ends with 0.
    struct Count(u32, bool);

    impl Framer for Count {
        type Frame = u32;
        fn on_event(&mut self, event: CallEvent) -> Vec<u32> {
            if let CallEvent::Delta { .. } = event {
                self.0 += 1;
                return vec![self.0];
            }
            Vec::new()
        }
        fn on_end(&mut self) -> Vec<u32> {
            if std::mem::replace(&mut self.1, true) {
                Vec::new()
            } else {
                vec![0]
            }
        }
        fn is_finished(&self) -> bool {
            self.1
        }
    }

    #[tokio::test]
    async fn the_stream_starts_after_connected_and_ends_with_the_framer() {
        let (tx, mut rx) = mpsc::channel(8);
        tx.send(CallEvent::Connected {
            peer: "p".into(),
            path: crate::network::Path::Direct,
            connect_ms: 1,
        })
        .await
        .unwrap();
        tx.send(CallEvent::Started { queue_ms: 0 }).await.unwrap();
        tx.send(CallEvent::Delta { text: "a".into() })
            .await
            .unwrap();
        tx.send(CallEvent::Delta { text: "b".into() })
            .await
            .unwrap();
        drop(tx);
        let first = first_event(&mut rx).await.unwrap();
        assert_eq!(first, CallEvent::Started { queue_ms: 0 });
        let out: Vec<u32> = frames(Count(0, false), rx, VecDeque::from([9]))
            .collect()
            .await;
        assert_eq!(out, [9, 1, 2, 0]);

        let (tx, mut rx) = mpsc::channel(8);
        tx.send(CallEvent::Error(CallFailure::network(
            ErrorCode::Overloaded,
            "busy",
        )))
        .await
        .unwrap();
        assert_eq!(first_event(&mut rx).await.unwrap_err().message, "busy");
        drop(tx);
        let gone = first_event(&mut rx).await.unwrap_err();
        assert_eq!(gone.class(), crate::dispatch::FailureClass::Network);
    }
}
