//! The on-disk superblock at offset 0 of every Cairn disk: what the disk is, and how its data
//! area is laid out. Pure encode/decode, so it can be fuzzed.
//!
//! Layout (little-endian), in the first 4 KiB of the disk:
//! ```text
//! 0   8  magic "CAIRNDSK"
//! 8   4  format version
//! 12  16 disk uuid
//! 28  8  chunk size (bytes)
//! 36  8  data offset (bytes, where slot 0 begins)
//! 44  8  slot count
//! 52  4  CRC32C of bytes 0..52
//! ```
//! The rest of the first MiB is reserved; chunk slots follow, each `chunk size` bytes.

pub const MAGIC: &[u8; 8] = b"CAIRNDSK";
/// Bump on any incompatible change; older formats are refused with a clear message.
pub const FORMAT_VERSION: u32 = 1;
pub const SUPERBLOCK_SIZE: usize = 4096;
const ENCODED_LEN: usize = 56;
/// Where the first chunk slot starts: 1 MiB, aligned for any device.
pub const DATA_OFFSET: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub chunk_size: u64,
    pub data_offset: u64,
    pub slots: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("not a Cairn disk (no CAIRNDSK magic)")]
    NoMagic,
    #[error("disk format {found} is not supported by this build (format {FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("superblock checksum mismatch: the superblock is corrupt")]
    Checksum,
    #[error("superblock is inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error("superblock is truncated ({0} bytes)")]
    Truncated(usize),
}

impl Superblock {
    /// Lays out a new disk of `disk_size` bytes.
    pub fn new(disk_size: u64, chunk_size: u64) -> Option<Self> {
        let slots = disk_size.checked_sub(DATA_OFFSET)? / chunk_size;
        (slots > 0).then(|| Self {
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            chunk_size,
            data_offset: DATA_OFFSET,
            slots,
        })
    }

    pub fn uuid_string(&self) -> String {
        uuid::Uuid::from_bytes(self.uuid).to_string()
    }

    /// Byte offset of a slot on the disk.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.data_offset + slot * self.chunk_size
    }

    /// The 4 KiB superblock block, zero-padded.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..28].copy_from_slice(&self.uuid);
        b[28..36].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[36..44].copy_from_slice(&self.data_offset.to_le_bytes());
        b[44..52].copy_from_slice(&self.slots.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..52]);
        b[52..ENCODED_LEN].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a superblock; never panics, whatever the bytes.
    pub fn decode(b: &[u8]) -> Result<Self, SuperblockError> {
        if b.len() < ENCODED_LEN {
            return Err(SuperblockError::Truncated(b.len()));
        }
        if &b[0..8] != MAGIC {
            return Err(SuperblockError::NoMagic);
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(b[52..56].try_into().expect("4 bytes"));
        if crc32c::crc32c(&b[0..52]) != crc {
            return Err(SuperblockError::Checksum);
        }
        if version != FORMAT_VERSION {
            return Err(SuperblockError::Version { found: version });
        }
        let sb = Self {
            uuid: b[12..28].try_into().expect("16 bytes"),
            chunk_size: u64_at(28),
            data_offset: u64_at(36),
            slots: u64_at(44),
        };
        if sb.chunk_size == 0 || !sb.chunk_size.is_multiple_of(4096) {
            return Err(SuperblockError::Inconsistent(
                "chunk size is not a multiple of 4 KiB",
            ));
        }
        if sb.data_offset < SUPERBLOCK_SIZE as u64 || !sb.data_offset.is_multiple_of(4096) {
            return Err(SuperblockError::Inconsistent(
                "data offset overlaps the superblock",
            ));
        }
        if sb
            .slots
            .checked_mul(sb.chunk_size)
            .and_then(|d| d.checked_add(sb.data_offset))
            .is_none()
        {
            return Err(SuperblockError::Inconsistent("slot count overflows"));
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encode/decode round-trips, and any flipped byte of the header is caught.
    #[test]
    fn round_trip_and_bit_flips() {
        let sb = Superblock::new(1 << 30, 4 << 20).unwrap();
        assert_eq!(sb.slots, ((1 << 30) - DATA_OFFSET) / (4 << 20));
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b), Ok(sb));
        for i in 0..ENCODED_LEN {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(Superblock::decode(&c).is_err(), "flip at {i} accepted");
        }
        assert_eq!(
            Superblock::decode(&b[..10]),
            Err(SuperblockError::Truncated(10))
        );
        assert_eq!(
            Superblock::decode(&[0u8; 4096]),
            Err(SuperblockError::NoMagic)
        );
        assert!(
            Superblock::new(DATA_OFFSET + 100, 4 << 20).is_none(),
            "too small for one slot"
        );
    }

    /// An unknown version with a valid checksum is refused by version, not checksum.
    #[test]
    fn future_version_refused() {
        let mut b = Superblock::new(1 << 30, 4 << 20).unwrap().encode();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Superblock::decode(&b),
            Err(SuperblockError::Version { found: 2 })
        );
    }

    proptest! {
        /// Whatever the bytes, decode answers without panicking.
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Superblock::decode(&b);
        }
    }
}
