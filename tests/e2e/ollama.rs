//! Ollama's API and OpenAI's `/v1/responses` and `/v1/completions`, driven by the official
//! clients (`ollama` from PyPI and npm, `openai` from PyPI) against node C for models hosted
//! on node A; and their refusals, with in-process nodes.

use std::time::Duration;

use mesh_node::{Node, NodeIdentity};
use mesh_testnet::inprocess::{builtin_engines, loopback_config, tcp_addr};
use mesh_tests::{client_available, python_has, JoinedNode};
use serde_json::{json, Value};

const QUESTION: &str = "Name the capital of France.";

fn python() -> String {
    std::env::var("MESH_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("MESH_TEST_PYTHON is not set: run the tests with scripts/test.sh, which installs the clients")
    })
}

/// Node A hosting SmolLM2 (`smol`) and MiniLM (`minilm`), and node C serving its API on `api`.
fn models_on_a_seen_from_c(api: &str) -> (JoinedNode, JoinedNode) {
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
    let c = JoinedNode::start_on(api, &["--bootstrap", &a.addr()], &[]);
    (a, c)
}

fn api_of(node: &JoinedNode) -> String {
    node.ready["api"].as_str().expect("an API").to_string()
}

/// Mesh's own answer: `/v1/mesh/infer` on `api` with this spec, the deltas joined.
fn mesh_answer(api: &str, spec: Value) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let events = rt.block_on(crate::mesh_api::infer_events(api, &spec, |_| {}));
    assert_eq!(events.last().unwrap()["event"], "done", "{events:?}");
    crate::mesh_api::text_of(&events)
}

/// The greedy answer to `QUESTION` as a chat, in at most `max_tokens`.
fn mesh_chat_answer(api: &str, max_tokens: u32) -> String {
    mesh_answer(
        api,
        json!({ "target": "any", "model": "smol", "prompts": [QUESTION], "deadline_ms": 120_000,
                "params": { "max_tokens": max_tokens, "temperature": 0.0 } }),
    )
}

/// The greedy continuation of a raw `prompt`, without the chat template.
fn mesh_raw_answer(api: &str, prompt: &str, max_tokens: u32) -> String {
    mesh_answer(
        api,
        json!({ "target": "any", "model": "smol", "prompt": prompt, "deadline_ms": 120_000,
                "params": { "max_tokens": max_tokens, "temperature": 0.0 } }),
    )
}

/// Runs a client script; its one JSON line.
fn run(mut client: std::process::Command, a: &JoinedNode, c: &JoinedNode) -> Value {
    let out = client.output().expect("run the client");
    assert!(
        out.status.success(),
        "{}\nA: {}\nC: {}",
        String::from_utf8_lossy(&out.stderr),
        a.stderr(),
        c.stderr()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn script(name: &str) -> String {
    format!("{}/../testnet/reference/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn assert_unit_vectors_with_the_known_cosine(embed: &Value) {
    assert_eq!(embed["count"], 2, "{embed}");
    assert_eq!(embed["dims"], 384, "{embed}");
    for norm in embed["norms"].as_array().unwrap() {
        assert!((norm.as_f64().unwrap() - 1.0).abs() < 1e-3, "{embed}");
    }
    let cosine = embed["cosine"].as_f64().unwrap();
    assert!((cosine - 0.755).abs() < 0.01, "{cosine}");
}

#[test]
fn the_official_ollama_python_client_works_on_ollamas_port_for_models_elsewhere() {
    let py = python();
    if !client_available(
        python_has(&py, "ollama"),
        "the ollama Python package is not installed",
    ) {
        return;
    }
    // Ollama's own port, so that a client made without a host reaches the node.
    let (a, c) = models_on_a_seen_from_c("127.0.0.1:11434");
    let api = api_of(&c);
    assert_eq!(api, "http://127.0.0.1:11434");
    let mut client = std::process::Command::new(&py);
    client
        .args([
            &script("ollama_client_check.py"),
            &api,
            "smol",
            "minilm",
            "--default-host",
        ])
        .env_remove("OLLAMA_HOST");
    let seen = run(client, &a, &c);

    assert_eq!(seen["version"], "0.9.0");
    assert_eq!(seen["models"], json!(["minilm:latest", "smol:latest"]));
    assert_eq!(seen["default_host_models"], seen["models"]);
    assert_eq!(seen["list_details"]["smol:latest"], "llama");
    assert_eq!(seen["list_details"]["minilm:latest"], "bert");
    assert_eq!(seen["ps"][1][0], "smol:latest");
    assert!(seen["ps"][1][1].as_u64().unwrap() >= 2048, "{}", seen["ps"]);
    assert_eq!(seen["show"]["capabilities"], json!(["completion"]));
    assert_eq!(seen["show_tagged"], json!(["completion"]));
    assert_eq!(seen["show"]["family"], "llama");
    assert!(
        seen["show"]["modelinfo"]["llama.context_length"]
            .as_u64()
            .unwrap()
            >= 2048
    );

    // The greedy text is mesh's own answer, whichever way it is asked.
    let own = mesh_chat_answer(&api_of(&a), 24);
    assert!(own.contains("Paris"), "{own}");
    let chat = &seen["chat"];
    assert_eq!(chat["text"], own.as_str(), "{chat}");
    assert_eq!(seen["chat_tagged"], own.as_str());
    assert_eq!(seen["stream"]["text"], own.as_str());
    assert_eq!(seen["generate"]["text"], own.as_str());
    assert_eq!(seen["generate_stream"], own.as_str());
    assert_eq!(
        (
            &chat["role"],
            &chat["done"],
            &chat["done_reason"],
            &chat["model"]
        ),
        (
            &json!("assistant"),
            &json!(true),
            &json!("stop"),
            &json!("smol:latest")
        )
    );
    assert_eq!(chat["eval_count"], 7, "{chat}");
    assert!(chat["prompt_eval_count"].as_u64().unwrap() > 5, "{chat}");
    // Durations in nanoseconds, from the call's own measurements.
    let ns = |k: &str| chat[k].as_u64().unwrap_or_else(|| panic!("{k}: {chat}"));
    assert!(ns("eval_duration") > 1_000_000, "{chat}");
    assert!(ns("prompt_eval_duration") > 0, "{chat}");
    assert!(
        ns("total_duration") >= ns("prompt_eval_duration") + ns("eval_duration"),
        "the whole call includes the compute: {chat}"
    );
    assert_eq!(
        ns("total_duration") % 1_000_000,
        0,
        "milliseconds in nanoseconds"
    );
    let stream = &seen["stream"];
    let done = stream["done"].as_array().unwrap();
    assert!(done.len() > 2 && done[..done.len() - 1].iter().all(|d| d == false));
    assert_eq!(done.last().unwrap(), true);
    assert_eq!(
        (&stream["done_reason"], &stream["eval_count"]),
        (&json!("stop"), &json!(7))
    );

    let raw = &seen["generate_raw"];
    assert_eq!(
        raw["text"],
        mesh_raw_answer(&api_of(&a), "Count: one, two,", 3).as_str()
    );
    assert_eq!(
        (&raw["done_reason"], &raw["eval_count"]),
        (&json!("length"), &json!(3))
    );

    assert_unit_vectors_with_the_known_cosine(&seen["embed"]);
    assert_eq!(seen["embed"]["model"], "minilm:latest");
    assert!(seen["embed"]["prompt_eval_count"].as_u64().unwrap() > 0);
    assert_eq!(seen["embeddings"]["dims"], 384);
    assert!(
        seen["embeddings"]["same"].as_f64().unwrap() < 1e-5,
        "the old route, the same vector"
    );
    assert_eq!(seen["ndjson"]["content_type"], "application/x-ndjson");

    let errors = &seen["errors"];
    for (name, status) in [
        ("unknown_model", 404),
        ("unknown_show", 404),
        ("stream_unknown_model", 404),
        ("bad_temperature", 400),
        ("num_ctx_too_big", 400),
        ("embed_with_chat_model", 400),
        ("chat_with_embed_model", 400),
        ("pull", 501),
    ] {
        assert_eq!(errors[name]["status"], status, "{name}: {}", errors[name]);
    }
    assert!(errors["num_ctx_too_big"]["error"]
        .as_str()
        .unwrap()
        .contains("context length"));
    assert!(errors["bad_temperature"]["error"]
        .as_str()
        .unwrap()
        .contains("temperature"));
}

#[test]
fn the_official_ollama_javascript_client_works_for_models_elsewhere() {
    let modules = std::env::var("MESH_TEST_NODE_MODULES").ok();
    let has_it = modules
        .as_ref()
        .is_some_and(|m| std::path::Path::new(m).join("ollama").exists());
    if !client_available(has_it, "MESH_TEST_NODE_MODULES holds no ollama package") {
        return;
    }
    let (a, c) = models_on_a_seen_from_c("127.0.0.1:0");
    let mut client = std::process::Command::new("node");
    client
        .args([
            &script("ollama_client_check.cjs"),
            &api_of(&c),
            "smol",
            "minilm",
        ])
        .env("NODE_PATH", modules.unwrap());
    let seen = run(client, &a, &c);
    assert_eq!(seen["models"], json!(["minilm:latest", "smol:latest"]));
    assert_eq!(seen["ps"], seen["models"]);
    assert_eq!(seen["show"]["capabilities"], json!(["completion"]));
    let own = mesh_chat_answer(&api_of(&a), 24);
    for kind in ["chat", "stream", "generate"] {
        assert_eq!(seen[kind]["text"], own.as_str(), "{kind}: {}", seen[kind]);
    }
    assert_eq!(seen["chat"]["eval_count"], 7);
    assert_eq!(seen["stream"]["done"], true);
    assert_unit_vectors_with_the_known_cosine(&seen["embed"]);
    let errors = &seen["errors"];
    assert_eq!(errors["unknown_model"]["status"], 404, "{errors}");
    assert_eq!(
        errors["unknown_model"]["class"], "ResponseError",
        "{errors}"
    );
    assert_eq!(errors["bad_temperature"]["status"], 400, "{errors}");
    assert_eq!(errors["embed_with_chat_model"]["status"], 400, "{errors}");
}

#[test]
fn the_official_openai_client_speaks_responses_and_completions() {
    let (a, c) = models_on_a_seen_from_c("127.0.0.1:0");
    let mut client = std::process::Command::new(python());
    client.args([
        &script("openai_text_check.py"),
        &format!("{}/v1", api_of(&c)),
        "smol",
        "minilm",
    ]);
    let seen = run(client, &a, &c);
    let own = mesh_chat_answer(&api_of(&a), 24);
    let r = &seen["response"];
    assert_eq!(r["text"], own.as_str(), "{r}");
    assert_eq!(
        (&r["status"], &r["object"]),
        (&json!("completed"), &json!("response"))
    );
    assert_eq!(r["usage"]["output"], 7);
    assert_eq!(
        r["usage"]["total"].as_u64(),
        Some(r["usage"]["input"].as_u64().unwrap() + 7)
    );
    assert_eq!(seen["response_items"], own.as_str());
    let s = &seen["response_stream"];
    let types: Vec<&str> = s["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let deltas = types.len() - 8;
    assert!(deltas >= 1, "{types:?}");
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(types, expected);
    let sequence: Vec<u64> = (0..types.len() as u64).collect();
    assert_eq!(s["sequence"], json!(sequence));
    assert_eq!((&s["text"], &s["final_text"]), (&json!(own), &json!(own)));
    assert_eq!(
        (&s["status"], &s["output_tokens"]),
        (&json!("completed"), &json!(7))
    );
    assert_eq!(
        seen["response_cut"],
        json!({ "status": "incomplete", "reason": "max_output_tokens" })
    );

    let raw = mesh_raw_answer(&api_of(&a), "The capital of France is", 8);
    let cmpl = &seen["completion"];
    assert_eq!(cmpl["text"], raw.as_str(), "{cmpl}");
    assert_eq!(cmpl["object"], "text_completion");
    assert_eq!(cmpl["usage"]["completion_tokens"], 8);
    assert_eq!(cmpl["finish"], "length");
    let cs = &seen["completion_stream"];
    assert_eq!(cs["text"], raw.as_str());
    assert_eq!(cs["finish"], "length");
    // The streamed call repeats the plain one's prompt, so the node's prompt cache supplies all
    // but its last token, and says so; the counts are the same.
    let mut streamed = cs["usage"].clone();
    let details = streamed["prompt_tokens_details"].take();
    let prompt_tokens = cmpl["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(details["cached_tokens"], prompt_tokens - 1, "{details}");
    assert_eq!(cmpl["usage"]["prompt_tokens_details"], json!(null));
    streamed["prompt_tokens_details"] = json!(null);
    assert_eq!(streamed, cmpl["usage"]);

    let errors = &seen["errors"];
    for (name, status) in [
        ("responses_unknown_model", 404),
        ("responses_bad_temperature", 400),
        ("responses_with_embed_model", 400),
        ("completions_unknown_model", 404),
        ("completions_echo", 400),
        ("completions_stream_unknown", 404),
    ] {
        assert_eq!(errors[name]["status"], status, "{name}: {}", errors[name]);
    }
}

async fn node(specs: &[(&str, &str)], config: mesh_node::NodeConfig) -> Node {
    Node::start(NodeIdentity::generate(), builtin_engines(specs), config)
        .await
        .expect("node starts")
}

fn with_api(mut config: mesh_node::NodeConfig) -> mesh_node::NodeConfig {
    config.api = Some("127.0.0.1:0".parse().unwrap());
    config
}

/// POSTs `body` to `path` on `api` until the model is found (not 404); the status and body.
async fn post_found(api: std::net::SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut last = (0, Value::Null);
    for _ in 0..50 {
        let resp = http
            .post(format!("http://{api}{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        last = (resp.status().as_u16(), resp.json().await.unwrap());
        if last.0 != 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

fn chat_body(model: &str) -> Value {
    json!({ "model": model, "stream": false, "messages": [{ "role": "user", "content": "a b c d e f" }] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_get_ollamas_and_openais_statuses() {
    use mesh_node::auth::{Access, AccessConfig};
    let mut closed = loopback_config(vec![]);
    closed.serve.access = AccessConfig {
        default: Access::Allow,
        ..Default::default()
    };
    let locked = node(&[("locked", "echo")], closed).await;
    let boot = vec![tcp_addr(&locked).await];
    let mut hasty = loopback_config(boot.clone());
    hasty.serve.max_deadline = Duration::from_secs(1);
    let hasty = node(&[("slow", "echo?delay_ms=400")], hasty).await;
    let mut busy = with_api(loopback_config(boot.clone()));
    busy.serve.max_queue = 0;
    let busy = node(&[("busy", "echo?delay_ms=300")], busy).await;
    let c = node(&[], with_api(loopback_config(boot))).await;
    let api = c.api_addr().unwrap();

    let (status, body) = post_found(api, "/api/chat", chat_body("locked")).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("allow list"),
        "{body}"
    );
    let prompt = json!({ "model": "locked", "prompt": "hi" });
    assert_eq!(
        post_found(api, "/api/generate", prompt.clone()).await.0,
        403
    );
    assert_eq!(post_found(api, "/v1/completions", prompt).await.0, 403);
    let (status, body) = post_found(
        api,
        "/v1/responses",
        json!({ "model": "locked", "input": "hi" }),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["type"], "permission_error");

    // 7 tokens at 400 ms each: longer than the provider's 1 s limit.
    let (status, body) = post_found(api, "/api/chat", chat_body("slow")).await;
    assert_eq!(status, 504, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("deadline"),
        "{body}"
    );

    let (status, body) = post_found(api, "/api/chat", chat_body("nothing-here")).await;
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().unwrap().contains("nothing-here"),
        "{body}"
    );

    // Two slots, no queue: a third call at once is refused.
    let b_api = busy.api_addr().unwrap();
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(post_found(b_api, "/api/chat", chat_body("busy"))))
        .collect();
    while busy.server().load() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = post_found(
        b_api,
        "/api/generate",
        json!({ "model": "busy", "prompt": "x", "stream": false }),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        body.as_object().unwrap().len(),
        1,
        "only Ollama's error: {body}"
    );
    for h in held {
        let (status, body) = h.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["message"]["content"], "echo: a b c d e f");
        assert_eq!(body["done_reason"], "stop");
    }
    for n in [c, busy, hasty, locked] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_and_x_mesh_token_guard_ollamas_routes_too() {
    use mesh_node::auth::token::{issue, TokenRequest};
    use mesh_node::auth::{unix_now, Access, AccessConfig};
    let owner = NodeIdentity::generate();
    let mut config = loopback_config(vec![]);
    config.serve.access = AccessConfig {
        default: Access::Token,
        ..Default::default()
    };
    let a = Node::start(owner.clone(), builtin_engines(&[("paid", "echo")]), config)
        .await
        .unwrap();
    let mut gateway = with_api(loopback_config(vec![tcp_addr(&a).await]));
    gateway.api_key = Some("s3cret".into());
    let c = node(&[], gateway).await;
    let api = c.api_addr().unwrap();
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("http://{api}/api/tags"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("API key"),
        "{body}"
    );

    let now = unix_now();
    let token = issue(
        &owner,
        &TokenRequest {
            subject: c.peer_id(),
            models: vec!["paid".into()],
            not_before: now - 60,
            expires: now + 600,
            max_requests: None,
        },
    )
    .unwrap()
    .to_text();
    let body = json!({ "model": "paid:latest", "prompt": "hi", "stream": false });
    let send = |token: Option<&str>| {
        let mut req = http
            .post(format!("http://{api}/api/generate"))
            .header("authorization", "Bearer s3cret")
            .json(&body);
        if let Some(t) = token {
            req = req.header("X-Mesh-Token", t);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let mut last = (0, Value::Null);
    for _ in 0..50 {
        last = send(None).await;
        if last.0 != 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last.0, 403, "{}", last.1);
    assert!(
        last.1["error"].as_str().unwrap().contains("no token"),
        "{}",
        last.1
    );
    let (status, answer) = send(Some(&token)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], "echo: hi");
    assert_eq!(answer["model"], "paid:latest");
    assert_eq!(send(Some("mtk1.nope")).await.0, 400);
    for n in [c, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_an_ndjson_stream_cancels_the_remote_generation() {
    use futures::StreamExt;
    // 21 tokens at 200 ms each: about 4 s if nobody stops it.
    let a = node(
        &[("slow", "echo?delay_ms=200")],
        with_api(loopback_config(vec![])),
    )
    .await;
    let c = node(&[], with_api(loopback_config(vec![tcp_addr(&a).await]))).await;
    let url = format!("http://{}/api/chat", c.api_addr().unwrap());
    let body = json!({ "model": "slow:latest",
                       "messages": [{ "role": "user", "content": "w ".repeat(20) }] });
    let http = reqwest::Client::new();
    let mut response = None;
    for _ in 0..50 {
        let r = http.post(&url).json(&body).send().await.unwrap();
        if r.status() == 200 {
            response = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let response = response.expect("the node reached the model");
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut lines = response.bytes_stream();
    let first = lines.next().await.expect("a first line").unwrap();
    let first: Value = serde_json::from_slice(&first).expect("one JSON object per line");
    assert_eq!(first["done"], false, "{first}");
    assert_eq!(first["message"]["role"], "assistant");
    assert_eq!(a.server().load(), 1, "the generation runs on A");
    let hung_up = std::time::Instant::now();
    drop(lines);
    while a.server().load() > 0 {
        assert!(
            hung_up.elapsed() < Duration::from_secs(2),
            "A still generates {:?} after the client hung up",
            hung_up.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in [c, a] {
        n.shutdown().await;
    }
}
