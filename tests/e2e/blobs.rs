//! Model files over the mesh (`/mesh/blob/1`, `mesh model pull`) with real processes and the
//! real SmolLM2 file (98 MB): two sources at once, a source killed mid-pull, a pull killed and
//! resumed, a source that sends corrupted pieces (built from the protocol crate), a token
//! node that sends nothing without a token, and bad requests that change nothing.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use futures::AsyncWriteExt;
use mesh_node::blobs::fetch::{fetch_run, FetchError, PieceRun};
use mesh_node::wire::{read_frame, write_frame};
use mesh_protocol::blob::{BlobRequest, BlobResponse, BLOB_VERSION};
use mesh_protocol::frame::DEFAULT_MAX_FRAME_LEN;
use mesh_protocol::ErrorCode;
use mesh_tests::{mesh, mesh_bin, stderr, stdout, JoinedNode};
use serde_json::Value;

const SMOL: &str = "smollm2-135m-instruct";
const SMOL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn smol_path() -> std::path::PathBuf {
    mesh_tests::models_dir().join(SMOL).join(SMOL_FILE)
}

fn smol_sha256() -> &'static str {
    mesh_node::models::find_known(SMOL).unwrap().files[0].sha256
}

/// A `mesh join` hosting SmolLM2 as `smol`, with `extra` flags.
fn host(extra: &[&str]) -> JoinedNode {
    let mut args = vec!["--model", "smol=smollm2-135m-instruct"];
    args.extend_from_slice(extra);
    JoinedNode::start(&args)
}

/// `mesh model pull smol` into an empty models directory, through `bootstrap`.
fn pull(models: &Path, home: &Path, bootstrap: &str, extra: &[&str]) -> Child {
    Command::new(mesh_bin())
        .args([
            "model",
            "pull",
            "smol",
            "--json",
            "--no-mdns",
            "--bootstrap",
            bootstrap,
        ])
        .args(["--home", home.to_str().unwrap()])
        .args(extra)
        .env("MESH_MODELS", models)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mesh model pull")
}

/// Reads the pull's JSON lines until one passes `stop` (true: stop reading), or to the end.
fn lines_until(child: &mut Child, mut stop: impl FnMut(&Value) -> bool) -> Vec<Value> {
    let out = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let done = stop(&value);
        seen.push(value);
        if done {
            break;
        }
    }
    seen
}

/// Waits for a pull to end: its exit code, and its last JSON line.
fn finish(mut child: Child) -> (Option<i32>, Value, String) {
    let lines = lines_until(&mut child, |_| false);
    let out = child.wait_with_output().unwrap();
    let last = lines.last().cloned().unwrap_or(Value::Null);
    (
        out.status.code(),
        last,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn installed(models: &Path) -> std::path::PathBuf {
    models.join(SMOL).join(SMOL_FILE)
}

#[test]
fn a_pull_takes_pieces_from_two_sources_and_the_file_is_the_one_signed() {
    let a = host(&[]);
    let b = host(&["--bootstrap", &a.addr()]);
    let models = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (code, done, err) = finish(pull(models.path(), &home.path().join("c"), &a.addr(), &[]));
    assert_eq!(code, Some(0), "{err}\n{done}");
    assert_eq!(done["event"], "done");
    let by_source = done["by_source"].as_object().unwrap();
    for node in [&a, &b] {
        let pieces = by_source
            .get(&node.peer_id())
            .and_then(Value::as_u64)
            .unwrap_or(0);
        assert!(pieces > 0, "no pieces from {}: {done}", node.peer_id());
    }
    let total: u64 = by_source.values().filter_map(Value::as_u64).sum();
    assert_eq!(
        total,
        done["pieces"].as_u64().unwrap(),
        "each piece written once"
    );
    let path = installed(models.path());
    assert_eq!(done["path"], path.to_str().unwrap());
    assert_eq!(
        mesh_node::models::sha256_file(&path).unwrap(),
        smol_sha256()
    );
    // Installed where a known model goes: `mesh model list` sees it fetched, `--model` finds it.
    let out = Command::new(mesh_bin())
        .args([
            "model",
            "list",
            "--json",
            "--home",
            home.path().join("c").to_str().unwrap(),
        ])
        .env("MESH_MODELS", models.path())
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains(&format!("\"model\":\"{SMOL}\"")),
        "{}",
        stdout(&out)
    );
    let listed: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let smol = listed.iter().find(|m| m["model"] == SMOL).unwrap();
    assert_eq!(smol["fetched"], true, "{smol}");
}

#[test]
fn a_source_killed_mid_pull_leaves_the_rest_to_the_other() {
    // 8 MiB/s each: the pull takes several seconds, time to kill one source.
    let mut a = host(&["--share-rate", "8"]);
    let b = host(&["--share-rate", "8", "--bootstrap", &a.addr()]);
    let models = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut child = pull(models.path(), &home.path().join("c"), &b.addr(), &[]);
    let seen = lines_until(&mut child, |v| {
        v["event"] == "progress" && v["done"].as_u64().unwrap() * 4 > v["len"].as_u64().unwrap()
    });
    assert!(!seen.is_empty(), "no progress before the end");
    assert!(a.stop(), "a stops");
    let (code, done, err) = finish(child);
    assert_eq!(code, Some(0), "{err}\n{done}");
    assert_eq!(
        mesh_node::models::sha256_file(&installed(models.path())).unwrap(),
        smol_sha256()
    );
    let from_b = done["by_source"][b.peer_id()].as_u64().unwrap_or(0);
    assert!(from_b > 0, "{done}");
}

#[test]
fn a_pull_killed_midway_resumes_without_fetching_again_what_it_has() {
    let a = host(&["--share-rate", "16"]);
    let models = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut first = pull(models.path(), &home.path().join("c"), &a.addr(), &[]);
    let seen = lines_until(&mut first, |v| {
        v["event"] == "progress" && v["done"].as_u64().unwrap() * 3 > v["len"].as_u64().unwrap()
    });
    let had = seen.last().unwrap()["done"].as_u64().unwrap();
    first.kill().unwrap();
    let _ = first.wait();
    assert!(!installed(models.path()).exists());
    let (code, done, err) = finish(pull(models.path(), &home.path().join("c"), &a.addr(), &[]));
    assert_eq!(code, Some(0), "{err}\n{done}");
    let (pieces, resumed) = (
        done["pieces"].as_u64().unwrap(),
        done["resumed"].as_u64().unwrap(),
    );
    // The resume state is saved every 16 pieces, so up to 15 written pieces may be fetched again.
    assert!(
        resumed * 262_144 + 16 * 262_144 >= had,
        "resumed {resumed} pieces, had {had} bytes"
    );
    assert!(resumed > 0, "{done}");
    let fetched: u64 = done["by_source"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(fetched + resumed, pieces, "{done}");
    assert_eq!(
        mesh_node::models::sha256_file(&installed(models.path())).unwrap(),
        smol_sha256()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_sends_corrupted_pieces_is_struck_and_the_file_is_whole() {
    let a = host(&[]);
    let liar =
        mesh_testnet::attack::blob_liar("smol", &smol_path(), a.addr().parse().unwrap()).await;
    let models = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let child = pull(models.path(), &home.path().join("c"), &a.addr(), &[]);
    let (code, done, err) = tokio::task::spawn_blocking(move || finish(child))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{err}\n{done}");
    let liar_id = liar.peer.to_string();
    assert!(
        liar.lies.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the liar was asked"
    );
    assert!(done["struck"][&liar_id].as_u64().unwrap() >= 1, "{done}");
    assert_eq!(
        done["by_source"][&liar_id].as_u64().unwrap_or(0),
        0,
        "{done}"
    );
    assert_eq!(
        mesh_node::models::sha256_file(&installed(models.path())).unwrap(),
        smol_sha256()
    );
}

/// An in-process client node joined to `addr`.
async fn client(addr: &str) -> mesh_node::Node {
    mesh_testnet::inprocess::start_node(vec![], vec![addr.parse().unwrap()]).await
}

fn run(root: [u8; 32], count: u32, token: Option<Vec<u8>>) -> PieceRun {
    PieceRun {
        root,
        len: None,
        first: 0,
        count,
        token,
    }
}

fn smol_root() -> [u8; 32] {
    mesh_node::blobs::hash_file(&smol_path())
        .unwrap()
        .tree
        .root()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_node_sends_no_piece_without_a_token_and_serves_with_one() {
    let a = host(&["--require-token"]);
    let node = client(&a.addr()).await;
    let peer = a.peer_id().parse().unwrap();
    let mut pieces = 0;
    let refused = fetch_run(&node.client(), peer, &run(smol_root(), 4, None), |_| {
        pieces += 1
    })
    .await;
    match refused {
        Err(FetchError::Refused { error, .. }) => assert_eq!(error.code, ErrorCode::Unauthorized),
        other => panic!("{other:?}"),
    }
    assert_eq!(pieces, 0, "zero pieces without a token");
    let out = mesh(&[
        "token",
        "issue",
        "--home",
        &a.home_dir(),
        "--to",
        &node.peer_id().to_string(),
        "--model",
        "smol",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = mesh_protocol::SignedToken::from_text(stdout(&out).trim()).unwrap();
    let len = fetch_run(
        &node.client(),
        peer,
        &run(smol_root(), 4, Some(token.to_bytes())),
        |_| pieces += 1,
    )
    .await
    .unwrap();
    assert_eq!(
        (pieces, len),
        (4, std::fs::metadata(smol_path()).unwrap().len())
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_piece_requests_get_clear_refusals_and_the_node_keeps_serving() {
    let a = host(&[]);
    let node = client(&a.addr()).await;
    let peer: libp2p::PeerId = a.peer_id().parse().unwrap();
    let ask = |request: BlobRequest| {
        let client = node.client();
        async move {
            let mut stream = client
                .open_stream(peer, mesh_node::network::BLOB)
                .await
                .unwrap();
            write_frame(&mut stream, &request, DEFAULT_MAX_FRAME_LEN)
                .await
                .unwrap();
            let _ = stream.flush().await;
            read_frame::<BlobResponse, _>(&mut stream, DEFAULT_MAX_FRAME_LEN)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let request = |root: Vec<u8>, first: u64, count: u32| BlobRequest {
        version: BLOB_VERSION,
        root,
        first,
        count,
        token: None,
    };
    let root = smol_root().to_vec();
    let cases = [
        (
            request(root.clone(), 0, 1000),
            ErrorCode::BadRequest,
            "1 to 16 pieces",
        ),
        (
            request(root.clone(), 0, 0),
            ErrorCode::BadRequest,
            "1 to 16 pieces",
        ),
        (
            request(vec![1; 31], 0, 1),
            ErrorCode::BadRequest,
            "32 bytes",
        ),
        (
            request(vec![7; 32], 0, 1),
            ErrorCode::UnknownModel,
            "no file with blob root",
        ),
        (
            request(root.clone(), 1 << 40, 1),
            ErrorCode::BadRequest,
            "past the file's last",
        ),
    ];
    for (bad, code, says) in cases {
        match ask(bad).await {
            BlobResponse::Error(e) => {
                assert_eq!(e.code, code, "{e:?}");
                assert!(e.message.contains(says), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    // Not a blob request at all, then a frame past the limit: refused, nothing served.
    let mut stream = node
        .client()
        .open_stream(peer, mesh_node::network::BLOB)
        .await
        .unwrap();
    write_frame(&mut stream, &"not a request", DEFAULT_MAX_FRAME_LEN)
        .await
        .unwrap();
    let answer = read_frame::<BlobResponse, _>(&mut stream, DEFAULT_MAX_FRAME_LEN)
        .await
        .unwrap();
    assert!(
        matches!(answer, Some(BlobResponse::Error(ref e)) if e.code == ErrorCode::BadRequest),
        "{answer:?}"
    );
    let mut stream = node
        .client()
        .open_stream(peer, mesh_node::network::BLOB)
        .await
        .unwrap();
    let _ = stream
        .write_all(&mesh_protocol::frame::encode_prefix(64 << 20))
        .await;
    let _ = stream.flush().await;
    let answer = read_frame::<BlobResponse, _>(&mut stream, DEFAULT_MAX_FRAME_LEN).await;
    assert!(
        !matches!(answer, Ok(Some(BlobResponse::Piece { .. }))),
        "{answer:?}"
    );
    // And a good request is still served, every piece verified.
    let mut pieces = 0;
    fetch_run(&node.client(), peer, &run(smol_root(), 16, None), |_| {
        pieces += 1
    })
    .await
    .unwrap();
    assert_eq!(pieces, 16);
    node.shutdown().await;
    // The sharing switch: a node with --no-share-weights serves nothing.
    let closed = host(&["--no-share-weights"]);
    let node = client(&closed.addr()).await;
    let peer = closed.peer_id().parse().unwrap();
    let refused = fetch_run(&node.client(), peer, &run(smol_root(), 1, None), |_| {}).await;
    assert!(
        matches!(refused, Err(FetchError::Refused { .. })),
        "{refused:?}"
    );
    node.shutdown().await;
}

#[test]
fn a_running_node_pulls_through_its_own_swarm_into_its_models_directory() {
    let a = host(&[]);
    let models = tempfile::tempdir().unwrap();
    let env = [("MESH_MODELS", models.path().to_str().unwrap())];
    let c = JoinedNode::start_with_env(&["--bootstrap", &a.addr()], &env);
    // No --bootstrap: `mesh model pull` goes through the node running with this home.
    let out = Command::new(mesh_bin())
        .args(["model", "pull", "smol", "--json", "--home", &c.home_dir()])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "located", "{lines:?}");
    assert_eq!(lines[0]["sha256"], smol_sha256());
    let done = lines.last().unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["by_source"][a.peer_id()], done["pieces"], "{done}");
    assert_eq!(
        mesh_node::models::sha256_file(&installed(models.path())).unwrap(),
        smol_sha256()
    );
    // A name no one hosts: a clear error and exit 3.
    let out = Command::new(mesh_bin())
        .args([
            "model",
            "pull",
            "nobody-hosts-this",
            "--home",
            &c.home_dir(),
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no peer this node can see serves a file"),
        "{}",
        stderr(&out)
    );
}
