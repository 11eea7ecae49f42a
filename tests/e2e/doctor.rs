//! `mesh doctor` against real `mesh join` processes: every problem it claims to find is
//! provoked (a key others can read, a corrupt model file, an API off loopback) and found,
//! with its fix and the exit status; `mesh doctor PEER_ID` explains a peer's path. (A node
//! behind the lab's symmetric NAT is checked in the NAT lab, testnet/natlab.sh.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use mesh_tests::{mesh_bin, stderr, stdout, JoinedNode};
use serde_json::Value;

fn doctor(home: &str, models: &Path, extra: &[&str]) -> Output {
    Command::new(mesh_bin())
        .arg("doctor")
        .args(["--home", home])
        .args(extra)
        .env("MESH_MODELS", models)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mesh doctor")
}

/// The checks of a `--json` run, by area.
fn checks(out: &Output) -> Vec<Value> {
    let line: Value = serde_json::from_str(stdout(out).trim())
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(out), stderr(out)));
    line["checks"].as_array().unwrap().clone()
}

fn check<'a>(checks: &'a [Value], area: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["area"] == area)
        .unwrap_or_else(|| panic!("no {area} check in {checks:#?}"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn doctor_finds_each_problem_it_claims_and_says_how_to_fix_it() {
    // A private models directory with a real model in it, to corrupt.
    let models = tempfile::tempdir().unwrap();
    let smol = "smollm2-135m-instruct";
    copy_dir(
        &mesh_tests::models_dir().join(smol),
        &models.path().join(smol),
    );
    let env = [("MESH_MODELS", models.path().to_str().unwrap())];
    // The API on every interface (with its key), as a careless operator would serve it.
    let a = JoinedNode::start_on(
        "0.0.0.0:0",
        &["--api-key", "doctor-key", "--model", "echo=builtin:echo"],
        &env,
    );
    let b = JoinedNode::start(&["--bootstrap", &a.addr()]);
    let home = a.home_dir();

    let out = doctor(&home, models.path(), &["--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let found = checks(&out);
    let api = check(&found, "api");
    assert_eq!(api["verdict"], "warn", "{api}");
    assert!(
        api["summary"].as_str().unwrap().contains("every interface"),
        "{api}"
    );
    assert!(
        api["fix"].as_str().unwrap().contains("--api 127.0.0.1:"),
        "{api}"
    );
    assert_eq!(check(&found, "key")["verdict"], "ok");
    assert_eq!(check(&found, "home")["verdict"], "ok");
    assert_eq!(check(&found, &format!("model {smol}"))["verdict"], "ok");
    let b_short = format!(
        "peer {}…{}",
        &b.peer_id()[..8],
        &b.peer_id()[b.peer_id().len() - 6..]
    );
    let peer = check(&found, &b_short);
    assert!(
        peer["summary"].as_str().unwrap().starts_with("direct"),
        "{peer}"
    );

    // Provoked: the key readable by others, one byte of the model changed.
    let key = Path::new(&home).join("node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let weights = models
        .path()
        .join(smol)
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();

    let out = doctor(&home, models.path(), &["--json"]);
    assert_eq!(out.status.code(), Some(1), "a failed check exits 1");
    let found = checks(&out);
    let key_check = check(&found, "key");
    assert_eq!(key_check["verdict"], "fail");
    assert!(
        key_check["summary"].as_str().unwrap().contains("mode 644"),
        "{key_check}"
    );
    assert_eq!(
        key_check["fix"],
        format!(
            "chmod 600 {}; if others may have copied it, move it away for a new identity",
            key.display()
        )
    );
    let model = check(&found, &format!("model {smol}"));
    assert_eq!(model["verdict"], "fail");
    assert!(
        model["summary"].as_str().unwrap().contains("sha256"),
        "{model}"
    );
    assert!(model["fix"]
        .as_str()
        .unwrap()
        .contains(&format!("mesh model fetch {smol}")));

    // The screen: a verdict, the area, what was found, and the fix under it.
    // Warnings: the API's, and the clock's where NTP does not keep it (machines differ).
    let warns = found.iter().filter(|c| c["verdict"] == "warn").count();
    let out = doctor(&home, models.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let screen = stdout(&out);
    assert!(screen.contains("FAIL  key "), "{screen}");
    assert!(screen.contains("fix: chmod 600 "), "{screen}");
    assert!(screen.contains("warn  api "), "{screen}");
    let summary = format!("\n2 problem(s), {warns} warning(s)");
    assert!(screen.contains(&summary), "{summary:?} not in {screen}");

    // One peer: why calls to it take their path.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = doctor(&home, models.path(), &[&b.peer_id(), "--json"]);
    let found = checks(&out);
    let why = check(&found, &b_short);
    assert_eq!(why["verdict"], "ok", "{why}");
    assert!(
        why["summary"]
            .as_str()
            .unwrap()
            .contains("calls go straight to it"),
        "{why}"
    );
    // A peer that is nowhere: connecting fails, and the doctor says so.
    let stranger = mesh_node::NodeIdentity::generate().peer_id().to_string();
    let out = doctor(&home, models.path(), &[&stranger, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let gone = check(
        &checks(&out),
        &format!(
            "peer {}…{}",
            &stranger[..8],
            &stranger[stranger.len() - 6..]
        ),
    )
    .clone();
    assert_eq!(gone["verdict"], "fail", "{gone}");
    let out = doctor(&home, models.path(), &["not-a-peer"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));

    // No node running: the local checks still run; the network ones say what is missing.
    let idle = tempfile::tempdir().unwrap();
    let out = doctor(
        idle.path().join("h").to_str().unwrap(),
        models.path(),
        &["--json"],
    );
    let found = checks(&out);
    assert_eq!(check(&found, "node")["verdict"], "warn");
    drop(b);
}
