//! Property tests: every frame type survives encode -> decode, and no byte string makes the
//! decoder panic.

use mesh_protocol::frame::{decode_body, decode_frame, encode_frame, DEFAULT_MAX_FRAME_LEN};
use mesh_protocol::*;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,40}", "[a-z0-9 ]{0,12}"]
}

fn model_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:/-]{1,40}"
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::System), Just(Role::User), Just(Role::Assistant)]
}

fn params() -> impl Strategy<Value = SamplingParams> {
    (
        any::<u32>(),
        any::<f32>(),
        proptest::option::of(any::<f32>()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u64>()),
        proptest::collection::vec(text(), 0..3),
    )
        .prop_map(
            |(max_tokens, temperature, top_p, top_k, seed, stop)| SamplingParams {
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
            },
        )
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        proptest::collection::vec(
            (role(), text()).prop_map(|(role, content)| ChatMessage { role, content }),
            0..4
        )
        .prop_map(|messages| Input::Chat { messages }),
        text().prop_map(|prompt| Input::Completion { prompt }),
        proptest::collection::vec(text(), 0..4).prop_map(|texts| Input::Embed { texts }),
    ]
}

fn request() -> impl Strategy<Value = InferRequest> {
    (
        model_name(),
        input(),
        params(),
        proptest::option::of(any::<u64>()),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        proptest::option::of(
            (
                "[0-9a-f]{64}",
                proptest::collection::vec(any::<u32>(), 0..16),
            )
                .prop_map(|(weights_sha256, tokens)| Resume {
                    weights_sha256,
                    tokens,
                }),
        ),
    )
        .prop_map(
            |(model, input, params, deadline_ms, token, resume)| InferRequest {
                model,
                input,
                params,
                deadline_ms,
                token,
                resume,
            },
        )
}

fn layer_range() -> impl Strategy<Value = LayerRange> {
    (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(start, end, total)| LayerRange {
        start,
        end,
        total,
    })
}

fn stage_use() -> impl Strategy<Value = StageUse> {
    (
        proptest::collection::vec(any::<u8>(), 0..40),
        layer_range(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 32)),
        any::<u32>(),
        any::<u64>(),
        text(),
        any::<bool>(),
    )
        .prop_map(
            |(peer, layers, receipt_sha256, steps, wait_ms, path, replacement)| StageUse {
                peer,
                layers,
                receipt_sha256,
                steps,
                wait_ms,
                path,
                replacement,
            },
        )
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::UnknownModel),
        Just(ErrorCode::Unauthorized),
        Just(ErrorCode::Overloaded),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::DeadlineExceeded),
        Just(ErrorCode::Internal),
    ]
}

fn response() -> impl Strategy<Value = InferResponse> {
    let finish = prop_oneof![
        Just(FinishReason::Stop),
        Just(FinishReason::Length),
        Just(FinishReason::Complete)
    ];
    let usage = (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
        |(prompt_tokens, completion_tokens, time_to_first_token_ms, total_ms)| Usage {
            prompt_tokens,
            completion_tokens,
            cached_tokens: prompt_tokens / 2,
            time_to_first_token_ms,
            total_ms,
        },
    );
    prop_oneof![
        (model_name(), any::<u64>())
            .prop_map(|(model, queue_ms)| InferResponse::Started { model, queue_ms }),
        (text(), proptest::collection::vec(any::<u32>(), 0..8))
            .prop_map(|(text, tokens)| InferResponse::Delta { text, tokens }),
        proptest::collection::vec(proptest::collection::vec(any::<f32>(), 0..8), 0..4)
            .prop_map(|vectors| InferResponse::Embeddings { vectors }),
        (
            finish,
            usage,
            proptest::option::of((
                proptest::collection::vec(any::<u8>(), 0..64),
                proptest::collection::vec(any::<u8>(), 0..64)
            )),
            proptest::collection::vec(stage_use(), 0..3),
        )
            .prop_map(
                |(finish_reason, usage, receipt, stages)| InferResponse::Done {
                    finish_reason,
                    usage,
                    receipt: receipt
                        .map(|(receipt, signature)| SignedReceipt { receipt, signature }),
                    stages,
                }
            ),
        (error_code(), text())
            .prop_map(|(code, message)| InferResponse::Error(WireError { code, message })),
    ]
}

fn card() -> impl Strategy<Value = ModelCard> {
    let card = (
        model_name(),
        prop_oneof![Just(Task::Generate), Just(Task::Embed)],
        text(),
        any::<u64>(),
        text(),
        any::<u32>(),
        proptest::option::of(any::<u32>()),
        "[0-9a-f]{64}",
        proptest::option::of(text()),
        any::<u32>(),
        proptest::option::of(layer_range()),
        proptest::option::of("[0-9a-f]{64}"),
    )
        .prop_map(
            |(
                name,
                task,
                architecture,
                parameters,
                quantization,
                context_length,
                embedding_dims,
                sha256,
                license,
                max_concurrency,
                layers,
                blob_root,
            )| ModelCard {
                name,
                task,
                architecture,
                parameters,
                quantization,
                context_length,
                embedding_dims,
                sha256,
                license,
                max_concurrency,
                layers,
                blob_root,
                files: Vec::new(),
            },
        );
    let file =
        ("[a-z.]{1,16}", "[0-9a-f]{64}", "[0-9a-f]{64}").prop_map(|(name, sha256, blob_root)| {
            mesh_protocol::CardFile {
                name,
                sha256,
                blob_root,
            }
        });
    (card, proptest::collection::vec(file, 0..3)).prop_map(|(mut card, files)| {
        card.files = files;
        card
    })
}

fn stage_request() -> impl Strategy<Value = StageRequest> {
    let format = prop_oneof![Just(HiddenFormat::F32), Just(HiddenFormat::F16)];
    prop_oneof![
        (
            model_name(),
            "[0-9a-f]{64}",
            layer_range(),
            any::<u32>(),
            format,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        )
            .prop_map(
                |(model, weights_sha256, layers, max_positions, hidden, token)| {
                    StageRequest::Open {
                        model,
                        weights_sha256,
                        layers,
                        max_positions,
                        hidden,
                        token,
                    }
                }
            ),
        (
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..256)
        )
            .prop_map(|(start, rows, hidden)| StageRequest::Step {
                start,
                rows,
                hidden
            }),
        Just(StageRequest::Close),
    ]
}

fn stage_response() -> impl Strategy<Value = StageResponse> {
    prop_oneof![
        (any::<u32>(), layer_range())
            .prop_map(|(width, layers)| StageResponse::Opened { width, layers }),
        proptest::collection::vec(any::<u8>(), 0..256)
            .prop_map(|hidden| StageResponse::Output { hidden }),
        (
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(receipt, signature)| StageResponse::Closed {
                receipt: SignedStageReceipt { receipt, signature }
            }),
        (error_code(), text())
            .prop_map(|(code, message)| StageResponse::Error(WireError { code, message })),
    ]
}

/// Equality that treats NaN as equal to NaN, since NaN floats must survive the trip too.
fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    frame::encode_body(a).unwrap() == frame::encode_body(b).unwrap()
}

fn roundtrip<T>(value: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let bytes = encode_frame(value, DEFAULT_MAX_FRAME_LEN).unwrap();
    let (back, used): (T, usize) = decode_frame(&bytes, DEFAULT_MAX_FRAME_LEN)
        .unwrap()
        .expect("a whole frame");
    assert_eq!(used, bytes.len());
    back
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn requests_roundtrip(req in request()) {
        let back = roundtrip(&req);
        prop_assert!(same(&req, &back), "{req:?} != {back:?}");
    }

    #[test]
    fn responses_roundtrip(resp in response()) {
        let back = roundtrip(&resp);
        prop_assert!(same(&resp, &back), "{resp:?} != {back:?}");
    }

    #[test]
    fn cards_and_catalogs_roundtrip(cards in proptest::collection::vec(card(), 0..3), load in any::<u32>()) {
        let signed: Vec<SignedModelCard> = cards.iter().map(|c| SignedModelCard {
            card: frame::encode_body(c).unwrap(),
            signature: vec![7; 64],
        }).collect();
        let catalog = CatalogResponse { cards: signed, load };
        let back = roundtrip(&catalog);
        prop_assert_eq!(&back, &catalog);
        for (signed, card) in back.cards.iter().zip(&cards) {
            prop_assert_eq!(&signed.decode_card().unwrap(), card);
        }
        prop_assert_eq!(roundtrip(&CatalogRequest {}), CatalogRequest {});
    }

    #[test]
    fn stage_frames_roundtrip(req in stage_request(), resp in stage_response()) {
        prop_assert_eq!(roundtrip(&req), req);
        prop_assert_eq!(roundtrip(&resp), resp);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame::<StageRequest>(&bytes, DEFAULT_MAX_FRAME_LEN);
        let _ = decode_frame::<StageResponse>(&bytes, DEFAULT_MAX_FRAME_LEN);
        let _ = decode_body::<StageReceipt>(&bytes);
        let _ = decode_frame::<InferRequest>(&bytes, DEFAULT_MAX_FRAME_LEN);
        let _ = decode_frame::<InferResponse>(&bytes, DEFAULT_MAX_FRAME_LEN);
        let _ = decode_frame::<CatalogResponse>(&bytes, DEFAULT_MAX_FRAME_LEN);
        let _ = decode_body::<InferRequest>(&bytes);
        let _ = decode_body::<ModelCard>(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(req in request(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut bytes = encode_frame(&req, DEFAULT_MAX_FRAME_LEN).unwrap();
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
        let _ = decode_frame::<InferRequest>(&bytes, DEFAULT_MAX_FRAME_LEN);
    }

    #[test]
    fn truncated_frames_ask_for_more_or_fail(req in request(), cut in any::<usize>()) {
        let bytes = encode_frame(&req, DEFAULT_MAX_FRAME_LEN).unwrap();
        let cut = cut % bytes.len();
        let r = decode_frame::<InferRequest>(&bytes[..cut], DEFAULT_MAX_FRAME_LEN);
        prop_assert!(matches!(r, Ok(None)), "a prefix of a valid frame must ask for more bytes");
    }
}
