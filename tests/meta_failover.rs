//! The metadata service is off the I/O path (DESIGN.md §4, §6): with three metadata members,
//! killing the leader (SIGKILL) under a writer does not stop the volume's I/O; a new leader is
//! elected, the writer's lease renewals go to it, and every acknowledged write reads back.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::{AttachOptions, MetaClient, VolumeClient};
use common::UpCluster;

fn block(offset: u64, v: u64) -> Bytes {
    Bytes::from(
        (0..4096u64)
            .map(|i| (offset / 4096 + v * 7 + i) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[test]
fn killing_the_metadata_leader_does_not_stop_volume_io() {
    let c = UpCluster::start_with(&["--meta-replicas", "3"]);
    c.cairn(&["volume", "create", "mf", "--size", "64M"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vc = rt.block_on(async {
        VolumeClient::attach(
            MetaClient::new(&c.meta_addrs()).unwrap(),
            "mf",
            AttachOptions {
                holder: "failover-test".into(),
                force: false,
                host: "node-1".into(),
            },
        )
        .await
        .unwrap()
    });
    // Allocate the segment before the kill: a new segment needs the metadata service.
    rt.block_on(vc.write(0, block(0, 0))).unwrap();
    let acked: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (vc, acked, stop) = (vc.clone(), acked.clone(), stop.clone());
        rt.spawn(async move {
            let mut longest = Duration::ZERO;
            let mut v = 1;
            while !stop.load(Ordering::Relaxed) {
                let off = (v * 7919 % 4096) * 4096;
                let t = Instant::now();
                vc.write(off, block(off, v)).await?;
                longest = longest.max(t.elapsed());
                acked.lock().unwrap().insert(off, v);
                v += 1;
            }
            Ok::<_, cairn_client::VolumeError>((v - 1, longest))
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let status = || -> serde_json::Value {
        serde_json::from_slice(&c.cairn(&["status", "--json"]).stdout).unwrap()
    };
    let leader = status()["leader_id"].as_u64().unwrap();
    c.kill("meta", leader);
    let at_kill = acked.lock().unwrap().len();
    // Past a lease renewal (every 10 s with the default 30 s lease).
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        !writer.is_finished(),
        "the writer stopped: {:?}",
        rt.block_on(writer)
    );
    assert!(acked.lock().unwrap().len() > at_kill, "writes went on");
    let after = status();
    assert_ne!(
        after["leader_id"].as_u64(),
        Some(leader),
        "a new leader: {after}"
    );
    stop.store(true, Ordering::Relaxed);
    let (writes, longest) = rt.block_on(writer).unwrap().unwrap();
    println!("{writes} writes; longest {longest:?} across the leader kill");
    let acked = acked.lock().unwrap().clone();
    rt.block_on(async {
        for (off, v) in &acked {
            assert_eq!(vc.read(*off, 4096).await.unwrap(), block(*off, *v));
        }
        vc.detach().await.unwrap();
    });
}
