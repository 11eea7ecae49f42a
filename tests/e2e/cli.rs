//! `mesh` processes driven by the CLI: join, infer, models, peers, exit codes.

use mesh_tests::{mesh, stderr, stdout, JoinedNode};

/// Runs `mesh infer` from a fresh home against the mesh reached through `bootstrap`.
fn infer(bootstrap: &str, extra: &[&str]) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    mesh_tests::infer_via(&home.path().join("c"), bootstrap, extra)
}

#[test]
fn three_processes_find_and_call_a_model_through_the_dht() {
    let b = JoinedNode::start(&[]);
    let a = JoinedNode::start(&["--bootstrap", &b.addr(), "--model", "echo=builtin:echo"]);
    assert_eq!(a.ready["models"], serde_json::json!(["echo"]));

    // C knows only B. The provider record may take a moment to land on B: retry briefly.
    let mut out = infer(&b.addr(), &["any", "echo", "--prompt", "across the mesh"]);
    for _ in 0..20 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        out = infer(&b.addr(), &["any", "echo", "--prompt", "across the mesh"]);
    }
    assert!(out.status.success(), "{}\nA: {}", stderr(&out), a.stderr());
    assert_eq!(stdout(&out), "echo: across the mesh");
    assert!(stderr(&out).contains(&a.peer_id()), "{}", stderr(&out));

    // --json: frames as lines, then a final line with usage, timings and the path.
    let out = infer(
        &b.addr(),
        &[&a.peer_id(), "echo", "--prompt", "json please", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        ["connected", "started", "delta", "delta", "delta", "done"]
    );
    let done = lines.last().unwrap();
    assert_eq!(done["path"], "direct");
    assert_eq!(done["usage"]["completion_tokens"], 3);
    assert!(done["total_ms"].is_u64() && done["time_to_first_byte_ms"].is_u64());

    // `mesh models` lists it with its host.
    let home = tempfile::tempdir().unwrap();
    let out = mesh(&[
        "models",
        "--home",
        home.path().join("m").to_str().unwrap(),
        "--bootstrap",
        &b.addr(),
        "--no-mdns",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let row: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(row["model"], "echo");
    assert_eq!(row["peer_id"], a.peer_id().as_str());

    // With no --bootstrap, `mesh models` asks the node running with that home, through its
    // API (GET /v1/mesh/models), which lists its own models too.
    let out = mesh(&["models", "--home", &a.home_dir(), "--no-mdns", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let row: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(row["model"], "echo", "{}", stdout(&out));
    assert_eq!(row["peer_id"], a.peer_id().as_str());
    assert_eq!(row["card"]["architecture"], "builtin-echo");

    // `mesh peers` asks the running node through its API.
    let out = mesh(&["peers", "--home", &a.home_dir(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&b.peer_id()), "{}", stdout(&out));

    // `mesh infer` with no bootstrap goes through the node running with that home.
    let out = mesh(&[
        "infer",
        "--home",
        &a.home_dir(),
        "any",
        "echo",
        "--prompt",
        "local",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(r#""path":"local""#),
        "{}",
        stdout(&out)
    );

    // `mesh status`: one screen about the running node, and the same as one JSON object.
    let out = mesh(&["status", "--home", &a.home_dir(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(status["peer_id"], a.peer_id().as_str());
    assert!(
        status["peers_by_path"]["direct"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert_eq!(status["model_loads"][0]["model"], "echo", "{status}");
    assert_eq!(status["model_loads"][0]["busy"], 0);
    // The three calls answered above: two from client nodes, one through this node's API.
    let answered = status["served_last_minute"]["answered"].as_u64().unwrap();
    assert!(answered >= 3, "{status}");
    assert_eq!(status["network"]["dht"]["own_keys"], 1, "{status}");
    let out = mesh(&["status", "--home", &a.home_dir()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let screen = stdout(&out);
    for line in [
        format!("node      {}", a.peer_id()),
        "model     echo".to_string(),
        format!("served    last minute: {answered} answered"),
        "peers     ".to_string(),
        "reach     ".to_string(),
    ] {
        assert!(screen.contains(&line), "{line:?} missing from:\n{screen}");
    }

    // The inspector from the command line: capture on, a call, `mesh calls`, `mesh replay`.
    let home = a.home_dir();
    let out = mesh(&["capture", "on", "--home", &home]);
    assert!(stdout(&out).starts_with("capture on"), "{}", stderr(&out));
    let out = mesh(&["infer", "--home", &home, "any", "echo", "--prompt", "again"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = mesh(&["calls", "--home", &home, "--json"]);
    let list: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(list["capture"], true);
    let newest = &list["calls"][0];
    assert_eq!(
        (newest["direction"].as_str(), newest["state"].as_str()),
        (Some("out"), Some("answered"))
    );
    let captured = newest["id"].as_u64().unwrap().to_string();
    // The `local` call above was made with capture off: not replayable, and why.
    let uncaptured = list["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["direction"] == "out" && c.get("capture").is_none())
        .expect("the call made before capture was on")["id"]
        .to_string();
    let out = mesh(&["replay", &captured, "--home", &home, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let done: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["peer"], a.peer_id().as_str());
    let out = mesh(&["replay", &uncaptured, "--home", &home]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("capture off"), "{}", stderr(&out));
    let out = mesh(&["replay", "999999", "--home", &home]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = mesh(&["calls", "--home", &home]);
    let screen = stdout(&out);
    assert!(screen.starts_with("capture on;"), "{screen}");
    assert!(screen.contains("[captured]"), "{screen}");
}

#[test]
fn infer_failures_have_their_own_exit_codes_and_one_line_messages() {
    let a = JoinedNode::start(&[
        "--model",
        "echo=builtin:echo",
        "--model",
        "slow=builtin:echo?delay_ms=500",
    ]);
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &[
                "any",
                "slow",
                "--prompt",
                "a b c d e f g h",
                "--timeout",
                "1",
            ],
            8,
            "--timeout",
        ),
        (
            &["any", "no-such-model", "--prompt", "x"],
            3,
            "unknown_model",
        ),
        (
            &[&a.peer_id(), "no-such-model", "--prompt", "x"],
            3,
            "does not host",
        ),
        (
            &["any", "echo", "--prompt", "x", "--temperature", "-1"],
            6,
            "temperature",
        ),
        (
            &["any", "echo", "--prompt", "x", "--max-tokens", "0"],
            6,
            "max_tokens",
        ),
        (&["any", "echo", "--prompt", "   "], 6, "empty"),
        (&["not-a-peer", "echo", "--prompt", "x"], 6, "not a peer id"),
    ];
    for (args, code, needle) in cases {
        let out = infer(&a.addr(), args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("mesh: error:") && last.contains(needle),
            "{args:?}: {err}"
        );
    }
    // Nothing answers at this address: a network failure, exit 7.
    let out = infer(
        "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWRs2hfKDHDVSEXcK47mGkNYrZ1S7kBT4J8orokGPqi5cP",
        &["any", "echo", "--prompt", "x"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
}

#[test]
fn join_refuses_bad_models_and_stops_cleanly_on_sigterm() {
    let home = tempfile::tempdir().unwrap();
    let out = mesh(&[
        "join",
        "--home",
        home.path().join("h").to_str().unwrap(),
        "--no-mdns",
        "--model",
        "x=builtin:gpt-9",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown built-in model"),
        "{}",
        stderr(&out)
    );

    let out = mesh(&["join", "--model", "=no-name"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    // A name alone is a model in the cache; none of that name is a clear load error.
    let out = mesh(&["join", "--model", "not-in-the-cache"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no model of that name in the cache"),
        "{}",
        stderr(&out)
    );

    let mut a = JoinedNode::start(&["--model", "echo=builtin:echo"]);
    let runtime = std::path::Path::new(&a.home_dir()).join("node.json");
    assert!(runtime.exists());
    assert!(a.stop(), "clean exit on SIGTERM: {}", a.stderr());
    assert!(!runtime.exists(), "node.json removed on shutdown");
}

#[test]
fn infer_into_a_closed_pipe_ends_quietly() {
    let a = JoinedNode::start(&["--model", "echo=builtin:echo"]);
    let home = tempfile::tempdir().unwrap();
    // The reader of stdout is gone before the first delta is written, as with `| head -c 0`.
    let mut child = std::process::Command::new(mesh_tests::mesh_bin())
        .args([
            "infer",
            "--home",
            home.path().join("c").to_str().unwrap(),
            "--bootstrap",
            &a.addr(),
            "--no-mdns",
            &a.peer_id(),
            "echo",
            "--prompt",
            "words nobody reads",
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run mesh");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}
