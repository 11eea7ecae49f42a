//! Feeds arbitrary text to the receipt parser (`mrc1.…`, as `mesh receipt verify` reads it from
//! a file or a `done` line). Whatever parses must decode without panicking and print back to
//! the same receipt. Run: `cargo fuzz run receipt` in protocol/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_protocol::SignedReceipt;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(receipt) = SignedReceipt::from_text(text) {
        let _ = receipt.decode_receipt();
        let again = receipt.to_text();
        let back = SignedReceipt::from_text(&again).expect("a printed receipt parses");
        assert_eq!(back.to_text(), again);
    }
});
