//! Capability tokens: what a node owner signs to let one peer call models on a node.
//!
//! A token is a [`SignedToken`]: the CBOR bytes of [`TokenClaims`] and the issuer's ed25519
//! signature over [`TOKEN_SIGNING_CONTEXT`] followed by those bytes. It travels in
//! `InferRequest.token` as the CBOR encoding of the `SignedToken`, and people copy it as text:
//! [`TOKEN_TEXT_PREFIX`] then the same bytes in base64url without padding. This crate only
//! encodes and decodes; signing and every policy check live in the node crate.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::frame::{decode_body, encode_body, FrameError};

/// Domain separation: no other signed mesh object (a card, a receipt) verifies as a token.
pub const TOKEN_SIGNING_CONTEXT: &[u8] = b"mesh-capability-token-v1\0";
/// The text form starts with this, so a token is recognisable and versioned when pasted.
pub const TOKEN_TEXT_PREFIX: &str = "mtk1.";
/// The only claims version this build reads.
pub const TOKEN_VERSION: u32 = 1;
/// Length of a token id in bytes.
pub const TOKEN_ID_LEN: usize = 16;
/// Most models one token may name.
pub const MAX_TOKEN_MODELS: usize = 64;
/// Longest encoded token accepted (bytes of the CBOR `SignedToken`), checked before decoding.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Longest peer id accepted in a token (an ed25519 peer id is 38 bytes).
const MAX_PEER_ID_LEN: usize = 64;

/// What a token grants, as signed by its issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// [`TOKEN_VERSION`].
    pub version: u32,
    /// 16 random bytes naming this token (for revocation and quotas).
    #[serde(with = "serde_bytes")]
    pub id: Vec<u8>,
    /// The peer id (multihash bytes) of the key that signed the token.
    #[serde(with = "serde_bytes")]
    pub issuer: Vec<u8>,
    /// The peer id (multihash bytes) that may use the token: the Noise-authenticated caller.
    #[serde(with = "serde_bytes")]
    pub subject: Vec<u8>,
    /// Model names the token covers; empty means every model of the serving node.
    pub models: Vec<String>,
    /// Unix seconds before which the token is not valid.
    pub not_before: u64,
    /// Unix seconds from which the token is no longer valid.
    pub expires: u64,
    /// Most calls the token pays for on one serving node, if limited.
    #[serde(default)]
    pub max_requests: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedToken {
    /// The CBOR encoding of a [`TokenClaims`], exactly the bytes that were signed.
    #[serde(with = "serde_bytes")]
    pub claims: Vec<u8>,
    /// 64-byte ed25519 signature over `TOKEN_SIGNING_CONTEXT || claims`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFormatError {
    #[error("a token is at most {MAX_TOKEN_LEN} bytes, this one has {0}")]
    TooLong(usize),
    #[error("a token's text starts with {TOKEN_TEXT_PREFIX:?}")]
    NoPrefix,
    #[error("the token text is not base64url: {0}")]
    Base64(String),
    #[error("the token does not decode: {0}")]
    Frame(#[from] FrameError),
    #[error("the token's claims are invalid: {0}")]
    Claims(String),
}

impl TokenClaims {
    /// Checks the shape of the claims (not the signature, not the time).
    pub fn validate(&self) -> Result<(), TokenFormatError> {
        let bad = |m: String| Err(TokenFormatError::Claims(m));
        if self.version != TOKEN_VERSION {
            return bad(format!(
                "version {} is not supported (this build reads {TOKEN_VERSION})",
                self.version
            ));
        }
        if self.id.len() != TOKEN_ID_LEN {
            return bad(format!(
                "the id has {} bytes, not {TOKEN_ID_LEN}",
                self.id.len()
            ));
        }
        for (what, v) in [("issuer", &self.issuer), ("subject", &self.subject)] {
            if v.is_empty() || v.len() > MAX_PEER_ID_LEN {
                return bad(format!("the {what} peer id has {} bytes", v.len()));
            }
        }
        if self.models.len() > MAX_TOKEN_MODELS {
            return bad(format!(
                "it names {} models; at most {MAX_TOKEN_MODELS}",
                self.models.len()
            ));
        }
        for m in &self.models {
            crate::ids::validate_model_name(m).map_err(TokenFormatError::Claims)?;
        }
        if self.expires <= self.not_before {
            return bad("it expires before it becomes valid".into());
        }
        if self.max_requests == Some(0) {
            return bad("max_requests is 0".into());
        }
        Ok(())
    }

    /// The id as lower-case hex, as `mesh token revoke` takes it.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl SignedToken {
    /// The bytes the signature covers.
    pub fn signed_message(claims_cbor: &[u8]) -> Vec<u8> {
        [TOKEN_SIGNING_CONTEXT, claims_cbor].concat()
    }

    /// Decodes and shape-checks the claims, without checking the signature.
    pub fn decode_claims(&self) -> Result<TokenClaims, TokenFormatError> {
        let claims: TokenClaims = decode_body(&self.claims)?;
        claims.validate()?;
        Ok(claims)
    }

    /// The bytes that go in `InferRequest.token`.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_body(self).expect("a signed token always encodes")
    }

    /// Reads the bytes of `InferRequest.token`, bounded before decoding.
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedToken, TokenFormatError> {
        if bytes.len() > MAX_TOKEN_LEN {
            return Err(TokenFormatError::TooLong(bytes.len()));
        }
        Ok(decode_body(bytes)?)
    }

    /// `mtk1.` + base64url (no padding) of [`SignedToken::to_bytes`].
    pub fn to_text(&self) -> String {
        format!(
            "{TOKEN_TEXT_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(self.to_bytes())
        )
    }

    /// Parses the text form; surrounding whitespace is ignored.
    pub fn from_text(text: &str) -> Result<SignedToken, TokenFormatError> {
        let body = text
            .trim()
            .strip_prefix(TOKEN_TEXT_PREFIX)
            .ok_or(TokenFormatError::NoPrefix)?;
        // base64 grows bytes by 4/3: refuse long text before decoding it.
        if body.len() > MAX_TOKEN_LEN * 4 / 3 + 4 {
            return Err(TokenFormatError::TooLong(body.len() * 3 / 4));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenFormatError::Base64(e.to_string()))?;
        Self::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            version: TOKEN_VERSION,
            id: vec![7; 16],
            issuer: vec![1; 38],
            subject: vec![2; 38],
            models: vec!["smol".into()],
            not_before: 100,
            expires: 200,
            max_requests: Some(3),
        }
    }

    fn signed(c: &TokenClaims) -> SignedToken {
        SignedToken {
            claims: encode_body(c).unwrap(),
            signature: vec![9; 64],
        }
    }

    #[test]
    fn text_form_round_trips() {
        let t = signed(&claims());
        let text = t.to_text();
        assert!(text.starts_with("mtk1."));
        assert!(!text.contains('=') && !text.contains('+') && !text.contains('/'));
        let back = SignedToken::from_text(&format!("  {text}\n")).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.decode_claims().unwrap(), claims());
        assert_eq!(claims().id_hex(), "07".repeat(16));
    }

    #[test]
    fn malformed_text_is_a_clear_error() {
        assert!(matches!(
            SignedToken::from_text("abc"),
            Err(TokenFormatError::NoPrefix)
        ));
        assert!(matches!(
            SignedToken::from_text("mtk1.!!!"),
            Err(TokenFormatError::Base64(_))
        ));
        assert!(matches!(
            SignedToken::from_text("mtk1.AAAA"),
            Err(TokenFormatError::Frame(_))
        ));
        let long = format!("mtk1.{}", "A".repeat(MAX_TOKEN_LEN * 2));
        assert!(matches!(
            SignedToken::from_text(&long),
            Err(TokenFormatError::TooLong(_))
        ));
        assert!(matches!(
            SignedToken::from_bytes(&vec![0; MAX_TOKEN_LEN + 1]),
            Err(TokenFormatError::TooLong(_))
        ));
    }

    #[test]
    fn bad_claims_are_refused() {
        type Change = fn(&mut TokenClaims);
        let cases: Vec<(Change, &str)> = vec![
            (|c| c.version = 2, "version"),
            (|c| c.id = vec![1; 15], "id"),
            (|c| c.subject.clear(), "subject"),
            (|c| c.models = vec!["a b".into()], "model name"),
            (|c| c.expires = c.not_before, "expires before"),
            (|c| c.max_requests = Some(0), "max_requests"),
            (
                |c| c.models = vec!["m".into(); MAX_TOKEN_MODELS + 1],
                "at most",
            ),
        ];
        for (change, needle) in cases {
            let mut c = claims();
            change(&mut c);
            let err = signed(&c).decode_claims().unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
