//! The per-request CPU of Cairn's pure code, outside any I/O: CRC32C of a block and of a
//! chunk, the data protocol's frame codec and request validation for a 4 KiB write (what every
//! replica does per write), a node's log batch of 32 such writes (what QD32 writes make of
//! them), and the NBD codec (parse a request header, build a reply).
//!
//! cargo bench -p cairn-benches --bench codecs

use bytes::{Bytes, BytesMut};
use cairn_client::data::frame::{Frame, FrameCodec};
use cairn_client::nbd::proto::{parse_request, simple_reply, REQUEST_LEN};
use cairn_proto::data as dpb;
use cairn_storage_node::engine::log::{encode_batch, Record};
use cairn_storage_node::engine::ChunkId;
use cairn_storage_node::protocol::request::Request;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

fn crc(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    for size in [4096usize, 4 << 20] {
        let data = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{}K", size / 1024), |b| {
            b.iter(|| crc32c::crc32c(std::hint::black_box(&data)))
        });
    }
    g.finish();
}

fn write_header() -> Bytes {
    dpb::Request {
        request_id: 77,
        op: dpb::Op::Write as i32,
        volume: 3,
        chunk: 12,
        offset: 8192,
        length: 4096,
        generation: 5,
        group: 9,
        epoch: 4,
        payload_crc: crc32c::crc32c(&[0x5a; 4096]),
        disk: "3eef32b6-f1c9-4636-887f-a68a0c7bd55a".into(),
        seq: 1234,
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

fn frame(c: &mut Criterion) {
    let header = write_header();
    let payload = Bytes::from(vec![0x5au8; 4096]);
    let mut g = c.benchmark_group("data_protocol");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_4k_write_frame", |b| {
        let mut buf = BytesMut::with_capacity(8192);
        b.iter(|| {
            buf.clear();
            FrameCodec
                .encode(
                    Frame {
                        header: header.clone(),
                        payload: payload.clone(),
                    },
                    &mut buf,
                )
                .unwrap();
        })
    });
    let mut wire = BytesMut::new();
    FrameCodec
        .encode(
            Frame {
                header: header.clone(),
                payload: payload.clone(),
            },
            &mut wire,
        )
        .unwrap();
    let wire = wire.freeze();
    g.bench_function("decode_and_validate_4k_write", |b| {
        b.iter(|| {
            let mut src = BytesMut::from(&wire[..]);
            let f = FrameCodec.decode(&mut src).unwrap().unwrap();
            // What a storage node does before the engine: the frame split, the header decoded
            // and checked, the payload's CRC verified.
            Request::parse(&f.header, f.payload).unwrap()
        })
    });
    g.finish();
}

fn nbd(c: &mut Criterion) {
    let mut req = [0u8; REQUEST_LEN];
    req[0..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
    req[6..8].copy_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
    req[8..16].copy_from_slice(&42u64.to_be_bytes());
    req[16..24].copy_from_slice(&(1u64 << 20).to_be_bytes());
    req[24..28].copy_from_slice(&4096u32.to_be_bytes());
    let mut g = c.benchmark_group("nbd");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_request", |b| {
        b.iter(|| parse_request(std::hint::black_box(&req)).unwrap())
    });
    g.bench_function("simple_reply", |b| {
        b.iter(|| simple_reply(std::hint::black_box(42), 0))
    });
    g.finish();
}

fn log_batch(c: &mut Criterion) {
    let records: Vec<Record> = (0..32)
        .map(|i| {
            let chunk = ChunkId {
                volume: 3,
                index: i,
            };
            Record::write(chunk, i, 7, Bytes::from(vec![i as u8; 4096]))
        })
        .collect();
    let refs: Vec<&Record> = records.iter().collect();
    let mut g = c.benchmark_group("log");
    g.throughput(Throughput::Elements(refs.len() as u64));
    g.bench_function("encode_batch_32x4k", |b| {
        b.iter(|| encode_batch(1, std::hint::black_box(&refs), 5))
    });
    g.finish();
}

criterion_group!(benches, crc, frame, log_batch, nbd);
criterion_main!(benches);
