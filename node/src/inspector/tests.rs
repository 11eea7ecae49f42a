//! The inspector's ring, feed, capture switch and replay, without a node.

use super::*;
use crate::dispatch::CallFailure;
use crate::test_support::{delta, random_peer};
use mesh_protocol::{ErrorCode, WireError};

fn spec(target: &str) -> InferSpec {
    serde_json::from_value(serde_json::json!({
        "target": target, "model": "echo", "prompts": ["hello"], "deadline_ms": 1000
    }))
    .unwrap()
}

fn connected(peer: &PeerId) -> CallEvent {
    CallEvent::Connected {
        peer: peer.to_string(),
        path: Path::Direct,
        connect_ms: 1,
    }
}

/// Runs a made call through the inspector: the events seen on the far side.
async fn made(inspector: &Inspector, spec: &InferSpec, events: Vec<CallEvent>) -> (u64, usize) {
    let (tx, rx) = mpsc::channel(8);
    let (id, mut out) = inspector.watch_made(spec, None, rx);
    for event in events {
        tx.send(event).await.unwrap();
    }
    drop(tx);
    let mut seen = 0;
    while out.recv().await.is_some() {
        seen += 1;
    }
    (id, seen)
}

/// Waits for the forwarding task to file the call's end.
async fn until_ended(inspector: &Inspector, id: u64) -> CallRecord {
    for _ in 0..200 {
        match inspector.call(id) {
            Some(r) if r.state != CallState::Running => return r,
            _ => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    }
    panic!("call {id} never ended");
}

#[tokio::test]
async fn a_made_call_is_carried_on_unchanged_and_filed_with_its_end() {
    let inspector = Inspector::default();
    let mut feed = inspector.subscribe();
    let peer = random_peer();
    let failure = CallFailure::remote(WireError::new(ErrorCode::Overloaded, "busy"));
    let events = vec![connected(&peer), delta("x"), CallEvent::Error(failure)];
    let (id, seen) = made(&inspector, &spec("any"), events).await;
    assert_eq!(seen, 3);
    let record = until_ended(&inspector, id).await;
    assert_eq!(record.state, CallState::Refused);
    assert_eq!(record.peer, Some(peer.to_string()));
    let started = feed.recv().await.unwrap();
    assert!(matches!(started, MeshEvent::CallStarted(ref r) if r.id == id));
    let ended = feed.recv().await.unwrap();
    assert_eq!(ended.name(), "call_ended");
}

#[tokio::test]
async fn hanging_up_the_watched_receiver_hangs_up_the_call() {
    let inspector = Inspector::default();
    let (tx, rx) = mpsc::channel(8);
    let (id, out) = inspector.watch_made(&spec("any"), None, rx);
    drop(out);
    tokio::time::timeout(std::time::Duration::from_secs(2), tx.closed())
        .await
        .expect("the dispatcher's sender sees the hang-up");
    assert_eq!(
        until_ended(&inspector, id).await.state,
        CallState::Cancelled
    );
}

#[tokio::test]
async fn the_ring_keeps_the_newest_calls() {
    let inspector = Inspector::default();
    let caller = random_peer();
    let first = inspector.served_started("echo", &caller);
    for _ in 0..MAX_CALLS {
        inspector.served_started("echo", &caller);
    }
    let calls = inspector.calls();
    assert_eq!(calls.len(), MAX_CALLS);
    assert!(inspector.call(first).is_none());
    assert!(calls[0].id > calls[1].id, "newest first");
    inspector.served_ended(first, ServedEnd::Cancelled); // gone: nothing to do
}

#[tokio::test]
async fn a_served_call_records_its_caller_and_end() {
    let inspector = Inspector::default();
    let caller = random_peer();
    let long_name = "m".repeat(1000);
    let id = inspector.served_started(&long_name, &caller);
    let record = inspector.call(id).unwrap();
    assert_eq!(record.direction, Direction::In);
    assert_eq!(record.model.len(), MAX_MODEL_NAME);
    assert_eq!(record.peer, Some(caller.to_string()));
    let end = ServedEnd::Error {
        code: "unauthorized",
        message: "no token",
    };
    inspector.served_ended(id, end);
    let record = inspector.call(id).unwrap();
    assert_eq!(record.state, CallState::Refused);
    assert!(record.total_ms.is_some());
    assert_eq!(
        inspector.replay_spec(id, ReplayTo::Same, None).err(),
        Some(ReplayError::Served(id))
    );
}

#[tokio::test]
async fn replay_needs_a_capture_and_goes_where_it_is_told() {
    let inspector = Inspector::default();
    let peer = random_peer();
    let answered = vec![connected(&peer), delta("x")];
    let (uncaptured, _) = made(&inspector, &spec("any"), answered.clone()).await;
    until_ended(&inspector, uncaptured).await;
    assert_eq!(
        inspector
            .replay_spec(uncaptured, ReplayTo::Same, None)
            .err(),
        Some(ReplayError::NotCaptured(uncaptured))
    );
    inspector.set_capture(true);
    let (id, _) = made(&inspector, &spec("any"), answered).await;
    until_ended(&inspector, id).await;
    let same = inspector.replay_spec(id, ReplayTo::Same, None).unwrap();
    assert_eq!(same.target, Target::Peer(peer));
    assert_eq!(same.prompts, ["hello"]);
    let other = random_peer();
    let to = ReplayTo::Target(Target::Peer(other));
    assert_eq!(
        inspector.replay_spec(id, to, None).unwrap().target,
        Target::Peer(other)
    );
    assert_eq!(
        inspector.replay_spec(999, ReplayTo::Same, None).err(),
        Some(ReplayError::NotFound(999))
    );
    let (never, _) = made(&inspector, &spec("any"), vec![]).await;
    until_ended(&inspector, never).await;
    assert_eq!(
        inspector.replay_spec(never, ReplayTo::Same, None).err(),
        Some(ReplayError::NoPeer(never))
    );
}

#[tokio::test]
async fn a_call_made_with_a_token_replays_only_with_one() {
    let inspector = Inspector::default();
    inspector.set_capture(true);
    let mut with_token = spec("any");
    with_token.token = Some(crate::test_support::signed_token());
    let (id, _) = made(&inspector, &with_token, vec![]).await;
    until_ended(&inspector, id).await;
    let to_any = ReplayTo::Target(Target::Any);
    assert_eq!(
        inspector.replay_spec(id, to_any, None).err(),
        Some(ReplayError::NeedsToken(id))
    );
    let token = crate::test_support::signed_token();
    let replay = inspector.replay_spec(id, to_any, Some(token)).unwrap();
    assert!(replay.token.is_some());
}
