//! The vhost-user-blk backend's per-request CPU path, without the volume: parse the header,
//! check the range, copy a 4 KiB write's data out of guest memory (or a read's data into it)
//! and write the status byte — what every request costs before and after `VolumeClient`.
//!
//! cargo bench -p cairn-benches --bench vhost_request

use cairn_client::vhost::request::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn bench(c: &mut Criterion) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&800u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x1000)).unwrap();
    mem.write_slice(&[0x5a; 4096], GuestAddress(0x2000))
        .unwrap();
    let capacity = 1u64 << 30;

    let mut g = c.benchmark_group("vhost_request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_header_and_range", |b| {
        b.iter(|| {
            let hdr = parse_header(std::hint::black_box(&h)).unwrap();
            byte_range(hdr.sector, 4096, capacity).unwrap()
        })
    });
    g.bench_function("write_4k_gather_and_status", |b| {
        let mut buf = vec![0u8; 16 + 4096];
        b.iter(|| {
            mem.read_slice(&mut buf[..16], GuestAddress(0x1000))
                .unwrap();
            mem.read_slice(&mut buf[16..], GuestAddress(0x2000))
                .unwrap();
            let hdr = parse_header(&buf).unwrap();
            let r = byte_range(hdr.sector, 4096, capacity).unwrap();
            let data = bytes::Bytes::copy_from_slice(&buf[16..]);
            mem.write_slice(&[S_OK], GuestAddress(0x4000)).unwrap();
            (r, data)
        })
    });
    g.bench_function("read_4k_scatter_and_status", |b| {
        let data = bytes::Bytes::from(vec![0xa5u8; 4096]);
        b.iter(|| {
            let hdr = parse_header(std::hint::black_box(&h)).unwrap();
            let r = byte_range(hdr.sector, 4096, capacity).unwrap();
            mem.write_slice(&data, GuestAddress(0x2000)).unwrap();
            mem.write_slice(&[S_OK], GuestAddress(0x4000)).unwrap();
            r
        })
    });
    g.bench_function("discard_segments_32", |b| {
        let mut segs = Vec::new();
        for i in 0..32u64 {
            segs.extend_from_slice(&(i * 8).to_le_bytes());
            segs.extend_from_slice(&8u32.to_le_bytes());
            segs.extend_from_slice(&0u32.to_le_bytes());
        }
        b.iter(|| parse_segments(std::hint::black_box(&segs)).unwrap().len())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
