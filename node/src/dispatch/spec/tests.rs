//! Unit tests of `spec`.

use super::*;
use mesh_protocol::ErrorCode;

use crate::test_support::random_peer as peer;

fn card(task: Task) -> ModelCard {
    crate::test_support::card("m", task)
}

fn spec(prompts: &[&str]) -> InferSpec {
    InferSpec {
        target: Target::Any,
        model: "m".into(),
        weights: None,
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        system: None,
        messages: Vec::new(),
        prompt: None,
        expect: None,
        params: SamplingParams::default(),
        deadline_ms: 5_000,
        token: None,
    }
}

fn token() -> SignedToken {
    let issuer = crate::NodeIdentity::generate();
    crate::auth::token::issue(
        &issuer,
        &crate::auth::token::TokenRequest {
            subject: peer(),
            models: vec!["m".into()],
            not_before: 0,
            expires: 4_000_000_000,
            max_requests: None,
        },
    )
    .unwrap()
}

fn message(role: Role, content: &str) -> ChatMessage {
    ChatMessage {
        role,
        content: content.into(),
    }
}

#[test]
fn targets_are_any_or_a_peer_id_as_text() {
    let p = peer();
    for (target, text) in [
        (Target::Any, "any".to_string()),
        (Target::Peer(p), p.to_string()),
    ] {
        assert_eq!(
            serde_json::to_value(target).unwrap(),
            serde_json::json!(text)
        );
        assert_eq!(
            serde_json::from_value::<Target>(text.clone().into()).unwrap(),
            target
        );
        assert_eq!(text.parse::<Target>(), Ok(target));
        assert_eq!(target.to_string(), text);
    }
    for bad in ["", "Any", "not-a-peer", "12D3KooW"] {
        let err = bad.parse::<Target>().unwrap_err();
        assert_eq!(err.text, bad);
        assert!(err.to_string().contains("not a peer id"), "{err}");
        let json = serde_json::from_value::<Target>(bad.into()).unwrap_err();
        assert!(json.to_string().contains("not a peer id"), "{json}");
    }
    assert!(serde_json::from_value::<Target>(serde_json::json!(7)).is_err());
}

#[test]
fn a_spec_reads_the_json_the_cli_and_api_send() {
    let t = token();
    let json = serde_json::json!({
        "target": "any", "model": "m", "prompts": ["hi"], "deadline_ms": 1000,
        "token": t.to_text(),
    });
    let spec: InferSpec = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(spec.target, Target::Any);
    assert_eq!(spec.token.as_ref(), Some(&t));
    let back = serde_json::to_value(&spec).unwrap();
    assert_eq!(back["target"], "any");
    assert_eq!(back["token"], json["token"]);

    let without: InferSpec = serde_json::from_value(
        serde_json::json!({"target": "any", "model": "m", "deadline_ms": 1}),
    )
    .unwrap();
    assert!(without.token.is_none());
    assert_eq!(
        serde_json::to_value(&without).unwrap()["token"],
        serde_json::Value::Null
    );

    let bad = serde_json::from_value::<InferSpec>(serde_json::json!({
        "target": "any", "model": "m", "deadline_ms": 1, "token": "mtk1.not-a-token",
    }))
    .unwrap_err();
    assert!(bad.to_string().contains("capability token"), "{bad}");
    let bad = serde_json::from_value::<InferSpec>(
        serde_json::json!({"target": "nobody", "model": "m", "deadline_ms": 1}),
    )
    .unwrap_err();
    assert!(bad.to_string().contains("not a peer id"), "{bad}");
}

#[test]
fn a_prompt_becomes_a_chat_with_its_system_message() {
    let request = build_request(&spec(&["hello"]), &card(Task::Generate)).unwrap();
    assert_eq!(
        request.input,
        Input::Chat {
            messages: vec![message(Role::User, "hello")]
        }
    );
    assert_eq!(request.deadline_ms, Some(5_000));
    assert_eq!(request.model, "m");
    assert!(request.token.is_none());

    let with_system = InferSpec {
        system: Some("be brief".into()),
        ..spec(&["hello"])
    };
    let request = build_request(&with_system, &card(Task::Generate)).unwrap();
    assert_eq!(
        request.input,
        Input::Chat {
            messages: vec![
                message(Role::System, "be brief"),
                message(Role::User, "hello")
            ]
        }
    );
}

#[test]
fn messages_go_as_they_are_and_prompts_embed() {
    let messages = vec![
        message(Role::User, "hi"),
        message(Role::Assistant, "hello"),
        message(Role::User, "how are you?"),
    ];
    let chat = InferSpec {
        messages: messages.clone(),
        system: Some("ignored with messages".into()),
        ..spec(&[])
    };
    let request = build_request(&chat, &card(Task::Generate)).unwrap();
    assert_eq!(request.input, Input::Chat { messages });

    let request = build_request(&spec(&["a", "b c"]), &card(Task::Embed)).unwrap();
    assert_eq!(
        request.input,
        Input::Embed {
            texts: vec!["a".into(), "b c".into()]
        }
    );
}

#[test]
fn the_token_goes_in_its_wire_form() {
    let t = token();
    let with_token = InferSpec {
        token: Some(t.clone()),
        ..spec(&["hi"])
    };
    let request = build_request(&with_token, &card(Task::Generate)).unwrap();
    assert_eq!(request.token, Some(t.to_bytes()));
}

#[test]
fn requests_that_do_not_fit_are_bad_requests() {
    let refused = |spec: &InferSpec, task| {
        let e = build_request(spec, &card(task)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{e}");
        e.message
    };
    let wants_chat = InferSpec {
        expect: Some(Task::Generate),
        ..spec(&["x"])
    };
    assert_eq!(
        refused(&wants_chat, Task::Embed),
        "model \"m\" is an embedding model; use it for embeddings"
    );
    let wants_embed = InferSpec {
        expect: Some(Task::Embed),
        ..spec(&["x"])
    };
    assert_eq!(
        refused(&wants_embed, Task::Generate),
        "model \"m\" is a generation model; use it for chat completions"
    );
    assert_eq!(
        refused(&spec(&["a", "b"]), Task::Generate),
        "a generation model takes one prompt, got 2"
    );
    assert_eq!(
        refused(&spec(&[]), Task::Generate),
        "a generation model takes one prompt, got 0"
    );
    // The request's own checks, made once here.
    assert!(refused(&spec(&["   "]), Task::Generate).contains("empty"));
    assert!(refused(&spec(&[]), Task::Embed).contains("embeddings need"));
    let hot = InferSpec {
        params: SamplingParams {
            temperature: 5.0,
            ..Default::default()
        },
        ..spec(&["x"])
    };
    assert!(refused(&hot, Task::Generate).contains("temperature"));
    let no_time = InferSpec {
        deadline_ms: 0,
        ..spec(&["x"])
    };
    assert!(refused(&no_time, Task::Generate).contains("deadline_ms"));
    let bad_name = InferSpec {
        model: "a b".into(),
        ..spec(&["x"])
    };
    assert!(refused(&bad_name, Task::Generate).contains("model name"));
}

#[test]
fn a_raw_prompt_is_a_completion_without_a_template_and_absent_from_older_json() {
    let raw = InferSpec {
        prompt: Some("Once upon a time".into()),
        messages: vec![message(Role::User, "ignored with a raw prompt")],
        ..spec(&[])
    };
    let request = build_request(&raw, &card(Task::Generate)).unwrap();
    assert_eq!(
        request.input,
        Input::Completion {
            prompt: "Once upon a time".into()
        }
    );
    let e = build_request(
        &InferSpec {
            prompt: Some("  ".into()),
            ..spec(&[])
        },
        &card(Task::Generate),
    )
    .unwrap_err();
    assert!(e.message.contains("empty"), "{e}");
    // A spec without it writes no `prompt` key, and JSON without one reads as None.
    let json = serde_json::to_value(spec(&["x"])).unwrap();
    assert!(json.get("prompt").is_none(), "{json}");
    let back: InferSpec = serde_json::from_value(json).unwrap();
    assert_eq!(back.prompt, None);
    let with: InferSpec = serde_json::from_value(serde_json::json!({
        "target": "any", "model": "m", "deadline_ms": 1, "prompt": "p",
    }))
    .unwrap();
    assert_eq!(with.prompt.as_deref(), Some("p"));
}
