//! A writer of single 4 KiB blocks that runs while a test breaks the cluster, keeping what
//! every acknowledged write left, so the test can check each block afterwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::{VolumeClient, VolumeError};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// What a writer did: its acknowledged writes, and the slowest one.
#[derive(Debug)]
pub struct Writes {
    pub count: u64,
    pub longest: Duration,
}

pub struct BlockWriter {
    /// Offset → the version of the last acknowledged write there.
    acked: Arc<Mutex<HashMap<u64, u64>>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<Writes, VolumeError>>,
}

/// Offsets of 4 KiB blocks in the first `blocks` blocks, from a xorshift seeded with `seed`.
pub fn random_offsets(seed: u64, blocks: u64) -> impl FnMut(u64) -> u64 + Send + 'static {
    let mut x = seed;
    move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * 4096
    }
}

/// Offsets of 4 KiB blocks in the first `blocks` blocks, a prime stride apart: every block is
/// visited before any is written twice (for `blocks` not a multiple of 7919).
pub fn strided_offsets(blocks: u64) -> impl FnMut(u64) -> u64 + Send + 'static {
    move |v| (v * 7919 % blocks) * 4096
}

impl BlockWriter {
    /// Starts writing on `rt`: the v-th write (from 1) puts `block(offset, v)` at
    /// `next_offset(v)`, then waits `pause`. Stops at the first failed write.
    pub fn start(
        rt: &Runtime,
        vc: Arc<VolumeClient>,
        block: fn(u64, u64) -> Bytes,
        pause: Duration,
        mut next_offset: impl FnMut(u64) -> u64 + Send + 'static,
    ) -> Self {
        let acked: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (acked, stop) = (acked.clone(), stop.clone());
            rt.spawn(async move {
                let mut longest = Duration::ZERO;
                let mut v = 1;
                while !stop.load(Ordering::Relaxed) {
                    let off = next_offset(v);
                    let t = Instant::now();
                    vc.write(off, block(off, v)).await?;
                    longest = longest.max(t.elapsed());
                    acked.lock().unwrap().insert(off, v);
                    v += 1;
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                Ok(Writes {
                    count: v - 1,
                    longest,
                })
            })
        };
        Self { acked, stop, task }
    }

    /// How many blocks have an acknowledged write.
    pub fn blocks_written(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Offset → version of every acknowledged write so far.
    pub fn acked(&self) -> HashMap<u64, u64> {
        self.acked.lock().unwrap().clone()
    }

    /// Panics with the writer's error if it has stopped (`during` says when).
    pub fn assert_running(&mut self, rt: &Runtime, during: &str) {
        if self.task.is_finished() {
            panic!(
                "the writer stopped {during}: {:?}",
                rt.block_on(&mut self.task)
            );
        }
    }

    /// Whether the writer has stopped (a write failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the writer; panics if a write failed. Returns what it did and every
    /// acknowledged write.
    pub fn stop(self, rt: &Runtime) -> (Writes, HashMap<u64, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let writes = rt.block_on(self.task).unwrap().unwrap();
        let acked = self.acked.lock().unwrap().clone();
        (writes, acked)
    }
}

/// Checks through `vc` that each block of the volume's first `span` bytes holds
/// `block(offset, v)` for the version `v` its last acknowledged write left (0 where none), and
/// that the three replicas of that span are identical.
pub async fn check_acked(
    vc: &VolumeClient,
    span: u64,
    block: fn(u64, u64) -> Bytes,
    acked: &HashMap<u64, u64>,
) {
    for b in (0..span).step_by(4096) {
        let want = block(b, acked.get(&b).copied().unwrap_or(0));
        assert_eq!(vc.read(b, 4096).await.unwrap(), want, "block at {b}");
    }
    let nodes = vc.replica_nodes();
    assert_eq!(nodes.len(), 3);
    let mut copies = Vec::new();
    for n in nodes {
        copies.push(vc.read_replica(0, span, n).await.unwrap());
    }
    assert!(
        copies[0] == copies[1] && copies[1] == copies[2],
        "replicas differ"
    );
}
