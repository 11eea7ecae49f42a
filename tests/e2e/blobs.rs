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
    pull_what("smol", models, home, bootstrap, extra)
}

/// `mesh model pull WHAT --json` into `models`, through `bootstrap`.
fn pull_what(what: &str, models: &Path, home: &Path, bootstrap: &str, extra: &[&str]) -> Child {
    Command::new(mesh_bin())
        .args([
            "model",
            "pull",
            what,
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
    let listed = list(models.path());
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

/// The pinned blob root of a known model's weights (computed by an independent
/// implementation, tests/e2e/fixtures/blob_tree.py).
fn pinned_root(model: &str) -> [u8; 32] {
    let hex = mesh_node::models::find_known(model).unwrap().files[0].blob_root;
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

fn smol_root() -> [u8; 32] {
    pinned_root(SMOL)
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
        stderr(&out).contains("no peer this node can see serves the files of"),
        "{}",
        stderr(&out)
    );
    // c serves the file onward at once, without a restart: d takes every piece from c.
    let d_models = tempfile::tempdir().unwrap();
    let d_home = tempfile::tempdir().unwrap();
    let from_c = ["--from", &c.peer_id()];
    let (code, done, err) = finish(pull(d_models.path(), d_home.path(), &a.addr(), &from_c));
    assert_eq!(code, Some(0), "{err}\n{done}");
    assert_eq!(done["by_source"][c.peer_id()], done["pieces"], "{done}");
    assert_eq!(
        mesh_node::models::sha256_file(&installed(d_models.path())).unwrap(),
        smol_sha256()
    );
    // c's cache records where the file came from.
    let listed = list(models.path());
    let smol = listed.iter().find(|m| m["model"] == SMOL).unwrap();
    assert_eq!(smol["source"]["kind"], "peers", "{smol}");
    assert_eq!(smol["source"]["peers"][0], a.peer_id(), "{smol}");
}

/// `mesh model list --json` of the cache `models`.
fn list(models: &Path) -> Vec<Value> {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(mesh_bin())
        .args(["model", "list", "--json", "--home"])
        .arg(home.path())
        .env("MESH_MODELS", models)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_bert_directory_travels_as_its_three_files_and_is_hosted_from_the_cache() {
    let minilm = mesh_node::models::find_known("all-minilm-l6-v2").unwrap();
    let a = JoinedNode::start(&["--model", "minilm=all-minilm-l6-v2"]);
    let models = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    // By the weights' sha256: a known model's, so only its pinned files (all three, by sha256
    // and blob root, which an independent implementation computed) are taken.
    let what = format!("sha256:{}", minilm.files[0].sha256);
    let child = pull_what(&what, models.path(), home.path(), &a.addr(), &[]);
    let (code, done, err) = finish(child);
    assert_eq!(code, Some(0), "{err}\n{done}");
    let dir = models.path().join(minilm.name);
    assert_eq!(done["path"], dir.to_str().unwrap(), "{done}");
    for file in minilm.files {
        let ours = std::fs::read(dir.join(file.name)).unwrap();
        let theirs = std::fs::read(mesh_tests::models_dir().join(minilm.name).join(file.name));
        assert!(ours == theirs.unwrap(), "{} differs", file.name);
    }
    let listed = list(models.path());
    let entry = listed.iter().find(|m| m["model"] == minilm.name).unwrap();
    assert_eq!(entry["source"]["peers"][0], a.peer_id(), "{entry}");
    assert_eq!(entry["fetched"], true, "{entry}");
    let files = entry["files"].as_array().unwrap();
    assert_eq!(files.len(), minilm.files.len(), "{entry}");
    for pin in minilm.files {
        let listed = files.iter().find(|f| f["name"] == pin.name).unwrap();
        assert_eq!(listed["sha256"], pin.sha256, "{entry}");
        assert_eq!(listed["blob_root"], pin.blob_root, "{entry}");
    }
    // Hosted from the cache by name; its card names the same files.
    let env = [("MESH_MODELS", models.path().to_str().unwrap())];
    let b = JoinedNode::start_with_env(&["--model", "all-minilm-l6-v2"], &env);
    assert_eq!(b.ready["models"][0], minilm.name, "{}", b.ready);
    // Pulling again is a no-op: the cache holds these very files.
    let (code, last, err) = finish(pull_what(&what, models.path(), home.path(), &b.addr(), &[]));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        (last["event"].as_str(), last["pieces"].as_u64()),
        (Some("done"), Some(0)),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_import_is_hosted_by_its_name_shared_per_model_and_pulled_by_a_peer() {
    let own = tempfile::tempdir().unwrap();
    // SmolLM2 with another model name in its metadata: a GGUF file no registry knows.
    let original = own.path().join("My-Model.Q4_1.gguf");
    let mut bytes = std::fs::read(smol_path()).unwrap();
    let key = bytes
        .windows(12)
        .position(|w| w == b"general.name")
        .unwrap();
    assert_eq!(bytes[key + 24], b'S', "the name's first letter");
    bytes[key + 24] = b'M';
    std::fs::write(&original, bytes).unwrap();
    let blob = mesh_node::blobs::hash_file(&original).unwrap();
    let models = own.path().join("models");
    let out = Command::new(mesh_bin())
        .args([
            "model",
            "add",
            original.to_str().unwrap(),
            "--json",
            "--home",
        ])
        .arg(own.path().join("h"))
        .env("MESH_MODELS", &models)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let added: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(added["model"], "my-model.q4_1", "{added}");
    assert_eq!(added["placed"], "linked", "{added}");
    assert_eq!(added["source"]["kind"], "local", "{added}");
    assert_eq!(added["files"][0]["sha256"], blob.sha256, "{added}");
    assert_eq!(added["files"][0]["blob_root"], blob.root_hex(), "{added}");
    // Not a model: refused with the reason, exit 6 (a bad request).
    let text = own.path().join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let out = Command::new(mesh_bin())
        .args(["model", "add", text.to_str().unwrap(), "--home"])
        .arg(own.path().join("h"))
        .env("MESH_MODELS", &models)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a GGUF file"), "{}", stderr(&out));

    // Hosted by its cache name; MiniLM beside it is not shared (per model).
    let env = [("MESH_MODELS", models.to_str().unwrap())];
    let minilm = format!(
        "minilm={}",
        mesh_tests::models_dir().join("all-minilm-l6-v2").display()
    );
    let args = [
        "--model",
        "mine=my-model.q4_1",
        "--model",
        &minilm,
        "--no-share-weights=minilm",
    ];
    let a = JoinedNode::start_with_env(&args, &env);
    let node = client(&a.addr()).await;
    let peer = a.peer_id().parse().unwrap();
    let minilm_root = pinned_root("all-minilm-l6-v2");
    let refused = fetch_run(&node.client(), peer, &run(minilm_root, 1, None), |_| {}).await;
    match refused {
        Err(FetchError::Refused { ref error, .. }) => {
            assert!(
                error.message.contains("--no-share-weights=minilm"),
                "{error:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    let shared = fetch_run(
        &node.client(),
        peer,
        &run(blob.tree.root(), 2, None),
        |_| {},
    )
    .await;
    assert!(shared.is_ok(), "{shared:?}");
    node.shutdown().await;

    // A peer pulls it by the name it is hosted under.
    let theirs = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let child = pull_what("mine", theirs.path(), home.path(), &a.addr(), &[]);
    let (code, done, err) = tokio::task::spawn_blocking(move || finish(child))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{err}\n{done}");
    let path = theirs.path().join("mine").join("mine.gguf");
    assert_eq!(done["path"], path.to_str().unwrap(), "{done}");
    assert_eq!(mesh_node::models::sha256_file(&path).unwrap(), blob.sha256);
    let listed = list(theirs.path());
    let mine = listed.iter().find(|m| m["model"] == "mine").unwrap();
    assert_eq!(mine["source"]["peers"][0], a.peer_id(), "{mine}");
    assert_eq!(mine["files"][0]["blob_root"], blob.root_hex(), "{mine}");

    // A model named in --no-share-weights that the node does not host: a clear error.
    let out = Command::new(mesh_bin())
        .args([
            "join",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
        ])
        .args([
            "--model",
            "echo=builtin:echo",
            "--no-share-weights=nosuch",
            "--home",
        ])
        .arg(own.path().join("h2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--no-share-weights=nosuch"),
        "{}",
        stderr(&out)
    );
}
