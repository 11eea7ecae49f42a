//! Unit tests of `call`.

use super::*;
use crate::engine::builtin::Echo;
use crate::serve::ServeConfig;
use crate::NodeIdentity;
use mesh_protocol::{ChatMessage, Input, Role};

const IDLE: Duration = Duration::from_secs(10);

fn server(identity: &NodeIdentity) -> Arc<Server> {
    let echo = Arc::new(Echo::new("echo", Duration::ZERO, 1));
    Arc::new(Server::new(identity, vec![echo], ServeConfig::default()).unwrap())
}

fn hello() -> InferRequest {
    InferRequest {
        model: "echo".into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: "hello".into(),
            }],
        },
        params: Default::default(),
        deadline_ms: Some(5_000),
        token: None,
        resume: None,
    }
}

/// Serves one catalog stream of `server` and fetches it as a caller who believes the node
/// is `peer`.
async fn catalog_of(server: Arc<Server>, peer: PeerId) -> (Vec<ModelCard>, u32) {
    let (near, far) = tokio::io::duplex(LOCAL_PIPE_BYTES);
    tokio::spawn(async move { server.serve_catalog(far.compat()).await });
    fetch_catalog(near.compat(), &peer, IDLE).await.unwrap()
}

#[tokio::test]
async fn a_catalog_keeps_only_cards_signed_by_the_node_called() {
    let identity = NodeIdentity::generate();
    let (cards, load) = catalog_of(server(&identity), identity.peer_id()).await;
    assert_eq!(cards.len(), 1);
    assert_eq!(cards[0].name, "echo");
    assert_eq!(load, 0);

    let impostor = NodeIdentity::generate().peer_id();
    let (cards, _) = catalog_of(server(&identity), impostor).await;
    assert!(cards.is_empty(), "cards signed by another key are dropped");
}

#[tokio::test]
async fn a_local_call_is_answered_by_this_node_s_server() {
    let identity = NodeIdentity::generate();
    let mut call = Call::local(&server(&identity), identity.peer_id(), &hello(), IDLE)
        .await
        .unwrap();
    let mut text = String::new();
    let mut last = None;
    while let Some(frame) = call.next().await.unwrap() {
        if let InferResponse::Delta { text: t, .. } = &frame {
            text.push_str(t);
        }
        last = Some(frame);
    }
    assert_eq!(text, "echo: hello");
    assert!(matches!(last, Some(InferResponse::Done { .. })));
    assert!(call.next().await.unwrap().is_none(), "nothing after done");
}

#[tokio::test]
async fn a_stream_closed_before_any_frame_is_not_accepted_and_an_error_frame_is_remote() {
    // The node takes the bytes but closes before any frame, as a full accept queue does.
    let (near, far) = tokio::io::duplex(LOCAL_PIPE_BYTES);
    let node = tokio::spawn(async move {
        let (mut rd, _wr) = far.compat().split();
        let _: Option<InferRequest> = read_frame(&mut rd, DEFAULT_MAX_FRAME_LEN).await.unwrap();
    });
    let result = Call::start_confirmed(near.compat(), &hello(), IDLE).await;
    assert!(
        matches!(result, Err(CallError::NotAccepted)),
        "retrying is safe"
    );
    node.await.unwrap();

    let (near, far) = tokio::io::duplex(LOCAL_PIPE_BYTES);
    let node = tokio::spawn(async move {
        let (mut rd, mut wr) = far.compat().split();
        let _: Option<InferRequest> = read_frame(&mut rd, DEFAULT_MAX_FRAME_LEN).await.unwrap();
        // The node read the request and refuses it: its answer, not "not accepted".
        let busy =
            InferResponse::Error(WireError::new(mesh_protocol::ErrorCode::Overloaded, "busy"));
        write_frame(&mut wr, &busy, DEFAULT_MAX_FRAME_LEN)
            .await
            .unwrap();
    });
    match Call::start_confirmed(near.compat(), &hello(), IDLE).await {
        Err(CallError::Remote(e)) => assert_eq!(e.code, mesh_protocol::ErrorCode::Overloaded),
        Err(e) => panic!("expected the node's refusal, got {e:?}"),
        Ok(_) => panic!("expected the node's refusal, got a call"),
    }
    node.await.unwrap();
}
