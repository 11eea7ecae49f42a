//! Feeds arbitrary bytes to what a catalog answer carries: a `CatalogResponse` frame, and each
//! signed card in it, whose card bytes are decoded the way a caller does before it trusts them
//! (after the signature check, which needs the peer's key and is not what is fuzzed here).
//! The bytes are also read as one signed card alone. Run: `cargo fuzz run catalog` in protocol/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_protocol::frame::{decode_frame, DEFAULT_MAX_FRAME_LEN};
use mesh_protocol::{CatalogResponse, SignedModelCard};

fn card(signed: &SignedModelCard) {
    let _ = SignedModelCard::signed_message(&signed.card);
    if let Ok(card) = signed.decode_card() {
        let _ = mesh_protocol::ids::validate_model_name(&card.name);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((response, _))) = decode_frame::<CatalogResponse>(data, DEFAULT_MAX_FRAME_LEN) {
        response.cards.iter().for_each(card);
    }
    if let Ok(Some((signed, _))) = decode_frame::<SignedModelCard>(data, DEFAULT_MAX_FRAME_LEN) {
        card(&signed);
    }
    // A card's own bytes, as `decode_card` reads them.
    card(&SignedModelCard {
        card: data.to_vec(),
        signature: Vec::new(),
    });
});
