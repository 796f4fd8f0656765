//! Split-virtqueue descriptor chains (virtio 1.2 §2.7.5), walked from a head index: the list
//! of guest buffers a request is made of. Pure over a [`DescTable`] reader, never a panic,
//! fuzzed (`fuzz/vring_chain`).
//!
//! virtio-queue walks chains only as it pops them off the available ring; a request found in
//! the inflight region after a backend restart has to be walked from its head alone, so every
//! chain — popped or resubmitted — goes through this one walker.

/// Size of one descriptor: addr u64, len u32, flags u16, next u16 (little-endian).
pub const DESC_SIZE: u64 = 16;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
/// The largest indirect table accepted (the largest virtqueue), in descriptors.
pub const MAX_INDIRECT: u64 = 32_768;

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// The device writes it (VIRTQ_DESC_F_WRITE); otherwise the device reads it.
    pub write: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {0} out of the table")]
    OutOfTable(u16),
    #[error("descriptor chain loops")]
    Loop,
    #[error("descriptor at {0:#x} is not in guest memory")]
    Unreadable(u64),
    #[error("malformed indirect descriptor")]
    BadIndirect,
}

/// Reads one descriptor (16 bytes) at a guest address.
pub trait DescTable {
    fn read_desc(&self, addr: u64) -> Option<[u8; 16]>;
}

impl DescTable for vm_memory::GuestMemoryMmap {
    fn read_desc(&self, addr: u64) -> Option<[u8; 16]> {
        let mut d = [0u8; 16];
        vm_memory::Bytes::read_slice(self, &mut d, vm_memory::GuestAddress(addr)).ok()?;
        Some(d)
    }
}

/// The buffers of the chain starting at `head` in the descriptor table at `table` of a queue
/// of `queue_size` entries. One indirect table is followed if `indirect` was negotiated
/// (never nested, never with NEXT, a whole number of descriptors). A chain longer than its
/// table is a loop.
pub fn walk(
    mem: &impl DescTable,
    table: u64,
    queue_size: u16,
    head: u16,
    indirect: bool,
) -> Result<Vec<Seg>, ChainError> {
    if head >= queue_size {
        return Err(ChainError::OutOfTable(head));
    }
    let (mut table, mut size, mut idx) = (table, u64::from(queue_size), u64::from(head));
    let mut in_indirect = false;
    let mut seen = 0u64;
    let mut segs = Vec::new();
    loop {
        seen += 1;
        if seen > size {
            return Err(ChainError::Loop);
        }
        let at = table
            .checked_add(idx * DESC_SIZE)
            .ok_or(ChainError::Unreadable(table))?;
        let d = mem.read_desc(at).ok_or(ChainError::Unreadable(at))?;
        let addr = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes(d[12..14].try_into().expect("2 bytes"));
        let next = u16::from_le_bytes(d[14..16].try_into().expect("2 bytes"));
        if flags & DESC_F_INDIRECT != 0 {
            let n = u64::from(len) / DESC_SIZE;
            if !indirect
                || in_indirect
                || flags & DESC_F_NEXT != 0
                || n == 0
                || u64::from(len) % DESC_SIZE != 0
                || n > MAX_INDIRECT
            {
                return Err(ChainError::BadIndirect);
            }
            (table, size, idx, seen, in_indirect) = (addr, n, 0, 0, true);
            continue;
        }
        segs.push(Seg {
            addr,
            len,
            write: flags & DESC_F_WRITE != 0,
        });
        if flags & DESC_F_NEXT == 0 {
            return Ok(segs);
        }
        if u64::from(next) >= size {
            return Err(ChainError::OutOfTable(next));
        }
        idx = u64::from(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Guest memory as a byte vector at address 0.
    struct Flat(Vec<u8>);

    impl DescTable for Flat {
        fn read_desc(&self, addr: u64) -> Option<[u8; 16]> {
            let a = usize::try_from(addr).ok()?;
            self.0.get(a..a.checked_add(16)?)?.try_into().ok()
        }
    }

    fn put(m: &mut Flat, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let a = at as usize;
        m.0[a..a + 8].copy_from_slice(&addr.to_le_bytes());
        m.0[a + 8..a + 12].copy_from_slice(&len.to_le_bytes());
        m.0[a + 12..a + 14].copy_from_slice(&flags.to_le_bytes());
        m.0[a + 14..a + 16].copy_from_slice(&next.to_le_bytes());
    }

    #[test]
    fn direct_indirect_and_malformed_chains() {
        let mut m = Flat(vec![0; 4096]);
        // Direct: 2 -> 5 -> 1.
        put(&mut m, 2 * 16, 0x100, 16, DESC_F_NEXT, 5);
        put(&mut m, 5 * 16, 0x200, 4096, DESC_F_NEXT | DESC_F_WRITE, 1);
        put(&mut m, 16, 0x300, 1, DESC_F_WRITE, 0);
        assert_eq!(
            walk(&m, 0, 8, 2, false).unwrap(),
            vec![
                Seg {
                    addr: 0x100,
                    len: 16,
                    write: false
                },
                Seg {
                    addr: 0x200,
                    len: 4096,
                    write: true
                },
                Seg {
                    addr: 0x300,
                    len: 1,
                    write: true
                },
            ]
        );
        assert_eq!(walk(&m, 0, 8, 8, false), Err(ChainError::OutOfTable(8)));
        // A loop: 1 -> 1.
        put(&mut m, 16, 0x300, 1, DESC_F_NEXT, 1);
        assert_eq!(walk(&m, 0, 8, 1, false), Err(ChainError::Loop));
        // Next past the table.
        put(&mut m, 16, 0x300, 1, DESC_F_NEXT, 9);
        assert_eq!(walk(&m, 0, 8, 1, false), Err(ChainError::OutOfTable(9)));

        // Indirect: head 0 points at a 3-entry table at 0x800.
        put(&mut m, 0, 0x800, 48, DESC_F_INDIRECT, 0);
        put(&mut m, 0x800, 0x100, 16, DESC_F_NEXT, 1);
        put(&mut m, 0x810, 0x200, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
        put(&mut m, 0x820, 0x300, 1, DESC_F_WRITE, 0);
        assert_eq!(walk(&m, 0, 8, 0, true).unwrap().len(), 3);
        assert_eq!(walk(&m, 0, 8, 0, false), Err(ChainError::BadIndirect));
        // Nested indirect, indirect with NEXT, a torn table.
        put(&mut m, 0x820, 0x800, 48, DESC_F_INDIRECT, 0);
        assert_eq!(walk(&m, 0, 8, 0, true), Err(ChainError::BadIndirect));
        put(&mut m, 0, 0x800, 48, DESC_F_INDIRECT | DESC_F_NEXT, 1);
        assert_eq!(walk(&m, 0, 8, 0, true), Err(ChainError::BadIndirect));
        put(&mut m, 0, 0x800, 40, DESC_F_INDIRECT, 0);
        assert_eq!(walk(&m, 0, 8, 0, true), Err(ChainError::BadIndirect));
        // A table outside memory.
        put(&mut m, 0, 0x10_0000, 48, DESC_F_INDIRECT, 0);
        assert_eq!(
            walk(&m, 0, 8, 0, true),
            Err(ChainError::Unreadable(0x10_0000))
        );
    }

    proptest! {
        /// Any table contents: no panic, and a chain returned is never longer than the
        /// descriptors that could make it up.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                        size in 1u16..64, head in 0u16..80, indirect: bool) {
            let m = Flat(bytes);
            if let Ok(segs) = walk(&m, 0, size, head, indirect) {
                prop_assert!(segs.len() as u64 <= u64::from(size) + MAX_INDIRECT);
            }
        }
    }
}
