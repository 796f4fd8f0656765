//! virtio-blk requests and configuration space (virtio 1.2 §5.2), as pure functions over bytes:
//! no guest memory, no I/O, never a panic — fuzzed (`fuzz/virtio_blk`). All little-endian.

/// The unit of virtio-blk addressing.
pub const SECTOR: u64 = 512;
/// The volume's block size, advertised as `blk_size`: the guest's logical block size.
pub const BLOCK: u64 = 4096;
/// Largest data descriptor (`size_max`) and most data descriptors per request (`seg_max`).
pub const SIZE_MAX: u32 = 1 << 20;
pub const SEG_MAX: u32 = 126;
/// Largest discard / write-zeroes: 4 GiB - 4 KiB in sectors, 32 segments a request.
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX - 4095) / 512;
pub const MAX_DISCARD_SEG: u32 = 32;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Length of the serial number GET_ID returns.
pub const ID_BYTES: usize = 20;
/// `flags` bit of a write-zeroes segment: the device may unmap.
pub const WRITE_ZEROES_UNMAP: u32 = 1;

// Feature bits.
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// The 16-byte request header: type, reserved, sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub sector: u64,
}

pub const HEADER_LEN: usize = 16;

pub fn parse_header(b: &[u8]) -> Option<Header> {
    let b = b.get(..HEADER_LEN)?;
    Some(Header {
        kind: u32::from_le_bytes(b[0..4].try_into().ok()?),
        sector: u64::from_le_bytes(b[8..16].try_into().ok()?),
    })
}

/// A discard / write-zeroes segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub sectors: u32,
    pub flags: u32,
}

/// The segments of a discard or write-zeroes request; `None` if the payload is not whole
/// segments, has none, or more than [`MAX_DISCARD_SEG`].
pub fn parse_segments(b: &[u8]) -> Option<Vec<Segment>> {
    if b.is_empty() || !b.len().is_multiple_of(16) || b.len() / 16 > MAX_DISCARD_SEG as usize {
        return None;
    }
    b.chunks(16)
        .map(|s| {
            Some(Segment {
                sector: u64::from_le_bytes(s[0..8].try_into().ok()?),
                sectors: u32::from_le_bytes(s[8..12].try_into().ok()?),
                flags: u32::from_le_bytes(s[12..16].try_into().ok()?),
            })
        })
        .collect()
}

/// The byte range `sectors` at `sector` covers, if it lies within `capacity` bytes and is
/// aligned to the 4 KiB block.
pub fn byte_range(sector: u64, bytes: u64, capacity: u64) -> Option<(u64, u64)> {
    let offset = sector.checked_mul(SECTOR)?;
    let end = offset.checked_add(bytes)?;
    (end <= capacity && offset.is_multiple_of(BLOCK) && bytes.is_multiple_of(BLOCK))
        .then_some((offset, bytes))
}

/// `struct virtio_blk_config` for a volume of `capacity` bytes served on `queues` queues.
pub fn config(capacity: u64, queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&(capacity / SECTOR).to_le_bytes());
    c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    // geometry (16..20): unused.
    c[20..24].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    // topology: physical block = logical block (exponent 0), no offset, min and optimal I/O
    // of one block.
    c[24] = 0;
    c[25] = 0;
    c[26..28].copy_from_slice(&1u16.to_le_bytes());
    c[28..32].copy_from_slice(&1u32.to_le_bytes());
    // writeback (32): 0, unused (33).
    c[34..36].copy_from_slice(&queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[44..48].copy_from_slice(&((BLOCK / SECTOR) as u32).to_le_bytes());
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// The part of the configuration space a driver asked for (zeros past its end).
pub fn config_slice(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(config.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(config.len());
    out[..end - start].copy_from_slice(&config[start..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_segments_and_ranges() {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&80u64.to_le_bytes());
        assert_eq!(
            parse_header(&h),
            Some(Header {
                kind: T_OUT,
                sector: 80
            })
        );
        assert_eq!(parse_header(&h[..15]), None);
        let mut s = Vec::new();
        s.extend_from_slice(&8u64.to_le_bytes());
        s.extend_from_slice(&16u32.to_le_bytes());
        s.extend_from_slice(&WRITE_ZEROES_UNMAP.to_le_bytes());
        assert_eq!(
            parse_segments(&s).unwrap(),
            vec![Segment {
                sector: 8,
                sectors: 16,
                flags: 1
            }]
        );
        assert_eq!(parse_segments(&s[..15]), None);
        assert_eq!(parse_segments(&[]), None);
        assert_eq!(byte_range(8, 4096, 1 << 20), Some((4096, 4096)));
        assert_eq!(byte_range(1, 4096, 1 << 20), None, "unaligned");
        assert_eq!(byte_range(2040, 8192, 1 << 20), None, "past the end");
        assert_eq!(byte_range(u64::MAX / 2, 4096, u64::MAX), None, "overflow");
        let c = config(1 << 30, 2);
        assert_eq!(c.len(), 60);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(config_slice(&c, 20, 4), 4096u32.to_le_bytes().to_vec());
        assert_eq!(config_slice(&c, 58, 8), vec![0; 8]);
        assert_eq!(config_slice(&c, 1000, 4), vec![0; 4]);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600), off in any::<u32>(), size in 0u32..256) {
            let _ = parse_header(&b);
            let _ = parse_segments(&b);
            let _ = config_slice(&b, off, size);
            if b.len() >= 16 {
                let s = u64::from_le_bytes(b[0..8].try_into().unwrap());
                let n = u64::from_le_bytes(b[8..16].try_into().unwrap());
                let _ = byte_range(s, n, u64::MAX);
            }
        }
    }
}
