//! Descriptor-chain walking over arbitrary guest memory (the descriptor table and any
//! indirect tables in it): never a panic, never an endless walk, and a chain returned is no
//! longer than its tables allow.
#![no_main]

use cairn_client::vhost::chain::{walk, DescTable, MAX_INDIRECT};
use libfuzzer_sys::fuzz_target;

struct Flat<'a>(&'a [u8]);

impl DescTable for Flat<'_> {
    fn read_desc(&self, addr: u64) -> Option<[u8; 16]> {
        let a = usize::try_from(addr).ok()?;
        self.0.get(a..a.checked_add(16)?)?.try_into().ok()
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let size = u16::from_le_bytes([data[0], data[1]]) % 1024 + 1;
    let head = u16::from_le_bytes([data[2], data[3]]) % (size + 4);
    let mem = Flat(&data[4..]);
    for indirect in [false, true] {
        if let Ok(segs) = walk(&mem, 0, size, head, indirect) {
            assert!(segs.len() as u64 <= u64::from(size) + MAX_INDIRECT);
        }
    }
});
