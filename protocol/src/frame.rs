//! Framing: an unsigned-varint (LEB128, at most 9 bytes as in multiformats) length prefix,
//! then exactly that many bytes holding one CBOR value.
//!
//! The length is checked against a maximum before any buffer is allocated, and decoding
//! never panics: every malformed input is a [`FrameError`].

use serde::{de::DeserializeOwned, Serialize};

/// 1 MiB: far above any request or response frame mesh sends (a batch of 32 MiniLM vectors
/// is about 50 KiB), small enough that a hostile peer cannot make a node allocate much.
pub const DEFAULT_MAX_FRAME_LEN: usize = 1024 * 1024;

/// Longest length prefix accepted: 9 bytes, the multiformats unsigned-varint limit.
pub const MAX_PREFIX_LEN: usize = 9;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("malformed length prefix: {0}")]
    BadPrefix(String),
    #[error("malformed CBOR frame body: {0}")]
    BadBody(String),
    #[error("frame body has {0} trailing bytes after the CBOR value")]
    TrailingBytes(usize),
    #[error("could not encode frame: {0}")]
    Encode(String),
}

/// Encodes `value` as one frame: length prefix followed by its CBOR encoding.
pub fn encode_frame<T: Serialize>(value: &T, max_len: usize) -> Result<Vec<u8>, FrameError> {
    let body = encode_body(value)?;
    if body.len() > max_len {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            max: max_len,
        });
    }
    let mut out = encode_prefix(body.len() as u64);
    out.extend_from_slice(&body);
    Ok(out)
}

/// The length prefix of a frame whose body is `len` bytes: an unsigned varint. (A sender may
/// announce any length; a reader refuses one above its limit before reading the body.)
pub fn encode_prefix(len: u64) -> Vec<u8> {
    let mut buf = unsigned_varint::encode::u64_buffer();
    unsigned_varint::encode::u64(len, &mut buf).to_vec()
}

/// The CBOR encoding of `value`, without a prefix (also used for signed payloads).
pub fn encode_body<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    cbor4ii::serde::to_vec(Vec::new(), value).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes one CBOR value that must fill `body` exactly.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let mut de = cbor4ii::serde::Deserializer::new(BodyReader::new(body));
    let value = T::deserialize(&mut de).map_err(|e| FrameError::BadBody(e.to_string()))?;
    match de.into_inner().buf.len() {
        0 => Ok(value),
        rest => Err(FrameError::TrailingBytes(rest)),
    }
}

/// Most levels of nested arrays and maps a body may have: mesh frames need fewer than 8,
/// and a bound keeps hostile input from exhausting the stack.
const MAX_NESTING: usize = 32;

/// A slice reader that exposes what is left, so trailing bytes can be refused.
struct BodyReader<'a> {
    buf: &'a [u8],
    depth_left: usize,
}

impl<'a> BodyReader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        BodyReader {
            buf,
            depth_left: MAX_NESTING,
        }
    }
}

impl<'de> cbor4ii::core::dec::Read<'de> for BodyReader<'de> {
    type Error = std::convert::Infallible;

    fn fill<'short>(
        &'short mut self,
        want: usize,
    ) -> Result<cbor4ii::core::dec::Reference<'de, 'short>, Self::Error> {
        let len = want.min(self.buf.len());
        Ok(cbor4ii::core::dec::Reference::Long(&self.buf[..len]))
    }

    fn advance(&mut self, n: usize) {
        self.buf = &self.buf[n.min(self.buf.len())..];
    }

    fn step_in(&mut self) -> bool {
        match self.depth_left.checked_sub(1) {
            Some(left) => {
                self.depth_left = left;
                true
            }
            None => false,
        }
    }

    fn step_out(&mut self) {
        self.depth_left += 1;
    }
}

/// Reads a length prefix from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, else the body length and the prefix length.
/// Fails as soon as the prefix is malformed or announces more than `max_len` bytes.
pub fn decode_prefix(buf: &[u8], max_len: usize) -> Result<Option<(usize, usize)>, FrameError> {
    let window = &buf[..buf.len().min(MAX_PREFIX_LEN)];
    match unsigned_varint::decode::u64(window) {
        Ok((len, rest)) => {
            if len > max_len as u64 {
                return Err(FrameError::TooLarge { len, max: max_len });
            }
            Ok(Some((len as usize, window.len() - rest.len())))
        }
        Err(unsigned_varint::decode::Error::Insufficient) if buf.len() < MAX_PREFIX_LEN => Ok(None),
        Err(e) => Err(FrameError::BadPrefix(e.to_string())),
    }
}

/// Decodes one frame from the start of `buf`.
///
/// Returns `Ok(None)` if `buf` does not yet hold a whole frame, else the value and how many
/// bytes of `buf` it used.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some((len, prefix_len)) = decode_prefix(buf, max_len)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(prefix_len..prefix_len + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, prefix_len + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_encodes_what_it_decodes_to() {
        for len in [0u64, 1, 127, 128, 300, 1 << 20, 64 << 20] {
            let prefix = encode_prefix(len);
            assert_eq!(
                decode_prefix(&prefix, usize::MAX).unwrap(),
                Some((len as usize, prefix.len())),
                "{len}"
            );
        }
        assert_eq!(encode_prefix(1 << 20), [0x80, 0x80, 0x40]);
    }

    #[test]
    fn prefix_needs_more_bytes() {
        assert!(decode_prefix(&[], 100).unwrap().is_none());
        assert!(decode_prefix(&[0x80], 100).unwrap().is_none());
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        // 2^20 + 1 announced, nothing else sent.
        let mut b = unsigned_varint::encode::u64_buffer();
        let p = unsigned_varint::encode::u64((DEFAULT_MAX_FRAME_LEN + 1) as u64, &mut b);
        match decode_prefix(p, DEFAULT_MAX_FRAME_LEN) {
            Err(FrameError::TooLarge { len, .. }) => {
                assert_eq!(len, DEFAULT_MAX_FRAME_LEN as u64 + 1)
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn overlong_and_non_minimal_prefixes_are_refused() {
        assert!(matches!(
            decode_prefix(&[0xff; 12], usize::MAX),
            Err(FrameError::BadPrefix(_))
        ));
        // 0x80 0x00 encodes 0 in two bytes: not minimal.
        assert!(matches!(
            decode_prefix(&[0x80, 0x00], 100),
            Err(FrameError::BadPrefix(_))
        ));
    }

    #[test]
    fn trailing_bytes_in_a_body_are_refused() {
        // body = CBOR 1 (0x01) then a stray 0x02.
        let r: Result<Option<(u32, usize)>, _> = decode_frame(&[0x02, 0x01, 0x02], 100);
        assert!(matches!(r, Err(FrameError::TrailingBytes(1))));
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        // 10,000 nested one-element arrays: 0x81 0x81 ... 0x00.
        let mut body = vec![0x81u8; 10_000];
        body.push(0);
        assert!(matches!(
            decode_body::<serde_ignored_value::Any>(&body),
            Err(FrameError::BadBody(_))
        ));
    }

    mod serde_ignored_value {
        /// Accepts any CBOR value, to drive the decoder through arbitrary nesting.
        pub struct Any;
        impl<'de> serde::Deserialize<'de> for Any {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                serde::de::IgnoredAny::deserialize(d).map(|_| Any)
            }
        }
    }

    #[test]
    fn encode_refuses_bodies_over_the_limit() {
        let big = "x".repeat(200);
        assert!(matches!(
            encode_frame(&big, 100),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn frames_are_consumed_one_at_a_time() {
        let mut buf = encode_frame(&7u32, 100).unwrap();
        buf.extend(encode_frame(&"hi", 100).unwrap());
        let (a, used): (u32, usize) = decode_frame(&buf, 100).unwrap().unwrap();
        assert_eq!((a, used), (7, 2));
        let (b, used2): (String, usize) = decode_frame(&buf[used..], 100).unwrap().unwrap();
        assert_eq!((b.as_str(), used2), ("hi", 4));
        assert!(decode_frame::<u32>(&buf[..1], 100).unwrap().is_none());
    }
}
