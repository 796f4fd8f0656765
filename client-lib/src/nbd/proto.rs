//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`, fixed newstyle): constants,
//! and pure parsers and encoders — no I/O, never a panic on any input, so they can be fuzzed.
//! All integers are big-endian.

use bytes::{BufMut, Bytes, BytesMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

// NBD_INFO_* in NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ESHUTDOWN: u32 = 108;

/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id in this server's replies.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Longest string (export name, query) accepted, as the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Longest option payload read; longer ones are refused (and skipped) unread.
pub const MAX_OPTION: usize = 64 << 10;

/// An option header: `IHAVEOPT`, option, payload length.
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32), String> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(format!("bad option magic {magic:#x}"));
    }
    Ok((
        u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
        u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
    ))
}

/// A string with a u32 length prefix, from the front of `b`.
fn take_string(b: &mut &[u8]) -> Option<String> {
    let len = take_u32(b)? as usize;
    if len > MAX_STRING || b.len() < len {
        return None;
    }
    let (s, rest) = b.split_at(len);
    *b = rest;
    String::from_utf8(s.to_vec())
        .ok()
        .filter(|s| !s.contains('\0'))
}

fn take_u32(b: &mut &[u8]) -> Option<u32> {
    let (n, rest) = b.split_first_chunk::<4>()?;
    *b = rest;
    Some(u32::from_be_bytes(*n))
}

fn take_u16(b: &mut &[u8]) -> Option<u16> {
    let (n, rest) = b.split_first_chunk::<2>()?;
    *b = rest;
    Some(u16::from_be_bytes(*n))
}

/// NBD_OPT_INFO / NBD_OPT_GO: the export name and the information requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_go(mut b: &[u8]) -> Option<GoRequest> {
    let name = take_string(&mut b)?;
    let n = take_u16(&mut b)? as usize;
    if b.len() != 2 * n {
        return None;
    }
    let infos = b
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some(GoRequest { name, infos })
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: the export name and the queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_context(mut b: &[u8]) -> Option<MetaContextRequest> {
    let name = take_string(&mut b)?;
    let n = take_u32(&mut b)? as usize;
    if n > 1024 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(take_string(&mut b)?);
    }
    b.is_empty().then_some(MetaContextRequest { name, queries })
}

/// Whether a meta-context query selects `base:allocation` (the exact name, or the namespace
/// `base:` alone, which asks for all of it).
pub fn query_matches_base_allocation(q: &str) -> bool {
    q == BASE_ALLOCATION || q == "base:"
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, String> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(format!("bad request magic {magic:#x}"));
    }
    Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
        kind: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
    })
}

/// The server's first bytes: magics and handshake flags.
pub fn greeting() -> Bytes {
    let mut b = BytesMut::with_capacity(18);
    b.put_u64(NBDMAGIC);
    b.put_u64(IHAVEOPT);
    b.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    b.freeze()
}

/// An option reply.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPT_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(kind);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

/// NBD_REP_SERVER's data for one export.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut b = INFO_NAME.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

pub fn info_description(text: &str) -> Vec<u8> {
    let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
    b.extend_from_slice(text.as_bytes());
    b
}

pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags (and no zero padding: the
/// client agreed to NO_ZEROES, or 124 zero bytes when it did not).
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(134);
    b.put_u64(size);
    b.put_u16(flags);
    if !no_zeroes {
        b.put_bytes(0, 124);
    }
    b.freeze()
}

pub fn simple_reply(cookie: u64, error: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(cookie);
    b.freeze()
}

/// A structured reply chunk header; `len` bytes of payload follow.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(20 + 12);
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(len);
    b
}

/// NBD_REPLY_TYPE_OFFSET_DATA's header and offset; the data follows.
pub fn offset_data_header(cookie: u64, offset: u64, data_len: usize, done: bool) -> Bytes {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = chunk_header(cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + data_len as u32);
    b.put_u64(offset);
    b.freeze()
}

pub fn structured_error(cookie: u64, error: u32, message: &str) -> Bytes {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut b = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    );
    b.put_u32(error);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg);
    b.freeze()
}

pub fn structured_none(cookie: u64) -> Bytes {
    chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).freeze()
}

/// NBD_REPLY_TYPE_BLOCK_STATUS for one context: descriptors of (length, status flags).
pub fn block_status_reply(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Bytes {
    let mut b = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        4 + 8 * extents.len() as u32,
    );
    b.put_u32(context);
    for (len, flags) in extents {
        b.put_u32(*len);
        b.put_u32(*flags);
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn go_and_meta_context_round_trip() {
        let mut b = Vec::new();
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(b"db");
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        b.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_go(&b),
            Some(GoRequest {
                name: "db".into(),
                infos: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        assert_eq!(parse_go(&b[..b.len() - 1]), None, "a truncated info list");
        let mut m = Vec::new();
        m.extend_from_slice(&2u32.to_be_bytes());
        m.extend_from_slice(b"db");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let r = parse_meta_context(&m).unwrap();
        assert_eq!(r.queries, vec![BASE_ALLOCATION.to_string()]);
        m.push(0);
        assert_eq!(parse_meta_context(&m), None, "trailing bytes");
        let mut huge = 5000u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&[b'a'; 5000]);
        assert_eq!(parse_go(&huge), None, "a name over 4096 bytes");
    }

    #[test]
    fn request_header() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!(
            (r.flags, r.kind, r.cookie, r.offset, r.length),
            (CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 512)
        );
        b[0] ^= 1;
        assert!(parse_request(&b).is_err());
    }

    proptest! {
        /// Whatever the bytes, the parsers answer without panicking.
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_go(&b);
            let _ = parse_meta_context(&b);
            if b.len() >= REQUEST_LEN {
                let _ = parse_request(b[..REQUEST_LEN].try_into().unwrap());
            }
            if b.len() >= 16 {
                let _ = parse_option_header(b[..16].try_into().unwrap());
            }
        }
    }
}
