//! Framing of the data protocol: `u32 LE header length | u32 LE payload length | header |
//! payload`. Pure: no I/O, so it is unit-tested and fuzzed (`fuzz/fuzz_targets/frame.rs`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Largest header accepted: headers are a few dozen bytes.
pub const MAX_HEADER: usize = 4096;
/// Largest payload accepted: one whole chunk.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Bytes of the length prefix before each frame's header.
pub const PREFIX: usize = 8;
/// Room the decoder makes when it needs more bytes and has less than `MIN_ROOM` spare: the
/// frames that arrived together are then read by one system call (the reader's default room
/// is about one frame, so one call per frame).
pub const READ_AHEAD: usize = 64 << 10;
const MIN_ROOM: usize = 16 << 10;

/// Makes room for at least `need` more bytes, and for a read-ahead when little is left (the
/// frames already split off still share the buffer, so growing it takes a new one).
fn make_room(src: &mut BytesMut, need: usize) {
    if src.capacity() - src.len() < need.max(MIN_ROOM) {
        src.reserve(need.max(READ_AHEAD));
    }
}

/// One frame: a prost-encoded header and its raw payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Bytes,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame header of {0} bytes is larger than {MAX_HEADER}")]
    HeaderTooLarge(usize),
    #[error("frame payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
    #[error("frame with an empty header")]
    EmptyHeader,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Default)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < PREFIX {
            make_room(src, PREFIX - src.len());
            return Ok(None);
        }
        let h = u32::from_le_bytes(src[0..4].try_into().expect("4 bytes")) as usize;
        let p = u32::from_le_bytes(src[4..8].try_into().expect("4 bytes")) as usize;
        if h == 0 {
            return Err(FrameError::EmptyHeader);
        }
        if h > MAX_HEADER {
            return Err(FrameError::HeaderTooLarge(h));
        }
        if p > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLarge(p));
        }
        if src.len() < PREFIX + h + p {
            make_room(src, PREFIX + h + p - src.len());
            return Ok(None);
        }
        src.advance(PREFIX);
        let header = src.split_to(h).freeze();
        let payload = src.split_to(p).freeze();
        Ok(Some(Frame { header, payload }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, f: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.reserve(PREFIX + f.header.len() + f.payload.len());
        encode_head(&f, dst)?;
        dst.extend_from_slice(&f.payload);
        Ok(())
    }
}

/// Appends a frame's length prefix and header to `dst`, not its payload: the payload follows
/// them on the wire, and a writer can send it from where it is (`writer`).
pub fn encode_head(f: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
    if f.header.is_empty() {
        return Err(FrameError::EmptyHeader);
    }
    if f.header.len() > MAX_HEADER {
        return Err(FrameError::HeaderTooLarge(f.header.len()));
    }
    if f.payload.len() > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(f.payload.len()));
    }
    dst.put_u32_le(u32::try_from(f.header.len()).expect("checked above"));
    dst.put_u32_le(u32::try_from(f.payload.len()).expect("checked above"));
    dst.extend_from_slice(&f.header);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(f: Frame) -> BytesMut {
        let mut b = BytesMut::new();
        FrameCodec.encode(f, &mut b).unwrap();
        b
    }

    /// Frames round-trip, also when they arrive a byte at a time and back to back.
    #[test]
    fn round_trip_in_pieces() {
        let a = Frame {
            header: Bytes::from_static(b"hdr"),
            payload: Bytes::from(vec![7u8; 5000]),
        };
        let b = Frame {
            header: Bytes::from_static(b"h2"),
            payload: Bytes::new(),
        };
        let mut wire = enc(a.clone());
        wire.extend_from_slice(&enc(b.clone()));
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            while let Some(f) = FrameCodec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![a, b]);
        assert!(buf.is_empty());
    }

    /// Oversized and empty headers, and oversized payloads, are refused from the prefix alone,
    /// before any of it is buffered.
    #[test]
    fn limits() {
        let prefix = |h: u32, p: u32| {
            let mut b = BytesMut::new();
            b.put_u32_le(h);
            b.put_u32_le(p);
            b
        };
        assert!(matches!(
            FrameCodec.decode(&mut prefix(0, 0)),
            Err(FrameError::EmptyHeader)
        ));
        assert!(matches!(
            FrameCodec.decode(&mut prefix(5000, 0)),
            Err(FrameError::HeaderTooLarge(5000))
        ));
        assert!(matches!(
            FrameCodec.decode(&mut prefix(1, u32::MAX)),
            Err(FrameError::PayloadTooLarge(_))
        ));
        assert!(
            matches!(FrameCodec.decode(&mut prefix(10, 10)), Ok(None)),
            "waits for the rest"
        );
    }

    /// A decoder waiting for bytes leaves room for many frames, so one read takes them all;
    /// a buffer with room to spare is left as it is.
    #[test]
    fn waiting_makes_room_for_a_read_ahead() {
        let mut b = BytesMut::new();
        assert!(FrameCodec.decode(&mut b).unwrap().is_none());
        assert!(b.capacity() >= READ_AHEAD);
        let mut part = enc(Frame {
            header: Bytes::from_static(b"h"),
            payload: Bytes::from(vec![1u8; 4096]),
        });
        part.truncate(100);
        part.reserve(READ_AHEAD);
        let cap = part.capacity();
        assert!(FrameCodec.decode(&mut part).unwrap().is_none());
        assert_eq!(part.capacity(), cap);
    }

    proptest! {
        /// Any bytes: decoding never panics, and never yields a frame over the limits.
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&b[..]);
            while let Ok(Some(f)) = FrameCodec.decode(&mut buf) {
                prop_assert!(f.header.len() <= MAX_HEADER && f.payload.len() <= MAX_PAYLOAD);
            }
        }
    }
}
