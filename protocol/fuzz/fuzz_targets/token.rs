//! Feeds arbitrary input to the capability-token parser, in both its forms: the `mtk1.` text a
//! user pastes or a gateway client sends, and the bytes a request frame carries. Whatever
//! parses must decode its claims without panicking, and print back to text that parses to the
//! same token. Run: `cargo fuzz run token` in protocol/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_protocol::SignedToken;

fn check(token: SignedToken) {
    if let Ok(claims) = token.decode_claims() {
        let _ = claims.validate();
        let _ = claims.id_hex();
    }
    let text = token.to_text();
    let back = SignedToken::from_text(&text).expect("a printed token parses");
    assert_eq!(back.to_bytes(), token.to_bytes());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = SignedToken::from_bytes(data) {
        check(token);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(token) = SignedToken::from_text(text) {
            check(token);
        }
    }
});
