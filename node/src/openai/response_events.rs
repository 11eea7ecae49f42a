//! The Responses API's objects and its stream of typed events, from a call's events: a pure
//! mapping ([`ResponseFramer`]), so the sequence is tested without a network.
//!
//! A streamed response is `response.created`, `response.in_progress`,
//! `response.output_item.added`, `response.content_part.added`, one
//! `response.output_text.delta` per delta, then `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done` and `response.completed` (or
//! `response.incomplete` when `max_output_tokens` cut it short); a call that fails after it
//! began ends with `response.failed`. Every event has a `sequence_number`, from 0.

use axum::response::sse::Event;
use mesh_protocol::{ErrorCode, FinishReason, Role, Usage as MeshUsage};

use super::error::OpenAiError;
use super::schema::{
    IncompleteDetails, OutputMessage, OutputText, ResponseError, ResponseEventBody, ResponseObject,
    ResponseStreamEvent, ResponsesUsage,
};
use super::stream::Framer;
use crate::dispatch::{CallEvent, CallFailure};

/// The response's fixed parts, as the request set them.
#[derive(Debug, Clone)]
pub(super) struct ResponseHead {
    pub(super) id: String,
    pub(super) item_id: String,
    pub(super) created_at: u64,
    pub(super) model: String,
    pub(super) instructions: Option<String>,
    pub(super) max_output_tokens: Option<u32>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
}

impl ResponseHead {
    /// The response object with `status`, no output and no usage.
    fn object(&self, status: &'static str) -> ResponseObject {
        ResponseObject {
            id: self.id.clone(),
            object: "response",
            created_at: self.created_at,
            status,
            error: None,
            incomplete_details: None,
            instructions: self.instructions.clone(),
            max_output_tokens: self.max_output_tokens,
            model: self.model.clone(),
            output: Vec::new(),
            parallel_tool_calls: false,
            temperature: self.temperature,
            tool_choice: "auto",
            tools: Vec::new(),
            top_p: self.top_p,
            metadata: Default::default(),
            usage: None,
        }
    }

    fn message(&self, status: &'static str, content: Vec<OutputText>) -> OutputMessage {
        OutputMessage {
            kind: "message",
            id: self.item_id.clone(),
            status,
            role: Role::Assistant,
            content,
        }
    }

    /// The finished response: `completed`, or `incomplete` when the length limit cut it.
    pub(super) fn finished(
        &self,
        text: String,
        finish: FinishReason,
        usage: &MeshUsage,
    ) -> ResponseObject {
        let cut = finish == FinishReason::Length;
        let status = if cut { "incomplete" } else { "completed" };
        ResponseObject {
            incomplete_details: cut.then_some(IncompleteDetails {
                reason: "max_output_tokens",
            }),
            output: vec![self.message(status, vec![OutputText::new(text)])],
            usage: Some(ResponsesUsage::from(usage)),
            ..self.object(status)
        }
    }

    fn failed(&self, failure: CallFailure) -> ResponseObject {
        let e = OpenAiError::from_mesh(failure);
        ResponseObject {
            error: Some(ResponseError {
                code: e.code(),
                message: e.message().to_string(),
            }),
            ..self.object("failed")
        }
    }
}

impl ResponseStreamEvent {
    /// The event as a server-sent event: `event: <type>`, `data: <json>`.
    pub(super) fn sse(&self) -> Result<Event, axum::Error> {
        Event::default().event(self.kind).json_data(self)
    }
}

/// The events of one streamed response.
pub(super) struct ResponseFramer {
    head: ResponseHead,
    text: String,
    next: u64,
    finished: bool,
}

impl ResponseFramer {
    pub(super) fn new(head: ResponseHead) -> Self {
        ResponseFramer {
            head,
            text: String::new(),
            next: 0,
            finished: false,
        }
    }

    fn event(&mut self, kind: &'static str, body: ResponseEventBody) -> ResponseStreamEvent {
        let sequence_number = self.next;
        self.next += 1;
        ResponseStreamEvent {
            kind,
            sequence_number,
            body,
        }
    }

    fn part(&self, kind: &'static str, text: String) -> (&'static str, ResponseEventBody) {
        let body = ResponseEventBody::Part {
            item_id: self.head.item_id.clone(),
            output_index: 0,
            content_index: 0,
            part: OutputText::new(text),
        };
        (kind, body)
    }

    /// The events before the first delta: the response, its message and its text part begun.
    pub(super) fn opening(&mut self) -> Vec<ResponseStreamEvent> {
        let response = |s: &Self| ResponseEventBody::Response {
            response: Box::new(s.head.object("in_progress")),
        };
        let item = ResponseEventBody::Item {
            output_index: 0,
            item: self.head.message("in_progress", Vec::new()),
        };
        let (kind, part) = self.part("response.content_part.added", String::new());
        vec![
            self.event("response.created", response(self)),
            self.event("response.in_progress", response(self)),
            self.event("response.output_item.added", item),
            self.event(kind, part),
        ]
    }

    fn closing(&mut self, finish: FinishReason, usage: &MeshUsage) -> Vec<ResponseStreamEvent> {
        let text = std::mem::take(&mut self.text);
        let text_done = ResponseEventBody::TextDone {
            item_id: self.head.item_id.clone(),
            output_index: 0,
            content_index: 0,
            text: text.clone(),
            logprobs: Vec::new(),
        };
        let (part_kind, part) = self.part("response.content_part.done", text.clone());
        let response = self.head.finished(text, finish, usage);
        let item = ResponseEventBody::Item {
            output_index: 0,
            item: response.output[0].clone(),
        };
        let last = if response.status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.finished = true;
        vec![
            self.event("response.output_text.done", text_done),
            self.event(part_kind, part),
            self.event("response.output_item.done", item),
            self.event(
                last,
                ResponseEventBody::Response {
                    response: Box::new(response),
                },
            ),
        ]
    }

    fn fail(&mut self, failure: CallFailure) -> Vec<ResponseStreamEvent> {
        self.finished = true;
        let response = Box::new(self.head.failed(failure));
        vec![self.event("response.failed", ResponseEventBody::Response { response })]
    }
}

impl Framer for ResponseFramer {
    type Frame = ResponseStreamEvent;

    fn on_event(&mut self, event: CallEvent) -> Vec<ResponseStreamEvent> {
        if self.finished {
            return Vec::new();
        }
        match event {
            CallEvent::Delta { text } => {
                self.text.push_str(&text);
                let delta = ResponseEventBody::Delta {
                    item_id: self.head.item_id.clone(),
                    output_index: 0,
                    content_index: 0,
                    delta: text,
                    logprobs: Vec::new(),
                };
                vec![self.event("response.output_text.delta", delta)]
            }
            CallEvent::Done {
                finish_reason,
                usage,
                ..
            } => self.closing(finish_reason, &usage),
            CallEvent::Error(failure) => self.fail(failure),
            CallEvent::Connected { .. }
            | CallEvent::Started { .. }
            | CallEvent::Embeddings { .. } => Vec::new(),
        }
    }

    fn on_end(&mut self) -> Vec<ResponseStreamEvent> {
        if self.finished {
            return Vec::new();
        }
        self.fail(CallFailure::network(
            ErrorCode::Internal,
            "the call ended without an answer",
        ))
    }

    fn is_finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::super::chunks::tests::{delta, done};
    use super::*;
    use mesh_protocol::WireError;
    use serde_json::{json, Value};

    fn head() -> ResponseHead {
        ResponseHead {
            id: "resp_1".into(),
            item_id: "msg_1".into(),
            created_at: 9,
            model: "smol".into(),
            instructions: None,
            max_output_tokens: Some(4),
            temperature: Some(0.0),
            top_p: None,
        }
    }

    fn json_of(events: Vec<ResponseStreamEvent>) -> Vec<Value> {
        events
            .into_iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .collect()
    }

    #[test]
    fn a_stream_follows_the_responses_event_sequence() {
        let mut f = ResponseFramer::new(head());
        let mut events = f.opening();
        for e in [
            CallEvent::Started { queue_ms: 0 },
            delta("Par"),
            delta("is"),
            done(FinishReason::Stop, 12, 2),
        ] {
            events.extend(f.on_event(e));
        }
        events.extend(f.on_end());
        events.extend(f.on_event(delta("late")));
        let kinds: Vec<&str> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let json = json_of(events);
        for (n, e) in json.iter().enumerate() {
            assert_eq!(e["sequence_number"], n as u64);
            assert_eq!(e["type"], kinds[n]);
        }
        assert_eq!(json[0]["response"]["status"], "in_progress");
        assert_eq!(json[0]["response"]["output"], json!([]));
        assert_eq!(
            json[4],
            json!({ "type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_1",
                    "output_index": 0, "content_index": 0, "delta": "Par", "logprobs": [] })
        );
        assert_eq!(json[6]["text"], "Paris");
        assert_eq!(json[7]["part"]["text"], "Paris");
        assert_eq!(json[8]["item"]["status"], "completed");
        let last = &json[9]["response"];
        assert_eq!(last["status"], "completed");
        assert_eq!(last["output"][0]["content"][0]["type"], "output_text");
        assert_eq!(last["output"][0]["content"][0]["text"], "Paris");
        assert_eq!(
            last["usage"],
            json!({ "input_tokens": 12, "input_tokens_details": { "cached_tokens": 0 },
                    "output_tokens": 2, "output_tokens_details": { "reasoning_tokens": 0 },
                    "total_tokens": 14 })
        );
        assert_eq!(last["incomplete_details"], Value::Null);
    }

    #[test]
    fn a_cut_answer_is_incomplete_and_a_failure_is_failed() {
        let mut f = ResponseFramer::new(head());
        f.opening();
        let events = f.on_event(done(FinishReason::Length, 1, 4));
        let last = events.last().unwrap();
        assert_eq!(last.kind, "response.incomplete");
        let json = serde_json::to_value(last).unwrap();
        assert_eq!(json["response"]["status"], "incomplete");
        assert_eq!(
            json["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );

        let mut f = ResponseFramer::new(head());
        f.opening();
        f.on_event(delta("a"));
        let failure = CallFailure::remote(WireError::new(ErrorCode::Overloaded, "busy"));
        let events = json_of(f.on_event(CallEvent::Error(failure)));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "response.failed");
        assert_eq!(events[0]["sequence_number"], 5);
        assert_eq!(
            events[0]["response"]["error"],
            json!({ "code": "overloaded", "message": "busy" })
        );
        assert!(f.is_finished() && f.on_end().is_empty());

        let mut f = ResponseFramer::new(head());
        f.opening();
        let ended = f.on_end();
        assert_eq!(
            ended[0].kind, "response.failed",
            "events that stop short fail"
        );
    }
}
