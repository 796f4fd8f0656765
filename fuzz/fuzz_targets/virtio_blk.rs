//! virtio-blk request parsing on arbitrary bytes: headers, discard / write-zeroes segments,
//! byte ranges, config-space reads. Never a panic; a range accepted lies within the device.
#![no_main]

use cairn_client::vhost::request::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_header(data);
    if let Some(segs) = parse_segments(data) {
        assert!(!segs.is_empty() && segs.len() <= MAX_DISCARD_SEG as usize);
        for s in segs {
            let capacity = 1u64 << 40;
            if let Some((off, len)) = byte_range(s.sector, u64::from(s.sectors) * SECTOR, capacity) {
                assert!(off + len <= capacity && off % BLOCK == 0 && len % BLOCK == 0);
            }
        }
    }
    if data.len() >= 8 {
        let off = u32::from_le_bytes(data[0..4].try_into().unwrap());
        let size = u32::from_le_bytes(data[4..8].try_into().unwrap()) % 4096;
        let c = config(1 << 30, 4);
        assert_eq!(config_slice(&c, off, size).len(), size as usize);
    }
});
