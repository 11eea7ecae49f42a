//! Authorization over real swarms: allow lists, capability tokens with every refusal reason,
//! zero engine runs for refused calls, and signed receipts (in-process nodes and the real
//! `mesh` binary).

use std::time::Duration;

use mesh_node::auth::receipt::{self, ReceiptError};
use mesh_node::auth::revocation;
use mesh_node::auth::token::{issue, TokenRequest};
use mesh_node::auth::{unix_now, Access, AccessConfig};
use mesh_node::call::{CallError, Calls};
use mesh_node::{Node, NodeIdentity};
use mesh_protocol::frame::encode_body;
use mesh_protocol::{
    ChatMessage, ErrorCode, InferRequest, InferResponse, Input, Role, SamplingParams,
    SignedReceipt, SignedToken,
};
use mesh_testnet::inprocess::{builtin_engines, loopback_config, tcp_addr};
use mesh_tests::{infer_via as infer, mesh, stderr, stdout, JoinedNode};

const IDLE: Duration = Duration::from_secs(10);

fn chat(model: &str, token: Option<Vec<u8>>) -> InferRequest {
    InferRequest {
        model: model.into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: "hello".into(),
            }],
        },
        params: SamplingParams {
            max_tokens: 16,
            ..Default::default()
        },
        deadline_ms: None,
        token,
        resume: None,
    }
}

/// A node hosting `echo` and `embed` with `access`, and its identity (to issue tokens).
async fn server(access: AccessConfig) -> (Node, NodeIdentity) {
    let identity = NodeIdentity::generate();
    let mut config = loopback_config(vec![]);
    config.serve.access = access;
    let engines = builtin_engines(&[("echo", "echo"), ("embed", "hash-embed")]);
    let node = Node::start(identity.clone(), engines, config)
        .await
        .expect("server starts");
    (node, identity)
}

async fn client_of(server: &Node) -> Node {
    let config = loopback_config(vec![tcp_addr(server).await]);
    Node::start(NodeIdentity::generate(), vec![], config)
        .await
        .expect("client starts")
}

/// Runs a call to the end and returns its `done` frame.
async fn call(from: &Node, to: &Node, req: &InferRequest) -> Result<InferResponse, CallError> {
    let mut call = from.client().call(to.peer_id(), req, IDLE).await?;
    let mut last = None;
    while let Some(frame) = call.next().await? {
        last = Some(frame);
    }
    Ok(last.expect("at least one frame"))
}

/// The `unauthorized` message of a refused call (panics on anything else).
async fn refused(from: &Node, to: &Node, req: &InferRequest) -> String {
    match call(from, to, req).await {
        Err(CallError::Remote(e)) if e.code == ErrorCode::Unauthorized => e.message,
        other => panic!("expected unauthorized, got {other:?}"),
    }
}

fn token(issuer: &NodeIdentity, subject: &Node, change: impl FnOnce(&mut TokenRequest)) -> Vec<u8> {
    let now = unix_now();
    let mut request = TokenRequest {
        subject: subject.peer_id(),
        models: vec!["echo".into()],
        not_before: now - 60,
        expires: now + 3600,
        max_requests: None,
    };
    change(&mut request);
    issue(issuer, &request).unwrap().to_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_listed_peer_is_served_and_others_are_refused_without_compute() {
    let stranger = NodeIdentity::generate();
    let friend = NodeIdentity::generate();
    let (a, _) = server(AccessConfig {
        default: Access::Allow,
        allow: vec![friend.peer_id()],
        ..Default::default()
    })
    .await;
    let addr = tcp_addr(&a).await;
    let friend = Node::start(friend, vec![], loopback_config(vec![addr.clone()]))
        .await
        .unwrap();
    let stranger = Node::start(stranger, vec![], loopback_config(vec![addr]))
        .await
        .unwrap();

    let msg = refused(&stranger, &a, &chat("echo", None)).await;
    assert!(msg.starts_with("not on the allow list"), "{msg}");
    assert!(msg.contains(&stranger.peer_id().to_string()), "{msg}");
    assert_eq!(
        a.server().runs("echo"),
        0,
        "a refused call never runs the engine"
    );

    let done = call(&friend, &a, &chat("echo", None)).await.unwrap();
    assert!(matches!(done, InferResponse::Done { .. }), "{done:?}");
    assert_eq!(a.server().runs("echo"), 1);
    for n in [stranger, friend, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_on_the_serving_node_with_each_reason_named() {
    let tmp = tempfile::tempdir().unwrap();
    let revoked_file = tmp.path().join("revoked-tokens");
    let (a, owner) = server(AccessConfig {
        default: Access::Token,
        revocation_file: Some(revoked_file.clone()),
        quota_file: Some(tmp.path().join("token-usage.json")),
        ..Default::default()
    })
    .await;
    let c = client_of(&a).await;
    let d = client_of(&a).await;

    // Happy path: a token for C, signed by A's owner key.
    let good = token(&owner, &c, |_| {});
    let done = call(&c, &a, &chat("echo", Some(good.clone())))
        .await
        .unwrap();
    assert!(matches!(done, InferResponse::Done { .. }));
    let mut served = 1;

    // D replays C's token: the subject is C, but Noise says D is calling.
    let msg = refused(&d, &a, &chat("echo", Some(good.clone()))).await;
    assert!(msg.starts_with("wrong subject"), "{msg}");

    let now = unix_now();
    let stranger = NodeIdentity::generate();
    let tampered = {
        let t = SignedToken::from_bytes(&token(&owner, &c, |r| r.models = vec!["embed".into()]))
            .unwrap();
        let mut claims = t.decode_claims().unwrap();
        claims.models = vec!["echo".into()];
        SignedToken {
            claims: encode_body(&claims).unwrap(),
            signature: t.signature,
        }
        .to_bytes()
    };
    let cases: Vec<(Option<Vec<u8>>, &str)> = vec![
        (None, "no token"),
        (Some(b"not a token".to_vec()), "malformed token"),
        (
            Some(token(&owner, &c, |r| {
                r.not_before = now - 7200;
                r.expires = now - 3600;
            })),
            "expired",
        ),
        (
            Some(token(&owner, &c, |r| {
                r.not_before = now + 3600;
                r.expires = now + 7200;
            })),
            "not yet valid",
        ),
        (Some(tampered), "bad signature"),
        (
            Some(token(&owner, &c, |r| r.models = vec!["embed".into()])),
            "model not covered",
        ),
        (Some(token(&stranger, &c, |_| {})), "untrusted issuer"),
    ];
    for (t, reason) in cases {
        let msg = refused(&c, &a, &chat("echo", t)).await;
        assert!(msg.starts_with(reason), "{reason}: {msg}");
    }

    // Revoked while the node runs: the owner appends its id to the revocation file.
    let doomed = token(&owner, &c, |_| {});
    call(&c, &a, &chat("echo", Some(doomed.clone())))
        .await
        .unwrap();
    served += 1;
    let id = mesh_node::auth::token::open_bytes(&doomed).unwrap().id();
    revocation::revoke(&revoked_file, &id, "").unwrap();
    let msg = refused(&c, &a, &chat("echo", Some(doomed))).await;
    assert!(msg.starts_with("revoked"), "{msg}");

    // A quota of two calls: the third is refused.
    let limited = token(&owner, &c, |r| r.max_requests = Some(2));
    for _ in 0..2 {
        call(&c, &a, &chat("echo", Some(limited.clone())))
            .await
            .unwrap();
        served += 1;
    }
    let msg = refused(&c, &a, &chat("echo", Some(limited))).await;
    assert!(msg.starts_with("quota spent"), "{msg}");

    // Every refused call above ran the engine zero times.
    assert_eq!(a.server().runs("echo"), served);
    assert_eq!(a.server().runs("embed"), 0);
    for n in [c, d, a] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_receipt_that_verifies_and_tampering_breaks_it() {
    let (a, _) = server(AccessConfig::default()).await;
    let c = client_of(&a).await;
    let req = chat("echo", None);
    let InferResponse::Done {
        usage,
        receipt: Some(signed),
        ..
    } = call(&c, &a, &req).await.unwrap()
    else {
        panic!("done without a receipt");
    };
    let r = receipt::verify_for_call(&signed, &a.peer_id(), &req).unwrap();
    assert_eq!(r.client, c.peer_id().to_bytes());
    assert_eq!(r.model, "echo");
    let echo_card = a.cards().into_iter().find(|c| c.name == "echo").unwrap();
    assert_eq!(r.weights_sha256, echo_card.sha256);
    assert_eq!(r.completion_tokens, usage.completion_tokens);
    assert_eq!(r.compute_ms, usage.total_ms);

    // Claiming more tokens were served breaks the signature.
    let mut inflated = r.clone();
    inflated.completion_tokens += 1000;
    let forged = SignedReceipt {
        receipt: encode_body(&inflated).unwrap(),
        signature: signed.signature.clone(),
    };
    assert!(matches!(
        receipt::verify_for_call(&forged, &a.peer_id(), &req),
        Err(ReceiptError::BadSignature(_))
    ));

    // Embeddings get one too.
    let embed = InferRequest {
        input: Input::Embed {
            texts: vec!["x".into()],
        },
        ..chat("embed", None)
    };
    let InferResponse::Done {
        receipt: Some(signed),
        ..
    } = call(&c, &a, &embed).await.unwrap()
    else {
        panic!("done without a receipt");
    };
    assert!(receipt::verify_for_call(&signed, &a.peer_id(), &embed).is_ok());
    c.shutdown().await;
    a.shutdown().await;
}

fn id_of(home: &std::path::Path) -> String {
    let out = mesh(&["id", "--home", home.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

#[test]
fn token_commands_and_receipts_through_the_real_binary() {
    let a = JoinedNode::start(&["--require-token", "--model", "echo=builtin:echo"]);
    assert_eq!(a.ready["access"]["default"], "token", "{}", a.ready);
    let tmp = tempfile::tempdir().unwrap();
    let (c_home, d_home) = (tmp.path().join("c"), tmp.path().join("d"));
    let c_id = id_of(&c_home);
    id_of(&d_home);

    let issued = mesh(&[
        "token",
        "issue",
        "--home",
        &a.home_dir(),
        "--to",
        &c_id,
        "--model",
        "echo",
        "--expires",
        "1h",
        "--max-requests",
        "5",
        "--json",
    ]);
    assert!(issued.status.success(), "{}", stderr(&issued));
    let issued: serde_json::Value = serde_json::from_str(&stdout(&issued)).unwrap();
    let token = issued["token"].as_str().unwrap().to_string();
    assert_eq!(issued["subject"], c_id.as_str());
    assert_eq!(issued["issuer"], a.peer_id().as_str());

    let inspect = mesh(&["token", "inspect", &token, "--json"]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    let shown: serde_json::Value = serde_json::from_str(&stdout(&inspect)).unwrap();
    assert_eq!(shown["signature_valid"], true);
    assert_eq!(shown["max_requests"], 5);
    // One changed character inside the base64 breaks the signature (or the encoding).
    let mut bad = token.clone().into_bytes();
    let i = bad.len() - 20;
    bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    let inspect = mesh(&["token", "inspect", &bad]);
    assert!(!inspect.status.success(), "{}", stdout(&inspect));

    // No token: refused with exit 4 and the reason.
    let out = infer(
        &c_home,
        &a.addr(),
        &[&a.peer_id(), "echo", "--prompt", "hi"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unauthorized: no token"),
        "{}",
        stderr(&out)
    );

    // With the token: answered, and the done line carries a verified receipt.
    let out = infer(
        &c_home,
        &a.addr(),
        &[
            &a.peer_id(),
            "echo",
            "--prompt",
            "hi",
            "--token",
            &token,
            "--json",
        ],
    );
    assert!(out.status.success(), "{}\nA: {}", stderr(&out), a.stderr());
    let done_line = stdout(&out).lines().last().unwrap().to_string();
    let done: serde_json::Value = serde_json::from_str(&done_line).unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["receipt_verified"], true, "{done}");

    // The receipt verifies offline; a tampered one does not.
    let file = tmp.path().join("done.json");
    std::fs::write(&file, &done_line).unwrap();
    let out = mesh(&["receipt", "verify", file.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let verified: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(verified["server"], a.peer_id().as_str());
    assert_eq!(verified["client"], c_id.as_str());
    assert_eq!(verified["token_id"], issued["id"]);
    let receipt = done["receipt"].as_str().unwrap();
    let mut bytes = receipt.as_bytes().to_vec();
    let i = bytes.len() - 30;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    std::fs::write(&file, &bytes).unwrap();
    let out = mesh(&["receipt", "verify", file.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "a tampered receipt must fail: {}",
        stdout(&out)
    );

    // D replays C's token: wrong subject.
    let out = infer(
        &d_home,
        &a.addr(),
        &[&a.peer_id(), "echo", "--prompt", "hi", "--token", &token],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("wrong subject"), "{}", stderr(&out));

    // Revoked offline on A's home while A runs: refused from then on.
    let out = mesh(&[
        "token",
        "revoke",
        "--home",
        &a.home_dir(),
        issued["id"].as_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let out = infer(
        &c_home,
        &a.addr(),
        &[
            &a.peer_id(),
            "echo",
            "--prompt",
            "hi",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
}

#[test]
fn an_allow_file_is_reread_while_the_node_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (c_home, d_home) = (tmp.path().join("c"), tmp.path().join("d"));
    let (c_id, d_id) = (id_of(&c_home), id_of(&d_home));
    let allow = tmp.path().join("allowed");
    std::fs::write(&allow, format!("# who may call\n{c_id} carol\n")).unwrap();
    let a = JoinedNode::start(&[
        "--allow-file",
        allow.to_str().unwrap(),
        "--model",
        "echo=builtin:echo",
        "--model-policy",
        "pub=open",
        "--model",
        "pub=builtin:echo",
    ]);
    assert_eq!(a.ready["access"]["default"], "allow", "{}", a.ready);
    assert_eq!(a.ready["access"]["models"]["pub"], "open", "{}", a.ready);

    let ask = |home: &std::path::Path, model: &str| {
        infer(home, &a.addr(), &[&a.peer_id(), model, "--prompt", "hi"])
    };
    assert!(ask(&c_home, "echo").status.success());
    let out = ask(&d_home, "echo");
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not on the allow list"),
        "{}",
        stderr(&out)
    );
    assert!(
        ask(&d_home, "pub").status.success(),
        "the open model serves anyone"
    );

    // Add D to the file: served without a restart.
    std::fs::write(&allow, format!("{c_id}\n{d_id} dave, added later\n")).unwrap();
    let out = ask(&d_home, "echo");
    assert!(out.status.success(), "{}\nA: {}", stderr(&out), a.stderr());
}
