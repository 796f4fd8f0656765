//! Request validation: any header bytes and payload are either a request that satisfies the
//! engine's range rules, or a refusal — never a panic.
#![no_main]

use bytes::Bytes;
use cairn_storage_node::engine::{check_range, CHUNK_SIZE};
use cairn_storage_node::protocol::request::{Command, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let (h, p) = data.split_at(cut);
    if let Ok(r) = Request::parse(h, Bytes::copy_from_slice(p)) {
        match r.cmd {
            Command::Read { offset, len } | Command::Discard { offset, len } | Command::WriteZeroes { offset, len } => {
                assert!(check_range(offset, len).is_ok() && offset + len <= CHUNK_SIZE);
            }
            Command::Write { offset, data, crc } => {
                assert!(check_range(offset, data.len() as u64).is_ok());
                assert_eq!(crc, crc32c::crc32c(&data));
                assert!(r.generation > 0);
            }
            _ => {}
        }
    }
});
