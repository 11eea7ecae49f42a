//! Every decision of [`Authorizer`], one reason at a time.

use super::token::{issue, sign_claims, TokenRequest};
use super::*;
use crate::NodeIdentity;

const NOW: u64 = 1_700_000_000;

struct Setup {
    node: NodeIdentity,
    client: PeerId,
    auth: Authorizer,
    _tmp: tempfile::TempDir,
    revoked: std::path::PathBuf,
}

fn setup(default: Access, trusted: Vec<PeerId>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let node = NodeIdentity::generate();
    let revoked = tmp.path().join(revocation::REVOKED_FILE);
    let config = AccessConfig {
        default,
        trusted_issuers: trusted,
        revocation_file: Some(revoked.clone()),
        quota_file: Some(tmp.path().join(quota::USAGE_FILE)),
        ..Default::default()
    };
    let hosted = ["echo".to_string(), "other".to_string()];
    let auth = Authorizer::new(node.peer_id(), &config, &hosted).unwrap();
    Setup {
        node,
        client: NodeIdentity::generate().peer_id(),
        auth,
        _tmp: tmp,
        revoked,
    }
}

fn token_for(
    issuer: &NodeIdentity,
    subject: PeerId,
    change: impl FnOnce(&mut TokenRequest),
) -> Vec<u8> {
    let mut request = TokenRequest {
        subject,
        models: vec!["echo".into()],
        not_before: NOW - 10,
        expires: NOW + 3600,
        max_requests: None,
    };
    change(&mut request);
    issue(issuer, &request).unwrap().to_bytes()
}

fn refusal(s: &Setup, token: Option<&[u8]>) -> &'static str {
    s.auth
        .authorize(&s.client, "echo", token, NOW)
        .unwrap_err()
        .reason()
}

#[test]
fn open_serves_anyone_and_the_owner_is_always_served() {
    let s = setup(Access::Open, vec![]);
    assert_eq!(
        s.auth.authorize(&s.client, "echo", None, NOW).unwrap().by,
        GrantedBy::Open
    );
    let s = setup(Access::Token, vec![]);
    let me = s.node.peer_id();
    assert_eq!(
        s.auth.authorize(&me, "echo", None, NOW).unwrap().by,
        GrantedBy::Owner
    );
}

#[test]
fn a_valid_token_is_served_and_every_bad_one_is_refused_with_its_reason() {
    let s = setup(Access::Token, vec![]);
    let good = token_for(&s.node, s.client, |_| {});
    let grant = s
        .auth
        .authorize(&s.client, "echo", Some(&good), NOW)
        .unwrap();
    assert_eq!(grant.by, GrantedBy::Token);
    assert!(grant.token_id.is_some());

    assert_eq!(refusal(&s, None), "no_token");
    assert_eq!(refusal(&s, Some(b"garbage")), "malformed_token");
    let expired = token_for(&s.node, s.client, |r| {
        r.not_before = NOW - 100;
        r.expires = NOW;
    });
    assert_eq!(refusal(&s, Some(&expired)), "expired");
    let early = token_for(&s.node, s.client, |r| {
        r.not_before = NOW + 1;
        r.expires = NOW + 100;
    });
    assert_eq!(refusal(&s, Some(&early)), "not_yet_valid");
    let someone_else = token_for(&s.node, NodeIdentity::generate().peer_id(), |_| {});
    assert_eq!(refusal(&s, Some(&someone_else)), "wrong_subject");
    let other_model = token_for(&s.node, s.client, |r| r.models = vec!["other".into()]);
    assert_eq!(refusal(&s, Some(&other_model)), "model_not_covered");
    let every_model = token_for(&s.node, s.client, |r| r.models.clear());
    assert!(s
        .auth
        .authorize(&s.client, "echo", Some(&every_model), NOW)
        .is_ok());
    let stranger = NodeIdentity::generate();
    let untrusted = token_for(&stranger, s.client, |_| {});
    assert_eq!(refusal(&s, Some(&untrusted)), "untrusted_issuer");

    // Tampered: the claims are re-encoded with a later expiry under the old signature.
    let signed = mesh_protocol::SignedToken::from_bytes(&expired).unwrap();
    let mut claims = signed.decode_claims().unwrap();
    claims.expires = u64::MAX;
    let forged = mesh_protocol::SignedToken {
        claims: mesh_protocol::frame::encode_body(&claims).unwrap(),
        signature: signed.signature,
    };
    assert_eq!(refusal(&s, Some(&forged.to_bytes())), "bad_signature");

    // Messages carry the reason's phrase.
    let msg = WireError::from(
        s.auth
            .authorize(&s.client, "echo", Some(&someone_else), NOW)
            .unwrap_err(),
    );
    assert_eq!(msg.code, ErrorCode::Unauthorized);
    assert!(msg.message.starts_with("wrong subject:"), "{}", msg.message);
}

#[test]
fn a_trusted_issuer_is_accepted() {
    let delegate = NodeIdentity::generate();
    let s = setup(Access::Token, vec![delegate.peer_id()]);
    let token = token_for(&delegate, s.client, |_| {});
    assert_eq!(
        s.auth
            .authorize(&s.client, "echo", Some(&token), NOW)
            .unwrap()
            .by,
        GrantedBy::Token
    );
}

#[test]
fn revocation_is_read_from_the_file_while_running() {
    let s = setup(Access::Token, vec![]);
    let token = token_for(&s.node, s.client, |_| {});
    assert!(s
        .auth
        .authorize(&s.client, "echo", Some(&token), NOW)
        .is_ok());
    let id = token::open_bytes(&token).unwrap().id();
    revocation::revoke(&s.revoked, &id, "").unwrap();
    assert_eq!(refusal(&s, Some(&token)), "revoked");
}

#[test]
fn an_unusable_revocation_list_refuses_every_token_with_its_reason() {
    let s = setup(Access::Token, vec![]);
    assert!(
        s.revoked.exists(),
        "the list is created when the node starts"
    );
    let token = token_for(&s.node, s.client, |_| {});
    let ok = |s: &Setup| s.auth.authorize(&s.client, "echo", Some(&token), NOW);
    assert!(ok(&s).is_ok());
    let unavailable = |s: &Setup| {
        let r = ok(s).unwrap_err();
        assert_eq!(r.reason(), "revocation_unavailable", "{r}");
        r.to_string()
    };
    // Oversized.
    std::fs::write(
        &s.revoked,
        vec![b'#'; watched::MAX_WATCHED_FILE as usize + 1],
    )
    .unwrap();
    assert!(unavailable(&s).contains("is over"));
    // Vanished.
    std::fs::remove_file(&s.revoked).unwrap();
    assert!(unavailable(&s).contains("is missing"));
    // Unreadable, even by root: a directory in its place.
    std::fs::create_dir(&s.revoked).unwrap();
    assert!(unavailable(&s).contains("cannot read"));
    std::fs::remove_dir(&s.revoked).unwrap();
    std::fs::write(&s.revoked, "").unwrap();
    assert!(ok(&s).is_ok());
    // Callers without a token are not affected: the allow list and the owner still work.
    std::fs::remove_file(&s.revoked).unwrap();
    let me = s.node.peer_id();
    assert!(s.auth.authorize(&me, "echo", None, NOW).is_ok());
}

#[test]
fn a_queued_call_is_checked_again_when_it_starts() {
    let s = setup(Access::Token, vec![]);
    let token = token_for(&s.node, s.client, |r| r.expires = NOW + 60);
    let grant = s
        .auth
        .authorize(&s.client, "echo", Some(&token), NOW)
        .unwrap();
    // Expired while it waited.
    let late = s.auth.commit(&grant, NOW + 60).unwrap_err();
    assert_eq!(late.reason(), "expired", "{late}");
    // Revoked while it waited.
    assert!(s.auth.commit(&grant, NOW).is_ok());
    let id = token::open_bytes(&token).unwrap().id();
    revocation::revoke(&s.revoked, &id, "").unwrap();
    assert_eq!(s.auth.commit(&grant, NOW).unwrap_err().reason(), "revoked");
    // The list became unusable while it waited.
    let other = token_for(&s.node, s.client, |_| {});
    let grant = s
        .auth
        .authorize(&s.client, "echo", Some(&other), NOW)
        .unwrap();
    std::fs::remove_file(&s.revoked).unwrap();
    assert_eq!(
        s.auth.commit(&grant, NOW).unwrap_err().reason(),
        "revocation_unavailable"
    );
}

#[test]
fn quota_is_counted_at_commit_and_refused_when_spent() {
    let s = setup(Access::Token, vec![]);
    let token = token_for(&s.node, s.client, |r| r.max_requests = Some(2));
    for _ in 0..2 {
        let grant = s
            .auth
            .authorize(&s.client, "echo", Some(&token), NOW)
            .unwrap();
        s.auth.commit(&grant, NOW).unwrap();
    }
    assert_eq!(refusal(&s, Some(&token)), "quota_spent");
    // Two grants racing for the last request: only one commit succeeds.
    let token = token_for(&s.node, s.client, |r| r.max_requests = Some(1));
    let a = s
        .auth
        .authorize(&s.client, "echo", Some(&token), NOW)
        .unwrap();
    let b = s
        .auth
        .authorize(&s.client, "echo", Some(&token), NOW)
        .unwrap();
    assert!(s.auth.commit(&a, NOW).is_ok());
    assert_eq!(s.auth.commit(&b, NOW).unwrap_err().reason(), "quota_spent");
}

#[test]
fn allow_lists_from_flags_and_a_file_reloaded_on_change() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("allowed");
    let (a, b, c) = (
        NodeIdentity::generate().peer_id(),
        NodeIdentity::generate().peer_id(),
        NodeIdentity::generate().peer_id(),
    );
    std::fs::write(&file, format!("# team\n{b} bob\nbad line\n")).unwrap();
    let config = AccessConfig {
        default: Access::Allow,
        models: BTreeMap::from([("public".to_string(), Access::Open)]),
        allow: vec![a],
        allow_file: Some(file.clone()),
        ..Default::default()
    };
    let hosted = ["echo".to_string(), "public".to_string()];
    let auth = Authorizer::new(NodeIdentity::generate().peer_id(), &config, &hosted).unwrap();
    assert_eq!(
        auth.authorize(&a, "echo", None, NOW).unwrap().by,
        GrantedBy::AllowList
    );
    assert_eq!(
        auth.authorize(&b, "echo", None, NOW).unwrap().by,
        GrantedBy::AllowList
    );
    assert_eq!(
        auth.authorize(&c, "echo", None, NOW).unwrap_err().reason(),
        "not_allowed"
    );
    assert_eq!(
        auth.authorize(&c, "public", None, NOW).unwrap().by,
        GrantedBy::Open
    );

    // Edit the file while running: c in, b out (a different size, so the change is seen
    // even within one mtime tick).
    std::fs::write(&file, format!("{c}\n")).unwrap();
    assert!(auth.authorize(&c, "echo", None, NOW).is_ok());
    assert_eq!(
        auth.authorize(&b, "echo", None, NOW).unwrap_err().reason(),
        "not_allowed"
    );
    // A deleted file allows nobody (closed), but flags still apply.
    std::fs::remove_file(&file).unwrap();
    assert!(auth.authorize(&c, "echo", None, NOW).is_err());
    assert!(auth.authorize(&a, "echo", None, NOW).is_ok());
}

#[test]
fn setup_errors_are_clear() {
    let me = NodeIdentity::generate().peer_id();
    let config = AccessConfig {
        models: BTreeMap::from([("typo".to_string(), Access::Token)]),
        ..Default::default()
    };
    let err = Authorizer::new(me, &config, &["echo".into()])
        .err()
        .unwrap();
    assert!(err.to_string().contains("typo"), "{err}");
    let config = AccessConfig {
        allow_file: Some("/nonexistent/allowed".into()),
        ..Default::default()
    };
    let err = Authorizer::new(me, &config, &[]).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/allowed"), "{err}");
}

#[test]
fn signed_claims_with_the_same_inputs_are_the_same_bytes() {
    let issuer = NodeIdentity::from_secret([9; 32]);
    let claims = mesh_protocol::TokenClaims {
        version: 1,
        id: vec![0; 16],
        issuer: issuer.peer_id().to_bytes(),
        subject: issuer.peer_id().to_bytes(),
        models: vec![],
        not_before: 0,
        expires: 1,
        max_requests: None,
    };
    assert_eq!(sign_claims(&issuer, &claims), sign_claims(&issuer, &claims));
}
