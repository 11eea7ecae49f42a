//! Routing inbound streams by protocol id, and the node-wide bound on streams served.

use std::sync::Arc;

use libp2p::PeerId;
use mesh_protocol::ids::{CATALOG_PROTOCOL, INFER_PROTOCOL};
use mesh_protocol::{CatalogRequest, CatalogResponse, ErrorCode, InferResponse, SignedModelCard};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{chat, compute_stopped, server, stranger, text, words, Caller, Pipe, WAIT};
use crate::identity::verify_by_peer;
use crate::serve::{accept, ServeConfig, Server, StreamLimits};
use crate::wire::write_frame;

/// An accept loop serving `server` with at most `limit` streams at once.
struct Router {
    streams: mpsc::Sender<(PeerId, &'static str, Pipe)>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Router {
    fn start(server: &Arc<Server>, limit: usize) -> Router {
        Self::with_limits(
            server,
            StreamLimits {
                streams: limit,
                ..StreamLimits::default()
            },
        )
    }

    fn with_limits(server: &Arc<Server>, limits: StreamLimits) -> Router {
        let (streams, incoming) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept(incoming, server.clone(), limits, shutdown.clone()));
        Router {
            streams,
            shutdown,
            task,
        }
    }

    /// Opens a stream of protocol `id` to the loop.
    async fn open(&self, id: &'static str) -> Caller {
        self.open_as(stranger(), id).await
    }

    /// Opens a stream of protocol `id` to the loop, as `peer`.
    async fn open_as(&self, peer: PeerId, id: &'static str) -> Caller {
        let (caller, far) = Caller::unserved();
        self.streams.send((peer, id, far)).await.unwrap();
        caller
    }
}

#[tokio::test]
async fn streams_go_to_the_handler_their_protocol_names() {
    let (server, identity) = server(&[("echo", "echo", 1)], ServeConfig::default());
    let router = Router::start(&server, 8);

    let mut infer = router.open(INFER_PROTOCOL).await;
    infer.send(&chat("echo", "routed")).await;
    assert_eq!(text(&infer.rest().await), "echo: routed");

    let mut catalog = router.open(CATALOG_PROTOCOL).await;
    write_frame(&mut catalog.wr, &CatalogRequest {}, 1024)
        .await
        .unwrap();
    let response: CatalogResponse = catalog.next().await.expect("a catalog");
    let [SignedModelCard { card, signature }] = &response.cards[..] else {
        panic!("one card: {response:?}");
    };
    assert!(verify_by_peer(
        &identity.peer_id(),
        &SignedModelCard::signed_message(card),
        signature
    ));
    assert_eq!(response.cards[0].decode_card().unwrap().name, "echo");

    // A protocol this node does not serve: the stream is dropped unanswered.
    let mut other = router.open("/not/served/1").await;
    assert!(other.frame().await.is_none());
    assert_eq!(server.runs("echo"), 1);
}

#[tokio::test]
async fn streams_past_the_limit_get_overloaded_and_catalogs_keep_their_own_pool() {
    let (server, _) = server(&[("slow", "echo?delay_ms=20", 4)], ServeConfig::default());
    let router = Router::start(&server, 1);
    let mut running = router.open(INFER_PROTOCOL).await;
    running.send(&chat("slow", &words(1000))).await;
    assert!(matches!(
        running.frame().await,
        Some(InferResponse::Started { .. })
    ));

    // The model has free slots; the node has no free stream.
    let mut refused = router.open(INFER_PROTOCOL).await;
    match refused.frame().await {
        Some(InferResponse::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Overloaded);
            assert!(
                e.message.contains("maximum number of streams"),
                "{}",
                e.message
            );
        }
        other => panic!("expected overloaded, got {other:?}"),
    }
    assert!(refused.frame().await.is_none(), "then the stream closes");

    // Catalogs have a pool of their own: routing keeps working while calls are full.
    let mut catalog = router.open(CATALOG_PROTOCOL).await;
    write_frame(&mut catalog.wr, &CatalogRequest {}, 1024)
        .await
        .unwrap();
    let response: CatalogResponse = catalog.next().await.expect("a catalog");
    assert_eq!(response.load, 1);
    assert_eq!(server.runs("slow"), 1);
}

#[tokio::test]
async fn a_full_catalog_pool_drops_catalog_streams_and_leaves_calls_alone() {
    let (server, _) = server(&[("echo", "echo", 4)], ServeConfig::default());
    let limits = StreamLimits {
        catalogs: 2,
        ..StreamLimits::default()
    };
    let router = Router::with_limits(&server, limits);
    // Two silent catalog streams of two peers hold the pool.
    let _held = [
        router.open_as(stranger(), CATALOG_PROTOCOL).await,
        router.open_as(stranger(), CATALOG_PROTOCOL).await,
    ];
    let mut dropped = router.open(CATALOG_PROTOCOL).await;
    let _ = write_frame(&mut dropped.wr, &CatalogRequest {}, 1024).await;
    assert!(dropped.next::<CatalogResponse>().await.is_none());
    let mut call = router.open(INFER_PROTOCOL).await;
    call.send(&chat("echo", "still")).await;
    assert_eq!(text(&call.rest().await), "echo: still");
}

#[tokio::test]
async fn one_peer_past_its_share_is_refused_while_another_is_served() {
    let (server, _) = server(&[("slow", "echo?delay_ms=20", 8)], ServeConfig::default());
    let limits = StreamLimits {
        per_peer: 2,
        ..StreamLimits::default()
    };
    let router = Router::with_limits(&server, limits);
    let greedy = stranger();
    // Two streams that announce nothing: they hold the greedy peer's two places.
    let _silent = [
        router.open_as(greedy, INFER_PROTOCOL).await,
        router.open_as(greedy, INFER_PROTOCOL).await,
    ];
    let mut third = router.open_as(greedy, INFER_PROTOCOL).await;
    match third.frame().await {
        Some(InferResponse::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Overloaded);
            assert!(e.message.contains("of one peer"), "{}", e.message);
        }
        other => panic!("expected overloaded, got {other:?}"),
    }
    let mut honest = router.open_as(stranger(), INFER_PROTOCOL).await;
    honest.send(&chat("slow", "served")).await;
    assert_eq!(text(&honest.rest().await), "echo: served");
}

#[tokio::test]
async fn a_node_closed_to_all_but_its_allow_list_refuses_others_before_reading() {
    let friend = stranger();
    let access = crate::auth::AccessConfig {
        default: crate::auth::Access::Allow,
        allow: vec![friend],
        ..Default::default()
    };
    let config = ServeConfig {
        access,
        ..Default::default()
    };
    let (server, _) = server(&[("echo", "echo", 1)], config);
    let router = Router::with_limits(
        &server,
        StreamLimits {
            streams: 1,
            ..StreamLimits::default()
        },
    );
    // The stranger's stream is refused without taking the node's one place...
    let mut refused = router.open(INFER_PROTOCOL).await;
    match refused.frame().await {
        Some(InferResponse::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(
                e.message.starts_with("not on the allow list"),
                "{}",
                e.message
            );
        }
        other => panic!("expected unauthorized, got {other:?}"),
    }
    // ...so the friend is served.
    let mut served = router.open_as(friend, INFER_PROTOCOL).await;
    served.send(&chat("echo", "friend")).await;
    assert_eq!(text(&served.rest().await), "echo: friend");
    assert_eq!(server.runs("echo"), 1);
}

#[tokio::test]
async fn shutdown_ends_the_loop_and_the_streams_it_serves() {
    let (server, _) = server(&[("slow", "echo?delay_ms=20", 1)], ServeConfig::default());
    let router = Router::start(&server, 8);
    let mut running = router.open(INFER_PROTOCOL).await;
    running.send(&chat("slow", &words(1000))).await;
    assert!(matches!(
        running.frame().await,
        Some(InferResponse::Started { .. })
    ));

    router.shutdown.cancel();
    tokio::time::timeout(WAIT, router.task)
        .await
        .expect("the loop ends")
        .unwrap();
    // The call's task was aborted: its stream ends without `done`.
    let rest = running.rest().await;
    assert!(
        !rest.iter().any(|f| matches!(f, InferResponse::Done { .. })),
        "{rest:?}"
    );
    compute_stopped(&server, "slow").await;
}
