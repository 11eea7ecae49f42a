//! The OpenAI-compatible gateway of node C, driven by the official OpenAI clients for Python
//! and JavaScript, for models hosted on node A.

use mesh_tests::JoinedNode;

/// The Python with the `openai` package that scripts/test.sh prepares (`$MESH_TEST_PYTHON`).
fn python() -> String {
    std::env::var("MESH_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("MESH_TEST_PYTHON is not set: run the tests with scripts/test.sh, which installs the OpenAI client")
    })
}

/// Node A hosting SmolLM2 (`smol`) and MiniLM (`minilm`), and node C, whose gateway is used.
fn smol_and_minilm_behind_a_gateway() -> (JoinedNode, JoinedNode) {
    let models = mesh_tests::models_dir();
    let a = JoinedNode::start_with_env(
        &[
            "--model",
            "smol=smollm2-135m-instruct",
            "--model",
            "minilm=all-minilm-l6-v2",
        ],
        &[("MESH_MODELS", models.to_str().unwrap())],
    );
    let c = JoinedNode::start(&["--bootstrap", &a.addr()]);
    (a, c)
}

/// Runs a client check script and checks what every client must have seen: both models, and
/// greedy chat and streamed chat answering "Paris" in 7 tokens. Returns the rest of its report.
fn what_the_client_saw(
    mut client: std::process::Command,
    a: &JoinedNode,
    c: &JoinedNode,
) -> serde_json::Value {
    let out = client.output().expect("run the client");
    assert!(
        out.status.success(),
        "{}\nA: {}\nC: {}",
        String::from_utf8_lossy(&out.stderr),
        a.stderr(),
        c.stderr()
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["models"], serde_json::json!(["minilm", "smol"]));
    for kind in ["chat", "stream"] {
        let text = seen[kind]["text"].as_str().unwrap();
        assert!(text.contains("Paris"), "{kind}: {text:?}");
        assert_eq!(seen[kind]["finish"], "stop", "{kind}");
        assert_eq!(seen[kind]["usage"]["completion_tokens"], 7, "{kind}");
    }
    seen
}

#[test]
fn the_official_openai_client_works_against_the_gateway() {
    let (a, c) = smol_and_minilm_behind_a_gateway();
    let api = c.ready["api"]
        .as_str()
        .expect("C serves an API")
        .to_string();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testnet/reference/openai_client_check.py"
    );
    let mut client = std::process::Command::new(python());
    client.args([script, &format!("{api}/v1"), "smol", "minilm"]);
    let seen = what_the_client_saw(client, &a, &c);
    assert_eq!(
        seen["chat"]["text"], seen["stream"]["text"],
        "streamed = not streamed (greedy)"
    );
    assert_eq!(seen["sse"]["content_type"], "text/event-stream");
    assert_eq!(seen["embeddings"]["dims"], 384);
    assert_eq!(seen["embeddings"]["batch"], 2);
    let cosine = seen["embeddings"]["cosine"].as_f64().unwrap();
    assert!((cosine - 0.755).abs() < 0.01, "{cosine}");

    let errors = &seen["errors"];
    assert_eq!(errors["unknown_model"]["status"], 404);
    for bad in [
        "bad_temperature",
        "embed_with_chat_model",
        "chat_with_embed_model",
        "empty_messages",
    ] {
        assert_eq!(errors[bad]["status"], 400, "{bad}: {}", errors[bad]);
        assert_eq!(errors[bad]["type"], "invalid_request_error", "{bad}");
    }
}

/// `node` and the directory holding the `openai` npm package that scripts/test.sh installs
/// (`$MESH_TEST_NODE_MODULES`).
fn node_modules() -> Option<String> {
    std::env::var("MESH_TEST_NODE_MODULES").ok()
}

#[test]
fn the_official_javascript_client_works_against_the_gateway() {
    let Some(modules) = node_modules() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the JavaScript client check, but MESH_TEST_NODE_MODULES is not set"
        );
        eprintln!("SKIPPED: MESH_TEST_NODE_MODULES is not set (scripts/test.sh sets it when node and npm exist)");
        return;
    };
    let (a, c) = smol_and_minilm_behind_a_gateway();
    let api = c.ready["api"]
        .as_str()
        .expect("C serves an API")
        .to_string();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testnet/reference/openai_client_check.cjs"
    );
    let mut client = std::process::Command::new("node");
    client
        .args([script, &format!("{api}/v1"), "smol", "minilm"])
        .env("NODE_PATH", &modules);
    let seen = what_the_client_saw(client, &a, &c);
    assert_eq!(seen["chat"]["text"], seen["stream"]["text"]);
    assert_eq!(seen["embeddings"]["batch"], 2);
    assert_eq!(seen["embeddings"]["dims"], 384);
    let cosine = seen["embeddings"]["cosine"].as_f64().unwrap();
    assert!((cosine - 0.755).abs() < 0.01, "{cosine}");
    let errors = &seen["errors"];
    assert_eq!(errors["unknown_model"]["status"], 404, "{errors}");
    assert_eq!(
        errors["unknown_model"]["class"], "NotFoundError",
        "{errors}"
    );
    for bad in ["bad_temperature", "embed_with_chat_model"] {
        assert_eq!(errors[bad]["status"], 400, "{bad}: {}", errors[bad]);
        assert_eq!(errors[bad]["class"], "BadRequestError", "{bad}");
    }
}
