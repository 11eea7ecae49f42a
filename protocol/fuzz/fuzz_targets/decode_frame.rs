//! Feeds arbitrary bytes to the frame decoder as every frame type a peer may send.
//! Any panic, overflow or out-of-memory is a bug. Run: `cargo fuzz run decode_frame` in protocol/.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_protocol::frame::{decode_frame, encode_frame, DEFAULT_MAX_FRAME_LEN};
use mesh_protocol::{CatalogRequest, CatalogResponse, InferRequest, InferResponse, ModelCard};

fn check<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    if let Ok(Some((value, used))) = decode_frame::<T>(data, DEFAULT_MAX_FRAME_LEN) {
        assert!(used <= data.len());
        // Whatever decodes must encode again and decode to the same encoding.
        let again = encode_frame(&value, DEFAULT_MAX_FRAME_LEN).expect("re-encode");
        let (back, _) = decode_frame::<T>(&again, DEFAULT_MAX_FRAME_LEN)
            .expect("re-decode")
            .expect("whole frame");
        assert_eq!(encode_frame(&back, DEFAULT_MAX_FRAME_LEN).unwrap(), again);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<InferRequest>(data);
    check::<InferResponse>(data);
    check::<CatalogRequest>(data);
    check::<CatalogResponse>(data);
    check::<ModelCard>(data);
});
