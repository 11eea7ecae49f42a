//! One inference stream, phase by phase: request timeout, authorization, admission,
//! hang-up, deadline, frame limits, coalescing, and `done` with its receipt.

use std::time::{Duration, Instant};

use mesh_protocol::frame::{encode_frame, DEFAULT_MAX_FRAME_LEN};
use mesh_protocol::{ErrorCode, FinishReason, InferResponse};

use super::{chat, compute_stopped, server, stranger, text, wait_until, words, Caller, WAIT};
use crate::auth::receipt::verify_for_call;
use crate::auth::{Access, AccessConfig};
use crate::serve::frames::STARTED_HOLD;
use crate::serve::ServeConfig;

/// The error a call ended with; panics if it ended otherwise.
fn error_of(frames: &[InferResponse]) -> (ErrorCode, String) {
    match frames.last() {
        Some(InferResponse::Error(e)) => (e.code, e.message.clone()),
        other => panic!("expected an error frame last, got {other:?} in {frames:?}"),
    }
}

#[tokio::test]
async fn a_call_ends_with_done_carrying_usage_and_a_receipt_that_verifies() {
    let (server, identity) = server(&[("echo", "echo", 1)], ServeConfig::default());
    let caller = stranger();
    let request = chat("echo", "hello mesh");
    let frames = Caller::call(&server, caller, &request).await;

    assert!(
        matches!(&frames[0], InferResponse::Started { model, .. } if model == "echo"),
        "{frames:?}"
    );
    assert_eq!(text(&frames), "echo: hello mesh");
    let Some(InferResponse::Done {
        finish_reason,
        usage,
        receipt: Some(signed),
        ..
    }) = frames.last()
    else {
        panic!("expected done with a receipt last: {frames:?}");
    };
    assert_eq!(*finish_reason, FinishReason::Stop);
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (2, 3));
    let receipt = verify_for_call(signed, &identity.peer_id(), &request).expect("it verifies");
    assert_eq!(receipt.client, caller.to_bytes());
    assert_eq!((receipt.prompt_tokens, receipt.completion_tokens), (2, 3));
    assert_eq!(receipt.finish_reason, FinishReason::Stop);
    assert_eq!(receipt.compute_ms, usage.total_ms);
    // Not a receipt for some other request.
    assert!(verify_for_call(signed, &identity.peer_id(), &chat("echo", "bye")).is_err());
    assert_eq!((server.runs("echo"), server.load()), (1, 0));
}

#[tokio::test]
async fn a_caller_that_sends_nothing_gets_bad_request_at_the_request_timeout() {
    let config = ServeConfig {
        request_timeout: Duration::from_millis(50),
        ..Default::default()
    };
    let (server, _) = server(&[("echo", "echo", 1)], config);
    let mut caller = Caller::infer(&server, stranger());
    let start = Instant::now();
    let frames = caller.rest().await;
    assert!(start.elapsed() >= Duration::from_millis(50));
    let (code, message) = error_of(&frames);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(
        message.starts_with("no request frame began within"),
        "{message}"
    );
    assert_eq!(frames.len(), 1);
    caller.served().await;
    assert_eq!(server.runs("echo"), 0);
}

#[tokio::test]
async fn a_partial_request_frame_is_given_up_when_it_falls_behind_the_pace() {
    let config = ServeConfig {
        request_timeout: Duration::from_millis(50),
        ..Default::default()
    };
    let (server, _) = server(&[("echo", "echo", 1)], config);
    let whole = encode_frame(&chat("echo", "hello"), DEFAULT_MAX_FRAME_LEN).unwrap();
    let mut caller = Caller::infer(&server, stranger());
    caller.send_bytes(&whole[..whole.len() / 2]).await;
    let (code, message) = error_of(&caller.rest().await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(
        message.starts_with("the frame came too slowly"),
        "{message}"
    );
    caller.served().await;
    assert_eq!(server.runs("echo"), 0);
}

#[tokio::test]
async fn a_caller_leaving_before_its_request_gets_no_frame() {
    let (server, _) = server(&[("echo", "echo", 1)], ServeConfig::default());
    let caller = Caller::infer(&server, stranger());
    // Ends at once, not at the 10 s request timeout.
    tokio::time::timeout(WAIT, caller.hang_up())
        .await
        .expect("the serving task ends")
        .unwrap();
    assert_eq!(server.runs("echo"), 0);
}

#[tokio::test]
async fn an_oversized_request_frame_is_refused_without_compute() {
    let config = ServeConfig {
        max_frame_len: 1024,
        ..Default::default()
    };
    let (server, _) = server(&[("echo", "echo", 1)], config);
    let big = encode_frame(&chat("echo", &words(2000)), DEFAULT_MAX_FRAME_LEN).unwrap();
    assert!(big.len() > 1024);
    let mut caller = Caller::infer(&server, stranger());
    caller.send_bytes(&big).await;
    let (code, message) = error_of(&caller.rest().await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("exceeds the limit of 1024"), "{message}");
    caller.served().await;
    assert_eq!(server.runs("echo"), 0);
}

#[tokio::test]
async fn a_refused_caller_gets_unauthorized_and_runs_no_compute() {
    let config = ServeConfig {
        access: AccessConfig {
            default: Access::Allow,
            ..Default::default()
        },
        ..Default::default()
    };
    let (server, identity) = server(&[("echo", "echo", 1)], config);

    let frames = Caller::call(&server, stranger(), &chat("echo", "hi")).await;
    let (code, message) = error_of(&frames);
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(message.starts_with("not on the allow list"), "{message}");
    assert_eq!(frames.len(), 1, "nothing before the refusal: {frames:?}");
    // Authorization comes before the model lookup: a stranger learns nothing of the models.
    let frames = Caller::call(&server, stranger(), &chat("no-such-model", "hi")).await;
    assert_eq!(error_of(&frames).0, ErrorCode::Unauthorized);
    assert_eq!((server.runs("echo"), server.load()), (0, 0));

    // The node's own key is always served, and that call is counted.
    let frames = Caller::call(&server, identity.peer_id(), &chat("echo", "hi")).await;
    assert_eq!(text(&frames), "echo: hi");
    assert_eq!(server.runs("echo"), 1);
}

#[tokio::test]
async fn a_caller_hanging_up_frees_the_slot_and_stops_compute() {
    // 1000 words at 20 ms each: 20 s if compute ran to the end.
    let (server, _) = server(&[("slow", "echo?delay_ms=20", 1)], ServeConfig::default());
    let mut caller = Caller::running(&server, "slow").await;
    assert!(matches!(
        caller.frame().await,
        Some(InferResponse::Delta { .. })
    ));
    assert_eq!(server.load(), 1);

    let serving = caller.hang_up();
    tokio::time::timeout(WAIT, serving)
        .await
        .expect("the session ends when the caller leaves")
        .unwrap();
    // Within WAIT, much less than the 20 s of the whole answer.
    compute_stopped(&server, "slow").await;
    wait_until("the admission is released", || server.load() == 0).await;
    assert_eq!(server.runs("slow"), 1);

    let frames = Caller::call(&server, stranger(), &chat("slow", "again")).await;
    assert_eq!(text(&frames), "echo: again");
}

#[tokio::test]
async fn a_call_past_its_deadline_gets_deadline_exceeded_and_stops_compute() {
    let (server, _) = server(&[("slow", "echo?delay_ms=20", 1)], ServeConfig::default());
    let mut request = chat("slow", &words(1000));
    request.deadline_ms = Some(100);
    let start = Instant::now();
    let frames = Caller::call(&server, stranger(), &request).await;
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(
        matches!(frames[0], InferResponse::Started { .. }),
        "{frames:?}"
    );
    let (code, message) = error_of(&frames);
    assert_eq!(code, ErrorCode::DeadlineExceeded);
    assert!(message.contains("100ms"), "{message}");
    assert!(!frames
        .iter()
        .any(|f| matches!(f, InferResponse::Done { .. })));
    compute_stopped(&server, "slow").await;
}

#[tokio::test]
async fn a_full_model_answers_overloaded_at_once() {
    // One slot and a queue of one: two calls admitted, the third refused.
    let config = ServeConfig {
        max_queue: 1,
        ..Default::default()
    };
    let (server, _) = server(&[("slow", "echo?delay_ms=20", 1)], config);
    let running = Caller::running(&server, "slow").await;
    let mut queued = Caller::infer(&server, stranger());
    queued.send(&chat("slow", "queued")).await;
    wait_until("the second call is queued", || server.load() == 2).await;

    let frames = Caller::call(&server, stranger(), &chat("slow", "one more")).await;
    let (code, message) = error_of(&frames);
    assert_eq!(code, ErrorCode::Overloaded);
    assert!(message.contains("2 calls running or queued"), "{message}");
    assert_eq!(frames.len(), 1, "refused before any start: {frames:?}");
    // Answered while the other two are still admitted: it waited for nothing.
    assert_eq!(server.load(), 2);
    assert_eq!(server.runs("slow"), 1);

    // When the running call goes, the queued one gets the slot and runs to the end.
    drop(running.hang_up());
    assert!(matches!(
        queued.frame().await,
        Some(InferResponse::Started { .. })
    ));
    let rest = queued.rest().await;
    assert_eq!(text(&rest), "echo: queued");
    assert!(matches!(rest.last(), Some(InferResponse::Done { .. })));
    assert_eq!(server.runs("slow"), 2);
}

#[tokio::test]
async fn a_queued_call_gets_deadline_exceeded_if_no_slot_frees_in_time() {
    let (server, _) = server(&[("slow", "echo?delay_ms=20", 1)], ServeConfig::default());
    // Holds the only slot until the test ends.
    let _running = Caller::running(&server, "slow").await;

    let mut request = chat("slow", "late");
    request.deadline_ms = Some(50);
    let frames = Caller::call(&server, stranger(), &request).await;
    assert_eq!(error_of(&frames).0, ErrorCode::DeadlineExceeded);
    assert_eq!(frames.len(), 1, "it never started: {frames:?}");
    assert_eq!(server.runs("slow"), 1);
    assert_eq!(server.load(), 1, "its admission is released");
}

#[tokio::test]
async fn a_burst_of_deltas_leaves_in_fewer_packets_than_frames() {
    let (server, _) = server(&[("echo", "echo", 1)], ServeConfig::default());
    let (mut caller, packets) = Caller::infer_recorded(&server, stranger());
    caller.send(&chat("echo", &words(300))).await;
    let received = caller.rest().await;
    caller.served().await;
    assert!(matches!(received.last(), Some(InferResponse::Done { .. })));

    let packets = packets.frames();
    let sent: Vec<InferResponse> = packets.iter().flat_map(|(_, f)| f.clone()).collect();
    assert_eq!(sent, received, "coalescing keeps every frame, in order");
    assert!(
        packets.len() < received.len(),
        "{} frames in {} packets",
        received.len(),
        packets.len()
    );
}

#[tokio::test]
async fn started_is_held_briefly_then_sent_alone_when_output_is_slow() {
    // The first output takes 300 ms: far past the hold.
    let (server, _) = server(&[("slow", "echo?delay_ms=300", 1)], ServeConfig::default());
    let (mut caller, packets) = Caller::infer_recorded(&server, stranger());
    let sent_at = Instant::now();
    caller.send(&chat("slow", "a")).await;
    assert!(matches!(
        caller.frame().await,
        Some(InferResponse::Started { .. })
    ));
    assert!(matches!(
        caller.frame().await,
        Some(InferResponse::Delta { .. })
    ));
    drop(caller.hang_up());

    let packets = packets.frames();
    let (started_at, first) = &packets[0];
    assert!(
        matches!(first[..], [InferResponse::Started { .. }]),
        "started leaves alone, before any output: {first:?}"
    );
    assert!(
        started_at.duration_since(sent_at) >= STARTED_HOLD,
        "started was held back for the first output"
    );
    assert!(matches!(packets[1].1[0], InferResponse::Delta { .. }));
}
