//! The log's batch decoder on arbitrary bytes: never panics; whatever records it accepts
//! re-encode to a batch that decodes to the same records.
#![no_main]

use bytes::Bytes;
use cairn_storage_node::engine::log::{decode_header, decode_records, encode_batch, seal_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Half the inputs get a correct header checksum, so the checks past it are reached too.
    let mut v = data.to_vec();
    if v.first().is_some_and(|b| b & 1 == 1) {
        seal_header(&mut v, 0);
    }
    let b = Bytes::from(v);
    let Some(h) = decode_header(&b, 0) else {
        return;
    };
    let payload = b.slice(4096.min(b.len())..);
    if let Some(records) = decode_records(&h, &payload) {
        let refs: Vec<_> = records.iter().collect();
        let again = encode_batch(h.first_seq, &refs, 0).into_bytes();
        let h2 = decode_header(&again, 0).expect("re-encoded header decodes");
        assert_eq!(h2.first_seq, h.first_seq);
        assert_eq!(decode_records(&h2, &again.slice(4096..)).as_ref(), Some(&records));
    }
});
