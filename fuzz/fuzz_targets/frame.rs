//! The data-protocol frame decoder: any bytes, in any split, decode without panicking, never
//! yield a frame over the limits, and re-encode to the bytes they came from.
#![no_main]

use bytes::BytesMut;
use cairn_client::data::frame::{FrameCodec, MAX_HEADER, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let mut buf = BytesMut::from(&data[..split]);
    let mut frames = Vec::new();
    let mut ok = true;
    loop {
        match FrameCodec.decode(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(_) => {
                ok = false;
                break;
            }
        }
    }
    if ok {
        buf.extend_from_slice(&data[split..]);
        while let Ok(Some(f)) = FrameCodec.decode(&mut buf) {
            frames.push(f);
        }
    }
    for f in frames {
        assert!(f.header.len() <= MAX_HEADER && f.payload.len() <= MAX_PAYLOAD);
        let mut out = BytesMut::new();
        FrameCodec.encode(f.clone(), &mut out).unwrap();
        let again = FrameCodec.decode(&mut out).unwrap().unwrap();
        assert_eq!(again, f);
    }
});
