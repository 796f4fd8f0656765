//! The conformance suite every `ChunkEngine` must pass (TiKV's engine_traits pattern). Each
//! check names the contract clause it holds the engine to (see the `engine` module docs).

use std::sync::Arc;

use bytes::Bytes;

use super::*;

/// How the suite reaches behind an engine's back.
pub trait Harness: Send + Sync + 'static {
    type E: ChunkEngine;
    fn engine(&self) -> &Self::E;
    /// Damages one mapped block's stored bytes without updating its checksum.
    fn corrupt(&self, chunk: ChunkId, block: usize)
        -> impl std::future::Future<Output = ()> + Send;
}

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    Bytes::from(v)
}

const C: ChunkId = ChunkId {
    volume: 7,
    index: 3,
};
const B: usize = BLOCK_SIZE as usize;

/// Runs every check on fresh engines from `make`.
pub async fn run_all<H: Harness, F: std::future::Future<Output = H>>(make: impl Fn() -> F) {
    thin_reads_zero(&make().await).await;
    write_read_round_trip(&make().await).await;
    invalid_requests_change_nothing(&make().await).await;
    discard_and_write_zeroes(&make().await).await;
    corruption_is_reported(&make().await).await;
    checked_reads_carry_their_checksum(&make().await).await;
    concurrent_writes_and_racing_reads(Arc::new(make().await)).await;
}

/// Thin chunks: never-written blocks, and chunks, read as zeros and take no space.
pub async fn thin_reads_zero<H: Harness>(h: &H) {
    let e = h.engine();
    assert_eq!(
        e.read(C, 0, CHUNK_SIZE).await.unwrap(),
        Bytes::from(vec![0u8; CHUNK_SIZE as usize])
    );
    assert!(e.chunk_info(C).unwrap().is_none());
    assert!(e.chunks().is_empty());
    e.write(C, 8 * BLOCK_SIZE, pattern(1, B)).await.unwrap();
    let r = e.read(C, 7 * BLOCK_SIZE, 3 * BLOCK_SIZE).await.unwrap();
    assert_eq!(&r[..B], &[0u8; B][..], "block before the write is zero");
    assert_eq!(&r[B..2 * B], &pattern(1, B)[..]);
    assert_eq!(&r[2 * B..], &[0u8; B][..], "block after the write is zero");
    assert_eq!(e.chunk_info(C).unwrap().unwrap().mapped_blocks, 1);
    assert_eq!(e.chunks(), vec![C]);
}

/// Writes of every shape read back exactly: one block, many, the whole chunk, overwrites.
pub async fn write_read_round_trip<H: Harness>(h: &H) {
    let e = h.engine();
    e.write(C, 0, pattern(2, CHUNK_SIZE as usize))
        .await
        .unwrap();
    assert_eq!(
        e.read(C, 0, CHUNK_SIZE).await.unwrap(),
        pattern(2, CHUNK_SIZE as usize)
    );
    e.write(C, 100 * BLOCK_SIZE, pattern(3, 5 * B))
        .await
        .unwrap();
    let r = e.read(C, 99 * BLOCK_SIZE, 7 * BLOCK_SIZE).await.unwrap();
    let full = pattern(2, CHUNK_SIZE as usize);
    assert_eq!(&r[..B], &full[99 * B..100 * B]);
    assert_eq!(&r[B..6 * B], &pattern(3, 5 * B)[..]);
    assert_eq!(&r[6 * B..], &full[105 * B..106 * B]);
    let last = CHUNK_SIZE - BLOCK_SIZE;
    e.write(C, last, pattern(4, B)).await.unwrap();
    assert_eq!(e.read(C, last, BLOCK_SIZE).await.unwrap(), pattern(4, B));
    let other = ChunkId {
        volume: 7,
        index: 4,
    };
    e.write(other, 0, pattern(5, B)).await.unwrap();
    assert_eq!(e.read(other, 0, BLOCK_SIZE).await.unwrap(), pattern(5, B));
    assert_eq!(
        e.read(C, 0, BLOCK_SIZE).await.unwrap(),
        full.slice(0..B),
        "chunks are independent"
    );
    e.flush().await.unwrap();
}

/// Bad requests are refused with InvalidRequest and change nothing.
pub async fn invalid_requests_change_nothing<H: Harness>(h: &H) {
    let e = h.engine();
    e.write(C, 0, pattern(6, B)).await.unwrap();
    for (off, len) in [
        (1, BLOCK_SIZE),
        (0, 100),
        (0, 0),
        (CHUNK_SIZE, BLOCK_SIZE),
        (CHUNK_SIZE - BLOCK_SIZE, 2 * BLOCK_SIZE),
        (u64::MAX - 4095, BLOCK_SIZE),
    ] {
        assert!(
            matches!(
                e.read(C, off, len).await,
                Err(EngineError::InvalidRequest(_))
            ),
            "read {off}+{len}"
        );
        assert!(
            matches!(
                e.discard(C, off, len).await,
                Err(EngineError::InvalidRequest(_))
            ),
            "discard {off}+{len}"
        );
        let data = Bytes::from(vec![0xAB; len.min(1 << 20) as usize]);
        if len <= 1 << 20 {
            assert!(
                matches!(
                    e.write(C, off, data).await,
                    Err(EngineError::InvalidRequest(_))
                ),
                "write {off}+{len}"
            );
        }
    }
    assert_eq!(e.read(C, 0, BLOCK_SIZE).await.unwrap(), pattern(6, B));
    assert_eq!(e.chunk_info(C).unwrap().unwrap().mapped_blocks, 1);
}

/// Discard and write-zeroes unmap; a fully unmapped chunk gives its space back.
pub async fn discard_and_write_zeroes<H: Harness>(h: &H) {
    let e = h.engine();
    let free0 = e.stats().free_slots;
    e.write(C, 0, pattern(7, 16 * B)).await.unwrap();
    assert_eq!(e.stats().free_slots, free0 - 1);
    e.discard(C, 4 * BLOCK_SIZE, 4 * BLOCK_SIZE).await.unwrap();
    e.write_zeroes(C, 12 * BLOCK_SIZE, 2 * BLOCK_SIZE)
        .await
        .unwrap();
    let r = e.read(C, 0, 16 * BLOCK_SIZE).await.unwrap();
    let p = pattern(7, 16 * B);
    assert_eq!(&r[..4 * B], &p[..4 * B]);
    assert!(r[4 * B..8 * B].iter().all(|&b| b == 0));
    assert_eq!(&r[8 * B..12 * B], &p[8 * B..12 * B]);
    assert!(r[12 * B..14 * B].iter().all(|&b| b == 0));
    assert_eq!(e.chunk_info(C).unwrap().unwrap().mapped_blocks, 10);
    e.discard(C, 0, CHUNK_SIZE).await.unwrap();
    assert!(e.chunk_info(C).unwrap().is_none());
    assert_eq!(e.stats().free_slots, free0, "the slot is free again");
    assert!(e
        .read(C, 0, CHUNK_SIZE)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    e.discard(
        ChunkId {
            volume: 99,
            index: 0,
        },
        0,
        BLOCK_SIZE,
    )
    .await
    .unwrap();
}

/// A damaged block is reported as Corrupt naming chunk and block, counted, never returned;
/// other blocks stay readable, and rewriting the block heals it.
pub async fn corruption_is_reported<H: Harness>(h: &H) {
    let e = h.engine();
    e.write(C, 0, pattern(8, 4 * B)).await.unwrap();
    h.corrupt(C, 2).await;
    let before = e.stats().corrupt_reads;
    match e.read(C, 0, 4 * BLOCK_SIZE).await {
        Err(EngineError::Corrupt { chunk, block }) => assert_eq!((chunk, block), (C, 2)),
        other => panic!("corrupt block read as {other:?}"),
    }
    assert_eq!(e.stats().corrupt_reads, before + 1);
    assert_eq!(
        e.read(C, BLOCK_SIZE, BLOCK_SIZE).await.unwrap(),
        pattern(8, 4 * B).slice(B..2 * B)
    );
    e.write(C, 2 * BLOCK_SIZE, pattern(9, B)).await.unwrap();
    assert_eq!(
        e.read(C, 2 * BLOCK_SIZE, BLOCK_SIZE).await.unwrap(),
        pattern(9, B)
    );
}

/// A checked read returns the same bytes as a plain one, with the CRC32C of exactly those
/// bytes, whatever the read covers: a lone mapped block (whose stored checksum an engine may
/// hand back), an unmapped one, a partly mapped range, a block overwritten since; and a
/// corrupt block is reported, not answered with its old checksum.
pub async fn checked_reads_carry_their_checksum<H: Harness>(h: &H) {
    let e = h.engine();
    e.write(C, 4 * BLOCK_SIZE, pattern(10, 3 * B))
        .await
        .unwrap();
    e.write(C, 5 * BLOCK_SIZE, pattern(11, B)).await.unwrap();
    for (first, n) in [(4, 1), (5, 1), (6, 1), (9, 1), (3, 4), (4, 3), (0, 16)] {
        let (off, len) = (first * BLOCK_SIZE, n * BLOCK_SIZE);
        let (data, crc) = e.read_checked(C, off, len).await.unwrap();
        assert_eq!(
            data,
            e.read(C, off, len).await.unwrap(),
            "blocks {first}+{n}"
        );
        assert_eq!(crc, crc32c::crc32c(&data), "checksum of blocks {first}+{n}");
    }
    h.corrupt(C, 6).await;
    assert!(
        matches!(
            e.read_checked(C, 6 * BLOCK_SIZE, BLOCK_SIZE).await,
            Err(EngineError::Corrupt { block: 6, .. })
        ),
        "a corrupt block read with a checksum"
    );
    assert!(e.read_checked(C, 1, BLOCK_SIZE).await.is_err(), "unaligned");
}

/// Concurrent writes to one chunk (same and different blocks) and reads racing them: every
/// read sees, per block, one of the values written — never a mix, never a checksum error —
/// and the final state holds one of them.
pub async fn concurrent_writes_and_racing_reads<H: Harness>(h: Arc<H>) {
    let values: Vec<Bytes> = (0..4).map(|i| pattern(100 + i, 8 * B)).collect();
    h.engine().write(C, 0, values[0].clone()).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let (h, values) = (h.clone(), values.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..8usize {
                let v = &values[(w + round) % 4];
                h.engine().write(C, 0, v.clone()).await.unwrap();
                // A different block range, written by this writer alone.
                let own = (16 + w * 4) as u64 * BLOCK_SIZE;
                h.engine()
                    .write(C, own, pattern(200 + w as u64 * 8 + round as u64, B))
                    .await
                    .unwrap();
            }
        }));
    }
    for _ in 0..2 {
        let (h, values) = (h.clone(), values.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..16 {
                let r = h.engine().read(C, 0, 8 * BLOCK_SIZE).await.unwrap();
                for blk in 0..8 {
                    let got = &r[blk * B..(blk + 1) * B];
                    assert!(
                        values.iter().any(|v| &v[blk * B..(blk + 1) * B] == got),
                        "block {blk} holds a mix"
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = h.engine().read(C, 0, 8 * BLOCK_SIZE).await.unwrap();
    assert!(values.contains(&r), "the final value is one whole write");
    for w in 0..4u64 {
        let own = (16 + w * 4) * BLOCK_SIZE;
        assert_eq!(
            h.engine().read(C, own, BLOCK_SIZE).await.unwrap(),
            pattern(200 + w * 8 + 7, B)
        );
    }
}
