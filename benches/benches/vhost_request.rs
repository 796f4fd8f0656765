//! The vhost-user-blk backend's per-request CPU path, without the volume: parse the header,
//! check the range, copy a 4 KiB write's data out of guest memory (or a read's data into it)
//! and write the status byte — what every request costs before and after `VolumeClient`;
//! walking its descriptor chain, and marking it in the inflight region and clearing the mark.
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
    g.bench_function("walk_chain_3_descriptors", |b| {
        // header -> data -> status at descriptors 0, 1, 2 of a table at 0x8000.
        for (i, (addr, len, flags, next)) in [
            (0x1000u64, 16u32, 1u16, 1u16),
            (0x2000, 4096, 1, 2),
            (0x4000, 1, 2, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(0x8000 + 16 * i as u64))
                .unwrap();
        }
        b.iter(|| {
            cairn_client::vhost::chain::walk(&mem, 0x8000, 256, std::hint::black_box(0), true)
                .unwrap()
                .len()
        })
    });
    g.bench_function("inflight_take_and_return", |b| {
        let (region, _fd) = cairn_client::vhost::inflight::Region::create(1, 256).unwrap();
        let q = region.queue(0).unwrap();
        q.init(0);
        let mut n = 0u64;
        b.iter(|| {
            let head = (n % 256) as u16;
            q.taken(head, n);
            q.returning(head);
            n += 1;
            q.returned(head, n as u16);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
