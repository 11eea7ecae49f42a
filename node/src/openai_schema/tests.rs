//! Schema round-trips against real OpenAI-shaped JSON, in both directions.

use super::*;
use serde_json::json;

#[test]
fn a_chat_request_with_every_field_mesh_supports_parses() {
    // As the official Python client sends it, with fields mesh ignores.
    let body = json!({
        "model": "smol",
        "messages": [
            { "role": "developer", "content": "Be brief." },
            { "role": "system", "content": [{ "type": "text", "text": "Answer " }, { "type": "text", "text": "in English." }] },
            { "role": "user", "content": "Name the capital of France.", "name": "ann" },
            { "role": "assistant", "content": null },
        ],
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_tokens": 24,
        "max_completion_tokens": 32,
        "temperature": 0,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["\n\n", "END"],
        "n": 1,
        "top_k": 5,
        "tools": [], "response_format": { "type": "text" }, "logprobs": false,
        "frequency_penalty": 0.5,
    });
    let req: ChatRequest = serde_json::from_value(body).unwrap();
    assert_eq!(req.model, "smol");
    assert!(req.stream);
    assert_eq!(
        req.stream_options,
        Some(StreamOptions {
            include_usage: true
        })
    );
    assert_eq!(
        (req.max_tokens, req.max_completion_tokens),
        (Some(24), Some(32))
    );
    assert_eq!(
        (req.temperature, req.top_p, req.seed),
        (Some(0.0), Some(0.9), Some(42))
    );
    assert_eq!(
        req.stop,
        Some(Stop::Many(vec!["\n\n".into(), "END".into()]))
    );
    assert_eq!(req.n, Some(1));
    assert_eq!(
        req.top_k, None,
        "an OpenAI client's top_k is ignored, as before"
    );
    let messages: Vec<ChatMessage> = req.messages.iter().map(|m| m.to_mesh().unwrap()).collect();
    assert_eq!(
        messages,
        [
            ChatMessage {
                role: Role::System,
                content: "Be brief.".into()
            },
            ChatMessage {
                role: Role::System,
                content: "Answer in English.".into()
            },
            ChatMessage {
                role: Role::User,
                content: "Name the capital of France.".into()
            },
            ChatMessage {
                role: Role::Assistant,
                content: String::new()
            },
        ]
    );
}

#[test]
fn stop_is_a_string_or_a_list() {
    let stop = |v: Value| serde_json::from_value::<Stop>(v).unwrap().into_vec();
    assert_eq!(stop(json!("END")), ["END"]);
    assert_eq!(stop(json!(["a", "b"])), ["a", "b"]);
    let minimal: ChatRequest =
        serde_json::from_str(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
            .unwrap();
    assert_eq!(
        (minimal.stream, minimal.stop, minimal.n),
        (false, None, None)
    );
    assert!(serde_json::from_value::<ChatRequest>(json!({ "model": "m" })).is_err());
}

#[test]
fn unsupported_roles_and_content_are_refused_with_a_reason() {
    let to_mesh = |v: Value| serde_json::from_value::<Message>(v).unwrap().to_mesh();
    assert_eq!(
        to_mesh(json!({ "role": "tool", "content": "42" })).unwrap_err(),
        r#"unsupported message role "tool""#
    );
    let image = json!({ "role": "user", "content": [
        { "type": "text", "text": "what is this?" },
        { "type": "image_url", "image_url": { "url": "data:," } },
    ]});
    assert_eq!(
        to_mesh(image).unwrap_err(),
        "only text content parts are supported"
    );
    assert_eq!(
        to_mesh(json!({ "role": "user", "content": 7 })).unwrap_err(),
        "message content must be a string or a list of text parts"
    );
    assert_eq!(to_mesh(json!({ "role": "user" })).unwrap().content, "");
}

#[test]
fn roles_have_openais_names_both_ways() {
    for (role, name) in [
        (Role::System, "system"),
        (Role::User, "user"),
        (Role::Assistant, "assistant"),
    ] {
        assert_eq!(role_name(role), name);
        let m = Message::from(&ChatMessage {
            role,
            content: "x".into(),
        });
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({ "role": name, "content": "x" })
        );
        assert_eq!(m.to_mesh().unwrap().role, role);
    }
}

#[test]
fn a_request_written_upstream_has_only_the_fields_set() {
    let req = ChatRequest {
        model: "smollm2".into(),
        messages: vec![Message::from(&ChatMessage {
            role: Role::User,
            content: "hi".into(),
        })],
        stream: true,
        stream_options: Some(StreamOptions {
            include_usage: true,
        }),
        max_tokens: Some(24),
        temperature: Some(0.5),
        top_k: Some(40),
        ..ChatRequest::default()
    };
    assert_eq!(
        serde_json::to_value(&req).unwrap(),
        json!({
            "model": "smollm2", "messages": [{ "role": "user", "content": "hi" }],
            "stream": true, "stream_options": { "include_usage": true },
            "max_tokens": 24, "temperature": 0.5, "top_k": 40,
        })
    );
}

#[test]
fn embeddings_input_is_a_string_or_a_list() {
    let req: EmbeddingsRequest = serde_json::from_value(json!({
        "model": "minilm", "input": "A man is eating food.", "encoding_format": "base64", "user": "u1",
    }))
    .unwrap();
    assert_eq!(req.input.clone().into_vec(), ["A man is eating food."]);
    assert_eq!(req.encoding_format.as_deref(), Some("base64"));
    let many: EmbeddingsRequest =
        serde_json::from_value(json!({ "model": "minilm", "input": ["a", "b"] })).unwrap();
    assert_eq!(many.input.into_vec(), ["a", "b"]);
    assert!(
        serde_json::from_value::<EmbeddingsRequest>(json!({ "model": "m", "input": 3 })).is_err()
    );
}

#[test]
fn a_whole_answer_is_written_as_before() {
    let answer = ChatCompletion {
        choices: vec![Choice {
            finish_reason: Some(finish_reason_name(FinishReason::Stop).into()),
            index: 0,
            message: AnswerMessage {
                content: "Paris.".into(),
                role: Role::Assistant,
            },
        }],
        created: 1_700_000_000,
        id: "chatcmpl-0123456789abcdef".into(),
        model: "smol".into(),
        object: "chat.completion".into(),
        usage: Usage::new(12, 3),
    };
    // The `json!` body this replaced; serde_json wrote its keys sorted.
    let old = json!({
        "id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "created": 1_700_000_000u64,
        "model": "smol",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": "Paris." },
                      "finish_reason": "stop" }],
        "usage": { "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15 },
    });
    assert_eq!(serde_json::to_string(&answer).unwrap(), old.to_string());
    let back: ChatCompletion = serde_json::from_value(old).unwrap();
    assert_eq!(back, answer);
}

#[test]
fn finish_reasons_map_both_ways() {
    assert_eq!(finish_reason_name(FinishReason::Length), "length");
    assert_eq!(finish_reason_name(FinishReason::Stop), "stop");
    assert_eq!(finish_reason_name(FinishReason::Complete), "stop");
    assert_eq!(finish_reason_from("length"), FinishReason::Length);
    assert_eq!(finish_reason_from("stop"), FinishReason::Stop);
    assert_eq!(finish_reason_from("tool_calls"), FinishReason::Stop);
}

#[test]
fn stream_events_of_real_servers_parse() {
    // llama.cpp's server: a chat chunk with fields mesh does not read.
    let chat = r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" Paris"}}],
        "created":1733100000,"id":"chatcmpl-x","model":"smollm2","system_fingerprint":"b4273",
        "object":"chat.completion.chunk"}"#;
    let StreamEvent::Chunk(chunk) = serde_json::from_str(chat).unwrap() else {
        panic!()
    };
    assert_eq!(chunk.choices[0].text(), " Paris");
    assert_eq!(chunk.usage, None);
    // A `/completions` stream, and a usage-only last chunk (vLLM, OpenAI).
    let text = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m",
        "choices":[{"text":"Hello","index":0,"logprobs":null,"finish_reason":"length"}]}"#;
    let StreamEvent::Chunk(chunk) = serde_json::from_str(text).unwrap() else {
        panic!()
    };
    assert_eq!(chunk.choices[0].text(), "Hello");
    assert_eq!(chunk.choices[0].finish_reason.as_deref(), Some("length"));
    let usage = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],
        "usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}"#;
    let StreamEvent::Chunk(chunk) = serde_json::from_str(usage).unwrap() else {
        panic!()
    };
    assert_eq!(chunk.usage, Some(Usage::new(9, 4)));
    // An error in the stream (llama.cpp, once it has started answering).
    let error =
        r#"{"error":{"code":500,"message":"context shift is disabled","type":"server_error"}}"#;
    let StreamEvent::Failed { error } = serde_json::from_str(error).unwrap() else {
        panic!()
    };
    assert_eq!(error["message"], "context shift is disabled");
}

#[test]
fn model_lists_round_trip() {
    let list = ModelList {
        data: vec![ModelObject {
            created: 0,
            id: "smol".into(),
            object: "model".into(),
            owned_by: "12D3KooW".into(),
        }],
        object: "list".into(),
    };
    let old = json!({ "object": "list", "data": [
        { "id": "smol", "object": "model", "created": 0, "owned_by": "12D3KooW" }] });
    assert_eq!(serde_json::to_string(&list).unwrap(), old.to_string());
    assert_eq!(serde_json::from_value::<ModelList>(old).unwrap(), list);
}

#[test]
fn token_totals_from_a_hostile_node_saturate() {
    assert_eq!(Usage::new(u32::MAX, 7).total_tokens, u32::MAX);
    let usage = mesh_protocol::Usage {
        prompt_tokens: u32::MAX,
        completion_tokens: u32::MAX,
        ..Default::default()
    };
    assert_eq!(
        super::responses::ResponsesUsage::from(&usage).total_tokens,
        u32::MAX
    );
}
