//! The NBD codec's parsers on arbitrary bytes: option headers, GO/INFO and meta-context
//! payloads, request headers. Never a panic; what parses is within the protocol's limits.
#![no_main]

use cairn_client::nbd::proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.first_chunk::<16>() {
        let _ = parse_option_header(h);
    }
    if let Some(r) = data.first_chunk::<REQUEST_LEN>() {
        let _ = parse_request(r);
    }
    if let Some(g) = parse_go(data) {
        assert!(g.name.len() <= MAX_STRING);
    }
    if let Some(m) = parse_meta_context(data) {
        assert!(m.name.len() <= MAX_STRING);
        assert!(m.queries.iter().all(|q| q.len() <= MAX_STRING));
    }
});
