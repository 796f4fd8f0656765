//! Drives the disk engine with 4 KiB random I/O at a fixed queue depth and prints one JSON
//! line: IOPS, median and p99 latency, CPU µs per I/O. Used by `benches/engine/run`, which
//! runs fio on the same filesystem in the same run for comparison.
//!
//! cairn-engine-bench --file F --size BYTES --rw randwrite|randread --qd N --ops N [--io sync|uring]
//!   [--disk-size BYTES]
//!
//! `--size` is the working set; `--disk-size` (default 16 GiB, sparse) the disk it lives on,
//! which sets the size of the engine's log (1/128 of the disk) as on a real node's disk.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cairn_storage_node::engine::disk::DiskEngine;
use cairn_storage_node::engine::io::IoKind;
use cairn_storage_node::engine::{ChunkEngine, ChunkId, CHUNK_SIZE};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() -> anyhow::Result<()> {
    let file = arg("--file").ok_or_else(|| anyhow::anyhow!("--file is required"))?;
    let size: u64 = arg("--size")
        .unwrap_or_else(|| (256u64 << 20).to_string())
        .parse()?;
    let disk_size: u64 = arg("--disk-size")
        .unwrap_or_else(|| (16u64 << 30).to_string())
        .parse()?;
    let rw = arg("--rw").unwrap_or_else(|| "randwrite".into());
    let qd: usize = arg("--qd").unwrap_or_else(|| "1".into()).parse()?;
    let ops: usize = arg("--ops").unwrap_or_else(|| "20000".into()).parse()?;
    let kind = match arg("--io").as_deref() {
        Some("sync") => IoKind::Sync,
        _ => IoKind::Uring,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let path = std::path::Path::new(&file);
        let index = path.with_extension("index");
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir_all(&index);
        let chunks = size / CHUNK_SIZE;
        DiskEngine::create_file(path, disk_size.max(DiskEngine::file_size_for(chunks + 1)))?;
        let e = Arc::new(DiskEngine::open_with(path, &index, kind).await?);
        // Reads need data to read; writes go to allocated chunks as in steady state.
        for c in 0..chunks {
            e.write(ChunkId { volume: 1, index: c }, 0, Bytes::from(vec![0xA5u8; CHUNK_SIZE as usize])).await?;
        }
        // The fill's data leaves the device's cache before the clock starts.
        e.checkpoint().await?;
        let blocks = size / 4096;
        let data = Bytes::from(vec![0x5Au8; 4096]);
        let (log0, ckpt0) = (e.log_stats(), e.checkpoints());
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for q in 0..qd {
            let (e, data, rw) = (e.clone(), data.clone(), rw.clone());
            let n = ops / qd;
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n);
                let mut x = 0x9E3779B97F4A7C15u64 ^ (q as u64 + 1);
                for _ in 0..n {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = x % blocks;
                    let chunk = ChunkId { volume: 1, index: b / 1024 };
                    let off = (b % 1024) * 4096;
                    let t = Instant::now();
                    if rw == "randwrite" {
                        e.write(chunk, off, data.clone()).await?;
                    } else {
                        e.read(chunk, off, 4096).await?;
                    }
                    lat.push(t.elapsed().as_nanos() as u64);
                }
                anyhow::Ok(lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await??);
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        let (log1, ckpt1) = (e.log_stats(), e.checkpoints());
        let batches = (log1.batches - log0.batches).max(1);
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
        println!(
            "{{\"rw\":\"{rw}\",\"qd\":{qd},\"ops\":{},\"iops\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\"cpu_us_per_io\":{:.1},\"uring\":{},\"records_per_batch\":{:.1},\"checkpoints\":{}}}",
            lat.len(),
            lat.len() as f64 / wall,
            pct(0.5),
            pct(0.99),
            cpu * 1e6 / lat.len() as f64,
            e.uses_uring(),
            (log1.records - log0.records) as f64 / batches as f64,
            ckpt1 - ckpt0
        );
        drop(e);
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_dir_all(&index);
        anyhow::Ok(())
    })
}
