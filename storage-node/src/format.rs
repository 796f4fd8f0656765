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
//! 52  8  log offset (bytes, where the write-ahead log region begins)
//! 60  8  log size (bytes)
//! 68  4  CRC32C of bytes 0..68
//! ```
//! The rest of the first MiB is reserved; the write-ahead log region follows (see
//! `engine::log`), then the chunk slots, each `chunk size` bytes.
//!
//! Format 1 had no log; it is refused (no format-1 disk was ever deployed).

pub const MAGIC: &[u8; 8] = b"CAIRNDSK";
/// Bump on any incompatible change; older formats are refused with a clear message.
pub const FORMAT_VERSION: u32 = 2;
pub const SUPERBLOCK_SIZE: usize = 4096;
const ENCODED_LEN: usize = 72;
/// Where the log region starts: 1 MiB, aligned for any device.
pub const LOG_OFFSET: u64 = 1 << 20;
/// Bounds of the log region: 1/128 of the disk, rounded down to whole MiB, within these.
pub const MIN_LOG_SIZE: u64 = 8 << 20;
pub const MAX_LOG_SIZE: u64 = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub chunk_size: u64,
    pub data_offset: u64,
    pub slots: u64,
    pub log_offset: u64,
    pub log_size: u64,
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
        let log_size = Self::log_size_for(disk_size);
        let data_offset = LOG_OFFSET + log_size;
        let slots = disk_size.checked_sub(data_offset)? / chunk_size;
        (slots > 0).then(|| Self {
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            chunk_size,
            data_offset,
            slots,
            log_offset: LOG_OFFSET,
            log_size,
        })
    }

    fn log_size_for(disk_size: u64) -> u64 {
        (disk_size / 128 / (1 << 20) * (1 << 20)).clamp(MIN_LOG_SIZE, MAX_LOG_SIZE)
    }

    /// The smallest disk size that holds `slots` chunk slots (for file-backed disks and tests).
    pub fn disk_size_for(slots: u64, chunk_size: u64) -> u64 {
        let mut size = LOG_OFFSET + MIN_LOG_SIZE + slots * chunk_size;
        while Self::new(size, chunk_size).is_none_or(|sb| sb.slots < slots) {
            size += chunk_size;
        }
        size
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
        b[52..60].copy_from_slice(&self.log_offset.to_le_bytes());
        b[60..68].copy_from_slice(&self.log_size.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..68]);
        b[68..ENCODED_LEN].copy_from_slice(&crc.to_le_bytes());
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
        if version != FORMAT_VERSION {
            // Checked before the checksum: another format may keep its checksum elsewhere.
            return Err(SuperblockError::Version { found: version });
        }
        let crc = u32::from_le_bytes(b[68..72].try_into().expect("4 bytes"));
        if crc32c::crc32c(&b[0..68]) != crc {
            return Err(SuperblockError::Checksum);
        }
        let sb = Self {
            uuid: b[12..28].try_into().expect("16 bytes"),
            chunk_size: u64_at(28),
            data_offset: u64_at(36),
            slots: u64_at(44),
            log_offset: u64_at(52),
            log_size: u64_at(60),
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
        if sb.log_offset < SUPERBLOCK_SIZE as u64
            || !sb.log_offset.is_multiple_of(4096)
            || sb.log_size < MIN_LOG_SIZE
            || !sb.log_size.is_multiple_of(4096)
            || sb
                .log_offset
                .checked_add(sb.log_size)
                .is_none_or(|end| end > sb.data_offset)
        {
            return Err(SuperblockError::Inconsistent(
                "log region overlaps the superblock or the data",
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
        assert_eq!(sb.log_size, 8 << 20, "1/128 of the disk");
        assert_eq!(sb.slots, ((1 << 30) - LOG_OFFSET - (8 << 20)) / (4 << 20));
        let small = Superblock::new(256 << 20, 4 << 20).unwrap();
        assert_eq!(small.log_size, MIN_LOG_SIZE);
        let big = Superblock::new(1 << 40, 4 << 20).unwrap();
        assert_eq!(big.log_size, MAX_LOG_SIZE);
        let ten = Superblock::new(10 << 30, 4 << 20).unwrap();
        assert_eq!(
            Superblock::new(1 << 29, 4 << 20).unwrap().log_size,
            MIN_LOG_SIZE
        );
        assert_eq!(ten.log_size, 80 << 20);
        for slots in [1, 2, 8, 500, 3000] {
            let size = Superblock::disk_size_for(slots, 4 << 20);
            assert_eq!(Superblock::new(size, 4 << 20).unwrap().slots, slots);
        }
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
            Superblock::new(LOG_OFFSET + MIN_LOG_SIZE + 100, 4 << 20).is_none(),
            "too small for one slot"
        );
    }

    /// Another version is refused by version, not checksum, whatever it keeps where.
    #[test]
    fn other_versions_refused() {
        for v in [1u32, 3] {
            let mut b = Superblock::new(1 << 30, 4 << 20).unwrap().encode();
            b[8..12].copy_from_slice(&v.to_le_bytes());
            assert_eq!(
                Superblock::decode(&b),
                Err(SuperblockError::Version { found: v })
            );
        }
    }

    proptest! {
        /// Whatever the bytes, decode answers without panicking.
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Superblock::decode(&b);
        }
    }
}
