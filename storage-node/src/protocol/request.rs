//! Validation of data-protocol requests: a prost header and a payload become a [`Request`], or
//! an error saying what is wrong. Pure, so it is unit-tested and fuzzed.

use bytes::Bytes;
use cairn_proto::data as pb;
use prost::Message;

use crate::engine::{check_range, ChunkId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        data: Bytes,
        /// The payload's CRC32C, checked against it.
        crc: u32,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    ChunkInfo,
    ChunkCopy,
    BlockCrcs,
    /// Raise the group's epoch and wait for requests admitted under older ones.
    Barrier,
    DirtyList,
    ClearDirty,
    ActivityList,
    /// (chunk index, seq) pairs.
    Settle(Vec<(u64, u64)>),
}

impl Command {
    /// Whether the command changes data (and so must pass the fencing check).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Self::Write { .. } | Self::Discard { .. } | Self::WriteZeroes { .. }
        )
    }
}

/// Most chunks one settle may name.
pub const MAX_SETTLE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    /// The disk's uuid; empty: the node's only disk.
    pub disk: String,
    pub chunk: ChunkId,
    pub generation: u64,
    pub group: u64,
    pub epoch: u64,
    /// The sender's group has members out of date: record the chunk as one they missed.
    pub degraded: bool,
    /// Writes: the client's sequence number (activity record).
    pub seq: u64,
    pub cmd: Command,
}

/// Why a request was refused. With an id the refusal is answered; without one (the header did
/// not decode) the connection is closed, as the protocol can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub id: Option<u64>,
    pub status: pb::Status,
    pub message: String,
}

fn invalid(id: u64, message: impl Into<String>) -> Refusal {
    Refusal {
        id: Some(id),
        status: pb::Status::Invalid,
        message: message.into(),
    }
}

impl Request {
    /// Decodes a request header off the wire and validates it with its payload.
    pub fn parse(header: &[u8], payload: Bytes) -> Result<Self, Refusal> {
        let h = pb::Request::decode(header).map_err(|e| Refusal {
            id: None,
            status: pb::Status::Invalid,
            message: format!("undecodable request header: {e}"),
        })?;
        Self::validate(h, payload)
    }

    /// Validates a decoded request header with its payload: what [`Request::parse`] does after
    /// decoding, and all a client in this process needs (its requests are never encoded).
    pub fn validate(h: pb::Request, payload: Bytes) -> Result<Self, Refusal> {
        let id = h.request_id;
        let op = pb::Op::try_from(h.op).map_err(|_| Refusal {
            id: Some(id),
            status: pb::Status::Unsupported,
            message: format!("unknown op {}", h.op),
        })?;
        let range = || check_range(h.offset, h.length).map_err(|e| invalid(id, e.to_string()));
        let no_payload = || {
            if payload.is_empty() {
                Ok(())
            } else {
                Err(invalid(
                    id,
                    format!("{op:?} carries no payload, got {} bytes", payload.len()),
                ))
            }
        };
        let cmd = match op {
            pb::Op::Unspecified => {
                return Err(Refusal {
                    id: Some(id),
                    status: pb::Status::Unsupported,
                    message: "no op given".into(),
                })
            }
            pb::Op::Read => {
                range()?;
                no_payload()?;
                Command::Read {
                    offset: h.offset,
                    len: h.length,
                }
            }
            pb::Op::Write => {
                range()?;
                if payload.len() as u64 != h.length {
                    return Err(invalid(
                        id,
                        format!("length {} but {} payload bytes", h.length, payload.len()),
                    ));
                }
                if crc32c::crc32c(&payload) != h.payload_crc {
                    return Err(invalid(
                        id,
                        "payload checksum mismatch: corrupted in transit",
                    ));
                }
                Command::Write {
                    offset: h.offset,
                    data: payload,
                    crc: h.payload_crc,
                }
            }
            pb::Op::Flush => {
                no_payload()?;
                Command::Flush
            }
            pb::Op::Discard | pb::Op::WriteZeroes => {
                range()?;
                no_payload()?;
                if op == pb::Op::Discard {
                    Command::Discard {
                        offset: h.offset,
                        len: h.length,
                    }
                } else {
                    Command::WriteZeroes {
                        offset: h.offset,
                        len: h.length,
                    }
                }
            }
            pb::Op::ChunkInfo => {
                no_payload()?;
                Command::ChunkInfo
            }
            pb::Op::ChunkCopy => {
                no_payload()?;
                Command::ChunkCopy
            }
            pb::Op::BlockCrcs => {
                no_payload()?;
                Command::BlockCrcs
            }
            pb::Op::ActivityList => {
                no_payload()?;
                Command::ActivityList
            }
            pb::Op::Settle => {
                if payload.is_empty()
                    || !payload.len().is_multiple_of(16)
                    || payload.len() > MAX_SETTLE * 16
                {
                    return Err(invalid(
                        id,
                        format!(
                            "a settle carries 1 to {MAX_SETTLE} (chunk, seq) pairs, got {} bytes",
                            payload.len()
                        ),
                    ));
                }
                let n = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
                Command::Settle(
                    payload
                        .chunks_exact(16)
                        .map(|p| (n(&p[..8]), n(&p[8..])))
                        .collect(),
                )
            }
            pb::Op::Barrier | pb::Op::DirtyList | pb::Op::ClearDirty => {
                no_payload()?;
                if h.epoch == 0 {
                    return Err(invalid(id, format!("{op:?} needs the group's epoch")));
                }
                match op {
                    pb::Op::Barrier => Command::Barrier,
                    pb::Op::DirtyList => Command::DirtyList,
                    _ => Command::ClearDirty,
                }
            }
        };
        if cmd.mutates() && h.generation == 0 {
            return Err(Refusal {
                id: Some(id),
                status: pb::Status::Fenced,
                message: "a write needs the volume's attach generation".into(),
            });
        }
        if h.disk.len() > 64 {
            return Err(invalid(id, "disk id longer than 64 bytes"));
        }
        Ok(Self {
            id,
            disk: h.disk,
            chunk: ChunkId {
                volume: h.volume,
                index: h.chunk,
            },
            generation: h.generation,
            group: h.group,
            epoch: h.epoch,
            degraded: h.degraded,
            seq: h.seq,
            cmd,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::CHUNK_SIZE;
    use proptest::prelude::*;

    fn hdr(op: pb::Op, offset: u64, length: u64, crc: u32) -> Vec<u8> {
        pb::Request {
            request_id: 9,
            op: op as i32,
            volume: 1,
            chunk: 2,
            offset,
            length,
            generation: 3,
            group: 4,
            epoch: 5,
            payload_crc: crc,
            disk: String::new(),
            degraded: false,
            seq: 0,
        }
        .encode_to_vec()
    }

    /// Well-formed requests parse; every malformed field is refused with the request's id.
    #[test]
    fn validation() {
        let data = Bytes::from(vec![1u8; 4096]);
        let crc = crc32c::crc32c(&data);
        let w = Request::parse(&hdr(pb::Op::Write, 4096, 4096, crc), data.clone()).unwrap();
        assert_eq!(
            w.cmd,
            Command::Write {
                offset: 4096,
                data: data.clone(),
                crc
            }
        );
        assert_eq!(
            (w.chunk, w.generation, w.group, w.epoch),
            (
                ChunkId {
                    volume: 1,
                    index: 2
                },
                3,
                4,
                5
            )
        );
        for (h, p, why) in [
            (
                hdr(pb::Op::Write, 4096, 4096, crc ^ 1),
                data.clone(),
                "checksum",
            ),
            (
                hdr(pb::Op::Write, 4096, 8192, crc),
                data.clone(),
                "payload bytes",
            ),
            (
                hdr(pb::Op::Write, 100, 4096, crc),
                data.clone(),
                "multiples",
            ),
            (
                hdr(pb::Op::Read, CHUNK_SIZE, 4096, 0),
                Bytes::new(),
                "past the end",
            ),
            (hdr(pb::Op::Read, 0, 0, 0), Bytes::new(), "zero length"),
            (hdr(pb::Op::Read, 0, 4096, 0), data.clone(), "no payload"),
            (hdr(pb::Op::Flush, 0, 0, 0), data.clone(), "no payload"),
        ] {
            let r = Request::parse(&h, p).unwrap_err();
            assert_eq!(r.id, Some(9));
            assert!(r.message.contains(why), "{why}: {r:?}");
        }
        let mut unknown = pb::Request::decode(&hdr(pb::Op::Read, 0, 4096, 0)[..]).unwrap();
        unknown.op = 99;
        let r = Request::parse(&unknown.encode_to_vec(), Bytes::new()).unwrap_err();
        assert_eq!(r.status, pb::Status::Unsupported);
        let mut nogen = pb::Request::decode(&hdr(pb::Op::Write, 0, 4096, crc)[..]).unwrap();
        nogen.generation = 0;
        assert_eq!(
            Request::parse(&nogen.encode_to_vec(), data)
                .unwrap_err()
                .status,
            pb::Status::Fenced
        );
        assert_eq!(
            Request::parse(b"\xff\xff\xff", Bytes::new())
                .unwrap_err()
                .id,
            None
        );
    }

    proptest! {
        /// Any header bytes and payload: parsing answers without panicking.
        #[test]
        fn parse_never_panics(h in proptest::collection::vec(any::<u8>(), 0..64), p in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Request::parse(&h, Bytes::from(p));
        }
    }
}
