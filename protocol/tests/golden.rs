//! Golden byte vectors: these exact bytes are the wire format of `/mesh/infer/1` and
//! `/mesh/catalog/1`. docs/protocol.md quotes them; changing one is a protocol version bump.

use mesh_protocol::frame::{decode_frame, encode_body, encode_frame, DEFAULT_MAX_FRAME_LEN};
use mesh_protocol::*;

fn check<T>(value: &T, expected_hex: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode_frame(value, DEFAULT_MAX_FRAME_LEN).unwrap();
    assert_eq!(hex::encode(&bytes), expected_hex, "encoding of {value:?}");
    let expected = hex::decode(expected_hex).unwrap();
    let (decoded, used): (T, usize) = decode_frame(&expected, DEFAULT_MAX_FRAME_LEN)
        .unwrap()
        .unwrap();
    assert_eq!(used, expected.len());
    assert_eq!(&decoded, value);
}

#[test]
fn chat_request() {
    let req = InferRequest {
        model: "smol".into(),
        input: Input::Chat {
            messages: vec![ChatMessage {
                role: Role::User,
                content: "Hi".into(),
            }],
        },
        params: SamplingParams {
            max_tokens: 16,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            seed: Some(7),
            stop: vec![],
        },
        deadline_ms: Some(30_000),
        token: None,
        resume: None,
    };
    check(&req, "8e01a5656d6f64656c64736d6f6c65696e707574a16463686174a1686d6573736167657381a264726f6c65647573657267636f6e74656e7462486966706172616d73a66a6d61785f746f6b656e73106b74656d7065726174757265fa0000000065746f705f70f665746f705f6bf66473656564076473746f70806b646561646c696e655f6d7319753065746f6b656ef6");
}

#[test]
fn embed_request() {
    let req = InferRequest {
        model: "minilm".into(),
        input: Input::Embed {
            texts: vec!["a".into(), "b".into()],
        },
        params: SamplingParams::default(),
        deadline_ms: None,
        token: Some(vec![1, 2, 3]),
        resume: None,
    };
    check(&req, "7fa5656d6f64656c666d696e696c6d65696e707574a165656d626564a1657465787473826161616266706172616d73a66a6d61785f746f6b656e731901006b74656d7065726174757265fa0000000065746f705f70f665746f705f6bf66473656564f66473746f70806b646561646c696e655f6d73f665746f6b656e43010203");
}

#[test]
fn response_frames() {
    check(
        &InferResponse::Started {
            model: "smol".into(),
            queue_ms: 3,
        },
        "1fa16773746172746564a2656d6f64656c64736d6f6c6871756575655f6d7303",
    );
    check(
        &InferResponse::Delta {
            text: "Paris".into(),
            tokens: vec![],
        },
        "13a16564656c7461a16474657874655061726973",
    );
    check(
        &InferResponse::Embeddings {
            vectors: vec![vec![0.5, -1.0]],
        },
        "21a16a656d62656464696e6773a167766563746f72738182fa3f000000fabf800000",
    );
    check(
        &InferResponse::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 30,
                completion_tokens: 8,
                cached_tokens: 0,
                time_to_first_token_ms: 40,
                total_ms: 200,
            },
            receipt: None,
            stages: vec![],
        },
        "68a164646f6e65a26d66696e6973685f726561736f6e6473746f70657573616765a46d70726f6d70745f746f6b656e73181e71636f6d706c6574696f6e5f746f6b656e73087674696d655f746f5f66697273745f746f6b656e5f6d73182868746f74616c5f6d7318c8",
    );
    check(
        &InferResponse::Error(WireError::new(ErrorCode::UnknownModel, "no such model")),
        "31a1656572726f72a264636f64656d756e6b6e6f776e5f6d6f64656c676d6573736167656d6e6f2073756368206d6f64656c",
    );
}

#[test]
fn model_card_and_catalog() {
    let card = ModelCard {
        name: "smol".into(),
        task: Task::Generate,
        architecture: "llama".into(),
        parameters: 134_515_008,
        quantization: "Q4_1".into(),
        context_length: 8192,
        embedding_dims: None,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
        license: Some("Apache-2.0".into()),
        max_concurrency: 2,
        layers: None,
        blob_root: None,
        files: Vec::new(),
    };
    check(&card, "dd01aa646e616d6564736d6f6c647461736b6867656e65726174656c617263686974656374757265656c6c616d616a706172616d65746572731a080489406c7175616e74697a6174696f6e6451345f316e636f6e746578745f6c656e6774681920006e656d62656464696e675f64696d73f666736861323536784062313739633935323364306536613066393861333330633735363262363832373530613666386338633135653562633730656133373337323831313064623533676c6963656e73656a4170616368652d322e306f6d61785f636f6e63757272656e637902");
    let catalog = CatalogResponse {
        cards: vec![SignedModelCard {
            card: encode_body(&card).unwrap()[..4].to_vec(),
            signature: vec![0xAB; 4],
        }],
        load: 1,
    };
    check(
        &catalog,
        "28a265636172647381a2646361726444aa646e61697369676e617475726544abababab646c6f616401",
    );
    check(&CatalogRequest {}, "01a0");
}

#[test]
fn a_directory_models_card_names_its_other_files() {
    // MiniLM as a BERT directory: the weights' sha256 and blob root, and `files` for the config
    // and the tokenizer (cross-checked with Python cbor2; docs/protocol.md section 9.1).
    let file = |name: &str, sha256: &str, blob_root: &str| mesh_protocol::CardFile {
        name: name.into(),
        sha256: sha256.into(),
        blob_root: blob_root.into(),
    };
    let card = ModelCard {
        name: "minilm".into(),
        task: Task::Embed,
        architecture: "bert".into(),
        parameters: 22_713_216,
        quantization: "F32".into(),
        context_length: 256,
        embedding_dims: Some(384),
        sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db".into(),
        license: Some("Apache-2.0".into()),
        max_concurrency: 1,
        layers: None,
        blob_root: Some("fcb036007f5b53c14f75cd58fc4908d646cb836708d51ee678053afe6005d7db".into()),
        files: vec![
            file(
                "config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                "c07b9c125979e7e1304823a2e7f5a98c5a7e7d2ab91c937a082e465b97c8e9bf",
            ),
            file(
                "tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                "001436a25c85ff4e289a7d2810c5310c30a928dc935e86a69fa905db2868f079",
            ),
        ],
    };
    check(&card, "8005ac646e616d65666d696e696c6d647461736b65656d6265646c61726368697465637475726564626572746a706172616d65746572731a015a93806c7175616e74697a6174696f6e634633326e636f6e746578745f6c656e6774681901006e656d62656464696e675f64696d7319018066736861323536784035336161353131373264313432633839643930313263636531356165346436636330636136383935383935313134333739636163623466616231323864396462676c6963656e73656a4170616368652d322e306f6d61785f636f6e63757272656e63790169626c6f625f726f6f747840666362303336303037663562353363313466373563643538666334393038643634366362383336373038643531656536373830353361666536303035643764626566696c657382a3646e616d656b636f6e6669672e6a736f6e6673686132353678403935336639633064343633343836623130613638373163633266643539663232336232633730313834663439383135653765666263616235643839303862343169626c6f625f726f6f74784063303762396331323539373965376531333034383233613265376635613938633561376537643261623931633933376130383265343635623937633865396266a3646e616d656e746f6b656e697a65722e6a736f6e6673686132353678406265353063333632386632626635626235653361376631376231663734363131623235363161336132376565616230356535616133306634313135373230333769626c6f625f726f6f74784030303134333661323563383566663465323839613764323831306335333130633330613932386463393335653836613639666139303564623238363866303739");
}

#[test]
fn unknown_error_codes_from_newer_peers_decode_as_unknown() {
    // {"error": {"code": "melted", "message": ""}}
    let frame =
        hex::decode("1da1656572726f72a264636f6465666d656c746564676d65737361676560").unwrap();
    let (resp, _): (InferResponse, usize) = decode_frame(&frame, DEFAULT_MAX_FRAME_LEN)
        .unwrap()
        .unwrap();
    assert_eq!(
        resp,
        InferResponse::Error(WireError::new(ErrorCode::Unknown, ""))
    );
}

/// The peer ids of the ed25519 secrets [1; 32] and [2; 32], as bytes (identity multihash).
const PEER_1: &str = "0024080112208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
const PEER_2: &str = "0024080112208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394";

#[test]
fn done_with_receipt() {
    // Cross-checked with Python cbor2; the signature is a placeholder (signing is pinned by the
    // token test vector in node/src/auth/token.rs, which uses the same scheme).
    let receipt = Receipt {
        version: 1,
        request_sha256: vec![0x11; 32],
        model: "smol".into(),
        weights_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
        server: hex::decode(PEER_1).unwrap(),
        client: hex::decode(PEER_2).unwrap(),
        token_id: Some((0u8..16).collect()),
        prompt_tokens: 30,
        completion_tokens: 8,
        finish_reason: FinishReason::Stop,
        received_unix_ms: 1_700_000_000_000,
        queue_ms: 3,
        time_to_first_token_ms: 40,
        compute_ms: 200,
        stages: vec![],
        resumed_tokens: 0,
    };
    let done = InferResponse::Done {
        finish_reason: FinishReason::Stop,
        usage: Usage {
            prompt_tokens: 30,
            completion_tokens: 8,
            cached_tokens: 0,
            time_to_first_token_ms: 40,
            total_ms: 200,
        },
        receipt: Some(SignedReceipt {
            receipt: encode_body(&receipt).unwrap(),
            signature: vec![0xAB; 64],
        }),
        stages: vec![],
    };
    check(&done, "d704a164646f6e65a36d66696e6973685f726561736f6e6473746f70657573616765a46d70726f6d70745f746f6b656e73181e71636f6d706c6574696f6e5f746f6b656e73087674696d655f746f5f66697273745f746f6b656e5f6d73182868746f74616c5f6d7318c86772656365697074a2677265636569707459018fae6776657273696f6e016e726571756573745f73686132353658201111111111111111111111111111111111111111111111111111111111111111656d6f64656c64736d6f6c6e776569676874735f7368613235367840623137396339353233643065366130663938613333306337353632623638323735306136663863386331356535626337306561333733373238313130646235336673657276657258260024080112208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c66636c69656e7458260024080112208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b39468746f6b656e5f696450000102030405060708090a0b0c0d0e0f6d70726f6d70745f746f6b656e73181e71636f6d706c6574696f6e5f746f6b656e73086d66696e6973685f726561736f6e6473746f707072656365697665645f756e69785f6d731b0000018bcfe568006871756575655f6d73037674696d655f746f5f66697273745f746f6b656e5f6d7318286a636f6d707574655f6d7318c8697369676e61747572655840abababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababab");
}

#[test]
fn capability_token_claims() {
    // The claims of the token test vector in docs/protocol.md (cross-checked with cbor2).
    let claims = TokenClaims {
        version: 1,
        id: (0u8..16).collect(),
        issuer: hex::decode(PEER_1).unwrap(),
        subject: hex::decode(PEER_2).unwrap(),
        models: vec!["smol".into()],
        not_before: 1_700_000_000,
        expires: 1_700_086_400,
        max_requests: Some(100),
    };
    assert_eq!(hex::encode(encode_body(&claims).unwrap()), "a86776657273696f6e0162696450000102030405060708090a0b0c0d0e0f6669737375657258260024080112208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c677375626a65637458260024080112208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394666d6f64656c738164736d6f6c6a6e6f745f6265666f72651a6553f10067657870697265731a655542806c6d61785f72657175657374731864");
    let text = "mtk1.omZjbGFpbXNYtqhndmVyc2lvbgFiaWRQAAECAwQFBgcICQoLDA0OD2Zpc3N1ZXJYJgAkCAESIIqI4910CfGV_VLbLTy6XXLKZwm_HZQSG_N0iAG0D29cZ3N1YmplY3RYJgAkCAESIIE5dw6ofRdfVqNUZsNMfszLjYqRtO43ol32D1uPybOUZm1vZGVsc4Fkc21vbGpub3RfYmVmb3JlGmVT8QBnZXhwaXJlcxplVUKAbG1heF9yZXF1ZXN0cxhkaXNpZ25hdHVyZVhAIr5Daz8yS1rPrDW9o7wE1wGN4IbnrNhpPevjU6CtRaNtnqH8aRdoxrpwlzy9ExAADoviQ3ub7PMpiUQvlhZHCQ";
    let token = SignedToken::from_text(text).unwrap();
    assert_eq!(token.decode_claims().unwrap(), claims);
    assert_eq!(token.to_text(), text);
}

#[test]
fn stage_frames() {
    // `/mesh/stage/1`, cross-checked with Python cbor2 (docs/protocol.md shows them decoded).
    let layers = LayerRange {
        start: 10,
        end: 20,
        total: 30,
    };
    check(
        &StageRequest::Open {
            model: "smol".into(),
            weights_sha256: "b1".repeat(32),
            layers,
            max_positions: 512,
            hidden: HiddenFormat::F32,
            token: None,
        },
        "a201a1646f70656ea6656d6f64656c64736d6f6c6e776569676874735f736861323536784062316231623162316231623162316231623162316231623162316231623162316231623162316231623162316231623162316231623162316231623162316231666c6179657273a36573746172740a63656e641465746f74616c181e6d6d61785f706f736974696f6e731902006668696464656e6366333265746f6b656ef6",
    );
    check(
        &StageRequest::Step {
            start: 7,
            rows: 1,
            hidden: [1.0f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        },
        "24a16473746570a36573746172740764726f7773016668696464656e480000803f000000c0",
    );
    check(&StageRequest::Close, "0665636c6f7365");
    check(
        &StageResponse::Opened { width: 576, layers },
        "2ea1666f70656e6564a2657769647468190240666c6179657273a36573746172740a63656e641465746f74616c181e",
    );
    check(
        &StageResponse::Output {
            hidden: vec![0, 0, 128, 63],
        },
        "15a1666f7574707574a16668696464656e440000803f",
    );
    // A delta that names its tokens, and a request that resumes a call.
    check(
        &InferResponse::Delta {
            text: " Paris".into(),
            tokens: vec![7042],
        },
        "1fa16564656c7461a264746578746620506172697366746f6b656e7381191b82",
    );
    let card = ModelCard {
        name: "smol".into(),
        task: Task::Generate,
        architecture: "llama".into(),
        parameters: 1,
        quantization: "Q4_1".into(),
        context_length: 8192,
        embedding_dims: None,
        sha256: "b1".repeat(32),
        license: None,
        max_concurrency: 2,
        layers: Some(layers),
        blob_root: None,
        files: Vec::new(),
    };
    check(&card, "eb01ab646e616d6564736d6f6c647461736b6867656e65726174656c617263686974656374757265656c6c616d616a706172616d6574657273016c7175616e74697a6174696f6e6451345f316e636f6e746578745f6c656e6774681920006e656d62656464696e675f64696d73f666736861323536784062316231623162316231623162316231623162316231623162316231623162316231623162316231623162316231623162316231623162316231623162316231676c6963656e7365f66f6d61785f636f6e63757272656e637902666c6179657273a36573746172740a63656e641465746f74616c181e");
}
