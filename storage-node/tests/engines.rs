//! The conformance suite on every engine, and the disk engine's crash and corruption behaviour
//! on real files (O_DIRECT on the work filesystem, RocksDB).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::Bytes;
use cairn_storage_node::engine::conformance::{self, Harness};
use cairn_storage_node::engine::disk::DiskEngine;
use cairn_storage_node::engine::fault::{Domain, Fault, FaultEngine, FaultKind, FaultOp, Stage};
use cairn_storage_node::engine::io::IoKind;
use cairn_storage_node::engine::log::Record;
use cairn_storage_node::engine::mem::MemEngine;
use cairn_storage_node::engine::{ChunkEngine, ChunkId, EngineError, BLOCK_SIZE, CHUNK_SIZE};

struct Mem(MemEngine);

impl Harness for Mem {
    type E = MemEngine;
    fn engine(&self) -> &MemEngine {
        &self.0
    }
    async fn corrupt(&self, chunk: ChunkId, block: usize) {
        self.0.corrupt(chunk, block);
    }
}

struct Disk {
    engine: DiskEngine,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

fn flip_byte(path: &PathBuf, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

impl Harness for Disk {
    type E = DiskEngine;
    fn engine(&self) -> &DiskEngine {
        &self.engine
    }
    async fn corrupt(&self, chunk: ChunkId, block: usize) {
        // The in-place copy of a just-acknowledged write may still be on its way.
        self.engine.settle().await;
        let at = self
            .engine
            .disk_offset(chunk, block as u64 * BLOCK_SIZE)
            .unwrap()
            + 17;
        flip_byte(&self.path, at);
    }
}

/// A disk file in a temp dir on the work filesystem (not tmpfs: O_DIRECT and fdatasync must
/// be real), with room for `slots` chunks.
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(std::env::var("CAIRN_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .unwrap()
}

async fn open_disk(dir: &tempfile::TempDir, slots: u64) -> (DiskEngine, PathBuf) {
    open_disk_with(dir, slots, IoKind::Auto).await
}

async fn open_disk_with(
    dir: &tempfile::TempDir,
    slots: u64,
    kind: IoKind,
) -> (DiskEngine, PathBuf) {
    let path = dir.path().join("disk0");
    if !path.exists() {
        DiskEngine::create_file(&path, DiskEngine::file_size_for(slots)).unwrap();
    }
    let e = DiskEngine::open_with(&path, &dir.path().join("index0"), kind)
        .await
        .unwrap();
    (e, path)
}

async fn make_disk(kind: IoKind) -> Disk {
    let dir = disk_dir();
    let (engine, path) = open_disk_with(&dir, 16, kind).await;
    assert_eq!(engine.uses_uring(), kind == IoKind::Uring);
    Disk {
        engine,
        path,
        _dir: dir,
    }
}

/// The conformance suite on the in-memory engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_mem() {
    conformance::run_all(|| async { Mem(MemEngine::new(16)) }).await;
}

struct Faulty(FaultEngine<MemEngine>);

impl Harness for Faulty {
    type E = FaultEngine<MemEngine>;
    fn engine(&self) -> &Self::E {
        &self.0
    }
    async fn corrupt(&self, chunk: ChunkId, block: usize) {
        self.0.inner().corrupt(chunk, block);
    }
}

/// The fault-injecting wrapper with no fault installed is a faithful engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_fault_wrapper() {
    conformance::run_all(|| async { Faulty(FaultEngine::new(MemEngine::new(16))) }).await;
}

/// Faults by domain × operation × stage: EIO before (nothing written) and after (written,
/// error reported), ENOSPC, a torn write (a prefix lands), latency, a counted fault that
/// removes itself, and other chunks untouched throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults() {
    let dir = disk_dir();
    let (disk, _) = open_disk(&dir, 4).await;
    let e = FaultEngine::new(disk);
    let other = ChunkId {
        volume: 2,
        index: 0,
    };
    let fault = |op, stage, kind, times| Fault {
        domain: Domain::Volume(1),
        op,
        stage,
        kind,
        times,
    };
    let id = e.inject(fault(FaultOp::Write, Stage::Before, FaultKind::Eio, None));
    assert!(matches!(
        e.write(C, 0, Bytes::from(vec![1u8; 4096])).await,
        Err(EngineError::Io(_))
    ));
    assert!(
        e.read(C, 0, 4096).await.unwrap().iter().all(|&b| b == 0),
        "nothing landed"
    );
    e.write(other, 0, Bytes::from(vec![5u8; 4096]))
        .await
        .unwrap();
    e.remove(id);

    e.inject(fault(FaultOp::Write, Stage::After, FaultKind::Eio, Some(1)));
    assert!(e.write(C, 0, Bytes::from(vec![2u8; 4096])).await.is_err());
    assert_eq!(
        e.read(C, 0, 4096).await.unwrap(),
        Bytes::from(vec![2u8; 4096]),
        "landed despite the error"
    );
    e.write(C, 0, Bytes::from(vec![3u8; 4096])).await.unwrap(); // the counted fault is gone

    e.inject(fault(
        FaultOp::Write,
        Stage::Before,
        FaultKind::TornWrite,
        Some(1),
    ));
    assert!(e
        .write(C, 0, Bytes::from(vec![4u8; 4 * 4096]))
        .await
        .is_err());
    let r = e.read(C, 0, 4 * 4096).await.unwrap();
    assert_eq!(
        &r[..2 * 4096],
        &[4u8; 2 * 4096][..],
        "the first half landed"
    );
    assert!(r[2 * 4096..].iter().all(|&b| b == 0), "the rest did not");

    e.inject(fault(
        FaultOp::Read,
        Stage::Before,
        FaultKind::NoSpace,
        Some(1),
    ));
    assert!(matches!(
        e.read(C, 0, 4096).await,
        Err(EngineError::NoSpace)
    ));
    e.inject(fault(
        FaultOp::Any,
        Stage::Before,
        FaultKind::Latency(std::time::Duration::from_millis(50)),
        Some(1),
    ));
    let t = std::time::Instant::now();
    e.read(C, 0, 4096).await.unwrap();
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(50),
        "the latency was added"
    );
    assert_eq!(
        e.read(other, 0, 4096).await.unwrap(),
        Bytes::from(vec![5u8; 4096])
    );
    assert_eq!(e.fired(), 5);
}

/// The conformance suite on the disk engine over pread/pwrite (O_DIRECT on a real file,
/// RocksDB index).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_disk_sync() {
    conformance::run_all(|| make_disk(IoKind::Sync)).await;
}

/// The conformance suite on the disk engine over io_uring (registered buffers, O_DIRECT).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_disk_uring() {
    conformance::run_all(|| make_disk(IoKind::Uring)).await;
}

/// The failpoint that gives io_uring rings opened while it lives an hour-long backstop (see
/// `engine::uring`): an I/O someone waits for but the ring never reports then hangs its test
/// instead of finishing 5 ms late.
#[cfg(feature = "failpoints")]
struct HourBackstop;

#[cfg(feature = "failpoints")]
impl HourBackstop {
    fn set() -> Self {
        fail::cfg("uring-backstop-hour", "return").unwrap();
        Self
    }
}

#[cfg(feature = "failpoints")]
impl Drop for HourBackstop {
    fn drop(&mut self) {
        fail::remove("uring-backstop-hour");
    }
}

/// Bounds a wait that must end: a liveness check, not a timing one (far beyond any disk I/O
/// here, far below the hour-long backstop).
#[cfg(feature = "failpoints")]
async fn soon<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(60), f)
        .await
        .expect("never woken: an I/O waited on was not reported")
}

/// The conformance suite over io_uring on the current-thread runtime the daemons run by
/// default, where the ring defers its completion work and reports it only to those waiting.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn conformance_disk_uring_deferred() {
    let _hour = HourBackstop::set();
    soon(conformance::run_all(|| async {
        let d = make_disk(IoKind::Uring).await;
        assert!(d.engine.defers_completions());
        d
    }))
    .await;
}

/// On a deferred ring, whatever waits for a small write's in-place step (whose completion no
/// one is told of by default) is told when it lands: a write or a read of its blocks, a
/// discard of its chunk, a checkpoint, `settle`.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn waits_on_in_place_steps_end() {
    let _hour = HourBackstop::set();
    let dir = disk_dir();
    let (e, _) = open_disk_with(&dir, 4, IoKind::Uring).await;
    assert!(e.defers_completions());
    let block = |b: u8| Bytes::from(vec![b; BLOCK_SIZE as usize]);
    soon(e.write(C, 0, block(1))).await.unwrap();
    soon(e.write(C, 0, block(2))).await.unwrap();
    assert_eq!(soon(e.read(C, 0, BLOCK_SIZE)).await.unwrap(), block(2));
    soon(e.write(C, BLOCK_SIZE, block(3))).await.unwrap();
    soon(e.discard(C, 0, CHUNK_SIZE)).await.unwrap();
    soon(e.write(C, 0, block(4))).await.unwrap();
    soon(e.checkpoint()).await.unwrap();
    soon(e.write(C, 0, block(5))).await.unwrap();
    soon(e.settle()).await;
    assert_eq!(soon(e.read(C, 0, BLOCK_SIZE)).await.unwrap(), block(5));
}

/// Data written through one backend reads back through the other: same on-disk format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_share_the_format() {
    let dir = disk_dir();
    let data = Bytes::from(
        (0..(256 << 10))
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    {
        let (e, _) = open_disk_with(&dir, 2, IoKind::Uring).await;
        e.write(C, 64 << 10, data.clone()).await.unwrap();
    }
    let (e, _) = open_disk_with(&dir, 2, IoKind::Sync).await;
    assert_eq!(e.read(C, 64 << 10, 256 << 10).await.unwrap(), data);
}

const C: ChunkId = ChunkId {
    volume: 1,
    index: 0,
};

/// Durability across a restart: acknowledged writes and discards are there after reopening;
/// the superblock's uuid and the index agree; a full disk says NoSpace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_persists_and_fills() {
    let dir = disk_dir();
    let uuid;
    {
        let (e, _) = open_disk(&dir, 2).await;
        uuid = e.uuid();
        e.write(C, 0, Bytes::from(vec![1u8; 8192])).await.unwrap();
        e.write(
            ChunkId {
                volume: 1,
                index: 1,
            },
            4096,
            Bytes::from(vec![2u8; 4096]),
        )
        .await
        .unwrap();
        let third = e
            .write(
                ChunkId {
                    volume: 1,
                    index: 2,
                },
                0,
                Bytes::from(vec![3u8; 4096]),
            )
            .await;
        assert!(matches!(third, Err(EngineError::NoSpace)), "{third:?}");
        e.discard(C, 4096, 4096).await.unwrap();
    }
    let (e, _) = open_disk(&dir, 2).await;
    assert_eq!(e.uuid(), uuid);
    assert_eq!(
        &e.read(C, 0, 8192).await.unwrap()[..],
        &[vec![1u8; 4096], vec![0u8; 4096]].concat()[..]
    );
    assert_eq!(
        e.read(
            ChunkId {
                volume: 1,
                index: 1
            },
            4096,
            4096
        )
        .await
        .unwrap(),
        Bytes::from(vec![2u8; 4096])
    );
    assert_eq!(e.stats().free_slots, 0);
    assert_eq!(e.chunks().len(), 2);
}

/// A disk with a foreign or damaged superblock is refused, never reformatted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_superblock_refused() {
    let dir = disk_dir();
    let path = {
        let (e, path) = open_disk(&dir, 2).await;
        e.write(C, 0, Bytes::from(vec![1u8; 4096])).await.unwrap();
        path
    };
    flip_byte(&path, 30);
    let err = DiskEngine::open(&path, &dir.path().join("index0"))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("checksum") && err.contains("refusing"),
        "{err}"
    );
    let other = dir.path().join("garbage");
    std::fs::write(&other, vec![0x42u8; 8 << 20]).unwrap();
    let err = DiskEngine::open(&other, &dir.path().join("index1"))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a Cairn disk"), "{err}");
}

/// Corruption behind the engine's back is reported after a restart too (the checksums are
/// durable, not just in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_detected_after_restart() {
    let dir = disk_dir();
    {
        let (e, path) = open_disk(&dir, 2).await;
        e.write(C, 0, Bytes::from(vec![9u8; 3 * 4096]))
            .await
            .unwrap();
        // Checkpoint the write (until then a restart would repair the block from the log),
        // then damage it.
        e.checkpoint().await.unwrap();
        assert_eq!(e.log_used(), 0);
        flip_byte(&path, e.disk_offset(C, 4096).unwrap() + 100);
    };
    let (e, _) = open_disk(&dir, 2).await;
    assert!(matches!(
        e.read(C, 0, 3 * 4096).await,
        Err(EngineError::Corrupt { block: 1, .. })
    ));
    assert_eq!(e.stats().corrupt_reads, 1);
}

/// Crash recovery, each case built on disk exactly as a crash would leave it: an intent is in
/// the index, and the data of its write is (a) not written, (b) written, (c) half written (a
/// torn block). After reopening: (a) reads the old data, (b) the new, (c) reports `Torn` —
/// not `Corrupt`, not counted as corruption — and a rewrite heals it; the torn mark survives
/// another restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_from_interrupted_writes() {
    let dir = disk_dir();
    let old = vec![0x11u8; 3 * 4096];
    let new = vec![0x22u8; 3 * 4096];
    {
        let (e, _) = open_disk(&dir, 2).await;
        assert!(e.direct_io(), "the work filesystem takes O_DIRECT");
        e.write(C, 0, Bytes::from(old.clone())).await.unwrap();
    }
    // The reopen checkpoints that small write, so the crash below is the only one in the log.
    let (e, path) = open_disk(&dir, 2).await;
    assert_eq!(e.log_used(), 0);
    let base = e.disk_offset(C, 0).unwrap();
    // The crash: an intent to write `new` over blocks 0..3 is durable, and the data is in
    // three states.
    e.crash_after_log(Record::Intent {
        chunk: C,
        slot: 0,
        first_block: 0,
        crcs: new.chunks(4096).map(crc32c::crc32c).collect(),
    })
    .await
    .unwrap();
    drop(e);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // Block 0: untouched (old). Block 1: fully new. Block 2: torn, half new.
        f.write_all_at(&new[4096..8192], base + 4096).unwrap();
        f.write_all_at(&new[8192..8192 + 2048], base + 8192)
            .unwrap();
        f.sync_all().unwrap();
    }
    for restart in 0..2 {
        let (e, _) = open_disk(&dir, 2).await;
        assert_eq!(
            e.read(C, 0, 4096).await.unwrap(),
            Bytes::from(old[..4096].to_vec()),
            "restart {restart}"
        );
        assert_eq!(
            e.read(C, 4096, 4096).await.unwrap(),
            Bytes::from(new[..4096].to_vec())
        );
        assert!(matches!(
            e.read(C, 8192, 4096).await,
            Err(EngineError::Torn { block: 2, .. })
        ));
        assert_eq!(e.stats().corrupt_reads, 0, "a torn write is not corruption");
        assert_eq!(e.stats().torn_blocks, 1);
    }
    let (e, _) = open_disk(&dir, 2).await;
    e.write(C, 8192, Bytes::from(vec![0x33u8; 4096]))
        .await
        .unwrap();
    assert_eq!(
        e.read(C, 8192, 4096).await.unwrap(),
        Bytes::from(vec![0x33u8; 4096])
    );
    assert_eq!(e.stats().torn_blocks, 0);
    // Healed for good: the checkpoint takes the cleared mark to the index (the log it empties
    // no longer holds the rewrite).
    e.checkpoint().await.unwrap();
    drop(e);
    let (e, _) = open_disk(&dir, 2).await;
    assert_eq!(e.log_used(), 0);
    assert_eq!(
        e.read(C, 8192, 4096).await.unwrap(),
        Bytes::from(vec![0x33u8; 4096])
    );
    assert_eq!(e.stats().torn_blocks, 0);
}

/// An intent for a chunk that never got any data (crash right after step 1 of its first
/// write) leaves no chunk and no used slot behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_of_a_first_write_that_never_landed() {
    let dir = disk_dir();
    {
        let (e, _) = open_disk(&dir, 2).await;
        e.crash_after_log(Record::Intent {
            chunk: C,
            slot: 1,
            first_block: 5,
            crcs: vec![crc32c::crc32c(&[7u8; 4096])],
        })
        .await
        .unwrap();
    }
    let (e, _) = open_disk(&dir, 2).await;
    assert!(e.chunks().is_empty());
    assert_eq!(e.stats().free_slots, 2);
    assert!(e
        .read(C, 0, CHUNK_SIZE)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

/// Journaled small writes: the in-place copy of an acknowledged write that never reached the
/// disk (simulated by overwriting it with garbage while the engine is closed) is restored from
/// the journal at open; a block discarded after its journaled write stays discarded; a block
/// rewritten by a later write keeps the later data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_replay() {
    let dir = disk_dir();
    let (path, base) = {
        let (e, path) = open_disk(&dir, 2).await;
        e.write(C, 0, Bytes::from(vec![0x41u8; 4096]))
            .await
            .unwrap();
        e.write(C, 4096, Bytes::from(vec![0x42u8; 4096]))
            .await
            .unwrap();
        e.write(C, 8192, Bytes::from(vec![0x43u8; 4096]))
            .await
            .unwrap();
        e.discard(C, 4096, 4096).await.unwrap();
        e.write(C, 8192, Bytes::from(vec![0x44u8; 8192]))
            .await
            .unwrap();
        // The in-place copies have landed: the garbage below is not overwritten by them.
        e.settle().await;
        (path, e.disk_offset(C, 0).unwrap())
    };
    // The in-place copies are lost: garbage where the data should be.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xEEu8; 4 * 4096], base).unwrap();
    f.sync_all().unwrap();
    let (e, _) = open_disk(&dir, 2).await;
    let r = e.read(C, 0, 4 * 4096).await.unwrap();
    assert!(
        r[..4096].iter().all(|&b| b == 0x41),
        "restored from the journal"
    );
    assert!(r[4096..8192].iter().all(|&b| b == 0), "the discard holds");
    assert!(r[8192..].iter().all(|&b| b == 0x44), "the later write wins");
    assert_eq!(e.stats().corrupt_reads, 0);
    drop(e);
    // Replayed and retired: a second restart finds nothing to replay and the same data.
    let (e, _) = open_disk(&dir, 2).await;
    assert_eq!(e.read(C, 0, 4 * 4096).await.unwrap(), r);
}

/// The log's ring and checkpoints under load: four writers, each on its own chunk, mix small
/// (logged) and large (intent) writes and discards on a disk with the smallest log, so it
/// wraps and checkpoints many times; a reopen in the middle replays whatever the log held.
/// Every chunk reads back exactly as a model of the acknowledged operations says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_wraps_and_checkpoints() {
    let dir = disk_dir();
    let mut models: Vec<Vec<u8>> = vec![vec![0u8; CHUNK_SIZE as usize]; 4];
    for round in 0..2u64 {
        let (e, _) = open_disk(&dir, 8).await;
        let e = std::sync::Arc::new(e);
        let mut tasks = Vec::new();
        for (w, model) in models.into_iter().enumerate() {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                let mut model = model;
                let chunk = ChunkId {
                    volume: 9,
                    index: w as u64,
                };
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 * 7919 + round);
                let mut next = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                for i in 0..150 {
                    let r = next();
                    let blocks = [1, 2, 16, 40][(r % 4) as usize];
                    let first = next() % (1024 - blocks);
                    let (off, len) = (first * 4096, blocks * 4096);
                    let range = off as usize..(off + len) as usize;
                    if r % 7 == 0 {
                        e.discard(chunk, off, len).await.unwrap();
                        model[range].fill(0);
                    } else {
                        let data: Vec<u8> = (0..len).map(|b| (b ^ r ^ i) as u8).collect();
                        e.write(chunk, off, Bytes::from(data.clone()))
                            .await
                            .unwrap();
                        model[range].copy_from_slice(&data);
                    }
                }
                model
            }));
        }
        models = Vec::new();
        for t in tasks {
            models.push(t.await.unwrap());
        }
        for (w, model) in models.iter().enumerate() {
            let chunk = ChunkId {
                volume: 9,
                index: w as u64,
            };
            let got = e.read(chunk, 0, CHUNK_SIZE).await.unwrap();
            assert!(
                got[..] == model[..],
                "round {round}, chunk {w} before reopen"
            );
        }
        assert!(e.log_used() < 4 << 20);
    }
    let (e, _) = open_disk(&dir, 8).await;
    for (w, model) in models.iter().enumerate() {
        let chunk = ChunkId {
            volume: 9,
            index: w as u64,
        };
        let got = e.read(chunk, 0, CHUNK_SIZE).await.unwrap();
        assert!(got[..] == model[..], "chunk {w} after the last reopen");
    }
    assert_eq!(e.stats().corrupt_reads, 0);
}

/// The log's end: a batch whose payload was torn by the crash (one byte off) is not replayed —
/// its write was never acknowledged — and the same batch intact is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_log_batch_ignored() {
    use cairn_storage_node::format::LOG_OFFSET;
    for torn in [true, false] {
        let dir = disk_dir();
        let path = {
            let (e, path) = open_disk(&dir, 2).await;
            // A fresh disk: the log starts at the beginning of its region.
            e.crash_after_log(Record::write(C, 0, 3, Bytes::from(vec![0x5Au8; 8192])))
                .await
                .unwrap();
            path
        };
        if torn {
            flip_byte(&path, LOG_OFFSET + 4096 + 6000);
        }
        let (e, _) = open_disk(&dir, 2).await;
        let got = e.read(C, 3 * 4096, 8192).await.unwrap();
        let want = if torn { 0 } else { 0x5A };
        assert!(got.iter().all(|&b| b == want), "torn {torn}");
        assert_eq!(e.chunks().is_empty(), torn);
    }
}
