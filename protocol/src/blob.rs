//! `/mesh/blob/1`: a model's file, fetched by pieces from any node that holds it.
//!
//! A blob is named by the root of its blob tree (a Merkle tree of BLAKE3 hashes over 256 KiB
//! pieces, docs/protocol.md "Blob tree"), which a model's signed card names next to the file's
//! sha256. The fetcher sends one [`BlobRequest`] per stream: the root and a run of pieces. The
//! holder answers [`BlobResponse::Header`] (the blob's length), then one
//! [`BlobResponse::Piece`] per piece asked, each with its audit path, then
//! [`BlobResponse::End`]; or [`BlobResponse::Error`] at any point. The fetcher checks every
//! piece against the root before it keeps it, so no holder has to be trusted.

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::frame::{decode_body, FrameError};

/// The only request version this build reads.
pub const BLOB_VERSION: u32 = 1;
/// Bytes in a piece; the last piece of a blob may be shorter.
pub const PIECE_LEN: u32 = 256 * 1024;
/// Most pieces one request may ask for (4 MiB).
pub const MAX_PIECES_PER_REQUEST: u32 = 16;
/// Most hashes in an audit path (a tree of 2^64 pieces is deeper than any file).
pub const MAX_PROOF_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlobRequest {
    pub version: u32,
    /// The blob tree's root, 32 bytes.
    #[serde(with = "serde_bytes")]
    pub root: Vec<u8>,
    /// The first piece wanted.
    pub first: u64,
    /// How many pieces from `first`: 1 to [`MAX_PIECES_PER_REQUEST`]; a run past the end is
    /// cut at the last piece.
    pub count: u32,
    /// A capability token (its CBOR bytes, as in `/mesh/infer/1`), for a model whose policy
    /// asks for one.
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub token: Option<Vec<u8>>,
}

impl BlobRequest {
    /// Checks what can be checked without the blob: the version, the root's size, the count.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != BLOB_VERSION {
            return Err(format!(
                "blob request version {} is not {BLOB_VERSION}",
                self.version
            ));
        }
        if self.root.len() != 32 {
            return Err(format!("a blob root is 32 bytes, not {}", self.root.len()));
        }
        if self.count == 0 || self.count > MAX_PIECES_PER_REQUEST {
            return Err(format!(
                "a request asks for 1 to {MAX_PIECES_PER_REQUEST} pieces, not {}",
                self.count
            ));
        }
        Ok(())
    }

    pub fn decode(body: &[u8]) -> Result<BlobRequest, FrameError> {
        decode_body(body)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobResponse {
    /// The blob's length in bytes (its piece count follows from it and [`PIECE_LEN`]).
    Header {
        len: u64,
    },
    Piece {
        index: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// The sibling hashes from the piece's leaf up to the tree's top, 32 bytes each.
        proof: Vec<serde_bytes::ByteBuf>,
    },
    /// Every piece asked for was sent.
    End,
    Error(WireError),
}

impl BlobResponse {
    pub fn decode(body: &[u8]) -> Result<BlobResponse, FrameError> {
        decode_body(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, DEFAULT_MAX_FRAME_LEN};

    fn request(count: u32) -> BlobRequest {
        BlobRequest {
            version: BLOB_VERSION,
            root: vec![7; 32],
            first: 3,
            count,
            token: None,
        }
    }

    #[test]
    fn requests_are_bounded() {
        assert!(request(1).validate().is_ok());
        assert!(request(MAX_PIECES_PER_REQUEST).validate().is_ok());
        assert!(request(0).validate().is_err());
        assert!(request(MAX_PIECES_PER_REQUEST + 1).validate().is_err());
        let mut short = request(1);
        short.root.pop();
        assert!(short.validate().unwrap_err().contains("32 bytes"));
        let mut later = request(1);
        later.version = 2;
        assert!(later.validate().is_err());
    }

    #[test]
    fn a_whole_piece_with_its_deepest_proof_fits_one_frame() {
        let piece = BlobResponse::Piece {
            index: u64::MAX,
            data: vec![0xab; PIECE_LEN as usize],
            proof: vec![serde_bytes::ByteBuf::from(vec![1u8; 32]); MAX_PROOF_LEN],
        };
        let frame = encode_frame(&piece, DEFAULT_MAX_FRAME_LEN).expect("fits");
        assert!(frame.len() < DEFAULT_MAX_FRAME_LEN);
        for value in [
            BlobResponse::Header { len: 98_362_432 },
            BlobResponse::End,
            piece,
        ] {
            let body = crate::frame::encode_body(&value).unwrap();
            assert_eq!(BlobResponse::decode(&body).unwrap(), value);
        }
        let body = crate::frame::encode_body(&request(4)).unwrap();
        assert_eq!(BlobRequest::decode(&body).unwrap(), request(4));
    }
}
