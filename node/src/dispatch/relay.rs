//! One call's frames as [`CallEvent`]s: `connected`, then `started`, deltas or embeddings,
//! and `done` with the serving node's receipt checked against the node called and the
//! request sent. A failure comes back with whether any output was passed on, which decides
//! whether the failover loop may try another node.

use std::time::Instant;

use libp2p::PeerId;
use mesh_protocol::receipt::SignedReceipt;
use mesh_protocol::{InferRequest, InferResponse};
use tokio::sync::mpsc;

use super::liveness::{unless_unresponsive, Watch};
use super::spec::StageReport;
use super::CallEvent;
use crate::call::{BoxedStream, Call, CallError};
use crate::network::Path;

/// How one attempt on one provider ended, short of `done`.
#[derive(Debug)]
pub(super) enum Failed {
    /// The call failed; `after_output` once a delta or embeddings were passed on.
    Call {
        error: CallError,
        after_output: bool,
    },
    AskerGone,
}

/// The tokens a call has passed on, by id, for resuming it elsewhere.
#[derive(Debug, Default)]
pub(super) struct Sampled {
    pub(super) tokens: Vec<u32>,
    /// Text came without its tokens' ids: the call cannot be carried on elsewhere.
    pub(super) untracked: bool,
}

/// One attempt at the call: the node called, when the whole call began, and whether to give
/// up on a node that stops answering (when another may take the call over).
#[derive(Clone, Copy)]
pub(super) struct Attempt<'a> {
    pub(super) peer: PeerId,
    pub(super) begin: Instant,
    pub(super) watch: Option<Watch<'a>>,
}

/// Passes the frames of `call` (`request` on `attempt.peer`, over `path`) on as events,
/// `connected` first, and returns `done` with the receipt checked. The ids of the tokens the
/// node says it sampled are appended to `sampled` as their deltas pass, so the call can be
/// resumed elsewhere if the node fails. With `attempt.watch`, a node silent for a while is
/// checked, and the call fails when it stopped answering ([`super::liveness`]).
pub(super) async fn relay(
    mut call: Call<BoxedStream>,
    attempt: Attempt<'_>,
    path: Path,
    request: &InferRequest,
    events: &mpsc::Sender<CallEvent>,
    sampled: &mut Sampled,
) -> Result<CallEvent, Failed> {
    let Attempt { peer, begin, watch } = attempt;
    let connect_ms = begin.elapsed().as_millis() as u64;
    let send = |event| async move { events.send(event).await.map_err(|_| Failed::AskerGone) };
    send(CallEvent::Connected {
        peer: peer.to_string(),
        path,
        connect_ms,
    })
    .await?;
    let mut first_byte = None;
    loop {
        let after_output = first_byte.is_some();
        let failed = |error| Failed::Call {
            error,
            after_output,
        };
        let frame = match unless_unresponsive(watch, call.next()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return Err(failed(CallError::Closed)),
            Ok(Err(e)) => return Err(failed(e)),
            Err(gone) => return Err(failed(gone.into())),
        };
        let event = match frame {
            InferResponse::Started { queue_ms, .. } => CallEvent::Started { queue_ms },
            InferResponse::Delta { text, tokens } => {
                first_byte.get_or_insert_with(|| begin.elapsed());
                // Bounded: a node cannot claim more tokens than the call allows.
                let room =
                    (request.params.max_tokens as usize).saturating_sub(sampled.tokens.len());
                if tokens.is_empty() && !text.is_empty() || tokens.len() > room {
                    sampled.untracked = true;
                }
                sampled.tokens.extend(tokens.into_iter().take(room));
                CallEvent::Delta { text }
            }
            InferResponse::Embeddings { vectors } => {
                first_byte.get_or_insert_with(|| begin.elapsed());
                CallEvent::Embeddings { vectors }
            }
            InferResponse::Done {
                finish_reason,
                usage,
                receipt,
                stages,
            } => {
                let (receipt_verified, receipt_error) =
                    match check_receipt(receipt.as_ref(), &peer, request) {
                        Ok(()) => (true, None),
                        Err(why) => (false, Some(why)),
                    };
                let total = begin.elapsed();
                return Ok(CallEvent::Done {
                    peer: peer.to_string(),
                    path,
                    finish_reason,
                    usage,
                    connect_ms,
                    time_to_first_byte_ms: first_byte.unwrap_or(total).as_millis() as u64,
                    total_ms: total.as_millis() as u64,
                    receipt: receipt.map(|r| r.to_text()),
                    receipt_verified,
                    receipt_error,
                    stages: stages.iter().map(StageReport::from).collect(),
                    resumed: Vec::new(),
                });
            }
            InferResponse::Error(e) => return Err(failed(CallError::Remote(e))),
        };
        send(event).await?;
    }
}

/// Checks that `receipt` is signed by `peer`, the node called, and covers `request`.
fn check_receipt(
    receipt: Option<&SignedReceipt>,
    peer: &PeerId,
    request: &InferRequest,
) -> Result<(), String> {
    let receipt = receipt.ok_or("the node sent no receipt")?;
    crate::auth::receipt::verify_for_call(receipt, peer, request)
        .map(drop)
        .map_err(|e| {
            tracing::warn!(%peer, "the node's receipt does not verify: {e}");
            e.to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{build_request, InferSpec, Target};
    use crate::engine::builtin::{Echo, HashEmbed};
    use crate::engine::SharedEngine;
    use crate::serve::ServeConfig;
    use crate::serve::Server;
    use crate::NodeIdentity;
    use mesh_protocol::ErrorCode;
    use mesh_protocol::{FinishReason, ModelCard};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio_util::compat::TokioAsyncReadCompatExt;

    const IDLE: Duration = Duration::from_secs(10);

    /// A real server with the builtin echo and hash-embed models, and its peer id.
    fn server() -> (Arc<Server>, PeerId) {
        let identity = NodeIdentity::generate();
        let engines: Vec<SharedEngine> = vec![
            Arc::new(Echo::new("echo", Duration::ZERO, 2)),
            Arc::new(HashEmbed::new("embed", 2)),
        ];
        let server = Server::new(&identity, engines, ServeConfig::default()).unwrap();
        (Arc::new(server), identity.peer_id())
    }

    fn card(server: &Server, model: &str) -> ModelCard {
        server.cards().find(|c| c.name == model).unwrap().clone()
    }

    fn spec(model: &str, prompts: &[&str]) -> InferSpec {
        InferSpec {
            target: Target::Any,
            model: model.into(),
            weights: None,
            prompts: prompts.iter().map(|p| p.to_string()).collect(),
            system: None,
            messages: Vec::new(),
            prompt: None,
            expect: None,
            params: Default::default(),
            deadline_ms: 5_000,
            token: None,
        }
    }

    /// Relays `call` as a call to `called`, returning the events passed on and the outcome.
    async fn relay_all(
        call: Call<BoxedStream>,
        called: PeerId,
        request: &InferRequest,
    ) -> (Vec<CallEvent>, Result<CallEvent, Failed>) {
        let (tx, mut rx) = mpsc::channel(64);
        let attempt = Attempt {
            peer: called,
            begin: Instant::now(),
            watch: None,
        };
        let last = relay(
            call,
            attempt,
            Path::Local,
            request,
            &tx,
            &mut Sampled::default(),
        )
        .await;
        drop(tx);
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            events.push(event);
        }
        (events, last)
    }

    fn text_of(events: &[CallEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                CallEvent::Delta { text } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_local_call_streams_its_answer_and_a_verified_receipt() {
        let (server, me) = server();
        let request =
            build_request(&spec("echo", &["hello mesh"]), &card(&server, "echo")).unwrap();
        let call = Call::local(&server, me, &request, IDLE).await.unwrap();
        let (events, last) = relay_all(call, me, &request).await;

        assert_eq!(
            events[0],
            CallEvent::Connected {
                peer: me.to_string(),
                path: Path::Local,
                connect_ms: match events[0] {
                    CallEvent::Connected { connect_ms, .. } => connect_ms,
                    _ => unreachable!(),
                },
            }
        );
        assert!(matches!(events[1], CallEvent::Started { .. }), "{events:?}");
        assert!(events[2..]
            .iter()
            .all(|e| matches!(e, CallEvent::Delta { .. })));
        assert_eq!(text_of(&events), "echo: hello mesh");
        match last.unwrap() {
            CallEvent::Done {
                peer,
                path,
                finish_reason,
                usage,
                receipt,
                receipt_verified,
                receipt_error,
                time_to_first_byte_ms,
                total_ms,
                ..
            } => {
                assert_eq!(peer, me.to_string());
                assert_eq!(path, Path::Local);
                assert_eq!(finish_reason, FinishReason::Stop);
                assert_eq!((usage.prompt_tokens, usage.completion_tokens), (2, 3));
                assert!(receipt.unwrap().starts_with("mrc1."));
                assert!(receipt_verified);
                assert_eq!(receipt_error, None);
                assert!(time_to_first_byte_ms <= total_ms);
            }
            other => panic!("expected done, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_receipt_by_another_node_or_for_another_request_does_not_verify() {
        let (server, me) = server();
        let echo = card(&server, "echo");
        let request = build_request(&spec("echo", &["hi"]), &echo).unwrap();

        let call = Call::local(&server, me, &request, IDLE).await.unwrap();
        let someone_else = NodeIdentity::generate().peer_id();
        let (_, last) = relay_all(call, someone_else, &request).await;
        let CallEvent::Done {
            receipt,
            receipt_verified,
            receipt_error,
            ..
        } = last.unwrap()
        else {
            panic!("expected done")
        };
        assert!(receipt.is_some() && !receipt_verified);
        assert!(receipt_error.unwrap().contains("but the call went to"));

        let call = Call::local(&server, me, &request, IDLE).await.unwrap();
        let other = build_request(&spec("echo", &["ho"]), &echo).unwrap();
        let (_, last) = relay_all(call, me, &other).await;
        let CallEvent::Done {
            receipt_verified,
            receipt_error,
            ..
        } = last.unwrap()
        else {
            panic!("expected done")
        };
        assert!(!receipt_verified);
        assert!(receipt_error.unwrap().contains("another request"));
    }

    #[tokio::test]
    async fn embeddings_arrive_as_one_event() {
        let (server, me) = server();
        let request =
            build_request(&spec("embed", &["a", "b c"]), &card(&server, "embed")).unwrap();
        let call = Call::local(&server, me, &request, IDLE).await.unwrap();
        let (events, last) = relay_all(call, me, &request).await;
        let vectors: Vec<&Vec<Vec<f32>>> = events
            .iter()
            .filter_map(|e| match e {
                CallEvent::Embeddings { vectors } => Some(vectors),
                _ => None,
            })
            .collect();
        assert_eq!(vectors.len(), 1);
        assert_eq!(vectors[0].len(), 2);
        assert_eq!(vectors[0][0], HashEmbed::embed("a"));
        assert!(matches!(
            last,
            Ok(CallEvent::Done {
                finish_reason: FinishReason::Complete,
                receipt_verified: true,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_node_s_refusal_ends_the_call_before_any_output() {
        let (server, me) = server();
        let mut request = build_request(&spec("echo", &["hi"]), &card(&server, "echo")).unwrap();
        request.model = "no-such-model".into();
        let call = Call::local(&server, me, &request, IDLE).await.unwrap();
        let (events, last) = relay_all(call, me, &request).await;
        assert!(
            matches!(events[..], [CallEvent::Connected { .. }]),
            "{events:?}"
        );
        match last {
            Err(Failed::Call {
                error: CallError::Remote(e),
                after_output: false,
            }) => {
                assert_eq!(e.code, ErrorCode::UnknownModel);
                assert!(e.message.contains("echo"), "it lists what it hosts: {e}");
            }
            other => panic!("expected a remote refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stream_cut_after_output_is_closed_and_counts_as_answered() {
        let (near, far) = tokio::io::duplex(4096);
        let node = tokio::spawn(async move {
            let (mut rd, mut wr) = futures::AsyncReadExt::split(far.compat());
            let max = mesh_protocol::DEFAULT_MAX_FRAME_LEN;
            let _: Option<InferRequest> = crate::wire::read_frame(&mut rd, max).await.unwrap();
            for frame in [
                InferResponse::Started {
                    model: "echo".into(),
                    queue_ms: 0,
                },
                InferResponse::Delta {
                    text: "half".into(),
                    tokens: vec![],
                },
            ] {
                crate::wire::write_frame(&mut wr, &frame, max)
                    .await
                    .unwrap();
            }
            // Then the node goes away.
        });
        let (server, me) = server();
        let request = build_request(&spec("echo", &["hi"]), &card(&server, "echo")).unwrap();
        let call = Call::start(Box::new(near.compat()) as BoxedStream, &request, IDLE)
            .await
            .unwrap();
        let (events, last) = relay_all(call, me, &request).await;
        node.await.unwrap();
        assert_eq!(text_of(&events), "half");
        assert!(
            matches!(
                last,
                Err(Failed::Call {
                    error: CallError::Closed,
                    after_output: true
                })
            ),
            "{last:?}"
        );
    }

    #[tokio::test]
    async fn an_asker_that_went_away_ends_the_call() {
        let (server, me) = server();
        let request = build_request(&spec("echo", &["hi"]), &card(&server, "echo")).unwrap();
        let call = Call::local(&server, me, &request, IDLE).await.unwrap();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let attempt = Attempt {
            peer: me,
            begin: Instant::now(),
            watch: None,
        };
        let last = relay(
            call,
            attempt,
            Path::Local,
            &request,
            &tx,
            &mut Sampled::default(),
        )
        .await;
        assert!(matches!(last, Err(Failed::AskerGone)), "{last:?}");
    }
}
