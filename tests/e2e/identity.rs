//! `mesh id`: key creation, permissions, refusal of readable keys.

use std::os::unix::fs::PermissionsExt;

use mesh_tests::{mesh, stderr, stdout};

#[test]
fn id_creates_a_private_key_and_prints_a_stable_peer_id() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("h");
    let dir_s = dir.to_str().unwrap();

    let first = mesh(&["id", "--home", dir_s]);
    assert!(first.status.success(), "{}", stderr(&first));
    let peer_id = stdout(&first);
    assert!(peer_id.starts_with("12D3KooW"), "{peer_id}");

    let key = dir.join("node.key");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir), 0o700);

    let json = mesh(&["id", "--home", dir_s, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(v["peer_id"], peer_id.as_str());
}

#[test]
fn a_key_others_can_read_is_refused_with_the_fix() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("h");
    let dir_s = dir.to_str().unwrap();
    assert!(mesh(&["id", "--home", dir_s]).status.success());
    let key = dir.join("node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();

    let out = mesh(&["id", "--home", dir_s]);
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);
    assert!(err.contains("chmod 600"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
}

#[test]
fn mesh_home_env_is_honoured() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(mesh_tests::mesh_bin())
        .arg("id")
        .env("MESH_HOME", home.path().join("env-home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(home.path().join("env-home/node.key").exists());
}
