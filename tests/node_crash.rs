//! Crash safety of a real `cairn node run` process: kill -9 it during a write storm, restart
//! it, and every acknowledged write reads back; a write in flight at the kill reads as its old
//! or its new value; nothing reads as corrupt or torn.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::data::client::DataClient;
use cairn_proto::data as pb;
use common::{free_ports, CAIRN};

const CHUNKS: u64 = 4;
const BLOCKS: u64 = 1024;
const WRITERS: u64 = 16;

fn spawn_node(dir: &std::path::Path, addr: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))
        .unwrap();
    Command::new(CAIRN)
        .args(["node", "run", "--data-dir"])
        .arg(dir.join("node"))
        .args(["--listen", addr, "--disk"])
        .arg(format!("{}:1G", dir.join("disk0.img").display()))
        .env_remove("CAIRN_META")
        .env("CAIRN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn connect(addr: &str) -> DataClient {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match DataClient::connect(addr).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "node did not come up: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The block's content for write number `seq` to block `b`: self-describing, so a read
/// tells which write it holds.
fn content(b: u64, seq: u64) -> Bytes {
    let mut v = vec![0u8; 4096];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, x) in v[16..].iter_mut().enumerate() {
        *x = (seq.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8;
    }
    Bytes::from(v)
}

fn req(op: pb::Op, block: u64, length: u64) -> pb::Request {
    pb::Request {
        op: op as i32,
        volume: 1,
        chunk: block / BLOCKS,
        offset: (block % BLOCKS) * 4096,
        length,
        generation: 1,
        group: 1,
        epoch: 1,
        ..Default::default()
    }
}

#[derive(Default)]
struct Ledger {
    acked: HashMap<u64, u64>,
    in_flight: HashMap<u64, u64>,
}

/// kill -9 during a write storm of 16 concurrent writers (DESIGN.md §5.1, process crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_write_storm() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let mut node = spawn_node(dir.path(), &addr);
    let client = Arc::new(connect(&addr).await);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let acks = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (client, ledger, acks) = (client.clone(), ledger.clone(), acks.clone());
        writers.push(tokio::spawn(async move {
            let mut x = w * 7919 + 1;
            for seq in 1.. {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let block = ((x >> 33) % (CHUNKS * BLOCKS / WRITERS)) * WRITERS + w;
                ledger.lock().unwrap().in_flight.insert(block, seq);
                match client
                    .call(req(pb::Op::Write, block, 4096), content(block, seq))
                    .await
                {
                    Ok((r, _)) if r.status == pb::Status::Ok as i32 => {
                        let mut l = ledger.lock().unwrap();
                        l.in_flight.remove(&block);
                        l.acked.insert(block, seq);
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((r, _)) => panic!("write refused: {r:?}"),
                    Err(_) => return, // the node is gone
                }
            }
        }));
    }
    while acks.load(Ordering::Relaxed) < 3000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.kill().unwrap(); // SIGKILL, writers still going
    node.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    println!(
        "{} writes acknowledged, {} in flight at the kill",
        acks.load(Ordering::Relaxed),
        ledger.in_flight.len()
    );

    let mut node = spawn_node(dir.path(), &addr);
    let client = connect(&addr).await;
    let mut checked = 0;
    for block in 0..CHUNKS * BLOCKS {
        let acked = ledger.acked.get(&block).copied();
        let flying = ledger.in_flight.get(&block).copied();
        if acked.is_none() && flying.is_none() {
            continue;
        }
        let (r, data) = client
            .call(req(pb::Op::Read, block, 4096), Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, pb::Status::Ok as i32, "block {block}: {r:?}");
        let seq = u64::from_le_bytes(data[8..16].try_into().unwrap());
        let ok = match (acked, flying) {
            (Some(a), None) => data == content(block, a),
            (Some(a), Some(f)) => data == content(block, a) || data == content(block, f),
            (None, Some(f)) => data.iter().all(|&b| b == 0) || data == content(block, f),
            (None, None) => unreachable!(),
        };
        assert!(
            ok,
            "block {block}: holds write {seq}, acked {acked:?}, in flight {flying:?}"
        );
        checked += 1;
    }
    println!("{checked} blocks verified after the restart");
    node.kill().unwrap();
    let _ = node.wait();
}
