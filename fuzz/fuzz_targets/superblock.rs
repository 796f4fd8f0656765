//! The on-disk superblock decoder: any bytes decode or are refused without panicking, and an
//! accepted superblock re-encodes to an identical header.
#![no_main]

use cairn_storage_node::format::Superblock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sb) = Superblock::decode(data) {
        assert_eq!(sb.encode()[..72], data[..72]);
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    }
});
