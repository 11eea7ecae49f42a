//! A model served by a real OpenAI-compatible server (llama-cpp-python's, running SmolLM2),
//! hosted on the mesh by node A with `--model NAME=openai+http://…`, and called from node C:
//! through `mesh infer` and through C's OpenAI gateway, streaming.
//!
//! The server comes from PyPI (`llama-cpp-python[server]`, which builds llama.cpp);
//! `scripts/test.sh` installs it once per machine and sets `MESH_LLAMA_PYTHON`. Without it this
//! test says why it cannot run and passes, except in CI (`CI` set), where that is a failure.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::{mesh, models_dir, stdout, JoinedNode};
use serde_json::{json, Value};

/// llama-cpp-python's server, killed when dropped.
struct LlamaServer {
    child: Child,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl LlamaServer {
    fn start(python: &str) -> LlamaServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let gguf = models_dir().join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&gguf)
            .args(["--model_alias", "smollm2-upstream", "--host", "127.0.0.1"])
            .args([
                "--port",
                &port.to_string(),
                "--n_threads",
                "2",
                "--n_ctx",
                "2048",
            ])
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start llama_cpp.server");
        let server = LlamaServer { child, port, log };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "llama_cpp.server did not listen within 90 s:\n{}",
                std::fs::read_to_string(server.log.path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mesh infer --json` through node `via` to `smol-up` on `host`.
fn infer_through(via: &JoinedNode, host: &JoinedNode, prompt: &str) -> std::process::Output {
    mesh(&[
        "infer",
        "--json",
        "--home",
        &via.home_dir(),
        &host.peer_id(),
        "smol-up",
        "--prompt",
        prompt,
        "--max-tokens",
        "24",
    ])
}

fn llama_python() -> Option<String> {
    let python = std::env::var("MESH_LLAMA_PYTHON").ok()?;
    let works = Command::new(&python)
        .args(["-c", "import llama_cpp.server"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    works.then_some(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_on_a_local_openai_server_is_served_across_the_mesh() {
    let Some(python) = llama_python() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must test upstream models, but MESH_LLAMA_PYTHON has no llama_cpp.server"
        );
        eprintln!("SKIPPED: set MESH_LLAMA_PYTHON to a python with llama-cpp-python[server] (scripts/test.sh does)");
        return;
    };
    let server = LlamaServer::start(&python);
    let upstream = format!(
        "smol-up=openai+http://127.0.0.1:{}/v1#smollm2-upstream",
        server.port
    );
    let a = JoinedNode::start(&["--model", &upstream]);
    let c = JoinedNode::start(&["--bootstrap", &a.addr()]);

    // 1. `mesh infer` on C's node to A's upstream model: streamed in several deltas.
    let out = infer_through(&c, &a, "Name the capital of France.");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", a.stderr());
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "delta")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert!(deltas.len() > 2, "the answer should stream: {deltas:?}");
    assert!(deltas.concat().contains("Paris"), "{deltas:?}");
    let done = events.iter().find(|e| e["event"] == "done").expect("done");
    assert!(
        done["usage"]["completion_tokens"].as_u64().unwrap() > 2,
        "{done}"
    );
    // llama-cpp-python sends no usage when streaming: completion tokens are the deltas counted,
    // prompt tokens stay unknown (0).
    assert_eq!(
        done["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        deltas.len(),
        "{done}"
    );

    // 2. C's OpenAI gateway, streaming, parsed as server-sent events.
    let api = c.ready["api"].as_str().unwrap().to_string();
    let body = reqwest::Client::new()
        .post(format!("{api}/v1/chat/completions"))
        .json(&json!({
            "model": "smol-up",
            "stream": true,
            "max_tokens": 24,
            "temperature": 0,
            "messages": [{ "role": "user", "content": "Name the capital of France." }],
        }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(streamed.contains("Paris"), "{body}");

    // 3. The upstream goes away: a clear error, and A keeps serving (its status answers).
    drop(server);
    let out = infer_through(&c, &a, "Hello");
    assert!(!out.status.success());
    assert!(stdout(&out).contains("upstream"), "{}", stdout(&out));
    let a_api = a.ready["api"].as_str().unwrap();
    let status = reqwest::get(format!("{a_api}/v1/mesh/status"))
        .await
        .unwrap();
    assert!(status.status().is_success());
}

#[test]
fn a_wrong_upstream_address_stops_join_with_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let out = mesh(&[
        "join",
        "--home",
        home.path().to_str().unwrap(),
        "--no-mdns",
        "--api",
        "127.0.0.1:0",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--model",
        "x=openai+http://127.0.0.1:9/v1",
    ]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = mesh_tests::stderr(&out);
    assert!(
        err.contains("cannot reach http://127.0.0.1:9/v1/models"),
        "{err}"
    );
}
