//! Helpers for the end-to-end tests: finding and running the real `mesh` binary.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `mesh` binary built in this workspace's target directory (or `$MESH_BIN`).
///
/// `scripts/test.sh` builds it before the tests run.
pub fn mesh_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/mesh
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("mesh"))
        .expect("target directory layout");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p mesh-cli` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Runs `mesh` with `args` to completion.
pub fn mesh(args: &[&str]) -> Output {
    Command::new(mesh_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mesh")
}

/// Runs `mesh infer` with its own `home`, reaching the mesh through `bootstrap` (no mDNS).
pub fn infer_via(home: &std::path::Path, bootstrap: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "infer",
        "--home",
        home.to_str().expect("a UTF-8 path"),
        "--bootstrap",
        bootstrap,
        "--no-mdns",
    ];
    args.extend_from_slice(extra);
    mesh(&args)
}

/// Stdout as text, trimmed.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Stderr as text, trimmed.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// A `mesh join` process, stopped with SIGTERM (and reaped) when dropped.
pub struct JoinedNode {
    pub child: std::process::Child,
    pub home: tempfile::TempDir,
    /// The `ready` line it printed.
    pub ready: serde_json::Value,
    /// Its stderr, kept in a file for failure messages.
    pub log: PathBuf,
}

impl JoinedNode {
    /// Starts `mesh join --json` with `args` on loopback and waits (up to 30 s) for `ready`.
    pub fn start(args: &[&str]) -> JoinedNode {
        Self::start_with_env(args, &[])
    }

    /// Like [`JoinedNode::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> JoinedNode {
        Self::start_on("127.0.0.1:0", args, env)
    }

    /// Like [`JoinedNode::start_with_env`], serving the API on `api` (`--api`, e.g. Ollama's
    /// `127.0.0.1:11434`).
    pub fn start_on(api: &str, args: &[&str], env: &[(&str, &str)]) -> JoinedNode {
        use std::io::BufRead;
        let home = tempfile::tempdir().expect("tempdir");
        let log = home.path().join("stderr.log");
        let mut child = Command::new(mesh_bin())
            .arg("join")
            .arg("--json")
            .args(["--home", home.path().join("h").to_str().unwrap()])
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
                "--api",
                api,
            ])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn mesh join");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Keep draining so the node never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "mesh join printed no ready line; stderr:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready is JSON");
        assert_eq!(ready["event"], "ready", "{line}");
        JoinedNode {
            child,
            home,
            ready,
            log,
        }
    }

    pub fn peer_id(&self) -> String {
        self.ready["peer_id"].as_str().expect("peer_id").to_string()
    }

    /// Its first listen address, with `/p2p/`.
    pub fn addr(&self) -> String {
        self.ready["listen_addrs"][0]
            .as_str()
            .expect("a listen address")
            .to_string()
    }

    /// The port of its API (from the `ready` line's `http://ADDR`).
    pub fn api_port(&self) -> u16 {
        let api = self.ready["api"].as_str().expect("api");
        api.rsplit(':').next().unwrap().parse().expect("a port")
    }

    pub fn home_dir(&self) -> String {
        self.home.path().join("h").to_str().unwrap().to_string()
    }

    /// Sends SIGTERM and waits up to 10 s for a clean exit; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(10) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for JoinedNode {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Where `scripts/test.sh` fetched the real models (`$MESH_MODELS`).
///
/// The real-model tests fail loudly without them: CI must never skip them silently.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("MESH_MODELS").map(PathBuf::from).unwrap_or_else(|| {
        panic!("MESH_MODELS is not set: run the tests with scripts/test.sh, which fetches the models")
    });
    for known in ["smollm2-135m-instruct", "all-minilm-l6-v2"] {
        assert!(
            dir.join(known).exists(),
            "{known} is not in {}: run `mesh model fetch all` (scripts/test.sh does)",
            dir.display()
        );
    }
    dir
}

/// Whether a client test can run: `available`, or else a skip with `why` — except in CI (the
/// `CI` variable set), where a missing client is a failure, never a silent skip.
pub fn client_available(available: bool, why: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run this client check, but {why}"
    );
    eprintln!("SKIPPED: {why} (scripts/test.sh installs it)");
    false
}

/// True when `python` can import `module`.
pub fn python_has(python: &str, module: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One HTTP/1.1 request over a fresh loopback connection to `port`, with exactly the
/// headers given (so `Host` and `Origin` can be anything): the status and the body.
pub fn raw_http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        request.push_str("content-type: application/json\r\n");
    }
    request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// Runs `mesh join` (with `args` after `join`) expecting it to fail at startup: waits up to
/// 60 s for it to exit and returns its exit code and stderr.
pub fn join_fails(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(mesh_bin())
        .arg("join")
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn mesh join");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mesh join {args:?} did not fail; stderr:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    (
        status.code(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}
