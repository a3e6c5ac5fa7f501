//! Artifacts over MQTT, for devices that reach only the broker.
//!
//! The device publishes a [`BlockRequest`](crate::messages::BlockRequest)
//! on its `fetch` topic: an artifact by SHA-256, a byte range and a block
//! size. The manager answers on the device's `blocks` topic with one
//! [`Frame::Block`] per block, in order, or one [`Frame::Refused`] saying why
//! it will not send that artifact. The device asks again for what did not
//! arrive; the artifact's hash, checked against the signed manifest, is what
//! makes the bytes trusted, never the channel.
//!
//! Blocks are binary, not JSON: base64 would cost a third more on the wire.
//! A frame, integers big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `FBK1` |
//! | 1 | kind: 1 = block, 2 = refusal |
//! | 32 | the artifact's SHA-256 |
//! | 8 | the block's offset in the artifact (0 in a refusal) |
//! | 4 | length of what follows |
//! | length | the block's bytes, or the refusal's reason in UTF-8 |

use crate::digest::Sha256Digest;

/// The smallest block a device may ask for.
pub const MIN_BLOCK_SIZE: u32 = 1024;
/// The largest block a device may ask for (many brokers cap a message at 256 KiB).
pub const MAX_BLOCK_SIZE: u32 = 256 * 1024;
/// The block size devices use unless configured: well under the payload
/// limits of common brokers (AWS IoT Core's is 128 KiB).
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// The most blocks one request may ask for.
pub const MAX_BLOCKS_PER_REQUEST: u32 = 1024;
/// The most bytes one request may ask for.
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024 * 1024;
/// The most requests of one device the manager serves at a time; more are
/// dropped (the device asks again after its retry time).
pub const MAX_REQUESTS_IN_FLIGHT: u32 = 8;
/// The longest refusal reason sent.
pub const MAX_REASON_BYTES: usize = 1024;

const MAGIC: &[u8; 4] = b"FBK1";
const KIND_BLOCK: u8 = 1;
const KIND_REFUSED: u8 = 2;
/// Bytes before a frame's data.
pub const HEADER_BYTES: usize = 4 + 1 + 32 + 8 + 4;

/// One message on a `blocks` topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Bytes of an artifact at an offset.
    Block {
        /// The artifact.
        artifact: Sha256Digest,
        /// Where the bytes belong.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// The manager will not send this artifact to this device.
    Refused {
        /// The artifact asked for.
        artifact: Sha256Digest,
        /// Why, in words an operator can act on.
        reason: &'a str,
    },
}

/// Bytes that are not a block frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a block frame: {0}")]
pub struct FrameError(String);

impl<'a> Frame<'a> {
    /// The artifact the frame is about.
    pub fn artifact(&self) -> Sha256Digest {
        match self {
            Self::Block { artifact, .. } | Self::Refused { artifact, .. } => *artifact,
        }
    }

    /// The frame's bytes (a refusal's reason cut to [`MAX_REASON_BYTES`]).
    pub fn encode(&self) -> Vec<u8> {
        let (kind, artifact, offset, body) = match self {
            Self::Block {
                artifact,
                offset,
                data,
            } => (KIND_BLOCK, artifact, *offset, *data),
            Self::Refused { artifact, reason } => (
                KIND_REFUSED,
                artifact,
                0,
                truncate_utf8(reason, MAX_REASON_BYTES).as_bytes(),
            ),
        };
        let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
        out.extend_from_slice(MAGIC);
        out.push(kind);
        out.extend_from_slice(artifact.as_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        // Bodies are at most MAX_BLOCK_SIZE or MAX_REASON_BYTES long.
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Reads a frame; the data borrows from `bytes`.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, FrameError> {
        let fail = |why: &str| FrameError(why.to_owned());
        if bytes.len() < HEADER_BYTES {
            return Err(fail("shorter than a frame header"));
        }
        let (header, body) = bytes.split_at(HEADER_BYTES);
        if &header[..4] != MAGIC {
            return Err(fail("wrong magic"));
        }
        let kind = header[4];
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&header[5..37]);
        let artifact = Sha256Digest::from_bytes(sha);
        let mut word = [0u8; 8];
        word.copy_from_slice(&header[37..45]);
        let offset = u64::from_be_bytes(word);
        let mut half = [0u8; 4];
        half.copy_from_slice(&header[45..49]);
        let length = u32::from_be_bytes(half) as usize;
        if length != body.len() {
            return Err(FrameError(format!(
                "says {length} bytes follow, {} do",
                body.len()
            )));
        }
        match kind {
            KIND_BLOCK => {
                if length == 0 || length > MAX_BLOCK_SIZE as usize {
                    return Err(FrameError(format!("a block of {length} bytes")));
                }
                if offset.checked_add(length as u64).is_none() {
                    return Err(fail("block runs past the largest offset"));
                }
                Ok(Self::Block {
                    artifact,
                    offset,
                    data: body,
                })
            }
            KIND_REFUSED => {
                if offset != 0 {
                    return Err(fail("a refusal with an offset"));
                }
                if length > MAX_REASON_BYTES {
                    return Err(fail("refusal reason too long"));
                }
                let reason =
                    std::str::from_utf8(body).map_err(|_| fail("refusal reason is not UTF-8"))?;
                Ok(Self::Refused { artifact, reason })
            }
            other => Err(FrameError(format!("unknown kind {other}"))),
        }
    }
}

/// The longest prefix of `text` that fits in `max` bytes.
fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{BlockRequest, MESSAGE_SCHEMA, Message};

    fn sha() -> Sha256Digest {
        Sha256Digest::of(b"artifact")
    }

    #[test]
    fn frames_round_trip() {
        let data = vec![7u8; 1500];
        let block = Frame::Block {
            artifact: sha(),
            offset: 1 << 40,
            data: &data,
        };
        let bytes = block.encode();
        assert_eq!(bytes.len(), HEADER_BYTES + 1500);
        assert_eq!(&bytes[..4], b"FBK1");
        assert_eq!(Frame::decode(&bytes).unwrap(), block);
        let refused = Frame::Refused {
            artifact: sha(),
            reason: "not assigned to gw-1",
        };
        assert_eq!(Frame::decode(&refused.encode()).unwrap(), refused);
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = Frame::Refused {
            artifact: sha(),
            reason: &long,
        }
        .encode();
        match Frame::decode(&cut).unwrap() {
            Frame::Refused { reason, .. } => assert!(reason.len() <= MAX_REASON_BYTES),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        let good = Frame::Block {
            artifact: sha(),
            offset: 0,
            data: b"abc",
        }
        .encode();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("header only, cut", good[..HEADER_BYTES - 1].to_vec()),
            ("body cut", good[..good.len() - 1].to_vec()),
            ("body too long", [good.as_slice(), b"x"].concat()),
        ];
        let mut magic = good.clone();
        magic[0] = b'X';
        cases.push(("magic", magic));
        let mut kind = good.clone();
        kind[4] = 9;
        cases.push(("kind", kind));
        let empty_block = Frame::Block {
            artifact: sha(),
            offset: 0,
            data: b"",
        }
        .encode();
        cases.push(("empty block", empty_block));
        let mut overflow = good.clone();
        overflow[37..45].copy_from_slice(&u64::MAX.to_be_bytes());
        cases.push(("offset overflow", overflow));
        let mut bad_utf8 = Frame::Refused {
            artifact: sha(),
            reason: "ab",
        }
        .encode();
        let n = bad_utf8.len();
        bad_utf8[n - 1] = 0xff;
        cases.push(("reason not utf-8", bad_utf8));
        // Found by fuzzing: a refusal carrying an offset read as one without.
        let mut refusal_offset = Frame::Refused {
            artifact: sha(),
            reason: "no",
        }
        .encode();
        refusal_offset[37] = 1;
        cases.push(("refusal with an offset", refusal_offset));
        for (name, bytes) in cases {
            assert!(Frame::decode(&bytes).is_err(), "{name} accepted");
        }
    }

    fn request(offset: u64, length: u64, block_size: u32) -> BlockRequest {
        BlockRequest {
            schema: MESSAGE_SCHEMA,
            artifact: sha(),
            offset,
            length,
            block_size,
        }
    }

    #[test]
    fn a_request_is_answered_in_blocks_cut_at_the_end() {
        let r = request(1024, 4096, 1024);
        let blocks: Vec<_> = r.blocks(10_000).unwrap().collect();
        assert_eq!(
            blocks,
            vec![(1024, 1024), (2048, 1024), (3072, 1024), (4096, 1024)]
        );
        let blocks: Vec<_> = r.blocks(3500).unwrap().collect();
        assert_eq!(blocks, vec![(1024, 1024), (2048, 1024), (3072, 428)]);
        assert!(r.blocks(1024).is_none());
        assert!(r.blocks(0).is_none());
    }

    #[test]
    fn requests_outside_the_limits_are_refused() {
        let ok = request(0, 64 * 1024 * 16, DEFAULT_BLOCK_SIZE);
        assert_eq!(BlockRequest::decode(&ok.encode()).unwrap(), ok);
        for (name, bad) in [
            ("block too small", request(0, 4096, 512)),
            ("block too large", request(0, 1 << 20, MAX_BLOCK_SIZE + 1)),
            ("no bytes", request(0, 0, 1024)),
            (
                "too many blocks",
                request(0, 1024 * (u64::from(MAX_BLOCKS_PER_REQUEST) + 1), 1024),
            ),
            (
                "too many bytes",
                request(0, MAX_REQUEST_BYTES + 1, MAX_BLOCK_SIZE),
            ),
            ("overflow", request(u64::MAX, 1, 1024)),
        ] {
            let err = BlockRequest::decode(&bad.encode()).unwrap_err();
            assert!(
                err.to_string().starts_with("block request: "),
                "{name}: {err}"
            );
        }
    }
}
