//! The chunk engine alone (DiskEngine on io_uring, O_DIRECT, a file on the work filesystem):
//! a durable 4 KiB write and a checked 4 KiB read, one at a time, so each figure is the
//! latency of one request through the engine — log append and group commit for writes, the
//! CRC check for reads. `benches/engine/run` compares it against fio on the same file.
//!
//! cargo bench -p cairn-benches --bench engine_ops   (CAIRN_BENCH_DIR: where the file goes)

use bytes::Bytes;
use cairn_storage_node::engine::disk::DiskEngine;
use cairn_storage_node::engine::{ChunkEngine, ChunkId};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir_in(
        std::env::var("CAIRN_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )
    .unwrap();
    let disk = dir.path().join("disk.img");
    DiskEngine::create_file(&disk, 1 << 30).unwrap();
    let e = rt
        .block_on(DiskEngine::open(&disk, &dir.path().join("index")))
        .unwrap();
    let chunk = ChunkId {
        volume: 1,
        index: 0,
    };
    let data = Bytes::from(vec![0x5au8; 4096]);
    // Every block of the chunk mapped, so reads read data.
    rt.block_on(e.write(chunk, 0, Bytes::from(vec![0x5au8; 4 << 20])))
        .unwrap();

    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("write_4k_durable", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % 1024;
            e.write(chunk, i * 4096, data.clone())
        })
    });
    let mut j = 0u64;
    g.bench_function("read_4k_checked", |b| {
        b.to_async(&rt).iter(|| {
            j = (j + 7) % 1024;
            e.read(chunk, j * 4096, 4096)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
