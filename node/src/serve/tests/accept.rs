//! Routing inbound streams by protocol id, and the node-wide bound on streams served.

use std::sync::Arc;

use libp2p::PeerId;
use mesh_protocol::ids::{CATALOG_PROTOCOL, INFER_PROTOCOL};
use mesh_protocol::{CatalogRequest, CatalogResponse, ErrorCode, InferResponse, SignedModelCard};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{chat, compute_stopped, server, stranger, text, words, Caller, Pipe, WAIT};
use crate::identity::verify_by_peer;
use crate::serve::{accept, ServeConfig, Server};
use crate::wire::write_frame;

/// An accept loop serving `server` with at most `limit` streams at once.
struct Router {
    streams: mpsc::Sender<(PeerId, &'static str, Pipe)>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Router {
    fn start(server: &Arc<Server>, limit: usize) -> Router {
        let (streams, incoming) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept(
            incoming,
            server.clone(),
            Arc::new(Semaphore::new(limit)),
            shutdown.clone(),
        ));
        Router {
            streams,
            shutdown,
            task,
        }
    }

    /// Opens a stream of protocol `id` to the loop.
    async fn open(&self, id: &'static str) -> Caller {
        let (caller, far) = Caller::unserved();
        self.streams.send((stranger(), id, far)).await.unwrap();
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
async fn streams_past_the_limit_get_overloaded_and_catalogs_are_dropped() {
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

    let mut catalog = router.open(CATALOG_PROTOCOL).await;
    // The request may or may not be written before the stream is dropped.
    let _ = write_frame(&mut catalog.wr, &CatalogRequest {}, 1024).await;
    assert!(catalog.next::<CatalogResponse>().await.is_none());
    assert_eq!(server.runs("slow"), 1);
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
