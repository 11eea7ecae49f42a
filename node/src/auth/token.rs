//! Issuing capability tokens with the node key, and checking their signature.
//!
//! The policy checks (trusted issuer, subject, model, time, revocation, quota) live in
//! [`super::Authorizer`]; this module only makes and opens signed tokens.

use libp2p::PeerId;
use mesh_protocol::frame::encode_body;
use mesh_protocol::token::{SignedToken, TokenClaims, TOKEN_ID_LEN, TOKEN_VERSION};

use crate::identity::{verify_by_peer, NodeIdentity};

use super::Refusal;

/// What `mesh token issue` asks for.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub subject: PeerId,
    pub models: Vec<String>,
    pub not_before: u64,
    pub expires: u64,
    pub max_requests: Option<u64>,
}

/// Issues a token signed by `issuer`, with a fresh random id.
pub fn issue(issuer: &NodeIdentity, request: &TokenRequest) -> Result<SignedToken, String> {
    let mut id = [0u8; TOKEN_ID_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
    let claims = TokenClaims {
        version: TOKEN_VERSION,
        id: id.to_vec(),
        issuer: issuer.peer_id().to_bytes(),
        subject: request.subject.to_bytes(),
        models: request.models.clone(),
        not_before: request.not_before,
        expires: request.expires,
        max_requests: request.max_requests,
    };
    claims.validate().map_err(|e| e.to_string())?;
    Ok(sign_claims(issuer, &claims))
}

/// Signs `claims` as they are (deterministic: ed25519 signatures are).
pub fn sign_claims(issuer: &NodeIdentity, claims: &TokenClaims) -> SignedToken {
    let bytes = encode_body(claims).expect("token claims always encode");
    let signature = issuer.sign(&SignedToken::signed_message(&bytes)).to_vec();
    SignedToken {
        claims: bytes,
        signature,
    }
}

/// A token whose signature holds: its claims, and its issuer and subject as peer ids.
#[derive(Debug, Clone)]
pub struct OpenedToken {
    pub claims: TokenClaims,
    pub issuer: PeerId,
    pub subject: PeerId,
}

impl OpenedToken {
    pub fn id(&self) -> [u8; TOKEN_ID_LEN] {
        self.claims
            .id
            .as_slice()
            .try_into()
            .expect("validated claims have a 16-byte id")
    }
}

/// Decodes a token and checks that its issuer signed it (and nothing else).
pub fn open(token: &SignedToken) -> Result<OpenedToken, Refusal> {
    let claims = token
        .decode_claims()
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    let issuer = PeerId::from_bytes(&claims.issuer)
        .map_err(|_| Refusal::Malformed("the issuer is not a peer id".into()))?;
    let subject = PeerId::from_bytes(&claims.subject)
        .map_err(|_| Refusal::Malformed("the subject is not a peer id".into()))?;
    if !verify_by_peer(
        &issuer,
        &SignedToken::signed_message(&token.claims),
        &token.signature,
    ) {
        return Err(Refusal::BadSignature);
    }
    Ok(OpenedToken {
        claims,
        issuer,
        subject,
    })
}

/// Decodes the bytes of `InferRequest.token` and [`open`]s them.
pub fn open_bytes(bytes: &[u8]) -> Result<OpenedToken, Refusal> {
    let token = SignedToken::from_bytes(bytes).map_err(|e| Refusal::Malformed(e.to_string()))?;
    open(&token)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of docs/protocol.md: fixed keys and claims give these exact bytes.
    #[test]
    fn test_vector() {
        let issuer = NodeIdentity::from_secret([1; 32]);
        let subject = NodeIdentity::from_secret([2; 32]).peer_id();
        let claims = TokenClaims {
            version: TOKEN_VERSION,
            id: (0u8..16).collect(),
            issuer: issuer.peer_id().to_bytes(),
            subject: subject.to_bytes(),
            models: vec!["smol".into()],
            not_before: 1_700_000_000,
            expires: 1_700_086_400,
            max_requests: Some(100),
        };
        let token = sign_claims(&issuer, &claims);
        assert_eq!(
            issuer.peer_id().to_string(),
            "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"
        );
        assert_eq!(
            subject.to_string(),
            "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
        );
        assert_eq!(hex::encode(&token.claims), TEST_VECTOR_CLAIMS);
        assert_eq!(hex::encode(&token.signature), TEST_VECTOR_SIGNATURE);
        assert_eq!(token.to_text(), TEST_VECTOR_TEXT);
        let opened = open(&SignedToken::from_text(TEST_VECTOR_TEXT).unwrap()).unwrap();
        assert_eq!(opened.issuer, issuer.peer_id());
        assert_eq!(opened.subject, subject);
        assert_eq!(opened.claims, claims);
    }

    // Cross-checked with Python: cbor2.dumps of the claims dict, and the `cryptography`
    // package's Ed25519 signature by the secret [1; 32] over the context and those bytes.
    const TEST_VECTOR_CLAIMS: &str = "a86776657273696f6e0162696450000102030405060708090a0b0c0d0e0f6669737375657258260024080112208a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c677375626a65637458260024080112208139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394666d6f64656c738164736d6f6c6a6e6f745f6265666f72651a6553f10067657870697265731a655542806c6d61785f72657175657374731864";
    const TEST_VECTOR_SIGNATURE: &str = "22be436b3f324b5acfac35bda3bc04d7018de086e7acd8693debe353a0ad45a36d9ea1fc691768c6ba70973cbd1310000e8be2437b9becf32989442f96164709";
    const TEST_VECTOR_TEXT: &str = "mtk1.omZjbGFpbXNYtqhndmVyc2lvbgFiaWRQAAECAwQFBgcICQoLDA0OD2Zpc3N1ZXJYJgAkCAESIIqI4910CfGV_VLbLTy6XXLKZwm_HZQSG_N0iAG0D29cZ3N1YmplY3RYJgAkCAESIIE5dw6ofRdfVqNUZsNMfszLjYqRtO43ol32D1uPybOUZm1vZGVsc4Fkc21vbGpub3RfYmVmb3JlGmVT8QBnZXhwaXJlcxplVUKAbG1heF9yZXF1ZXN0cxhkaXNpZ25hdHVyZVhAIr5Daz8yS1rPrDW9o7wE1wGN4IbnrNhpPevjU6CtRaNtnqH8aRdoxrpwlzy9ExAADoviQ3ub7PMpiUQvlhZHCQ";

    #[test]
    fn tampering_breaks_the_signature() {
        let issuer = NodeIdentity::generate();
        let request = TokenRequest {
            subject: NodeIdentity::generate().peer_id(),
            models: vec![],
            not_before: 0,
            expires: 10,
            max_requests: None,
        };
        let token = issue(&issuer, &request).unwrap();
        assert!(open(&token).is_ok());
        // Change the expiry inside the signed claims: the signature no longer holds.
        let mut claims = token.decode_claims().unwrap();
        claims.expires = u64::MAX;
        let forged = SignedToken {
            claims: encode_body(&claims).unwrap(),
            signature: token.signature.clone(),
        };
        assert!(matches!(open(&forged), Err(Refusal::BadSignature)));
        let mut flipped = token.clone();
        flipped.signature[3] ^= 1;
        assert!(matches!(open(&flipped), Err(Refusal::BadSignature)));
        assert!(matches!(open_bytes(b"junk"), Err(Refusal::Malformed(_))));
        // Two tokens issued alike still have different ids.
        assert_ne!(
            issue(&issuer, &request)
                .unwrap()
                .decode_claims()
                .unwrap()
                .id,
            token.decode_claims().unwrap().id
        );
    }
}
