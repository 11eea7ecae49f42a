//! Signing receipts on the serving node, and checking them on the client or offline.
//!
//! The serving side describes a finished call as a [`ServedCall`] and turns it into a signed
//! receipt with [`for_call`]; the caller checks it with [`verify_for_call`].

use libp2p::PeerId;
use mesh_protocol::frame::encode_body;
use mesh_protocol::receipt::{Receipt, ReceiptFormatError, SignedReceipt, RECEIPT_VERSION};
use mesh_protocol::token::TOKEN_ID_LEN;
use mesh_protocol::{
    FinishReason, InferRequest, ModelCard, SignedStageReceipt, StageReceipt, Usage,
};
use sha2::{Digest, Sha256};

use crate::identity::{verify_by_peer, NodeIdentity};

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error(transparent)]
    Format(#[from] ReceiptFormatError),
    #[error("the receipt's server field is not a peer id")]
    BadServer,
    #[error("the receipt's signature is not by its server {0}")]
    BadSignature(String),
    #[error("the receipt is signed by {signer}, but the call went to {called}")]
    WrongServer { signer: String, called: String },
    #[error("the receipt is for another request (its request hash differs)")]
    WrongRequest,
    #[error("the receipt is for model {receipt:?}, but the call was to {called:?}")]
    WrongModel { receipt: String, called: String },
}

/// sha256 of the request frame's body: the canonical CBOR encoding of `request`.
pub fn request_sha256(request: &InferRequest) -> [u8; 32] {
    let body = encode_body(request).expect("a decoded request always encodes");
    Sha256::digest(body).into()
}

/// Signs `receipt` with the node key.
pub fn sign(identity: &NodeIdentity, receipt: &Receipt) -> SignedReceipt {
    let bytes = encode_body(receipt).expect("a receipt always encodes");
    let signature = identity
        .sign(&SignedReceipt::signed_message(&bytes))
        .to_vec();
    SignedReceipt {
        receipt: bytes,
        signature,
    }
}

/// What the serving node knows about a call it answered to the end: the facts its receipt
/// vouches for.
#[derive(Debug, Clone)]
pub struct ServedCall<'a> {
    /// [`request_sha256`] of the request as the caller sent it.
    pub request_sha256: [u8; 32],
    /// The card of the model that computed the answer.
    pub card: &'a ModelCard,
    /// The caller's Noise-authenticated peer id.
    pub client: PeerId,
    /// The capability token that authorized the call, if one did.
    pub token_id: Option<[u8; TOKEN_ID_LEN]>,
    pub finish_reason: FinishReason,
    /// The usage reported in the `done` frame; the receipt repeats it.
    pub usage: &'a Usage,
    /// When the request frame arrived, in unix milliseconds.
    pub received_unix_ms: u64,
    /// Time from the request's check to its slot (and quota) being granted.
    pub queue_ms: u64,
    /// For a split model: the stages the call ran on.
    pub stages: &'a [mesh_protocol::StageUse],
    /// For a resumed call: the tokens another node sampled before this one.
    pub resumed_tokens: u32,
}

/// The signed receipt of `call`, served by the node `identity`.
pub fn for_call(identity: &NodeIdentity, call: &ServedCall<'_>) -> SignedReceipt {
    let receipt = Receipt {
        version: RECEIPT_VERSION,
        request_sha256: call.request_sha256.to_vec(),
        model: call.card.name.clone(),
        weights_sha256: call.card.sha256.clone(),
        server: identity.peer_id().to_bytes(),
        client: call.client.to_bytes(),
        token_id: call.token_id.map(|id| id.to_vec()),
        prompt_tokens: call.usage.prompt_tokens,
        completion_tokens: call.usage.completion_tokens,
        finish_reason: call.finish_reason,
        received_unix_ms: call.received_unix_ms,
        queue_ms: call.queue_ms,
        time_to_first_token_ms: call.usage.time_to_first_token_ms,
        compute_ms: call.usage.total_ms,
        stages: call.stages.to_vec(),
        resumed_tokens: call.resumed_tokens,
    };
    sign(identity, &receipt)
}

/// A stage's signed receipt for one session.
pub fn sign_stage(identity: &NodeIdentity, receipt: &StageReceipt) -> SignedStageReceipt {
    let bytes = encode_body(receipt).expect("a stage receipt always encodes");
    let signature = identity
        .sign(&SignedStageReceipt::signed_message(&bytes))
        .to_vec();
    SignedStageReceipt {
        receipt: bytes,
        signature,
    }
}

/// Checks a stage's receipt: decodes it, and checks that `stage` signed it for `head`.
pub fn verify_stage(
    signed: &SignedStageReceipt,
    stage: &PeerId,
    head: &PeerId,
) -> Result<StageReceipt, String> {
    let receipt = signed.decode_receipt().map_err(|e| e.to_string())?;
    if receipt.server != stage.to_bytes() || receipt.client != head.to_bytes() {
        return Err("the stage receipt names other nodes".into());
    }
    if !verify_by_peer(
        stage,
        &SignedStageReceipt::signed_message(&signed.receipt),
        &signed.signature,
    ) {
        return Err(format!("the stage receipt is not signed by {stage}"));
    }
    Ok(receipt)
}

/// Unix milliseconds now: the clock a receipt's `received_unix_ms` is read from.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Checks a receipt on its own: decodes it and checks the signature by the server it names.
pub fn verify(signed: &SignedReceipt) -> Result<(Receipt, PeerId), ReceiptError> {
    let receipt = signed.decode_receipt()?;
    let server = PeerId::from_bytes(&receipt.server).map_err(|_| ReceiptError::BadServer)?;
    if !verify_by_peer(
        &server,
        &SignedReceipt::signed_message(&signed.receipt),
        &signed.signature,
    ) {
        return Err(ReceiptError::BadSignature(server.to_string()));
    }
    Ok((receipt, server))
}

/// Checks the receipt a client got for `request` sent to `called`.
pub fn verify_for_call(
    signed: &SignedReceipt,
    called: &PeerId,
    request: &InferRequest,
) -> Result<Receipt, ReceiptError> {
    let (receipt, signer) = verify(signed)?;
    if signer != *called {
        return Err(ReceiptError::WrongServer {
            signer: signer.to_string(),
            called: called.to_string(),
        });
    }
    if receipt.model != request.model {
        return Err(ReceiptError::WrongModel {
            receipt: receipt.model,
            called: request.model.clone(),
        });
    }
    if receipt.request_sha256 != request_sha256(request) {
        return Err(ReceiptError::WrongRequest);
    }
    Ok(receipt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::{FinishReason, Input};

    fn request() -> InferRequest {
        InferRequest {
            model: "echo".into(),
            input: Input::Completion {
                prompt: "hi".into(),
            },
            params: Default::default(),
            deadline_ms: None,
            token: None,
            resume: None,
        }
    }

    fn receipt(server: &NodeIdentity, req: &InferRequest) -> Receipt {
        Receipt {
            version: 1,
            request_sha256: request_sha256(req).to_vec(),
            model: req.model.clone(),
            weights_sha256: "ab".repeat(32),
            server: server.peer_id().to_bytes(),
            client: NodeIdentity::generate().peer_id().to_bytes(),
            token_id: None,
            prompt_tokens: 1,
            completion_tokens: 2,
            finish_reason: FinishReason::Stop,
            received_unix_ms: 5,
            queue_ms: 0,
            time_to_first_token_ms: 1,
            compute_ms: 3,
            stages: Vec::new(),
            resumed_tokens: 0,
        }
    }

    #[test]
    fn a_signed_receipt_verifies_and_any_change_breaks_it() {
        let server = NodeIdentity::generate();
        let req = request();
        let signed = sign(&server, &receipt(&server, &req));
        assert!(verify_for_call(&signed, &server.peer_id(), &req).is_ok());

        // Tampered contents: more tokens than were served.
        let mut inflated = receipt(&server, &req);
        inflated.completion_tokens = 2000;
        let tampered = SignedReceipt {
            receipt: encode_body(&inflated).unwrap(),
            signature: signed.signature.clone(),
        };
        assert!(matches!(
            verify(&tampered),
            Err(ReceiptError::BadSignature(_))
        ));

        // Another node signing a receipt naming itself is not the node called.
        let other = NodeIdentity::generate();
        let foreign = sign(&other, &receipt(&other, &req));
        assert!(matches!(
            verify_for_call(&foreign, &server.peer_id(), &req),
            Err(ReceiptError::WrongServer { .. })
        ));

        // A genuine receipt for a different request does not vouch for this one.
        let mut other_req = request();
        other_req.input = Input::Completion {
            prompt: "bye".into(),
        };
        assert!(matches!(
            verify_for_call(&signed, &server.peer_id(), &other_req),
            Err(ReceiptError::WrongRequest)
        ));
    }
}
