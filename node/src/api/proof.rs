//! The running node proves to the local commands that it is the node of their home: the
//! command sends a fresh random challenge with `GET /v1/mesh/whoami` (the one route that needs
//! no API key), and the node signs it with its node key. The peer id in `node.json` names that key, so a process that took the
//! API's port after the node died (security review, finding 14) cannot answer, and gets
//! neither the prompt nor the token.

use libp2p::PeerId;

/// Bytes in a challenge.
pub const CHALLENGE_LEN: usize = 32;

/// What is signed: a fixed context, so the signature means nothing anywhere else, then the
/// challenge.
fn message(challenge: &[u8; CHALLENGE_LEN]) -> Vec<u8> {
    let mut message = b"mesh local API status proof v1\n".to_vec();
    message.extend_from_slice(challenge);
    message
}

/// A new random challenge.
pub fn challenge() -> [u8; CHALLENGE_LEN] {
    rand::random()
}

/// The challenge sent as hex in the query string, if it is one.
pub fn parse_challenge(hex_text: &str) -> Option<[u8; CHALLENGE_LEN]> {
    hex::decode(hex_text).ok()?.try_into().ok()
}

/// The node's answer to `challenge`, as hex.
pub fn prove(identity: &crate::NodeIdentity, challenge: &[u8; CHALLENGE_LEN]) -> String {
    hex::encode(identity.sign(&message(challenge)))
}

/// Whether `proof` is the node `peer_id`'s signature of `challenge`.
pub fn verify(peer_id: &str, challenge: &[u8; CHALLENGE_LEN], proof: Option<&str>) -> bool {
    let (Ok(peer), Some(Ok(signature))) = (peer_id.parse::<PeerId>(), proof.map(hex::decode))
    else {
        return false;
    };
    crate::identity::verify_by_peer(&peer, &message(challenge), &signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeIdentity;

    #[test]
    fn only_the_node_key_answers_its_challenge() {
        let node = NodeIdentity::generate();
        let id = node.peer_id().to_string();
        let asked = challenge();
        let proof = prove(&node, &asked);
        assert!(verify(&id, &asked, Some(&proof)));
        // Another challenge, another key, no proof, or garbage: refused.
        assert!(!verify(&id, &challenge(), Some(&proof)));
        let squatter = NodeIdentity::generate();
        assert!(!verify(&id, &asked, Some(&prove(&squatter, &asked))));
        assert!(!verify(&id, &asked, None));
        assert!(!verify(&id, &asked, Some("zz")));
        assert!(!verify("not a peer id", &asked, Some(&proof)));
    }

    #[test]
    fn a_challenge_is_exactly_32_bytes_of_hex() {
        let asked = challenge();
        assert_eq!(parse_challenge(&hex::encode(asked)), Some(asked));
        assert_eq!(parse_challenge(&hex::encode([0u8; 31])), None);
        assert_eq!(parse_challenge("xyz"), None);
    }
}
